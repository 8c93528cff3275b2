"""A hospital's SuperExec: every ClientApp task runs the site's own installed CareFed, in a process forked from one
that has already imported it.

Flower 1.42's SuperNode (in its default subprocess isolation) starts a fresh `flwr-clientapp` process per message,
and that process installs the FAB the coordinator sent with the run and imports the ClientApp from it. So whoever
runs the SuperLink decides what code runs at the hospital, policy gate and egress guard included: a coordinator that
ships a ClientApp without them gets everything. Here the FAB is neither installed nor imported; every task runs
`client.app:app` of the CareFed release the site installed, and the coordinator's app is only named in the log.
It is also faster: a fresh process imports ~1.6 s of Flower before CareFed's code runs (and torch and Opacus to
train); a fork starts with all of it imported.

`carefed-supernode` (client/supernode.py) starts this beside a SuperNode in Flower's `process` isolation; the loop
that asks the SuperNode for tasks is Flower's own `run_superexec`, given this executor.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

from client import after_reply
from common import object_pulls

READ_VERSION = "1.42."  # the flwr release whose SuperExec and ClientApp task runner this drives


def _site_app_loader(default_app_ref: str, app_path: str | None, multi_app: bool) -> Any:
    """Stands in for Flower's `get_load_client_app_fn`: whatever app the run names, the site's own ClientApp."""
    del default_app_ref, app_path, multi_app
    from importlib.metadata import version

    from flwr.common.logger import log

    from client.app import app

    def load(fab_id: str, fab_version: str, fab_hash: str) -> Any:
        log(logging.INFO, "the coordinator's app %s %s (FAB %s) is not installed or run: this site runs its own "
            "CareFed %s", fab_id, fab_version, fab_hash[:12], version("carefed"))
        return app

    return load


def _never_install(fab_content: bytes, *args: Any, **kwargs: Any) -> None:
    """Stands in for Flower's `install_from_fab`: nothing the coordinator sends is written to disk or imported."""
    del fab_content, args, kwargs


class ForkingExecutor:
    """Flower's SuperExec Executor (flwr/supercore/superexec/executor/types.py) for ClientApp tasks only: each task
    runs Flower's own ClientApp task runner (`run_clientapp`, what `flwr-clientapp` runs) in a forked child."""

    def __init__(self, secret_file: Path) -> None:
        self.pid = os.getpid()
        self.secret_file = secret_file
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types: set, **_: Any) -> tuple[set, set[str]]:
        from flwr.supercore.constant import TaskType

        return supported_task_types & {TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, *_: Any, **__: Any) -> None:
        """Forking has no capacity gate."""

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"a hospital runs ClientApp tasks only, not {spec.task_type}")
        pid = os.fork()
        if pid == 0:
            _run_task(spec)
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished tasks, and the workers they left behind (client.after_reply: this process is their
        subreaper), called by Flower's loop before each request for a task."""
        while True:
            try:
                done, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # no child left
                self.children.clear()
                return
            if not done:
                return
            self.children.discard(done)

    def close(self) -> None:
        """Remove the SuperExec secret carefed-supernode wrote (the SuperNode is gone: nobody needs it). Tasks
        still running watch this process (their parent pid) and end when it does."""
        if os.getpid() == self.pid:
            self.secret_file.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.secret_file.parent.rmdir()


def _run_task(spec: Any) -> NoReturn:
    """The forked child: Flower's ClientApp task runner with the site's own app; never returns."""
    code = 1
    try:
        from flwr.supercore.exit import exit_handler
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        for sig in (signal.SIGINT, signal.SIGTERM):  # the runner installs its own
            signal.signal(sig, signal.SIG_DFL)
        exit_handler.registered_exit_handlers.clear()  # the SuperExec's, inherited: not this process's to run
        after_reply.enable()
        run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
                      certificates=validate_and_resolve_root_certificates(spec.root_certificates_path,
                                                                          spec.insecure),
                      parent_pid=spec.parent_pid, runtime_dependency_install=False)
        code = 0
    except SystemExit as done:  # the runner ends with flwr_exit (sys.exit with the task's exit code)
        code = done.code if isinstance(done.code, int) else 1
    except BaseException:  # noqa: BLE001 - said; the child must end here, never return into the SuperExec loop
        traceback.print_exc()
    try:  # the reply and the task's status are out (run_clientapp pushed both before it exited)
        after_reply.run()
    except BaseException:  # noqa: BLE001 - as above
        traceback.print_exc()
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)


def install() -> None:
    """Point Flower's ClientApp task runner at the site's own app, and import everything a task needs once."""
    import flwr
    from flwr.supernode.runtime import run_clientapp as runner

    if not flwr.__version__.startswith(READ_VERSION):
        raise SystemExit(f"carefed-superexec was written against flwr {READ_VERSION}x, not {flwr.__version__}: "
                         "refusing to run ClientApps with a task runner it has not read")
    from flwr.supercore.inflatable import inflatable_utils

    runner.install_from_fab = _never_install
    runner.get_load_client_app_fn = _site_app_loader
    # a task pulls its message from the SuperNode, which may still be fetching it from the SuperLink
    runner.pull_and_inflate_object_from_tree = object_pulls.soon(inflatable_utils.pull_and_inflate_object_from_tree)
    import client.app  # noqa: F401 - the ClientApp, its gate and secure aggregation
    import client.site  # noqa: F401 - torch, torchvision and Opacus, for the training and evaluation tasks
    _import_what_tasks_import_late()


def _import_what_tasks_import_late() -> None:
    """Modules a training task would otherwise import on first use, in every forked child: torch's optimizers
    import torch._dynamo when the first one is built (0.9 s idle, 2-3 s with three sites on two cores; measured
    with py-spy on the loopback), ScatterNet its scattering code, a PNG its decoder. Imports only: nothing here
    starts a thread or touches torch's thread pools, which a fork must not inherit running."""
    import PIL.PngImagePlugin  # noqa: F401
    import torch._dynamo  # noqa: F401
    from kymatio.scattering2d.frontend import torch_frontend  # noqa: F401 - as common.models imports it


def _adopt_orphans() -> None:
    """Become the subreaper of every process forked below this one: a task's after-reply worker outlives the task,
    and would otherwise be reparented to PID 1, which in the site's container is carefed-supernode, which never
    reaps it (a zombie a round). Linux only; elsewhere the worker is left to the system's init."""
    import ctypes

    pr_set_child_subreaper = 36
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="carefed-superexec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    parser.add_argument("--parent-pid", type=int, required=True, help="the SuperNode: end when it ends")
    parser.add_argument("--superexec-auth-secret-file", type=Path, required=True,
                        help="the secret the SuperNode was started with (it authenticates task requests)")
    args = parser.parse_args(argv)
    install()
    from flwr.supercore.superexec import run_superexec as flower_superexec

    secret = args.superexec_auth_secret_file.read_bytes()
    _adopt_orphans()
    executor = ForkingExecutor(args.superexec_auth_secret_file)
    flower_superexec.get_executor = lambda *_, **__: executor
    # Insecure on the Runtime API as Flower's own subprocess isolation is: it listens on 127.0.0.1 only.
    flower_superexec.run_superexec(runtime_api_address=args.runtime_api_address, insecure=True,
                                   superexec_auth_secret=secret, parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
