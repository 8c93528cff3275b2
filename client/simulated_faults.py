"""Simulated dropouts and stragglers, so a study can be rehearsed with realistic failures (simulation only).

A sampled site drops at a secure-aggregation stage with that stage's configured probability: it raises, Flower
turns that into an error reply, and the server treats the site as gone. A straggler trains (and spends its
budget, in its ledger) but its reply never arrives. Draws are seeded per (seed, round, site, stage), so a
scenario replays identically. A deployed site never injects faults: only nodes the simulation engine created
(partition-id without site-id) do.
"""

from __future__ import annotations

import hashlib

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from client.identity import is_simulated, site_id
from common import messages
from common.config import RunConfig


class SimulatedDropout(RuntimeError):
    """A fault the scenario asked for; not a bug."""


def _draw(config: RunConfig, server_round: int, site: int, stage: str) -> float:
    digest = hashlib.sha256(f"{config.seed}/{server_round}/{site}/{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    content = msg.content
    if msg.metadata.message_type != MessageType.TRAIN or not is_simulated(context) \
            or messages.SIMULATION not in content:
        return call_next(msg, context)
    stage = str(content[messages.SECAGG]["stage"]) if messages.SECAGG in content else messages.STAGE_MASKED_INPUT
    server_round = int(content[messages.SECAGG]["round"]) if messages.SECAGG in content \
        else int(content[messages.ROUND]["round"])
    config = RunConfig.from_mapping(dict(content[messages.SIMULATION]))  # the policy gate has checked it
    site = site_id(context)
    probability = {
        messages.STAGE_ADVERTISE: config.dropout_advertise, messages.STAGE_SHARE_KEYS: config.dropout_share_keys,
        messages.STAGE_MASKED_INPUT: config.dropout_masked_input, messages.STAGE_UNMASK: config.dropout_unmask,
    }.get(stage, 0.0)  # the consistency check: no scenario drops sites there (yet)
    if _draw(config, server_round, site, stage) < probability:
        raise SimulatedDropout(f"site {site} dropped out at stage '{stage}' of round {server_round} (scenario)")
    reply = call_next(msg, context)
    if stage == messages.STAGE_MASKED_INPUT and _draw(config, server_round, site, "straggler") \
            < config.straggler_probability:
        raise SimulatedDropout(f"site {site} trained in round {server_round} but its reply was lost (straggler)")
    return reply
