"""Egress guard: the last thing every reply passes before it leaves the site. It fails closed.

A reply may carry only what the protocol sends, record by record: the message type it answers, the record names
of that stage, for each record its kind (arrays, metrics, config), only allow-listed keys, values of the expected
type and size. Arrays: a masked update is uint32 of exactly the global model's size + 2; a plain update (only
where the site's policy allows one: simulations, or `allow-plain-updates=true` in the SuperNode's node config) is
float32 shaped exactly like the global model. Secure-aggregation keys, ciphertexts and shares have their fixed
byte sizes, and lists are no longer than the cohort. Metrics are scalars (or the accountant's short history
lists) from an allow-list. The one free-text field, a status reason, is bounded.

Anything else (an image tensor, an extra record, an unknown metric, a float update where a masked one is due)
is refused: the mod raises, so Flower sends an error reply with this module's reason and no content, and the
round fails for this site. Every verdict goes to the site's egress log, `egress.jsonl` in its state folder:
time, run, round, message type, stage, each record's name, kind and byte size, the whole reply's byte size
and SHA-256 digest, and the verdict (never the values).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.serde import recorddict_to_proto

from common import messages
from common.secagg.shamir import SHARE_BYTES
from common.wire import array_view

ALLOW_PLAIN_KEY = "allow-plain-updates"  # node_config: a deployed site may accept sending unmasked updates
KEY_BYTES = 32  # X25519 public key
SIGNATURE_BYTES = (0, 64)  # none, or Ed25519
SESSION_BYTES = 32
NODE_ID_BYTES = 8
CIPHERTEXT_BYTES = 12 + 2 * NODE_ID_BYTES + 2 * SHARE_BYTES + 16  # nonce + ids + two shares + GCM tag
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


class EgressRefused(RuntimeError):
    """A reply broke the site's egress policy; it was not sent."""


