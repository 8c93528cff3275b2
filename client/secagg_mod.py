"""Secure aggregation at the site: a Flower mod, a thin adapter over common.secagg.ClientSession.

Every stage arrives as a `train` message carrying a `secagg` record, parsed by its typed schema
(common.secagg.stages) before anything else; whatever does not parse is refused by name. The mod answers the key
stages itself; at the masked-input stage it checks that the model is the one bound into the session at key
sharing, lets the ClientApp train (call_next), then replaces the plain update with the masked vector
[n * delta, n, clipped] in Z_2^32, so the server only ever learns sums. The session's secrets live in the node's
Context.state between stages (the ClientApp is re-created for every message) and are deleted at the end.
"""

from __future__ import annotations

import copy
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log

from client.policy_gate import enrolment_for, refuse
from common import messages
from common.errors import CareFedError
from common.secagg.client import Advertisement, ClientSession, Enrolment
from common.secagg.encoding import FixedPoint
from common.secagg.errors import AbortReason, SecAggAbort
from common.secagg.protocol import model_digest
from common.secagg.stages import (
    AdvertiseReply,
    AdvertiseRequest,
    ConsistencyReply,
    ConsistencyRequest,
    MalformedMessage,
    MaskedInputRequest,
    ShareKeysReply,
    ShareKeysRequest,
    Stage,
    UnmaskReply,
    UnmaskRequest,
    parse_request,
)
from common.study import RequestError
from common.update_codec import clip_l2, flatten
from common.wire import npy_array

SESSION_STATE = "carefed.secagg-session"


def next_round_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """An unmask request may carry the next round's advertise request (messages.SECAGG_NEXT). The site answers
    the unmask request, then the advertise request as a request of its own, through everything inside this mod
    (the policy gate and its state-folder check, scenario faults, the secure-aggregation mod), and sends both
    answers in one reply: the egress guard outside checks it whole. The next round's refusal or abort leaves as
    its status (messages.STATUS_NEXT) and never costs this round's unmask reply; if it fails outright, the reply
    carries no next-round part and the coordinator asks again in the next round."""
    if messages.SECAGG_NEXT not in msg.content:
        return call_next(msg, context)
    current = _without(msg.content, messages.SECAGG_NEXT)
    stage = current.get(messages.SECAGG)
    if msg.metadata.message_type != MessageType.TRAIN or not isinstance(stage, ConfigRecord) \
            or stage.get("stage") != Stage.UNMASK:
        err = RequestError("a next round's advertise request rides only on an unmask request")
        return Message(refuse(current, context, err), reply_to=msg)
    reply = call_next(_part(msg, current, msg.metadata.group_id), context)
    if reply.has_error():
        return reply
    answer = RecordDict(dict(reply.content.items()))
    upcoming = _without(current, messages.SECAGG)
    upcoming[messages.SECAGG] = msg.content[messages.SECAGG_NEXT]
    server_round = stage.get("round")
    advertise = msg.content[messages.SECAGG_NEXT]
    if not isinstance(advertise, ConfigRecord) or advertise.get("stage") != Stage.ADVERTISE \
            or not isinstance(server_round, int) or advertise.get("round") != server_round + 1:
        err = RequestError("the next round's request is not an advertise request for the round after this one")
        answer[messages.STATUS_NEXT] = refuse(upcoming, context, err)[messages.STATUS]
        return Message(answer, reply_to=msg)
    try:
        upcoming_reply = call_next(_part(msg, upcoming, str(server_round + 1)), context)
    except Exception as err:  # noqa: BLE001 - the next round's failure must not cost this round's unmask reply
        log(WARNING, "the next round's advertise request failed (%s); the coordinator will ask again",
            type(err).__name__)
        return Message(answer, reply_to=msg)
    if not upcoming_reply.has_error():
        part = upcoming_reply.content
        name = messages.STATUS_NEXT if messages.STATUS in part else messages.SECAGG_NEXT
        answer[name] = part[messages.STATUS if name == messages.STATUS_NEXT else messages.SECAGG]
    return Message(answer, reply_to=msg)


def _without(content: RecordDict, name: str) -> RecordDict:
    return RecordDict({key: record for key, record in content.items() if key != name})


def _part(msg: Message, content: RecordDict, group_id: str) -> Message:
    """One request of a bundle, as its own message (the same sender and run; its own round)."""
    metadata = copy.copy(msg.metadata)
    metadata.group_id = group_id
    return make_message(metadata, content)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if not msg.content or messages.SECAGG not in msg.content:
        return call_next(msg, context)
    try:
        record = msg.content[messages.SECAGG]
        if not isinstance(record, ConfigRecord):
            raise MalformedMessage(AbortReason.BAD_REQUEST, "the secagg record is not a config record")
        request = parse_request(record)
        if isinstance(request, AdvertiseRequest):
            enrolment = enrolment_for(context, msg.content, request.protocol.require_signatures)
            return _reply(msg, _advertise(request, context, enrolment))
        session = _session(context)
        session.expect_session(request.round, getattr(request, "session", None))
        if isinstance(request, ShareKeysRequest):
            session.enrolment = _advertised_enrolment(context, msg.content, session)
            content = _share_keys(request, session)
        elif isinstance(request, MaskedInputRequest):
            return _masked_input(msg, request, session, context, call_next)
        elif isinstance(request, ConsistencyRequest):
            session.enrolment = _advertised_enrolment(context, msg.content, session)  # it signs the survivor set
            signature = session.consistency_check(request.survivors)
            content = RecordDict({messages.SECAGG: ConfigRecord(ConsistencyReply(signature).record())})
        else:
            content = _unmask(request, session)
            del context.state[SESSION_STATE]
            return _reply(msg, content)
        context.state[SESSION_STATE] = ConfigRecord(session.to_state())
        return _reply(msg, content)
    except SecAggAbort as err:
        return _abort(msg, context, err)
    except (ValueError, TypeError, KeyError, CareFedError) as err:  # a value the schema let through was refused
        return _abort(msg, context, SecAggAbort(AbortReason.BAD_REQUEST, type(err).__name__))


