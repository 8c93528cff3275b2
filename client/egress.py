"""Egress guard: the last thing every reply passes before it leaves the site. It fails closed.

A reply may carry only what the protocol sends: the schema in common.replies (which the server checks too), with
a plain update only where the site allows one (simulations, or `allow-plain-updates=true` in the SuperNode's node
config).

Anything else (an image tensor, an extra record, an unknown metric, a float update where a masked one is due)
is refused: the mod raises, so Flower sends an error reply with this module's reason and no content, and the
round fails for this site. An exception from inside the ClientApp leaves as its type alone (its message could
carry data: a file path, a value); the full reason stays in the egress log. Every verdict goes to the site's
egress log, `egress.jsonl` in its state folder:
time, run, round, message type, stage, each record's name, kind and byte size, the whole reply's byte size
and SHA-256 digest, and the verdict (never the values).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.serde import recorddict_to_proto

from common import messages
from common.replies import ReplyRefused, check_reply, stage_of

ALLOW_PLAIN_KEY = "allow-plain-updates"  # node_config: a deployed site may accept sending unmasked updates


class EgressRefused(RuntimeError):
    """A reply broke the site's egress policy; it was not sent."""


class SiteFailure(RuntimeError):
    """The site could not answer. Flower sends this text to the coordinator, so it names the error type only;
    the site's egress log keeps the full reason."""


def egress_guard(state_dir: Callable[[Context, RecordDict], Path | None], *,
                 plain_allowed: Callable[[Context], bool]) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """A Flower client mod. `state_dir` names the site's folder for its egress log (None: no log)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        stage = stage_of(msg.content) if msg.metadata.message_type == MessageType.TRAIN else ""
        try:
            reply = call_next(msg, context)
        except Exception as err:  # whatever failed inside, only its type leaves (a message could carry data)
            folder = state_dir(context, msg.content)
            if folder is not None:
                with contextlib.suppress(OSError):  # the error reply leaves all the same; it carries no data
                    _log(folder, msg, stage, RecordDict(), "error", f"{type(err).__name__}: {err}"[:2000])
            raise SiteFailure(f"the site could not answer ({type(err).__name__}); see its egress log") from None
        if reply.has_error():  # an error reply carries only Flower's error code and reason, no records
            return reply
        content = reply.content
        try:
            check_reply(msg.metadata.message_type, stage, msg.content, content, plain_allowed=plain_allowed(context))
            verdict, reason = "sent", ""
        except ReplyRefused as err:
            verdict, reason = "refused", str(err)
        folder = state_dir(context, msg.content)
        if folder is not None:
            try:
                _log(folder, msg, stage, content, verdict, reason)
            except OSError as err:  # a read-only or full state folder: only a refusal, which carries no data, leaves
                if not _is_refusal(content):
                    raise SiteFailure(f"the site's egress log cannot be written ({type(err).__name__}); only a "
                                      "refusal leaves without it") from None
        if verdict == "refused":
            raise EgressRefused(f"egress guard refused this site's {msg.metadata.message_type} reply: {reason}")
        return reply

    return mod


def _is_refusal(content: RecordDict) -> bool:
    status = content.get(messages.STATUS)
    return set(content.keys()) == {messages.STATUS} and isinstance(status, ConfigRecord) \
        and status.get("state") == messages.STATE_REFUSED


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