def egress_guard(state_dir: Callable[[Context, RecordDict], Path | None], *,
                 plain_allowed: Callable[[Context], bool]) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """A Flower client mod. `state_dir` names the site's folder for its egress log (None: no log)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if reply.has_error():  # an error reply carries only Flower's error code and reason, no records
            return reply
        content = reply.content
        stage = _stage(msg.content) if msg.metadata.message_type == MessageType.TRAIN else ""
        try:
            check_reply(msg.metadata.message_type, stage, msg.content, content, plain_allowed=plain_allowed(context))
            verdict, reason = "sent", ""
        except EgressRefused as err:
            verdict, reason = "refused", str(err)
        folder = state_dir(context, msg.content)
        if folder is not None:
            _log(folder, msg, stage, content, verdict, reason)
        if verdict == "refused":
            raise EgressRefused(f"egress guard refused this site's {msg.metadata.message_type} reply: {reason}")
        return reply

    return mod


def check_reply(message_type: str, stage: str, request: RecordDict, reply: RecordDict, *,
                plain_allowed: bool) -> None:
    """Raise EgressRefused unless `reply` is exactly what the protocol sends for this request."""
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
        raise EgressRefused(f"message type '{message_type}' is not part of the protocol")
    if messages.SECAGG in request and stage != messages.STAGE_MASKED_INPUT:
        _secagg_reply(stage, request, reply)
        return
    # a training reply: plain update, masked update, or a status (refused, aborted) without an update
    allowed: dict[str, type] = {messages.STATUS: ConfigRecord, messages.PRIVACY_REPORT: MetricRecord,
                                messages.TRAIN_METRICS: MetricRecord}
    masked = messages.SECAGG in request
    allowed[messages.MASKED_UPDATE if masked else messages.UPDATE] = ArrayRecord
    _records(reply, allowed, required={messages.STATUS})
    _status(reply[messages.STATUS])
    if messages.PRIVACY_REPORT in reply:
        _privacy_report(reply[messages.PRIVACY_REPORT])
    if masked:
        if messages.TRAIN_METRICS in reply:
            _metrics(reply[messages.TRAIN_METRICS], MASKED_TRAIN_METRICS)
        if messages.MASKED_UPDATE in reply:
            size = sum(math.prod(s) for s in model_shapes.values()) + 2
            _arrays(reply[messages.MASKED_UPDATE], {"masked": ((size,), np.uint32)})
        return
    if messages.TRAIN_METRICS in reply:
        _metrics(reply[messages.TRAIN_METRICS], TRAIN_METRICS)
    if messages.UPDATE in reply:
        if not plain_allowed:
            raise EgressRefused("an unmasked model update; this site sends updates only through secure "
                                f"aggregation (set {ALLOW_PLAIN_KEY}=true in its node config to allow plain ones)")
        _arrays(reply[messages.UPDATE], {k: (s, np.float32) for k, s in model_shapes.items()})


def _secagg_reply(stage: str, request: RecordDict, reply: RecordDict) -> None:
    if messages.STATUS in reply:  # the site aborted the protocol: a status and nothing else
        _records(reply, {messages.STATUS: ConfigRecord}, required={messages.STATUS})
        _status(reply[messages.STATUS])
        return
    _records(reply, {messages.SECAGG: ConfigRecord}, required={messages.SECAGG})
    record = reply[messages.SECAGG]
    cohort = _cohort_size(request[messages.SECAGG])
    if stage == messages.STAGE_ADVERTISE:
        _config(record, {"c-pk": _bytes_of(KEY_BYTES), "s-pk": _bytes_of(KEY_BYTES),
                         "signature": _bytes_of(*SIGNATURE_BYTES)})
    elif stage == messages.STAGE_SHARE_KEYS:
        _config(record, {"session": _bytes_of(SESSION_BYTES), "receivers": _bytes_list(NODE_ID_BYTES, cohort),
                         "ciphertexts": _bytes_list(CIPHERTEXT_BYTES, cohort)})
        if len(record["receivers"]) != len(record["ciphertexts"]):
            raise EgressRefused("share-keys: receivers and ciphertexts differ in number")
    elif stage == messages.STAGE_UNMASK:
        _config(record, {"b-owners": _bytes_list(NODE_ID_BYTES, cohort), "b-shares": _bytes_list(SHARE_BYTES, cohort),
                         "s-owners": _bytes_list(NODE_ID_BYTES, cohort), "s-shares": _bytes_list(SHARE_BYTES, cohort)})
    else:
        raise EgressRefused(f"unknown secure-aggregation stage '{stage}'")


def _stage(request: RecordDict) -> str:
    if messages.SECAGG in request:
        return str(request[messages.SECAGG].get("stage", "?"))
    return messages.STAGE_MASKED_INPUT if messages.GLOBAL_MODEL in request else ""


def _model_shapes(request: RecordDict) -> dict[str, tuple[int, ...]]:
    model = request.get(messages.GLOBAL_MODEL)
    if not isinstance(model, ArrayRecord):
        return {}
    return {k: tuple(int(d) for d in v.shape) for k, v in model.items()}


def _cohort_size(record: ConfigRecord) -> int:
    for key in ("ids", "alive", "senders"):
        if key in record:
            return len(record[key]) + len(record.get("dropped", []))
    return 0


def _records(reply: RecordDict, allowed: dict[str, type], required: Iterable[str] = ()) -> None:
    for name, record in reply.items():
        if name not in allowed:
            raise EgressRefused(f"record '{name}' is not part of this reply (allowed: {sorted(allowed)})")
        if not isinstance(record, allowed[name]):
            raise EgressRefused(f"record '{name}' is a {type(record).__name__}, expected {allowed[name].__name__}")
    missing = set(required) - set(reply.keys())
    if missing:
        raise EgressRefused(f"missing record(s) {sorted(missing)}")


def _status(record: ConfigRecord) -> None:
    _config(record, {"state": lambda v: isinstance(v, str) and v in STATES,
                     "reason": lambda v: isinstance(v, str) and len(v) <= MAX_REASON_CHARS})


def _metrics(record: MetricRecord, allowed: set[str], required: Iterable[str] = ()) -> None:
    for key, value in record.items():
        if key not in allowed:
            raise EgressRefused(f"metric '{key}' is not on the allow-list {sorted(allowed)}")
        if not _finite_scalar(value):
            raise EgressRefused(f"metric '{key}' is not a finite scalar")
    missing = set(required) - set(record.keys())
    if missing:
        raise EgressRefused(f"missing metric(s) {sorted(missing)}")


def _privacy_report(record: MetricRecord) -> None:
    for key, value in record.items():
        if key in PRIVACY_SCALARS:
            ok = _finite_scalar(value)
        elif key in PRIVACY_LISTS:
            ok = isinstance(value, list) and len(value) <= MAX_HISTORY and all(_finite_scalar(v) for v in value)
        else:
            raise EgressRefused(f"privacy report key '{key}' is not on the allow-list")
        if not ok:
            raise EgressRefused(f"privacy report value '{key}' has the wrong type or size")


def _finite_scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _bytes_of(*sizes: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, bytes) and len(v) in sizes


def _bytes_list(size: int, max_items: int) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, list) and len(v) <= max_items
                      and all(isinstance(b, bytes) and len(b) == size for b in v))


def _config(record: ConfigRecord, checks: dict[str, Callable[[Any], bool]]) -> None:
    if set(record.keys()) != set(checks):
        raise EgressRefused(f"config keys {sorted(record.keys())}, expected exactly {sorted(checks)}")
    for key, check in checks.items():
        if not check(record[key]):
            raise EgressRefused(f"'{key}' has the wrong type or size")


def _arrays(record: ArrayRecord, expected: dict[str, tuple[tuple[int, ...], type]]) -> None:
    if set(record.keys()) != set(expected):
        raise EgressRefused(f"arrays {sorted(record.keys())[:8]}, expected exactly {sorted(expected)[:8]}")
    for key, (shape, dtype) in expected.items():
        array = record[key]
        if tuple(array.shape) != shape or np.dtype(array.dtype) != np.dtype(dtype):
            raise EgressRefused(f"array '{key}' is {array.dtype}{list(array.shape)}, "
                                f"expected {np.dtype(dtype).name}{list(shape)}")
        try:  # the .npy payload itself: its header must agree, and no byte may trail the declared values
            array_view(array.data, dtype, math.prod(shape))
        except ValueError as err:
            raise EgressRefused(f"array '{key}': {err}") from None


def _log(folder: Path, msg: Message, stage: str, content: RecordDict, verdict: str, reason: str) -> None:
    proto = recorddict_to_proto(content)
    payload = proto.SerializeToString()
    records = {item.key: {"kind": type(content[item.key]).__name__, "bytes": item.ByteSize()} for item in proto.items}
    study = msg.content.get(messages.STUDY)
    status = content.get(messages.STATUS)
    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": str(study.get("run-name", ""))[:128] if isinstance(study, ConfigRecord) else "",
        "round": msg.metadata.group_id, "message-type": msg.metadata.message_type, "stage": stage,
        "records": records, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
        "verdict": verdict, "reason": reason,
        # what the site answered: a refusal's named reason is in the log as well as in the ledger
        "status": {"state": status["state"], "reason": status["reason"]}
        if verdict == "sent" and isinstance(status, ConfigRecord) else None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "egress.jsonl").open("a") as out:
        out.write(json.dumps(line) + "\n")