def _abort(msg: Message, context: Context, err: SecAggAbort) -> Message:
    if SESSION_STATE in context.state:
        del context.state[SESSION_STATE]
    return _reply(msg, RecordDict({messages.STATUS: ConfigRecord({
        "state": messages.STATE_ABORTED, "reason": f"{err.reason.name}: {err}"[:400]})}))


def _reply(msg: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=msg)


def _session(context: Context) -> ClientSession:
    if SESSION_STATE not in context.state:
        raise SecAggAbort(AbortReason.WRONG_STAGE, "no advertised session")
    return ClientSession.from_state(context.state[SESSION_STATE])


def _advertised_enrolment(context: Context, content: RecordDict, session: ClientSession) -> Enrolment | None:
    """The identity a session advertised with: once keys went out signed, every later stage verifies and signs
    with it, or the site stops (a coordinator cannot turn verification off mid-session by changing the study)."""
    enrolment = enrolment_for(context, content, session.config.require_signatures)
    if session.config.require_signatures and enrolment is None:
        raise SecAggAbort(AbortReason.NO_IDENTITY, "this session's keys were advertised signed; the site's identity "
                                                   "for this request does not load")
    return enrolment


def _advertise(request: AdvertiseRequest, context: Context, enrolment: Enrolment | None) -> RecordDict:
    """Fresh keys, signed where the round requires enrolled sites. A site whose policy requires them only takes
    part in a round that runs them (and the consistency check); a site without an identity cannot take part in one
    that requires them."""
    if enrolment is not None and not request.protocol.require_signatures:
        raise SecAggAbort(AbortReason.BAD_REQUEST, "this site's policy requires enrolled peers and the consistency "
                                                   "check; the round has them off")
    if enrolment is None and request.protocol.require_signatures:
        raise SecAggAbort(AbortReason.NO_IDENTITY, "the round requires enrolled sites; this site has no identity")
    session = ClientSession(context.node_id, request.protocol, enrolment)
    ad = session.advertise_keys()
    context.state[SESSION_STATE] = ConfigRecord(session.to_state())
    reply = AdvertiseReply(ad.c_pk, ad.s_pk, ad.signature, ad.certificate)
    return RecordDict({messages.SECAGG: ConfigRecord(reply.record())})


def _share_keys(request: ShareKeysRequest, session: ClientSession) -> RecordDict:
    """Every advertised peer checked (an enrolled, distinct site where the site's policy says so), then shares."""
    ads = [Advertisement(u, request.c_pks[u], request.s_pks[u], request.signatures[u], request.certificates[u])
           for u in request.c_pks]
    ciphertexts = session.share_keys(ads, request.model_hash)
    return RecordDict({messages.SECAGG: ConfigRecord(ShareKeysReply(session.session, ciphertexts).record())})


def _masked_input(msg: Message, request: MaskedInputRequest, session: ClientSession, context: Context,
                  call_next: ClientAppCallable) -> Message:
    model = msg.content.get(messages.GLOBAL_MODEL)
    if not isinstance(model, ArrayRecord):
        raise SecAggAbort(AbortReason.BAD_REQUEST, "no global model")
    session.expect_masking()  # once per round, never replayed
    session.expect_model(model_digest([arr.data for arr in model.values()]))  # before any data is touched
    trained = call_next(msg, context)  # the ClientApp's own train handler: DP-SGD, budget check, privacy report
    if trained.has_error():
        return trained
    content = trained.content
    if content[messages.STATUS]["state"] != messages.STATE_TRAINED:
        del context.state[SESSION_STATE]  # refused: we simply do not send a masked input (handled as a dropout)
        return trained

    metrics = content[messages.TRAIN_METRICS]
    weight = int(metrics["num-examples"])
    if weight > request.max_weight:  # the reason names the setting only: the count is the site's
        raise SecAggAbort(AbortReason.BAD_INPUT, "this site's example count exceeds secagg-max-weight")
    delta, clipped = clip_l2(flatten({k: v.numpy() for k, v in content[messages.UPDATE].items()}),
                             request.update_bound)  # already clipped by the trainer; idempotent here
    clipped = clipped or bool(metrics["update-clipped"])
    codec = FixedPoint.for_cohort(request.max_weight * request.update_bound, request.cohort_size)
    encoded = np.empty(delta.size + 2, dtype=np.uint32)
    encoded[:-2] = codec.encode(delta, multiplier=weight)
    encoded[-2:] = (weight, int(clipped))
    masked = session.masked_input(request.ciphertexts, request.alive, encoded)
    context.state[SESSION_STATE] = ConfigRecord(session.to_state())
    reply = RecordDict({
        messages.STATUS: content[messages.STATUS],
        messages.MASKED_UPDATE: ArrayRecord({"masked": npy_array(masked)}),
        # only what is not secret: which site, how many steps; the count and the clip flag ride masked
        messages.TRAIN_METRICS: MetricRecord({"site": int(metrics["site"]), "steps": int(metrics["steps"])}),
    })
    for name in (messages.PRIVACY_REPORT, messages.EVAL_METRICS):  # public reports, as the policy allows
        if name in content:
            reply[name] = content[name]
    return _reply(msg, reply)


def _unmask(request: UnmaskRequest, session: ClientSession) -> RecordDict:
    response = session.unmask(request.alive, request.dropped, request.signatures)
    return RecordDict({messages.SECAGG: ConfigRecord(UnmaskReply(response.b_shares, response.s_shares).record())})
