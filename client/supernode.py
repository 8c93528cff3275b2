"""`carefed-supernode`: a hospital's SuperNode that runs only the site's own CareFed.

    carefed-supernode --superlink HOST:9092 --root-certificates ca.crt --auth-supernode-private-key node.key \
        --node-config 'site-id=0 data="..." state-dir="..." policy="..." identity="..."'

Takes `flower-supernode`'s arguments and runs that SuperNode, in Flower's `process` isolation, with CareFed's
SuperExec (client/launcher.py) beside it: every ClientApp task runs the CareFed installed at the site, never the
app the coordinator sends. Their shared SuperExec secret (random, in a private folder) authenticates the SuperExec's
requests for tasks; the Runtime API listens on 127.0.0.1 unless told otherwise.

Four things about Flower 1.42's SuperNode change (`adjust_supernode`):
- polls (`_Polls`): with no message for it at the SuperLink, it waits a fixed 3 s before asking again, and it
  checks its own state for the ClientApp's reply every 0.5 s. A secure-aggregation round is four exchanges, and
  after each reply the next message comes as soon as the server has every site's reply, so the fixed 3 s cost most
  exchanges 1.5-3 s. Here it asks again 0.1 s after its reply left, then after 0.15, 0.23... (x1.5) up to 0.5 s
  for the first 10 s (the next stage of a round usually comes within them: about 25 requests), then on up to
  Flower's 3 s (an idle site polls as Flower's does), and checks for a reply every 50 ms (a query of its own
  state);
- object pulls: a request's objects asked for before the server finished uploading them are retried after 1 s;
  here after 20 ms (common/object_pulls.py, which the ServerApp and the ClientApp tasks use too);
- heartbeat: it promises one every 30 s, so after a crash the SuperLink keeps the node online, and refuses the
  restarted SuperNode, for about a minute (two missed heartbeats). Here it promises one every 10 s (Flower's
  minimum) and sends one every 4 s: a crashed site is let back in after about 20 s;
- exit: a SuperNode that gives up (Flower's does on a TLS handshake error) runs Flower's exit handlers, which can
  hang retrying a dead link, and Flower's force-exit timer starts only after them; one that gives up after
  --max-retries does not exit at all (its Runtime API thread keeps the process alive). Either way the process
  never exits and a restart policy never revives it. Here any exit ends the process within 15 s (a loop that
  gave up: Flower's code 305, or 1 if its exit handlers outlast the 15 s); so does the SuperExec's death (a
  SuperNode without it would look online and never run a task).
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import object_pulls

READ_VERSION = "1.42."  # the flwr release whose SuperNode loop `_Polls` paces
IDLE_POLL = 3.0  # Flower's wait after the SuperLink had no message (start_client_internal)
REPLY_POLL = 0.5  # Flower's wait between checks of its own state for the ClientApp's reply
FIRST_IDLE_WAIT = 0.1
IDLE_GROWTH = 1.5  # x2 made a site notice the next stage up to as late again as it had waited (0.5-1 s a stage)
IN_ROUND_WAIT, IN_ROUND_SECONDS = 0.5, 10.0  # the longest wait while the next stage is likely to come soon
REPLY_WAIT = 0.05
HEARTBEAT_INTERVAL = 10  # seconds: the interval the SuperNode promises the SuperLink (Flower's minimum; default 30)
EXIT_GRACE = 15.0  # seconds an exiting SuperNode may spend in Flower's exit handlers

SUPEREXEC_DIED = threading.Event()  # set before this process is stopped for it: its exit code must say failure
OURS = ("--isolation", "--superexec-auth-secret-file")  # set here; a site that passes them means something else


class SupernodeArgumentError(SystemExit):
    """A flower-supernode argument that carefed-supernode sets itself."""


def _option(args: list[str], name: str, default: str) -> str:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def runtime_api_address(args: list[str]) -> str:
    """Where this SuperNode's Runtime API is reached from this machine (flower-supernode's --host and --port)."""
    host = _option(args, "--host", "127.0.0.1")
    return f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{_option(args, '--port', '9094')}"


def prepare(args: list[str]) -> list[str]:
    """Start CareFed's SuperExec for the SuperNode this process is about to become; its arguments."""
    for arg in args:
        if arg.split("=", 1)[0] in OURS:
            raise SupernodeArgumentError(f"carefed-supernode: {arg.split('=', 1)[0]} is set by carefed-supernode "
                                         "(process isolation with CareFed's own SuperExec); leave it out")
    folder = Path(tempfile.mkdtemp(prefix="carefed-superexec-"))  # 0700
    secret = folder / "secret"
    secret.write_bytes(secrets.token_bytes(32))
    secret.chmod(0o600)
    launcher = subprocess.Popen([sys.executable, "-m", "client.launcher", "--runtime-api-address",
                                 runtime_api_address(args), "--parent-pid", str(os.getpid()),
                                 "--superexec-auth-secret-file", str(secret)])
    threading.Thread(target=_stop_without, args=(launcher,), daemon=True, name="superexec-watch").start()
    return [*args, "--isolation", "process", "--superexec-auth-secret-file", str(secret)]


