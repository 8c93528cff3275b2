"""The egress guard with real Flower messages and the real ClientApp mods: what may leave a site, and what not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from client.egress import EgressRefused, egress_guard
from common import messages
from common.replies import PRIVACY_LISTS, PRIVACY_SCALARS, ReplyRefused, check_reply
from common.secagg.shamir import SHARE_BYTES
from common.secagg.stages import CIPHERTEXT_BYTES

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # messages need a task identity

SHAPES = {"conv.weight": (4, 1, 3, 3), "fc.bias": (10,)}
MODEL_SIZE = sum(int(np.prod(s)) for s in SHAPES.values())




def _request(stage: str | None = None, **secagg) -> RecordDict:
    content = RecordDict({
        messages.STUDY: ConfigRecord({"run-name": "t"}),
        messages.GLOBAL_MODEL: ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()}),
    })
    if stage is not None:
        content[messages.SECAGG] = ConfigRecord({"stage": stage, **secagg})
    return content


def _message(content: RecordDict, message_type: str = MessageType.TRAIN) -> Message:
    return Message(content, dst_node_id=7, message_type=message_type, group_id="3")


def _context(tmp: Path) -> Context:
    return Context(run_id=1, node_id=7, node_config={"site-id": 2, "state-dir": str(tmp)}, state=RecordDict(),
                   run_config={})


def _guarded(tmp: Path, reply_content: RecordDict, request: RecordDict, plain: bool = False,
             message_type: str = MessageType.TRAIN) -> Message:
    mod = egress_guard(lambda ctx, req: tmp, plain_allowed=lambda ctx: plain)
    msg = _message(request, message_type)
    return mod(msg, _context(tmp), lambda m, c: Message(reply_content, reply_to=m))


def _masked_reply(length: int = MODEL_SIZE + 2, dtype=np.uint32) -> RecordDict:
    return RecordDict({
        messages.STATUS: ConfigRecord({"state": "trained", "reason": ""}),
        messages.MASKED_UPDATE: ArrayRecord({"masked": Array(np.zeros(length, dtype))}),
        messages.TRAIN_METRICS: MetricRecord({"site": 2, "steps": 10}),
        messages.PRIVACY_REPORT: _full_report(),
    })


def _full_report() -> MetricRecord:
    """A privacy report with every field the schema requires (values do not matter to the guard)."""
    return MetricRecord({**{k: 1.0 for k in PRIVACY_SCALARS}, **{k: [1.0] for k in PRIVACY_LISTS}})


def _log(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "egress.jsonl").read_text().splitlines()]


def test_a_masked_update_of_the_model_size_leaves_and_is_logged(tmp_path: Path):
    reply = _guarded(tmp_path, _masked_reply(), _request(messages.STAGE_MASKED_INPUT))
    assert not reply.has_error()
    [line] = _log(tmp_path)
    assert line["verdict"] == "sent" and line["stage"] == messages.STAGE_MASKED_INPUT
    assert line["records"][messages.MASKED_UPDATE]["bytes"] >= 4 * (MODEL_SIZE + 2)
    assert len(line["sha256"]) == 64 and line["bytes"] > 4 * MODEL_SIZE


def _image_replies() -> dict[str, RecordDict]:
    image = np.random.default_rng(0).integers(0, 256, (1, 28, 28), dtype=np.uint8)
    trained = ConfigRecord({"state": "trained", "reason": ""})
    return {
        "an image array beside the update": RecordDict({
            **_masked_reply(), "debug": ArrayRecord({"image": Array(image)})}),
        "an image in place of the masked update": RecordDict({
            messages.STATUS: trained, messages.MASKED_UPDATE: ArrayRecord({"masked": Array(image.ravel())})}),
        "an image as float32 padded to the update's length": _masked_reply(dtype=np.float32),
        "pixels as a metric": RecordDict({
            messages.STATUS: trained, messages.TRAIN_METRICS: MetricRecord({"site": 2, "pixel-0": 0.5})}),
        "pixels in the privacy history": RecordDict({
            messages.STATUS: trained,
            messages.PRIVACY_REPORT: MetricRecord({"history-noise": [0.5] * 784, "site": 2, "extra": 1.0})}),
        "pixels in the status reason": RecordDict({
            messages.STATUS: ConfigRecord({"state": "trained", "reason": "x" * 1000})}),
        "an extra config key": RecordDict({
            messages.STATUS: ConfigRecord({"state": "trained", "reason": "", "pixels": image.tobytes()})}),
    }


@pytest.mark.parametrize("case", list(_image_replies()))
def test_a_broken_client_app_that_sends_image_data_is_refused_and_logged(tmp_path: Path, case: str):
    with pytest.raises(EgressRefused, match="egress guard refused"):
        _guarded(tmp_path, _image_replies()[case], _request(messages.STAGE_MASKED_INPUT))
    [line] = _log(tmp_path)
    assert line["verdict"] == "refused" and line["reason"]
    assert "pixel" not in json.dumps(line["records"]) or case == "an image array beside the update"


def test_an_unmasked_update_is_refused_unless_the_site_allows_plain_updates(tmp_path: Path):
    plain = RecordDict({
        messages.STATUS: ConfigRecord({"state": "trained", "reason": ""}),
        messages.UPDATE: ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()}),
        messages.TRAIN_METRICS: MetricRecord({"site": 2, "num-examples": 100, "steps": 4, "update-clipped": 0}),
    })
    with pytest.raises(EgressRefused, match="unmasked model update"):
        _guarded(tmp_path, plain, _request())
    assert not _guarded(tmp_path, plain, _request(), plain=True).has_error()
    wrong_shape = RecordDict({**plain, messages.UPDATE: ArrayRecord({
        "conv.weight": Array(np.zeros((28, 28), np.float32)), "fc.bias": Array(np.zeros(10, np.float32))})})
    with pytest.raises(EgressRefused, match=r"float32\[28, 28\], expected float32\[4, 1, 3, 3\]"):
        _guarded(tmp_path, wrong_shape, _request(), plain=True)
    trailing = Array(np.zeros(10, np.float32))
    trailing.data = trailing.data + bytes(784)  # an image appended behind a correctly declared array
    smuggled = RecordDict({**plain, messages.UPDATE: ArrayRecord({
        "conv.weight": Array(np.zeros(SHAPES["conv.weight"], np.float32)), "fc.bias": trailing})})
    with pytest.raises(EgressRefused, match="payload has the wrong size"):
        _guarded(tmp_path, smuggled, _request(), plain=True)


def test_secure_aggregation_stages_allow_only_their_fixed_size_fields():
    ids = [bytes(7) + b"\x03", bytes(7) + b"\x01", bytes(7) + b"\x02"]
    advertise = _request(messages.STAGE_ADVERTISE)
    good = RecordDict({messages.SECAGG: ConfigRecord({"c-pk": bytes(32), "s-pk": bytes(32), "signature": b"",
                                                      "certificate": b""})})
    check_reply(MessageType.TRAIN, messages.STAGE_ADVERTISE, advertise, good, plain_allowed=False)
    smuggled = RecordDict({messages.SECAGG: ConfigRecord({"c-pk": bytes(784), "s-pk": bytes(32), "signature": b"",
                                                          "certificate": b""})})
    with pytest.raises(ReplyRefused, match="'c-pk' must be 32 bytes"):
        check_reply(MessageType.TRAIN, messages.STAGE_ADVERTISE, advertise, smuggled, plain_allowed=False)

    share = _request(messages.STAGE_SHARE_KEYS, ids=ids)
    reply = RecordDict({messages.SECAGG: ConfigRecord({
        "session": bytes(32), "receivers": ids[1:], "ciphertexts": [bytes(CIPHERTEXT_BYTES)] * 2})})
    check_reply(MessageType.TRAIN, messages.STAGE_SHARE_KEYS, share, reply, plain_allowed=False)
    smuggled = RecordDict({messages.SECAGG: ConfigRecord({
        "session": bytes(32), "receivers": ids[1:], "ciphertexts": [bytes(CIPHERTEXT_BYTES), bytes(784)]})})
    with pytest.raises(ReplyRefused, match="'ciphertexts' must be a list of 176-byte strings"):
        check_reply(MessageType.TRAIN, messages.STAGE_SHARE_KEYS, share, smuggled, plain_allowed=False)
    too_many = RecordDict({messages.SECAGG: ConfigRecord({
        "session": bytes(32), "receivers": ids * 2, "ciphertexts": [bytes(CIPHERTEXT_BYTES)] * 6})})
    with pytest.raises(ReplyRefused, match="'receivers' is longer than the cohort"):
        check_reply(MessageType.TRAIN, messages.STAGE_SHARE_KEYS, share, too_many, plain_allowed=False)
    node_zero = RecordDict({messages.SECAGG: ConfigRecord({
        "session": bytes(32), "receivers": [bytes(8)], "ciphertexts": [bytes(CIPHERTEXT_BYTES)]})})
    with pytest.raises(ReplyRefused, match="names node 0"):
        check_reply(MessageType.TRAIN, messages.STAGE_SHARE_KEYS, share, node_zero, plain_allowed=False)


def test_evaluation_replies_carry_only_the_four_metrics(tmp_path: Path):
    good = RecordDict({messages.EVAL_METRICS: MetricRecord({"site": 2, "num-examples": 40, "loss": 0.3,
                                                            "accuracy": 0.9})})
    assert not _guarded(tmp_path, good, _request(), message_type=MessageType.EVALUATE).has_error()
    bad = RecordDict({messages.EVAL_METRICS: MetricRecord({"site": 2, "num-examples": 40, "loss": 0.3,
                                                           "accuracy": 0.9, "per-image-loss": [0.1, 0.2]})})
    with pytest.raises(EgressRefused, match="'per-image-loss' is not on the allow-list"):
        _guarded(tmp_path, bad, _request(), message_type=MessageType.EVALUATE)


def test_an_unmask_reply_answers_the_next_round_only_where_it_was_asked():
    ids = [bytes(7) + b"\x01", bytes(7) + b"\x02"]
    unmask = {"b-owners": ids, "b-shares": [bytes(SHARE_BYTES)] * 2, "s-owners": [], "s-shares": []}
    advertisement = {"c-pk": bytes(32), "s-pk": bytes(32), "signature": b"", "certificate": b""}
    plain = _request(messages.STAGE_UNMASK, alive=ids, dropped=[])
    bundled = _request(messages.STAGE_UNMASK, alive=ids, dropped=[])
    bundled[messages.SECAGG_NEXT] = ConfigRecord({"stage": messages.STAGE_ADVERTISE, "round": 4})

    def reply(**next_round: dict) -> RecordDict:
        content = RecordDict({messages.SECAGG: ConfigRecord(unmask)})
        for name, values in next_round.items():
            content[name.replace("_", "-")] = ConfigRecord(values)
        return content

    for answer in (reply(), reply(secagg_next=advertisement),
                   reply(status_next={"state": messages.STATE_REFUSED, "reason": "PolicyRefusal: budget"})):
        check_reply(MessageType.TRAIN, messages.STAGE_UNMASK, bundled, answer, plain_allowed=False)
    with pytest.raises(ReplyRefused, match="answers no next-round request"):  # keys nobody asked for
        check_reply(MessageType.TRAIN, messages.STAGE_UNMASK, plain, reply(secagg_next=advertisement),
                    plain_allowed=False)
    with pytest.raises(ReplyRefused, match="'c-pk' must be 32 bytes"):
        check_reply(MessageType.TRAIN, messages.STAGE_UNMASK, bundled,
                    reply(secagg_next={**advertisement, "c-pk": bytes(784)}), plain_allowed=False)
    with pytest.raises(ReplyRefused, match="both an advertisement and a status"):
        check_reply(MessageType.TRAIN, messages.STAGE_UNMASK, bundled, reply(
            secagg_next=advertisement, status_next={"state": messages.STATE_REFUSED, "reason": ""}),
            plain_allowed=False)
    with pytest.raises(ReplyRefused, match="not a refusal or an abort"):
        check_reply(MessageType.TRAIN, messages.STAGE_UNMASK, bundled,
                    reply(status_next={"state": messages.STATE_TRAINED, "reason": ""}), plain_allowed=False)
