"""One message exchange with the sites: push, then pull replies until all are in, the round's timeout passes, or
the run is interrupted.

Why not `grid.send_and_receive`: Flower 1.42's deployed grid sleeps a fixed 3 s between pulls (its in-memory grid
0.1 s), so every exchange of a deployed round waited up to 3 s after the last reply arrived; and a ServerApp thread
blocked there could not be stopped, so an interrupted simulation kept its process alive until the round timed out.
Here the pull interval starts at 20 ms and backs off to 0.5 s: one cheap `PullMessages` call to the SuperLink per
interval while a round is waiting. In simulation, CareFed's dispatch loop (simulations/dispatch.py) also sets
REPLY_STORED whenever the engine stores a reply, which ends the wait at once.

Grids that are not Flower's own (the test and benchmark harnesses that stand in for a coordinator's hands, which
deliver synchronously) keep their own `send_and_receive`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.superlink.grid.http_grid import HttpGrid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from common.errors import CareFedError

FIRST_PULL_INTERVAL, MAX_PULL_INTERVAL, BACKOFF = 0.02, 0.5, 1.5
FLOWER_EXCHANGES = (InMemoryGrid.send_and_receive, HttpGrid.send_and_receive)


class RunInterrupted(CareFedError):
    """The run was stopped from outside (SIGTERM from a scheduler, Ctrl-C) before it finished."""

    exit_code = 1


class StopSignal:
    """Process-wide: set once (by a signal handler) with the reason; every exchange in progress then ends."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        self.runs: set[threading.Thread] = set()  # threads running a ServerApp, to wait for once STOP is set

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Marks the current thread as running a ServerApp (it leaves its exchange, records the stop, and ends)."""
        self.runs.add(threading.current_thread())
        try:
            yield
        finally:
            self.runs.discard(threading.current_thread())

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def clear(self) -> None:
        self.reason = ""
        self._event.clear()

    def check(self) -> None:
        if self._event.is_set():
            raise RunInterrupted(self.reason)


STOP = StopSignal()
# Set by the simulation engine's dispatch loop when it stores a reply (simulations/dispatch.py); never deployed,
# where the wait is the pull interval. One per process: a missed wake-up only costs that interval.
REPLY_STORED = threading.Event()


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float) -> list[tuple[int, Message]]:
    """Flower's `Grid.send_and_receive` contract (replies in arrival order, at most `timeout` seconds), pulling
    with back-off and raising RunInterrupted as soon as STOP is set. Each reply comes with the node its request
    went to: an error the SuperLink answers for a node (unavailable: it crashed, or its heartbeats stopped) names
    the SuperLink as its source, and is that node's failure all the same."""
    STOP.check()
    messages = list(messages)
    if type(grid).send_and_receive not in FLOWER_EXCHANGES:
        return [(reply.metadata.src_node_id, reply) for reply in grid.send_and_receive(messages, timeout=timeout)]
    # Flower keeps the order and answers None for a message it could not push (nothing: a payload too large)
    sent = {mid: m.metadata.dst_node_id for mid, m in zip(grid.push_messages(messages), messages, strict=False)
            if mid is not None}
    pending = set(sent)
    deadline = time.monotonic() + timeout
    interval = FIRST_PULL_INTERVAL
    replies: list[tuple[int, Message]] = []
    while pending:
        STOP.check()
        REPLY_STORED.clear()  # before pulling: a reply stored after the pull ends the wait below at once
        arrived = [r for r in grid.pull_messages(pending) if r.metadata.reply_to_message_id in pending]
        replies.extend((sent[r.metadata.reply_to_message_id], r) for r in arrived)
        if arrived:  # the rest of a stage's replies tend to follow close behind
            interval = FIRST_PULL_INTERVAL
        pending.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        REPLY_STORED.wait(min(interval, left))
        interval = min(interval * BACKOFF, MAX_PULL_INTERVAL)
    return replies
