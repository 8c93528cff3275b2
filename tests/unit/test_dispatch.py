"""The simulation engine's dispatch loop, woken by each stored message (simulations/dispatch.py).

A stand-in for Flower's in-memory LinkState (the three methods the loop uses) lets the loop be watched alone; every
simulation test runs the real one inside Flower's engine."""

from __future__ import annotations

import threading
from queue import Queue

import pytest

from server.exchange import REPLY_STORED
from simulations import dispatch


class _State:
    def __init__(self) -> None:
        self.pending: dict[int, list[str]] = {}
        self.replies: list[str] = []

    def store_message_ins(self, node_id: int, message: str) -> str:
        self.pending.setdefault(node_id, []).append(message)
        return message

    def store_message_res(self, message: str) -> str:
        self.replies.append(message)
        return message

    def get_message_ins(self, node_id: int, limit: int) -> list[str]:
        waiting = self.pending.get(node_id, [])
        taken, self.pending[node_id] = waiting[:limit], waiting[limit:]
        return taken


@pytest.fixture
def running_loop(monkeypatch):
    monkeypatch.setattr(dispatch, "SCAN_INTERVAL", 3600.0)  # only a wake-up can deliver within the test's wait
    state, queue, stop = _State(), Queue(), threading.Event()
    loop = threading.Thread(target=dispatch.add_messages_to_queue, args=(state, queue, {1: 0, 2: 1}, stop))
    loop.start()
    yield state, queue
    stop.set()
    state.store_message_ins(1, "wake")  # the loop sees the stop after this wake-up
    loop.join(10)
    assert not loop.is_alive()
    assert "store_message_ins" not in vars(state) and "store_message_res" not in vars(state)  # unwrapped


def test_a_message_stored_while_the_loop_waits_is_dispatched_at_once(running_loop):
    state, queue = running_loop
    for node, message in ((1, "advertise-1"), (2, "advertise-2"), (1, "share-keys-1")):
        state.store_message_ins(node, message)
        assert queue.get(timeout=30) == message  # not after the hour-long scan interval


def test_a_reply_stored_by_the_engine_wakes_the_servers_exchange(running_loop):
    state, _ = running_loop
    REPLY_STORED.clear()
    state.store_message_res("reply")
    assert REPLY_STORED.is_set() and state.replies == ["reply"]


def test_install_replaces_flowers_loop_only_on_the_release_it_was_written_for(monkeypatch):
    """Against a stand-in for Flower's loop (same argument names), whatever an earlier test installed."""
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    def flowers(state, queue, nodes_mapping, f_stop):  # noqa: ARG001 - the signature is what install() reads
        raise AssertionError("never run here")

    monkeypatch.setattr(vce_api, "add_messages_to_queue", flowers)
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    assert not dispatch.install() and vce_api.add_messages_to_queue is flowers
    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    assert dispatch.install() and vce_api.add_messages_to_queue is dispatch.add_messages_to_queue
