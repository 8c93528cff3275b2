"""What a site may send back, record by record: one schema for every reply, shared by both sides.

The site's egress guard checks every reply against it before the reply leaves (and refuses what does not fit);
the server checks every reply it receives against the same schema and treats one that does not fit as that site
dropping out. A reply may carry only the record names of its stage, each of its kind, allow-listed keys, values
of the expected type and size: a masked update is uint32 of exactly the global model's size + 2; a plain update
is float32 shaped exactly like the global model (only where allowed); secure-aggregation replies follow their
stage's schema (common.secagg.stages), with lists no longer than the cohort; metrics are finite scalars (or the
accountant's short history lists) from an allow-list; the one free-text field, a status reason, is bounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from common import messages
from common.secagg.stages import AdvertiseReply, MalformedMessage, Stage, parse_reply
from common.wire import array_view

MAX_REASON_CHARS = 400
MAX_HISTORY = 1000  # distinct (noise, rate) entries in an accountant's history

TRAIN_METRICS = {"site", "num-examples", "steps", "update-clipped"}
MASKED_TRAIN_METRICS = {"site", "steps"}  # the example count and clip flag ride inside the masked vector
EVAL_METRICS = {"site", "num-examples", "loss", "accuracy"}
PRIVACY_SCALARS = {"site", "epsilon", "epsilon-independent", "delta", "budget-epsilon", "sample-rate",
                   "noise-multiplier", "max-grad-norm", "steps-round", "steps-total", "next-round-affordable",
                   "planned-rounds", "max-images-per-patient"}
PRIVACY_LISTS = {"history-noise", "history-rate", "history-steps"}
STATES = {messages.STATE_TRAINED, messages.STATE_REFUSED, messages.STATE_ABORTED}


NextRound = AdvertiseReply | tuple[str, str] | None  # a site's answer to the next round's advertise request


class ReplyRefused(ValueError):
    """A reply does not follow the protocol's schema for its request."""


def check_reply(message_type: str, stage: str, request: RecordDict, reply: RecordDict, *,
                plain_allowed: bool) -> None:
    """Raise ReplyRefused unless `reply` is exactly what the protocol sends for this request."""
    model_shapes = _model_shapes(request)
    if message_type == MessageType.EVALUATE and messages.STATUS in reply:  # a refusal: its status alone
        _records(reply, {messages.STATUS: ConfigRecord}, required={messages.STATUS})
        _status(reply[messages.STATUS])
        return
    if message_type == MessageType.EVALUATE:
        _records(reply, {messages.EVAL_METRICS: MetricRecord})
        _metrics(reply[messages.EVAL_METRICS], EVAL_METRICS, required=EVAL_METRICS)
        return
    if message_type != MessageType.TRAIN:
        raise ReplyRefused(f"message type '{message_type}' is not part of the protocol")
    if messages.SECAGG in request and stage != messages.STAGE_MASKED_INPUT:
        _secagg_reply(stage, request, reply)
        return
    # a training reply: plain update, masked update, or a status (refused, aborted) without an update
    allowed: dict[str, type] = {messages.STATUS: ConfigRecord, messages.PRIVACY_REPORT: MetricRecord,
                                messages.TRAIN_METRICS: MetricRecord, messages.EVAL_METRICS: MetricRecord}
    masked = messages.SECAGG in request
    allowed[messages.MASKED_UPDATE if masked else messages.UPDATE] = ArrayRecord
    _records(reply, allowed, required={messages.STATUS})
    _status(reply[messages.STATUS])
    if messages.PRIVACY_REPORT in reply:
        _privacy_report(reply[messages.PRIVACY_REPORT])
    if messages.EVAL_METRICS in reply:  # the received model's evaluation, sent with the update
        if messages.STATUS in reply and reply[messages.STATUS]["state"] != messages.STATE_TRAINED:
            raise ReplyRefused("evaluation metrics in a reply that did not train")
        _metrics(reply[messages.EVAL_METRICS], EVAL_METRICS, required=EVAL_METRICS)
    if masked:
        if messages.TRAIN_METRICS in reply:
            _metrics(reply[messages.TRAIN_METRICS], MASKED_TRAIN_METRICS, required=MASKED_TRAIN_METRICS)
        if messages.MASKED_UPDATE in reply:
            size = sum(math.prod(s) for s in model_shapes.values()) + 2
            _arrays(reply[messages.MASKED_UPDATE], {"masked": ((size,), np.uint32)})
        return
    if messages.TRAIN_METRICS in reply:
        _metrics(reply[messages.TRAIN_METRICS], TRAIN_METRICS, required=TRAIN_METRICS)
    if messages.UPDATE in reply:
        if not plain_allowed:
            raise ReplyRefused("an unmasked model update; this site sends updates only through secure "
                                "aggregation (set allow-plain-updates=true in its node config to allow plain ones)")
        _arrays(reply[messages.UPDATE], {k: (s, np.float32) for k, s in model_shapes.items()})


