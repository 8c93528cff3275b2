"""Secure aggregation at the site: a Flower mod, a thin adapter over common.secagg.ClientSession.

Every stage arrives as a `train` message carrying a `secagg` ConfigRecord. The mod answers the key stages itself;
at the masked-input stage it lets the ClientApp train (call_next), then replaces the plain update with the masked
vector [n * delta, n, clipped] in Z_2^32, so the server only ever learns sums. The session's secrets live in the
node's Context.state between stages (the ClientApp is re-created for every message) and are deleted at the end.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from common import messages
from common.secagg.client import Advertisement, ClientSession
from common.secagg.encoding import FixedPoint
from common.secagg.errors import AbortReason, SecAggAbort
from common.secagg.protocol import model_digest
from common.update_codec import clip_l2, flatten
from common.wire import ids_from_wire, ids_to_wire, protocol_config_from_record

SESSION_STATE = "carefed.secagg-session"


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if not msg.content or messages.SECAGG not in msg.content:
        return call_next(msg, context)
    record = msg.content[messages.SECAGG]
    stage = str(record["stage"])
    try:
        if stage == messages.STAGE_ADVERTISE:
            return _reply(msg, _advertise(record, context))
        if SESSION_STATE not in context.state:
            raise SecAggAbort(AbortReason.WRONG_STAGE, f"'{stage}' without an advertised session")
        session = ClientSession.from_state(context.state[SESSION_STATE])
        session.expect_session(int(record["round"]), bytes(record.get("session", session.session)))
        if stage == messages.STAGE_SHARE_KEYS:
            reply = _share_keys(record, session)
        elif stage == messages.STAGE_MASKED_INPUT:
            return _masked_input(msg, record, session, context, call_next)
        elif stage == messages.STAGE_UNMASK:
            reply = _unmask(record, session)
            del context.state[SESSION_STATE]
            return _reply(msg, reply)
        else:
            raise SecAggAbort(AbortReason.WRONG_STAGE, f"unknown stage '{stage}'")
        context.state[SESSION_STATE] = ConfigRecord(session.to_state())
        return _reply(msg, reply)
    except SecAggAbort as err:
        if SESSION_STATE in context.state:
            del context.state[SESSION_STATE]
        return _reply(msg, RecordDict({messages.STATUS: ConfigRecord({
            "state": messages.STATE_ABORTED, "reason": f"{err.reason.name}: {err}"})}))


def _reply(msg: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=msg)


def _advertise(record: ConfigRecord, context: Context) -> RecordDict:
    config = protocol_config_from_record(record)
    session = ClientSession(context.node_id, config)
    ad = session.advertise_keys()
    context.state[SESSION_STATE] = ConfigRecord(session.to_state())
    return RecordDict({messages.SECAGG: ConfigRecord({"c-pk": ad.c_pk, "s-pk": ad.s_pk, "signature": ad.signature})})


def _share_keys(record: ConfigRecord, session: ClientSession) -> RecordDict:
    ads = [Advertisement(u, bytes(c), bytes(s), bytes(sig)) for u, c, s, sig in zip(
        ids_from_wire(record["ids"]), record["c-pks"], record["s-pks"], record["signatures"], strict=True)]
    ciphertexts = session.share_keys(ads, bytes(record["model-hash"]))
    return RecordDict({messages.SECAGG: ConfigRecord({
        "session": session.session, "receivers": ids_to_wire(ciphertexts), "ciphertexts": list(ciphertexts.values()),
    })})


def _masked_input(msg: Message, record: ConfigRecord, session: ClientSession, context: Context,
                  call_next: ClientAppCallable) -> Message:
    model = msg.content[messages.GLOBAL_MODEL]
    digest = model_digest([arr.data for arr in model.values()])
    if digest != bytes(record["model-hash"]):
        raise SecAggAbort(AbortReason.MODEL_MISMATCH, "the model differs from the one the keys were bound to")
    trained = call_next(msg, context)  # the ClientApp's own train handler: DP-SGD, budget check, privacy report
    if trained.has_error():
        return trained
    content = trained.content
    if content[messages.STATUS]["state"] != messages.STATE_TRAINED:
        del context.state[SESSION_STATE]  # refused: we simply do not send a masked input (handled as a dropout)
        return trained

    metrics = content[messages.TRAIN_METRICS]
    weight = int(metrics["num-examples"])
    max_weight = float(record["max-weight"])
    if weight > max_weight:
        raise SecAggAbort(AbortReason.BAD_INPUT,
                          f"{weight} examples exceed secagg-max-weight {max_weight:g}; raise it in the run config")
    delta, clipped = clip_l2(flatten({k: v.numpy() for k, v in content[messages.UPDATE].items()}),
                             float(record["update-bound"]))  # already clipped by the trainer; idempotent here
    clipped = clipped or bool(metrics["update-clipped"])
    codec = FixedPoint.for_cohort(max_weight * float(record["update-bound"]), int(record["cohort-size"]))
    encoded = np.empty(delta.size + 2, dtype=np.uint32)
    encoded[:-2] = codec.encode(delta, multiplier=weight)
    encoded[-2:] = (weight, int(clipped))
    ciphertexts = dict(zip(ids_from_wire(record["senders"]), (bytes(c) for c in record["ciphertexts"]), strict=True))
    masked = session.masked_input(ciphertexts, ids_from_wire(record["alive"]), encoded)
    context.state[SESSION_STATE] = ConfigRecord(session.to_state())
    reply = RecordDict({
        messages.STATUS: content[messages.STATUS],
        messages.MASKED_UPDATE: ArrayRecord({"masked": Array(masked)}),
        # only what is not secret: which site, how many steps; the count and the clip flag ride masked
        messages.TRAIN_METRICS: MetricRecord({"site": int(metrics["site"]), "steps": int(metrics["steps"])}),
    })
    if messages.PRIVACY_REPORT in content:
        reply[messages.PRIVACY_REPORT] = content[messages.PRIVACY_REPORT]
    return _reply(msg, reply)


def _unmask(record: ConfigRecord, session: ClientSession) -> RecordDict:
    response = session.unmask(ids_from_wire(record["alive"]), ids_from_wire(record["dropped"]))
    return RecordDict({messages.SECAGG: ConfigRecord({
        "b-owners": ids_to_wire(response.b_shares), "b-shares": list(response.b_shares.values()),
        "s-owners": ids_to_wire(response.s_shares), "s-shares": list(response.s_shares.values()),
    })})

