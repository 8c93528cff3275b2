"""Flower's simulation engine, woken by each message instead of polling for it.

Flower 1.42's simulation engine hands messages from its in-memory LinkState to the ClientApp workers in a loop
that scans every node and then waits 0.1 s (`add_messages_to_queue` in flwr/server/superlink/fleet/vce/vce_api.py),
and the ServerApp then polls for the replies. Every message exchange of a round waits on both, and a secure-
aggregation round is four exchanges against plain FedAvg's one: most of what secure aggregation cost a simulated
round was these waits. Here the same loop (same arguments) wakes as soon as the ServerApp stores a message, and a
reply the engine stores wakes the ServerApp's exchange (`server.exchange.REPLY_STORED`). Both still fall back to
their intervals, so a missed wake-up costs time, never a message. A scan asks only the nodes that have a message
waiting, not every node of the federation.

`install()` swaps Flower's function for this one in its module, once, and only on the Flower release this was
written against; on any other, the engine runs as Flower ships it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from queue import Queue
from typing import Any

READ_VERSION = "1.42."  # the flwr release whose vce_api.add_messages_to_queue this replaces
SCAN_INTERVAL = 0.1  # Flower's own: now only the longest a message could wait if a wake-up were missed


def _then_set(method: Callable[..., Any], event: threading.Event) -> Callable[..., Any]:
    @functools.wraps(method)
    def stored(*args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        event.set()
        return result

    return stored


def add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Flower's dispatch loop: every node's next message into the workers' queue; then, instead of sleeping 0.1 s,
    wait until the ServerApp stores another message (rescanning at once after a scan that found any)."""
    from server.exchange import REPLY_STORED

    pushed = threading.Event()
    state.store_message_ins = _then_set(state.store_message_ins, pushed)  # this state object only
    state.store_message_res = _then_set(state.store_message_res, REPLY_STORED)
    try:
        while not f_stop.is_set():
            pushed.clear()
            found = False
            for node_id in _waiting(state, nodes_mapping):
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
                    found = True
            if not found:
                pushed.wait(SCAN_INTERVAL)
    finally:
        del state.store_message_ins, state.store_message_res  # the class's own methods again


def _waiting(state: Any, nodes_mapping: dict[int, int]) -> list[int]:
    """The nodes with a message not yet handed out, in Flower's order. Flower asks every node, and each ask walks
    the whole message store: with 1,000 idle sites a scan was thousands of checks, once per pushed message of
    every exchange. A state without the in-memory store's fields is asked node by node, as Flower does."""
    store, lock = getattr(state, "message_ins_store", None), getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return list(nodes_mapping)
    with lock:
        waiting = {m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == ""}
    return [node_id for node_id in nodes_mapping if node_id in waiting]


def install() -> bool:
    """Use this dispatch loop in Flower's simulation engine; False (and Flower's own) on another Flower."""
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    if vce_api.add_messages_to_queue is add_messages_to_queue:
        return True
    if not flwr.__version__.startswith(READ_VERSION) or vce_api.add_messages_to_queue.__code__.co_varnames[:4] \
            != ("state", "queue", "nodes_mapping", "f_stop"):
        logging.getLogger("carefed").warning(
            "flwr %s is not the %sx release whose simulation dispatch CareFed replaces; using Flower's own",
            flwr.__version__, READ_VERSION)
        return False
    vce_api.add_messages_to_queue = add_messages_to_queue
    return True
