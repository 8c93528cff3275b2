"""Drive one secure-aggregation round through the pure state machines, with dropouts at chosen stages."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from common.secagg.client import ClientSession
from common.secagg.protocol import ProtocolConfig
from common.secagg.server import ServerSession

MODEL_HASH = bytes(range(32))


@dataclass
class RoundTrace:
    """Everything that crossed the wire to the server, for leakage checks."""

    advertisements: dict = field(default_factory=dict)
    shares: dict = field(default_factory=dict)
    masked: dict = field(default_factory=dict)
    unmask: dict = field(default_factory=dict)
    survivors: list[int] = field(default_factory=list)


def run_round(config: ProtocolConfig, inputs: Mapping[int, np.ndarray], *, drop_before_advertise: Iterable[int] = (),
              drop_before_shares: Iterable[int] = (), drop_before_masking: Iterable[int] = (),
              drop_before_unmask: Iterable[int] = ()) -> tuple[np.ndarray, RoundTrace, dict[int, ClientSession]]:
    """Run the round; returns (unmasked sum, trace, clients). Raises SecAggAbort like the server would."""
    clients = {u: ClientSession(u, config) for u in inputs}
    server = ServerSession(config, MODEL_HASH)
    trace = RoundTrace()
    gone = set(drop_before_advertise)
    trace.advertisements = {u: c.advertise_keys() for u, c in clients.items() if u not in gone}
    relay = server.receive_advertisements(trace.advertisements)
    gone |= set(drop_before_shares)
    trace.shares = {ad.node_id: clients[ad.node_id].share_keys(relay, MODEL_HASH) for ad in relay
                    if ad.node_id not in gone}
    requests = server.receive_shares(trace.shares)
    gone |= set(drop_before_masking)
    trace.masked = {u: clients[u].masked_input(r.ciphertexts, r.alive, inputs[u]) for u, r in requests.items()
                    if u not in gone}
    unmask = server.receive_masked_inputs(trace.masked)
    gone |= set(drop_before_unmask)
    trace.unmask = {u: clients[u].unmask(unmask.alive, unmask.dropped) for u in unmask.alive if u not in gone}
    trace.survivors = unmask.alive
    return server.receive_unmasking(trace.unmask), trace, clients


def plain_sum(inputs: Mapping[int, np.ndarray], nodes: Iterable[int]) -> np.ndarray:
    total = np.zeros_like(next(iter(inputs.values())))
    for u in nodes:
        np.add(total, inputs[u], out=total)
    return total
