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


@pytest.fixture
def flowers_state(monkeypatch):
    """Flower's own in-memory LinkState with 200 registered nodes and a run, as its simulation engine sets them up."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 9, NOOP_FEDERATION_ID
    state.run_ids[7] = RunRecord(run=run)
    state.task_store[9] = Task(task_id=9, run_id=7)
    for name, value in (("_task_id", 9), ("_run_id", 7), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)
    nodes = _register_nodes(num_nodes=200, state_factory=factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, nodes


def test_only_nodes_with_a_waiting_message_are_asked_for_it(flowers_state, monkeypatch):
    """Flower's loop asks all 200 nodes, each ask a walk of the whole store; this one asks the three addressed."""
    from flwr.app import Message, MessageType, RecordDict

    state, grid, nodes = flowers_state
    addressed = list(nodes)[5:8]
    asked: list[int] = []
    get_message_ins = state.get_message_ins
    monkeypatch.setattr(state, "get_message_ins",
                        lambda node_id, limit: asked.append(node_id) or get_message_ins(node_id=node_id, limit=limit))
    queue, stop = Queue(), threading.Event()
    loop = threading.Thread(target=dispatch.add_messages_to_queue, args=(state, queue, nodes, stop))
    loop.start()
    try:
        ids = grid.push_messages([Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN)
                                  for n in addressed])
        got = [queue.get(timeout=30) for _ in addressed]
    finally:
        stop.set()
        grid.push_messages([Message(RecordDict(), dst_node_id=addressed[0], message_type=MessageType.TRAIN)])
        loop.join(10)
    assert sorted(m.metadata.message_id for m in got) == sorted(ids)
    assert set(asked) <= set(addressed) and len(asked) <= 2 * len(addressed)
