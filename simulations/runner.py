"""Run a CareFed study in Flower's simulation engine (Ray), in this process.

`flwr run .` goes through a local SuperLink; `carefed simulate` drives the same engine directly so it can validate
input first, choose the run folder, report progress and return a proper exit code. It uses the engine entry point
that Flower's own `flwr-simulation` process calls (`flwr.simulation.run_simulation._run_simulation`, pinned to
flwr 1.42.0); the public `run_simulation` wrapper cannot pass a run config to the ServerApp.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.data.site import check_partitions, load_site_data, load_source_for, resolve_partitioning
from server.exchange import STOP, RunInterrupted
from server.run_folder import STATUS_RUNNING, mark_failed, read_status, with_run_name

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SERVER_THREAD_GRACE = 60.0  # seconds for the ServerApp thread to leave the exchange it is in and record the failure

VALIDATED_SITES = 100  # beyond this, sites are built (and checked) when first sampled


def validate_inputs(config: RunConfig, *, check_sites: bool = True) -> None:
    """Fail fast, before any folder is created, on data or partitions that cannot work."""
    config = resolve_partitioning(config)
    check_partitions(config, load_source_for(config))
    check_site_policies(config)
    if check_sites:
        for site in range(min(config.num_sites, VALIDATED_SITES)):
            load_site_data(config, site)  # checks the site can keep a local test split


def check_site_policies(config: RunConfig) -> None:
    """The virtual sites' policies must parse, and at least one site must accept the study as configured: a study
    that every site would refuse (say, epsilon above the hard ceiling) stops here, before any run."""
    from client.policy_gate import accepting_policy
    from common.policy import PolicyRefusal, load_policy

    request = config.site_request(num_classes=2, channels=1, image_size=28)
    refusals = []
    for site in range(min(config.num_sites, VALIDATED_SITES)):
        policy = load_policy(Path(config.site_policy), site) if config.site_policy else accepting_policy(config)
        try:
            policy.check_study(request.study, request.privacy, request.secagg)
            return
        except PolicyRefusal as err:
            refusals.append(err)
    if refusals:
        raise refusals[0]


def gpu_share(gpus: int, cpus: int, num_cpus: float) -> float:
    """Auto GPU share per virtual site: the sites that run at once (one per `num_cpus` CPUs) split the GPUs."""
    if gpus == 0:
        return 0.0
    concurrent = max(1, int(cpus // num_cpus))
    return min(1.0, gpus / concurrent)


def resolve_resources(config: RunConfig) -> RunConfig:
    """client-num-gpus = -1 (auto) becomes a GPU share when this machine has GPUs, else 0."""
    if config.client_num_gpus != -1:
        return config
    import torch

    share = gpu_share(torch.cuda.device_count(), os.cpu_count() or 1, config.client_num_cpus)
    return config.replace(client_num_gpus=share)


def backend_config(config: RunConfig, ray_address: str | None = None) -> dict[str, Any]:
    init_args: dict[str, Any] = {}
    if ray_address:
        init_args["address"] = ray_address
    return {
        "client_resources": {"num_cpus": config.client_num_cpus, "num_gpus": config.client_num_gpus},
        "init_args": init_args,
    }


def run_simulation(config: RunConfig, *, ray_address: str | None = None, verbose: bool = False) -> Path:
    """Run the study; return its run folder. Raises what the ServerApp raised."""
    from flwr.app import Context, RecordDict
    from flwr.common.logger import log
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from client.app import app as client_app
    from server.app import app as server_app
    from simulations.dispatch import install

    install()  # the engine wakes on each message instead of polling every 0.1 s (simulations/dispatch.py)

    config = resolve_resources(resolve_partitioning(with_run_name(config)))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network calls from a hospital's machine
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=config.to_mapping())
    run_dir = Path(config.output_dir).expanduser().resolve() / config.run_name
    log(logging.INFO, "CareFed: %d sites, %d rounds, DP %s", config.num_sites, config.num_server_rounds,
        f"on (target epsilon {config.target_epsilon}, delta {config.target_delta})" if config.dp else "OFF")
    backend = backend_config(config, ray_address)
    try:
        RayBackend(backend)  # starts Ray (Flower's own code; the runtime reuses it), so that Ray's SIGTERM handler
        with _stopped_by_signals():  # is installed before ours, not after
            _run_simulation(
                num_supernodes=config.num_sites,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=client_app,
                server_app=server_app,
                backend_name="ray",
                backend_config=backend,
                server_app_context=context,
                verbose_logging=verbose,
            )
    except BaseException:
        if not STOP.is_set():
            raise
        _close_interrupted(run_dir, STOP.reason)
        raise RunInterrupted(f"the run was {STOP.reason}; run folder {run_dir} says so (status failed). Every "
                             "ledger entry written before it stopped is kept.") from None
    return run_dir


class _Signalled(BaseException):
    """Unwinds Flower's simulation runtime from the main thread (a BaseException, like KeyboardInterrupt, so the
    runtime's `except Exception` does not log it as a crash); its `finally` stops the Ray actors and Ray."""


@contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGTERM (a scheduler's timeout) or Ctrl-C: STOP ends every exchange of the ServerApp thread, and the main
    thread unwinds the runtime. A second signal gets the previous handler (it acts at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def stop(signum: int, _frame: object) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        STOP.set(f"interrupted by {signal.Signals(signum).name}")
        raise _Signalled(STOP.reason)

    STOP.clear()
    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _close_interrupted(run_dir: Path, reason: str) -> None:
    """Let the ServerApp thread record the failure, stop Ray if the runtime had not, and make sure the run folder
    says failed with the reason (the thread may not have reached its folder yet). The runtime's worker threads
    can stay blocked in `ray.get` on actors that died with the signal: the CLI ends its process without them."""
    import ray

    for thread in list(STOP.runs):
        thread.join(SERVER_THREAD_GRACE)
    if ray.is_initialized():
        ray.shutdown()
    if (run_dir / "status.json").exists() and read_status(run_dir)["state"] == STATUS_RUNNING:
        mark_failed(run_dir, reason)


def run_in_own_session(run_dir: Path, job: Callable[[], int]) -> int:
    """Run `job` (the study; it returns an exit code) in a forked child that leads a session of its own, and wait.

    A scheduler's timeout or a terminal's Ctrl-C signals a whole process group. In one, Ray's own processes (raylet,
    GCS, workers: the driver's children) die with the driver, and Ray's core worker can end the driver (exit code 1,
    nothing said) before the driver's Python handler runs: the run folder then said `running` forever. Here only
    this process is in the signalled group; it passes SIGTERM and SIGINT to the child, whose handler stops the run
    and then Ray, and if the child ends without closing its run (killed, out of memory, Ray's exit), this process
    records the run as failed, with how it ended, and ends what the child left in its group. Returns the child's
    exit code (128 + N when signal N ended it)."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setsid()
            _end_with(parent)
            code = job()
        except BaseException:  # noqa: BLE001 - said here: the child must never return into the caller's code
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    return _wait_for_run(pid, run_dir)


def _end_with(parent: int) -> None:
    """SIGTERM this process (a clean stop) when the supervising process dies (Linux; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def _wait_for_run(pid: int, run_dir: Path) -> int:
    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        _, status = os.waitpid(pid, 0)  # retried after each forwarded signal (PEP 475)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    with contextlib.suppress(ProcessLookupError):  # what the study left in its session's group (Ray's agents
        os.killpg(pid, signal.SIGKILL)  # outlive a killed driver)
    code = os.waitstatus_to_exitcode(status)
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    code = 128 - code if code < 0 else code
    if (run_dir / "status.json").exists() and read_status(run_dir)["state"] == STATUS_RUNNING:
        mark_failed(run_dir, f"the simulation process ended ({how}) before it closed the run")
        from simulations.terminal import fail

        fail(code or 1, f"the simulation process ended ({how}) before it closed the run; run folder {run_dir} "
                        "says so (status failed). Every ledger entry written before it ended is kept.")
        return code or 1
    return code
