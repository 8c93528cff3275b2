"""carefed-supernode and CareFed's SuperExec (client/supernode.py, client/launcher.py), the parts that can be
checked without a SuperNode; the loopback deployment tests run them for real, including a coordinator's own app."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import LaunchResultStatus

from client.launcher import ForkingExecutor, _site_app_loader
from client.supernode import SupernodeArgumentError, prepare, runtime_api_address


@pytest.mark.parametrize("arg", ["--isolation", "--isolation=subprocess", "--superexec-auth-secret-file=/tmp/s"])
def test_a_site_cannot_choose_flowers_isolation_or_secret_itself(arg: str):
    with pytest.raises(SupernodeArgumentError, match="set by carefed-supernode"):
        prepare(["--superlink", "127.0.0.1:9092", arg, "x"])


def test_the_superexec_reaches_the_runtime_api_on_this_machine():
    assert runtime_api_address([]) == "127.0.0.1:9094"
    assert runtime_api_address(["--host", "0.0.0.0", "--port", "9100"]) == "127.0.0.1:9100"
    assert runtime_api_address(["--host=10.0.0.5", "--port=9101"]) == "10.0.0.5:9101"


@pytest.mark.parametrize("task_type", [t for t in TaskType if t != TaskType.CLIENT_APP])
def test_only_clientapp_tasks_are_run(task_type: TaskType, tmp_path):
    executor = ForkingExecutor(tmp_path / "secret")
    assert executor.get_eligible_capacity(set(TaskType))[0] == {TaskType.CLIENT_APP}
    result = executor.launch(SimpleNamespace(task_type=task_type))
    assert result.status == LaunchResultStatus.FAILED and "ClientApp tasks only" in result.message
    assert not executor.children


def test_whatever_app_the_run_names_the_site_runs_its_own():
    from client.app import app

    load = _site_app_loader("", None, True)
    assert load("coordinator/anything", "9.9.9", "f" * 64) is app


def test_the_supernode_asks_again_soon_after_a_message_and_backs_off_to_flowers_3_s(monkeypatch):
    from client import supernode

    waits, clock = [], [100.0]
    monkeypatch.setattr(supernode.time, "sleep", lambda s: (waits.append(s), clock.__setitem__(0, clock[0] + s)))
    monkeypatch.setattr(supernode.time, "monotonic", lambda: clock[0])
    polls = supernode._Polls()
    for _ in range(11):
        polls.sleep(supernode.IDLE_POLL)  # the SuperLink had nothing: Flower would wait 3 s each time
    polls.sleep(supernode.REPLY_POLL)
    polls.sleep(1.25)  # any other wait is Flower's own
    idle = [0.1, 0.15, 0.225, 0.3375, 0.50625, 0.759375, 1.1390625, 1.70859375, 2.562890625, 3.0, 3.0]
    assert waits == pytest.approx([*idle, 0.05, 1.25])
    waits.clear()
    polls.reply_sent()  # within a round: the next stage comes soon, so it asks at least every 0.5 s for 10 s
    while not waits or waits[-1] < supernode.IDLE_POLL:
        polls.sleep(supernode.IDLE_POLL)
    assert waits[:6] == pytest.approx([0.1, 0.15, 0.225, 0.3375, 0.5, 0.5])
    in_round = [w for w, t in zip(waits, itertools.accumulate(waits), strict=True) if t <= 10.0]
    assert max(in_round) == 0.5 and len(in_round) > 15
    assert waits[len(in_round) + 1:] == pytest.approx([0.75, 1.125, 1.6875, 2.53125, 3.0])  # then Flower's 3 s
    assert polls.monotonic is supernode.time.monotonic  # the rest of the module is the real one


def test_a_supernode_that_starts_exiting_ends_even_if_an_exit_handler_hangs():
    """Flower's SuperNode, giving up on a lossy link, hung in an exit handler that retried the dead link; its
    force-exit timer starts only after those handlers, so nothing ended the process."""
    script = ("import time\\n"
              "from client.supernode import exit_within\\n"
              "from flwr.supercore.exit import ExitCode, add_exit_handler, flwr_exit\\n"
              "exit_within(1.0)\\n"
              "add_exit_handler(lambda: time.sleep(600), run_before_force_exit=True)\\n"
              "flwr_exit(ExitCode.SUCCESS)\\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    assert done.returncode == 1, done.stderr[-2000:]  # ended by the grace timer, not by Flower's own exit



@contextlib.contextmanager
def _active_supernode(tmp_path: Path):
    """A real `flower-superlink` (without TLS: only the SuperNode process's end is checked here; the loopback
    deployment tests run the same over TLS) and a real `carefed-supernode` (--max-retries 1) that it activated."""
    from simulations.loopback import free_port

    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HOME": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    port, log = free_port(), tmp_path / "supernode.log"
    superlink = subprocess.Popen(["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
                                  "--database", str(tmp_path / "superlink.db")], env=env, cwd=tmp_path,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    supernode = None
    try:
        deadline = time.monotonic() + 90
        while not _listening(port):  # the SuperNode gives up at once on a SuperLink not up yet
            assert superlink.poll() is None and time.monotonic() < deadline, "the SuperLink did not start"
            time.sleep(0.2)  # the poll interval of a wait with a deadline
        supernode = subprocess.Popen(["carefed-supernode", "--insecure", "--max-retries", "1", "--superlink",
                                      f"127.0.0.1:{port}", "--host", "127.0.0.1", "--port", str(free_port()),
                                      "--node-config", f'site-id=0 state-dir="{tmp_path}"'], env=env, cwd=tmp_path,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        while "SuperNode ID:" not in log.read_text() and time.monotonic() < deadline:
            assert supernode.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        assert "SuperNode ID:" in log.read_text(), log.read_text()[-3000:]
        yield superlink, supernode, log
    finally:
        for process in (superlink, supernode):
            if process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_a_supernode_that_gives_up_on_the_superlink_exits_so_a_restart_policy_can_revive_it(tmp_path):
    """Flower 1.42's SuperNode, out of --max-retries after its SuperLink died, returned from its loop but never
    exited: its Runtime API server thread kept the process alive (CI: two sites hung after a SuperLink restart,
    and nothing revived them)."""
    with _active_supernode(tmp_path) as (superlink, supernode, log):
        superlink.kill()
        # 305 from Flower's exit, or 1 when its exit handlers (retrying the dead link) outlast the 15 s grace
        assert supernode.wait(timeout=90) in (305, 1), log.read_text()[-3000:]
        assert "the SuperNode stopped" in log.read_text()


def test_a_supernode_whose_superexec_dies_stops_instead_of_looking_online(tmp_path):
    """Without CareFed's SuperExec no task can run; the SuperNode's heartbeats would go on, every round would wait
    for the site until round-timeout, and no restart policy would revive it."""
    import psutil

    with _active_supernode(tmp_path) as (superlink, supernode, log):
        children = psutil.Process(supernode.pid).children()
        launchers = [c for c in children if "client.launcher" in " ".join(c.cmdline())]
        assert len(launchers) == 1, [c.cmdline() for c in children]
        launchers[0].kill()
        # stopped as SIGTERM stops it (Flower deactivates the node), with exit code 1, not Flower's graceful 0
        assert supernode.wait(timeout=90) == 1, log.read_text()[-3000:]
        assert "SuperNode terminated gracefully" in log.read_text()
        assert "CareFed's SuperExec (client.launcher) exited with code -9" in log.read_text()
        assert superlink.poll() is None  # the SuperNode stopped, not its SuperLink


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def test_objects_still_uploading_are_asked_for_again_within_tens_of_milliseconds(monkeypatch):
    """Flower's own pull waits 1 s after an object is unavailable; the pulls of all three sides (common.
    object_pulls) retry after 20 ms. Run for real: Flower's `pull_objects` with an object that arrives on the
    third ask."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_object import get_object_id
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError
    from flwr.superlink.grid import http_grid

    from common import object_pulls

    content, asks = b"an object", []
    object_id = get_object_id(content)

    def pull(requested: str) -> bytes:
        asks.append(time.monotonic())
        if len(asks) < 3:
            raise ObjectUnavailableError(requested)
        return content

    started = time.monotonic()
    assert object_pulls.soon(inflatable_utils.pull_objects)([object_id], pull) == {object_id: content}
    assert len(asks) == 3 and time.monotonic() - started < 0.5  # Flower's schedule: 1 s, then 2 s more
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # restored after the test
    object_pulls.pace_server_pulls()
    object_pulls.pace_server_pulls()  # once is enough, and twice changes nothing
    assert http_grid.pull_objects.func is inflatable_utils.pull_objects
    assert http_grid.pull_objects.keywords["initial_backoff"] == object_pulls.FIRST_WAIT


REAPING = """
import json, os, sys, time
import psutil
from pathlib import Path
from client.launcher import ForkingExecutor, _adopt_orphans

_adopt_orphans()
task = os.fork()
if task == 0:  # a task process: it forks its after-reply worker, then ends at once
    if os.fork() == 0:
        time.sleep(1.0)
        os._exit(0)
    os._exit(0)
executor = ForkingExecutor(Path(sys.argv[1]))
executor.children.add(task)
time.sleep(0.5)
me = psutil.Process()
adopted = [c.pid for c in me.children() if c.pid != task]
deadline = time.monotonic() + 10
while me.children() and time.monotonic() < deadline:
    executor.reconcile()
    time.sleep(0.05)
print(json.dumps({"adopted": len(adopted), "left": len(me.children()), "tracked": len(executor.children)}))
"""


def test_the_superexec_reaps_the_workers_its_tasks_leave_behind(tmp_path):
    """A task's after-reply worker outlives the task: the SuperExec adopts it (subreaper) and reaps it, so none is
    left a zombie under a container's PID 1 that never reaps."""
    import json

    out = subprocess.run([sys.executable, "-c", REAPING, str(tmp_path / "secret")], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == {"adopted": 1, "left": 0, "tracked": 0}