def split_next_round(request: RecordDict, reply: RecordDict) -> tuple[RecordDict, NextRound]:
    """The reply without its next-round part, and that part: the site's advertisement for the next round, the
    (state, reason) of its refusal or abort, or None where it sent neither. Only a request that carried the next
    round's advertise request (an unmask request, common.messages.SECAGG_NEXT) may be answered with one."""
    names = {messages.SECAGG_NEXT, messages.STATUS_NEXT} & set(reply.keys())
    if not names:
        return reply, None
    if messages.SECAGG_NEXT not in request:
        raise ReplyRefused(f"record '{sorted(names)[0]}' answers no next-round request")
    if len(names) > 1:
        raise ReplyRefused("both an advertisement and a status for the next round")
    [name] = names
    record = reply[name]
    if not isinstance(record, ConfigRecord):
        raise ReplyRefused(f"record '{name}' is not a config record")
    rest = RecordDict({key: value for key, value in reply.items() if key != name})
    if name == messages.STATUS_NEXT:
        _status(record)
        if record["state"] == messages.STATE_TRAINED:
            raise ReplyRefused("a next-round status that is not a refusal or an abort")
        return rest, (str(record["state"]), str(record["reason"]))
    try:
        return rest, parse_reply(Stage.ADVERTISE, record, 0)
    except MalformedMessage as err:
        raise ReplyRefused(f"next round: {err}") from None


def _secagg_reply(stage: str, request: RecordDict, reply: RecordDict) -> None:
    reply, _ = split_next_round(request, reply)
    if messages.STATUS in reply:  # the site aborted or refused the request: a status and nothing else
        _records(reply, {messages.STATUS: ConfigRecord}, required={messages.STATUS})
        _status(reply[messages.STATUS])
        return
    _records(reply, {messages.SECAGG: ConfigRecord}, required={messages.SECAGG})
    if stage not in {Stage.ADVERTISE, Stage.SHARE_KEYS, Stage.CONSISTENCY, Stage.UNMASK}:
        raise ReplyRefused(f"unknown secure-aggregation stage '{stage}'")
    try:
        parse_reply(Stage(stage), reply[messages.SECAGG], _cohort_size(request[messages.SECAGG]))
    except MalformedMessage as err:
        raise ReplyRefused(str(err)) from None


def status_of(content: RecordDict) -> tuple[str, str] | None:
    """A reply's (state, reason), checked; None when it has no status."""
    record = content.get(messages.STATUS)
    if record is None:
        return None
    if not isinstance(record, ConfigRecord):
        raise ReplyRefused("the status is not a config record")
    _status(record)
    return str(record["state"]), str(record["reason"])


def stage_of(request: RecordDict) -> str:
    """The secure-aggregation stage a training request is for (masked input for a plain training request)."""
    record = request.get(messages.SECAGG)
    if record is not None:
        stage = record.get("stage", "?") if isinstance(record, ConfigRecord) else "?"
        return str(stage)[:32]
    return messages.STAGE_MASKED_INPUT if messages.GLOBAL_MODEL in request else ""


