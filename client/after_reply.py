"""Work a deployed site does after a task's reply has left: what the site's next task will need, computed while
the coordinator gathers the other sites' replies instead of on the round's critical path.

Only in a task process that client.launcher forked (`enable`): there the reply is pushed and the task's status
reported before `run` is called, and `run` forks the jobs off so that the task process still ends at once (Flower's
exit path force-exits a task 5 s after it began, which is too short to bound anything else by). Anywhere else
(simulation, tests that call the ClientApp directly) nothing is deferred.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

LOG = logging.getLogger(__name__)
LONGEST_SECONDS = 120  # a round's accounting takes a few seconds; nothing deferred may outlive this

_jobs: list[Callable[[], object]] | None = None


def enable() -> None:
    global _jobs
    _jobs = []


def later(job: Callable[[], object]) -> None:
    """Run `job` after the reply has left (in a forked task process; otherwise never)."""
    if _jobs is not None:
        _jobs.append(job)


def run() -> int | None:
    """Each deferred job once, in a process of their own (its pid is returned; None when there is nothing to do);
    a failing one is logged and skipped."""
    if not _jobs:
        return None
    pid = os.fork()
    if pid != 0:
        _jobs.clear()
        return pid
    code = 0
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):  # not Flower's task handlers: this is no task
            signal.signal(sig, signal.SIG_DFL)
        signal.alarm(LONGEST_SECONDS)  # SIGALRM ends it: whatever it has not kept by then the next task computes
        for job in _jobs:
            try:
                job()
            except Exception:  # noqa: BLE001 - a cache warmer; the next task recomputes what it lacks
                LOG.exception("work deferred past the reply failed")
                code = 1
    finally:
        os._exit(code)