def _stop_without(launcher: subprocess.Popen) -> None:
    """A SuperNode whose SuperExec died would stay online (its heartbeats go on) and never run a task: every round
    would wait for it until round-timeout, and no restart policy would revive it. Stop it (gracefully, as SIGTERM
    does: Flower deactivates the node) so that it goes offline and a restart policy starts it again."""
    code = launcher.wait()
    SUPEREXEC_DIED.set()
    print(f"carefed-supernode: CareFed's SuperExec (client.launcher) exited with code {code}; no task can run at "
          "this site, so the SuperNode stops", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


class _Polls:
    """The `time` module as Flower's SuperNode loop (flwr/supernode/start_client_internal.py) sees it: its two
    polling waits shortened as the module docstring says, every other call the real module's."""

    def __init__(self) -> None:
        self.idle = FIRST_IDLE_WAIT
        self.replied = -math.inf  # when this site last sent a reply (time.monotonic)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_POLL:
            time.sleep(self.idle)
            in_round = time.monotonic() - self.replied < IN_ROUND_SECONDS
            self.idle = min(IDLE_GROWTH * self.idle, IN_ROUND_WAIT if in_round else IDLE_POLL)
        else:
            time.sleep(REPLY_WAIT if seconds == REPLY_POLL else seconds)

    def reply_sent(self) -> None:
        self.idle, self.replied = FIRST_IDLE_WAIT, time.monotonic()


def exit_within(grace: float) -> None:
    """Once Flower starts exiting this process (`flwr_exit`, which every exit path calls), end it after `grace`
    seconds whatever its exit handlers are doing."""
    from flwr.supercore.exit import exit as flower_exit

    trigger = flower_exit.trigger_exit_handlers

    def triggering(*, run_before_force_exit: bool) -> None:
        if run_before_force_exit:  # flwr_exit's first step
            threading.Thread(target=lambda: (time.sleep(grace), os._exit(1)), daemon=True).start()
        trigger(run_before_force_exit=run_before_force_exit)

    flower_exit.trigger_exit_handlers = triggering


def adjust_supernode() -> None:
    """Flower's SuperNode as the module docstring says (polls, object pulls, heartbeat, exit), on the release it was
    read against."""
    import flwr
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection as fleet
    from flwr.supernode import start_client_internal as loop

    if not flwr.__version__.startswith(READ_VERSION):
        raise SystemExit(f"carefed-supernode was written against flwr {READ_VERSION}x, not {flwr.__version__}")
    polls = _Polls()
    push_messages = loop._push_messages

    def pushing(*args: Any, **kwargs: Any) -> None:  # Flower calls it right after it pulled a message
        push_messages(*args, **kwargs)
        polls.reply_sent()

    loop.time = polls
    loop._push_messages = pushing
    loop.pull_objects = object_pulls.soon(loop.pull_objects)  # a request's objects, still being uploaded
    fleet.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_INTERVAL  # promised at activation and with every heartbeat
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_INTERVAL  # the sender's pace: (10 - 5 s timeout) x 0.8
    exit_within(EXIT_GRACE)


def run(args: list[str]) -> None:
    """Run the SuperNode in this process with CareFed's SuperExec beside it."""
    from flwr.supercore.exit import ExitCode, flwr_exit
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *prepare(args)]  # Flower names its telemetry event by argv[0]
    adjust_supernode()
    try:
        flower_supernode()
        ended = "its loop returned"
    except SystemExit:
        if SUPEREXEC_DIED.is_set():  # Flower's graceful stop (0), but for a failure: a restart policy must see one
            raise SystemExit(1) from None
        raise
    except Exception as error:  # noqa: BLE001 - said in the exit message; SystemExit (flwr_exit) passes
        ended = f"{type(error).__name__}: {error}"
    # Flower's SuperNode that gives up (--max-retries reached on a dead SuperLink) leaves this function with its
    # Runtime API server thread, not a daemon, still serving: the process would never exit and no restart policy
    # would ever revive the site. Exit as Flower's own connection failures do (code 305), its handlers run.
    flwr_exit(ExitCode.SUPERNODE_CONNECTION_ERROR, f"the SuperNode stopped ({ended})")


def main() -> None:
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
