"""A real deployment on one machine: a SuperLink with TLS and node authentication, one SuperNode per hospital.

    python -m simulations.loopback --sites 3 --rounds 2 --work /tmp/carefed-loopback

What it runs is what a study runs, with the same commands the docker/ files use, only on 127.0.0.1:
1. `carefed certs` (in-process): study CA, SuperLink certificate for localhost/127.0.0.1, a node key per site;
2. each site's images written as files (`<site>/<label>/p<patient>_<n>.png`, from the embedded data);
3. `flower-superlink --ssl-* --enable-supernode-auth` (TLS on the Fleet/Control/runtime HTTP API);
4. `flwr supernode register <site>/node.pub` for every site (Flower 1.42's node authentication);
5. `carefed-supernode` (flower-supernode's arguments: `--root-certificates --auth-supernode-private-key --node-config
   "site-id=.. data=.. state-dir=.."`), a SuperNode whose ClientApp tasks run the site's own CareFed;
6. `flwr run <app> <connection> --run-config ...`, polled with `flwr list --run-id` until it finishes;
7. every process group is stopped (SIGTERM, then SIGKILL) and checked gone.
`--capture` runs each SuperNode (still with CareFed's SuperExec) under tests/capture_supernode.py, which records
every request the SuperNode sends to the SuperLink (the Fleet API's protobuf bytes, before TLS) so a test can
inspect what left each site.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from common.config import PROJECT_ROOT, resolve
from common.deploy.certs import StudyPaths, make_study
from common.deploy.demo_data import write_site_folders
from common.policy import SitePolicy, policy_text

CONNECTION = "carefed-study"
SUPEREXEC_TASK_POLL_INTERVAL = "0.1"  # seconds; Flower's default is 1 s (as docker/*.Dockerfile set it)
CAPTURE_WRAPPER = PROJECT_ROOT / "tests" / "capture_supernode.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LoopbackDeployment:
    work: Path
    sites: list[str]
    capture: bool = False
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    _descendants: set[psutil.Process] = field(default_factory=set)
    _control: object | None = field(default=None, repr=False)  # the Control API client, made at first use

    @property
    def study(self) -> StudyPaths:
        return StudyPaths(self.work / "study")

    def env(self, home: str) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)
        return {**os.environ, "FLWR_HOME": str(self.work / "homes" / home), "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": SUPEREXEC_TASK_POLL_INTERVAL,
                "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([_tool("flwr"), *args], env=self.env("coordinator"), capture_output=True, text=True,
                              timeout=timeout, cwd=self.work)

    def flwr_json(self, *args: str, timeout: float = 120) -> tuple[dict | None, str]:
        """`flwr <args> --format json`: (the parsed reply or None when it failed, what it printed).

        The flwr CLI exits 0 even when it cannot reach the SuperLink; only the reply's "success" says so."""
        done = self.flwr(*args, "--format", "json", timeout=timeout)
        printed = f"{done.stdout[-2000:]} {done.stderr[-2000:]}"
        start = done.stdout.find("{")
        if done.returncode != 0 or start < 0:
            return None, printed
        try:
            reply = json.loads(done.stdout[start:])
        except json.JSONDecodeError:
            return None, printed
        return (reply if reply.get("success", True) is not False else None), printed

    def prepare(self, *, data: bool = True) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        make_study(self.study.root, sites=self.sites, hosts=["localhost", "127.0.0.1"])
        if data:
            write_site_folders(resolve(), self.work / "data", self.sites)
        self.write_policies()
        home = self.work / "homes" / "coordinator"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.study.root / "superlink" / "ca.crt"}"\n')

    def policy_path(self, site: str) -> Path:
        return self.work / "policies" / f"{site}.toml"

    def write_policies(self, studies: tuple[str, ...] = ("carefed-demo",), **limits: object) -> None:
        """Each hospital's own policy file, as `carefed site policy init` writes it (existing files are kept)."""
        for site in self.sites:
            path = self.policy_path(site)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(policy_text(SitePolicy(studies=studies, **limits), path))

    def superlink_command(self) -> list[str]:
        """The coordinator's SuperLink: TLS on its HTTP API, SuperNode authentication, no runtime pip installs."""
        s = self.study
        return [_tool("flower-superlink"), "--ssl-ca-certfile", str(s.root / "superlink" / "ca.crt"),
                "--ssl-certfile", str(s.server_cert), "--ssl-keyfile", str(s.server_key), "--enable-supernode-auth",
                "--host", "127.0.0.1", "--port", str(self.port), "--database", str(self.work / "superlink.db"),
                "--disable-runtime-dependency-installation"]

    def start_superlink(self) -> None:
        self._spawn("superlink", self.superlink_command(), home="superlink")
        self.wait_until(lambda: self._control_call("ListNodes") is not None, "the SuperLink to answer", 90)

    def register(self, site: str) -> None:
        args = ("supernode", "register", str(self.study.site(site) / "node.pub"), CONNECTION, "--name", site)
        registered, printed = self.flwr_json(*args)
        if registered is None:
            raise RuntimeError(f"registering {site} failed: {printed}")

    def supernode_command(self, site: str, index: int, *, key: Path | None = None, ca: Path | None = None,
                          insecure: bool = False, name: str | None = None, identity: Path | None = None,
                          superlink_port: int | None = None, max_retries: int | None = 3) -> list[str]:
        """A hospital's SuperNode: the study CA, its own node key, its images, state folder, policy and identity
        (for secure aggregation) in node config; `superlink_port` reaches the SuperLink another way (a proxy).
        `max_retries=None` keeps trying to connect and activate, as the docker/ SuperNodes do."""
        folder = self.study.site(site)
        state = self.work / "state" / (name or site)
        node_config = (f'site-id={index} data="{self.work / "data" / site}" state-dir="{state}" '
                       f'policy="{self.policy_path(site)}" identity="{identity or folder}"')
        command = [_tool("carefed-supernode"), "--superlink", f"127.0.0.1:{superlink_port or self.port}",
                   "--node-config", node_config,
                   "--host", "127.0.0.1", "--port", str(free_port())]
        if max_retries is not None:
            command += ["--max-retries", str(max_retries)]
        if insecure:
            return [*command, "--insecure"]
        return [*command, "--root-certificates", str(ca or folder / "ca.crt"),
                "--auth-supernode-private-key", str(key or folder / "node.key")]

    def start_supernode(self, site: str, index: int, *, key: Path | None = None, ca: Path | None = None,
                        insecure: bool = False, name: str | None = None, identity: Path | None = None,
                        superlink_port: int | None = None, max_retries: int | None = 3) -> str:
        name = name or site
        command = self.supernode_command(site, index, key=key, ca=ca, insecure=insecure, name=name,
                                         identity=identity, superlink_port=superlink_port, max_retries=max_retries)
        env_extra = {}
        if self.capture:
            command = [sys.executable, str(CAPTURE_WRAPPER), *command[1:]]
            env_extra["CAREFED_CAPTURE"] = str(self.work / "capture" / f"{name}.bin")
            (self.work / "capture").mkdir(parents=True, exist_ok=True)
        self._spawn(f"supernode-{name}", command, home=f"supernode-{name}", extra=env_extra)
        return name

    def start_federation(self, superlink_ports: dict[str, int] | None = None) -> None:
        """Keys, data, the SuperLink, and every site registered and online: ready for `run`. `superlink_ports`:
        sites that reach the SuperLink through another port (a proxy); they never stop retrying."""
        self.prepare()
        self.start_superlink()
        ports = superlink_ports or {}
        for index, site in enumerate(self.sites):
            self.register(site)
            self.start_supernode(site, index, superlink_port=ports.get(site),
                                 max_retries=None if site in ports else 3)
        self.wait_online(len(self.sites))

    def restart_supernode(self, site: str, index: int, *, given_up: bool = True, log_from: int | None = None,
                          cancelled: Callable[[], bool] = lambda: False, timeout: float = 180) -> None:
        """Docker's restart policy for one site: start its SuperNode again (at once if `given_up`, else only once
        the running one exits) and again whenever it exits, until it is active: Flower 1.42's SuperLink refuses to
        activate a node it still counts online (until two heartbeats are missed) and the SuperNode then exits
        (code 305). A SuperNode still running is done once it reconnects ("Connection successful" in its log past
        `log_from`, the log's length when its link broke) instead."""
        name = f"supernode-{site}"
        seen = len(self.log(name)) if log_from is None else log_from
        activations = self.log(name)[:seen].count("SuperNode ID:")
        if given_up:
            self.start_supernode(site, index)

        def active() -> bool:
            written = self.log(name)
            if written.count("SuperNode ID:") > activations or cancelled():
                return True
            if self.processes[name].poll() is not None:  # gave up or refused, and exited: start it again
                self.start_supernode(site, index)
                return False
            return "Connection successful" in written[seen:]

        self.wait_until(active, f"{site} to be active again", timeout, interval=0.5)

    def online_nodes(self) -> int:
        nodes = self._control_call("ListNodes")
        return 0 if nodes is None else sum(1 for n in nodes.nodes_info if n.status == "online")

    def wait_online(self, count: int, timeout: float = 90) -> None:
        self.wait_until(lambda: self.online_nodes() >= count, f"{count} SuperNodes online", timeout)

    def run(self, run_config: dict[str, object], timeout: float = 900, app: Path = PROJECT_ROOT) -> tuple[str, str]:
        """Start the app on the federation; wait until it finishes. Returns (run id, final status)."""
        run_id = self.start_run(run_config, app)
        return run_id, self.wait_finished(run_id, timeout)

    def start_run(self, run_config: dict[str, object], app: Path = PROJECT_ROOT) -> str:
        """`flwr run` the app (CareFed, unless a test ships another) with this run config; returns the run id."""
        pairs = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else _toml(v)}" for k, v in run_config.items())
        started, printed = self.flwr_json("run", str(app), CONNECTION, "--run-config", pairs, timeout=300)
        if started is None:
            raise RuntimeError(f"flwr run failed: {printed}")
        return str(started["run-id"])

    def wait_finished(self, run_id: str, timeout: float = 900) -> str:
        """Poll `flwr list` until the run's status is finished:*; returns that status."""
        status = ""

        def finished() -> bool:
            nonlocal status
            listed = self._control_call("ListRuns", run_id=int(run_id))
            if listed is not None and int(run_id) in listed.run_dict:
                found = listed.run_dict[int(run_id)].status
                status = f"{found.status}:{found.sub_status}" if found.sub_status else found.status
            return status.startswith("finished")

        self.wait_until(finished, f"run {run_id} to finish", timeout, interval=1)
        return status

    def _control_call(self, method: str, **request: object):
        """One call to the SuperLink's Control API over TLS with the study's CA, what `flwr list` and `flwr
        supernode list` send, made from this process: each `flwr` command costs 2-3 s of CPU to start (measured on
        two cores), and polling with it every few seconds took a core's half from the deployment it watched.
        None when the SuperLink does not answer."""
        from flwr.cli.auth_plugin.noop_auth_plugin import NoOpCliAuthPlugin
        from flwr.cli.cli_account_auth_interceptor import CliAccountAuthHttpInterceptor
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.proto import control_pb2
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        if self._control is None:
            address = f"127.0.0.1:{self.port}"
            auth = NoOpCliAuthPlugin(address)
            self._control = ControlHttpClient.from_server_address(
                address, insecure=False, root_certificates=(self.study.root / "superlink" / "ca.crt").read_bytes(),
                interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
                              CliAccountAuthHttpInterceptor(auth, lambda _: None)])
        try:
            return getattr(self._control, method)(getattr(control_pb2, f"{method}Request")(**request))
        except Exception:  # noqa: BLE001 - not up yet, restarting, or gone: the caller polls again, afresh
            with contextlib.suppress(Exception):
                self._control.close()
            self._control = None
            return None

    def log(self, name: str) -> str:
        path = self.work / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str | None = None, grace: float = 20) -> None:
        """SIGTERM each process group, SIGKILL whatever of it (and of its descendants) is left after `grace` s.
        The SuperNodes go first and the SuperLink last, as a study is shut down (each can still deactivate its node
        on the way out); this harness's Control API client is closed before the SuperLink stops: its keep-alive
        connection held the SuperLink's graceful shutdown until `grace` ran out (measured: 22 s, then SIGKILL)."""
        if name in (None, "superlink") and self._control is not None:
            self._control.close()  # an open keep-alive connection holds the SuperLink's graceful shutdown
            self._control = None
        if name is not None:
            self._stop([name], grace)
            return
        self._stop([n for n in self.processes if n != "superlink"], grace)
        self._stop([n for n in self.processes if n == "superlink"], grace)

    def _stop(self, names: list[str], grace: float) -> None:
        for n in names:
            with contextlib.suppress(psutil.Error):
                self._descendants.update(psutil.Process(self.processes[n].pid).children(recursive=True))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.processes[n].pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for n in names:
            process = self.processes[n]
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for child in list(self._descendants):
            with contextlib.suppress(psutil.Error):
                child.kill()
        # SIGKILL is not instant: wait until they are gone (or zombies), so a check right after sees none alive
        psutil.wait_procs(list(self._descendants), timeout=10)

    def crash(self, name: str) -> None:
        """SIGKILL a process and everything it started, as a power cut or the OOM killer would: no handler runs."""
        process = self.processes[name]
        with contextlib.suppress(psutil.Error):
            self._descendants.update(psutil.Process(process.pid).children(recursive=True))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def leftover_processes(self) -> list[str]:
        """Processes this deployment started (or they started) that are still alive; zombies excluded."""
        groups = {p.pid for p in self.processes.values()}
        alive = []
        for proc in psutil.process_iter(["pid", "name", "status"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                ours = proc in self._descendants or os.getpgid(proc.pid) in groups
                if ours and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(f"{proc.pid} {proc.info['name']}")
        return alive

    def _spawn(self, name: str, command: list[str], *, home: str, extra: dict[str, str] | None = None) -> None:
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        (self.work / "homes" / home).mkdir(parents=True, exist_ok=True)
        log = (self.work / "logs" / f"{name}.log").open("ab")  # a restarted process keeps its earlier log
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.work,
                                                env={**self.env(home), **(extra or {})}, start_new_session=True)

    def wait_until(self, check, what: str, timeout: float, interval: float = 1.0) -> None:
        """Poll `check` until it holds; fail with `what` after `timeout` s, or at once if the SuperLink died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            for n, p in self.processes.items():
                if n == "superlink" and p.poll() is not None:
                    raise RuntimeError(f"the SuperLink exited ({p.returncode}):\n{self.log('superlink')[-3000:]}")
            time.sleep(interval)
        raise TimeoutError(f"waited {timeout:.0f} s for {what}")

    def __enter__(self) -> LoopbackDeployment:
        # a SIGTERM (timeout, Ctrl-C from a parent) must still stop every process this deployment started
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def _toml(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, required=True, help="An empty folder for keys, data, state, logs.")
    args = parser.parse_args()
    if args.work.exists() and any(args.work.iterdir()):
        parser.error(f"{args.work} is not empty")
    names = [f"site-{k}" for k in range(args.sites)]
    with LoopbackDeployment(args.work, names) as deployment:
        deployment.start_federation()
        run_id, status = deployment.run({"num-sites": len(names), "num-server-rounds": args.rounds,
                                         "output-dir": str(args.work / "runs"), "run-name": "loopback"})
    print(json.dumps({"run-id": run_id, "status": status, "run-dir": str(args.work / "runs" / "loopback")}))


if __name__ == "__main__":
    main()