def _model_shapes(request: RecordDict) -> dict[str, tuple[int, ...]]:
    model = request.get(messages.GLOBAL_MODEL)
    if not isinstance(model, ArrayRecord):
        return {}
    return {k: tuple(int(d) for d in v.shape) for k, v in model.items()}


def _cohort_size(record: ConfigRecord) -> int:
    """The most entries a reply's lists may hold: the cohort the request names (advertise names none: 0)."""
    for key in ("ids", "alive", "senders", "survivors"):
        if key in record and isinstance(record[key], list):
            return len(record[key]) + len(record.get("dropped", []) or [])
    return 0


def _records(reply: RecordDict, allowed: dict[str, type], required: Iterable[str] = ()) -> None:
    for name, record in reply.items():
        if name not in allowed:
            raise ReplyRefused(f"record '{name}' is not part of this reply (allowed: {sorted(allowed)})")
        if not isinstance(record, allowed[name]):
            raise ReplyRefused(f"record '{name}' is a {type(record).__name__}, expected {allowed[name].__name__}")
    missing = set(required) - set(reply.keys())
    if missing:
        raise ReplyRefused(f"missing record(s) {sorted(missing)}")


def _status(record: ConfigRecord) -> None:
    _config(record, {"state": lambda v: isinstance(v, str) and v in STATES,
                     "reason": lambda v: isinstance(v, str) and len(v) <= MAX_REASON_CHARS})


def _metrics(record: MetricRecord, allowed: set[str], required: Iterable[str] = ()) -> None:
    for key, value in record.items():
        if key not in allowed:
            raise ReplyRefused(f"metric '{key}' is not on the allow-list {sorted(allowed)}")
        if not _finite_scalar(value):
            raise ReplyRefused(f"metric '{key}' is not a finite scalar")
    missing = set(required) - set(record.keys())
    if missing:
        raise ReplyRefused(f"missing metric(s) {sorted(missing)}")


def _privacy_report(record: MetricRecord) -> None:
    for key, value in record.items():
        if key in PRIVACY_SCALARS:
            ok = _finite_scalar(value)
        elif key in PRIVACY_LISTS:
            ok = isinstance(value, list) and len(value) <= MAX_HISTORY and all(_finite_scalar(v) for v in value)
        else:
            raise ReplyRefused(f"privacy report key '{key}' is not on the allow-list")
        if not ok:
            raise ReplyRefused(f"privacy report value '{key}' has the wrong type or size")
    missing = (PRIVACY_SCALARS | PRIVACY_LISTS) - set(record.keys())
    if missing:
        raise ReplyRefused(f"privacy report without {sorted(missing)[0]!r}")


def _finite_scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _bytes_of(*sizes: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, bytes) and len(v) in sizes


def _bytes_list(size: int, max_items: int) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, list) and len(v) <= max_items
                      and all(isinstance(b, bytes) and len(b) == size for b in v))


def _config(record: ConfigRecord, checks: dict[str, Callable[[Any], bool]]) -> None:
    if set(record.keys()) != set(checks):
        raise ReplyRefused(f"config keys {sorted(record.keys())}, expected exactly {sorted(checks)}")
    for key, check in checks.items():
        if not check(record[key]):
            raise ReplyRefused(f"'{key}' has the wrong type or size")


def _arrays(record: ArrayRecord, expected: dict[str, tuple[tuple[int, ...], type]]) -> None:
    if set(record.keys()) != set(expected):
        raise ReplyRefused(f"arrays {sorted(record.keys())[:8]}, expected exactly {sorted(expected)[:8]}")
    for key, (shape, dtype) in expected.items():
        array = record[key]
        if tuple(array.shape) != shape or np.dtype(array.dtype) != np.dtype(dtype):
            raise ReplyRefused(f"array '{key}' is {array.dtype}{list(array.shape)}, "
                                f"expected {np.dtype(dtype).name}{list(shape)}")
        try:  # the .npy payload itself: its header must agree, and no byte may trail the declared values
            array_view(array.data, dtype, math.prod(shape))
        except ValueError as err:
            raise ReplyRefused(f"array '{key}': {err}") from None


