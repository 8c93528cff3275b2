"""Secure aggregation against an active coordinator and hostile sites, through the real mod and server adapter.

A `TamperingGrid` delivers each message to the site's real ClientApp (common.secagg behind client.secagg_mod) and
lets a test change any request before a site sees it, or any reply before the server does. What must hold: a site
never masks an update for a model other than the one bound into its session, never answers without the session id,
and refuses by name; the server never raises on a reply (a reply that does not parse is that site dropping out),
and it aborts, rather than releasing, a sum that its contributors could not have sent.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.secagg_mod import SESSION_STATE, secagg_mod
from common import messages
from common.config import resolve
from common.secagg.client import ClientSession, Enrolment
from common.secagg.errors import AbortReason
from common.secagg.identity import SiteIdentity, enrol_virtual_sites
from common.secagg.keys import new_key_pair
from common.secagg.protocol import ProtocolConfig
from common.secagg.stages import Stage
from server.secagg_round import SecAggRound, protocol_config
from server.training import request_content
from simulations.benchmarks import secagg as bench

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # messages need a task identity

M = 64
STAGES = [Stage.ADVERTISE, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.CONSISTENCY, Stage.UNMASK]
Tamper = Callable[[Stage, int, RecordDict], RecordDict | None]




class TamperingGrid(bench.LoopbackGrid):
    """The coordinator's (or a site's) hands on every message: `request` and `reply` may rewrite any of them."""

    def __init__(self, nodes: list[int], request: Tamper | None = None, reply: Tamper | None = None) -> None:
        super().__init__(bench.carefed_app(M), nodes, {})
        self.tamper_request, self.tamper_reply = request, reply
        self.seen: list[tuple[Stage, int, RecordDict]] = []

    def send_and_receive(self, messages_: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        stage = STAGES[self.stage]
        out = []
        for msg in messages_:
            node = msg.metadata.dst_node_id
            content = self.tamper_request(stage, node, msg.content) if self.tamper_request else None
            out.append(msg if content is None else Message(content, node, msg.metadata.message_type,
                                                           group_id=msg.metadata.group_id))
        replies = []
        for reply in super().send_and_receive(out, timeout=timeout):
            node = reply.metadata.src_node_id
            if not reply.has_error():
                self.seen.append((stage, node, reply.content))
                changed = self.tamper_reply(stage, node, reply.content) if self.tamper_reply else None
                if changed is not None:
                    reply = Message(changed, reply_to=_delivered(reply))
            replies.append(reply)
        return replies


def _delivered(reply: Message) -> Message:
    """A stand-in for the request `reply` answers (Message(..., reply_to=) needs one)."""
    original = Message(RecordDict(), reply.metadata.src_node_id, reply.metadata.message_type,
                       group_id=reply.metadata.group_id)
    original.metadata.__dict__["_message_id"] = reply.metadata.reply_to_message_id
    return original


WORK = Path(tempfile.mkdtemp(prefix="carefed-active-"))  # enrolled identities, shared by every round here


def _config(n: int, **overrides: object):
    """n virtual sites enrolled by this run's study CA (identities on, as a simulation runs by default)."""
    if not (WORK / f"n{n}" / "identities").exists():
        enrol_virtual_sites(n, "carefed-demo", WORK / f"n{n}" / "identities")
    return resolve(overrides={"num-sites": n, "update-clip-norm": 2.0, "secagg-max-weight": 1000,
                              "output-dir": str(WORK), "run-name": f"n{n}", **overrides})


def _round(n: int = 8, request: Tamper | None = None, reply: Tamper | None = None, dropout_rate: float = 0.3):
    nodes = list(range(1, n + 1))
    grid = TamperingGrid(nodes, request, reply)
    config = _config(n, **{"secagg-dropout-rate": dropout_rate})
    content = request_content(config.site_request(num_classes=10, channels=1, image_size=28), 1,
                              ArrayRecord({"w": Array(np.zeros(M, np.float32))}), simulation=config)
    outcome = SecAggRound(grid, config, 1, content, M, lambda node, reply_: None).run(nodes)
    return outcome, grid


def _mean_of(nodes: Iterable[int]) -> np.ndarray:
    return np.mean([bench.random_update(M, u) for u in nodes], axis=0)


def _status(grid: TamperingGrid, stage: Stage, node: int) -> str:
    [content] = [c for s, u, c in grid.seen if s == stage and u == node]
    return str(content[messages.STATUS]["reason"]) if messages.STATUS in content else ""


def _copy(content: RecordDict) -> RecordDict:
    return RecordDict({k: v for k, v in content.items()})


def _with_secagg(content: RecordDict, **changes: object) -> RecordDict:
    out = _copy(content)
    record = dict(content[messages.SECAGG])
    for key, value in changes.items():
        if value is None:
            record.pop(key, None)
        else:
            record[key] = value
    out[messages.SECAGG] = ConfigRecord(record)
    return out


def _invented_sites(kind: str) -> Tamper:
    """A coordinator that adds sites of its own to the key relay: unsigned, enrolled by another CA, or a real
    site's advertisement replayed under a new node id (Sybil)."""
    def relay(stage: Stage, node: int, content: RecordDict) -> RecordDict | None:
        if stage != Stage.SHARE_KEYS:
            return None
        record = dict(content[messages.SECAGG])
        if kind == "unsigned":
            fake = [(900 + k, new_key_pair()[1], new_key_pair()[1], b"", b"") for k in range(7)]
        elif kind == "another CA":
            other = enrol_virtual_sites(7, "carefed-demo", Path(tempfile.mkdtemp(dir=WORK)))
            fake = []
            for k, folder in enumerate(other.site_folders):
                session = ClientSession(900 + k, _protocol(), Enrolment(SiteIdentity.load(folder), None,
                                                                       "carefed-demo", "n8"))
                ad = session.advertise_keys()
                fake.append((ad.node_id, ad.c_pk, ad.s_pk, ad.signature, ad.certificate))
        else:  # a real advertisement under another node id
            fake = [(900, record["c-pks"][0], record["s-pks"][0], record["signatures"][0], record["certificates"][0])]
        for node_id, c_pk, s_pk, signature, certificate in fake:
            record["ids"] = [*record["ids"], node_id.to_bytes(8, "big")]
            for key, value in (("c-pks", c_pk), ("s-pks", s_pk), ("signatures", signature),
                               ("certificates", certificate)):
                record[key] = [*record[key], value]
        out = _copy(content)
        out[messages.SECAGG] = ConfigRecord(record)
        return out

    return relay


def _protocol() -> ProtocolConfig:
    return protocol_config(_config(8), 1, M)


@pytest.mark.parametrize("kind", ["unsigned", "another CA", "replayed under another node id"])
def test_sites_invented_by_the_coordinator_are_refused_before_any_share_is_sent(kind):
    outcome, grid = _round(request=_invented_sites(kind))
    assert outcome.aborted and outcome.total.contributors == 0
    for node in range(1, 9):
        reason = _status(grid, Stage.SHARE_KEYS, node)
        assert reason.startswith(("BAD_SIGNATURE", "DUPLICATE_ID", "DUPLICATE_KEY")), reason
    assert not any(messages.SECAGG in c for s, u, c in grid.seen if s == Stage.SHARE_KEYS)  # no share left


def test_a_site_shown_another_model_at_masked_input_refuses_and_the_rest_still_aggregate():
    def other_model(stage: Stage, node: int, content: RecordDict) -> RecordDict | None:
        if stage == Stage.MASKED_INPUT and node == 3:
            out = _copy(content)
            out[messages.GLOBAL_MODEL] = ArrayRecord({"w": Array(np.ones(M, np.float32))})
            return out
        return None

    outcome, grid = _round(request=other_model)
    assert _status(grid, Stage.MASKED_INPUT, 3).startswith("MODEL_MISMATCH")
    assert not any(messages.MASKED_UPDATE in c for s, u, c in grid.seen if u == 3)
    assert outcome.aborted == "" and outcome.dropped["masked-input"] == [3]
    np.testing.assert_allclose(outcome.total.mean(), _mean_of(u for u in range(1, 9) if u != 3), atol=1e-4)


@pytest.mark.parametrize("session, reason", [(None, "BAD_REQUEST"), (bytes(32), "WRONG_SESSION")])
def test_a_masked_input_request_without_this_sessions_id_is_refused(session, reason):
    def strip(stage: Stage, node: int, content: RecordDict) -> RecordDict | None:
        return _with_secagg(content, session=session) if stage == Stage.MASKED_INPUT and node == 2 else None

    outcome, grid = _round(request=strip)
    assert _status(grid, Stage.MASKED_INPUT, 2).startswith(reason)
    assert outcome.aborted == "" and 2 in outcome.dropped["masked-input"]
    assert SESSION_STATE not in grid.contexts[2].state  # its secrets are gone with the session


@pytest.mark.parametrize("where", ["coordinate", "weight", "clip-count"])
def test_a_manipulated_masked_vector_aborts_the_round_instead_of_releasing_a_wrong_sum(where):
    index = {"coordinate": 5, "weight": M, "clip-count": M + 1}[where]

    def shift(stage: Stage, node: int, content: RecordDict) -> RecordDict | None:
        if stage != Stage.MASKED_INPUT or node != 4 or messages.MASKED_UPDATE not in content:
            return None
        masked = content[messages.MASKED_UPDATE]["masked"].numpy().copy()
        masked[index] = (int(masked[index]) + (2**31 if where == "coordinate" else 2**20)) % 2**32
        out = _copy(content)
        out[messages.MASKED_UPDATE] = ArrayRecord({"masked": Array(masked)})
        return out

    outcome, _ = _round(reply=shift)
    assert outcome.aborted.startswith(AbortReason.IMPOSSIBLE_AGGREGATE.name)
    assert outcome.total.contributors == 0  # nothing reaches the global model


def test_a_shifted_self_mask_share_aborts_the_round():
    def shift(stage: Stage, node: int, content: RecordDict) -> RecordDict | None:
        if stage != Stage.UNMASK or node != 5:
            return None
        record = dict(content[messages.SECAGG])
        record["b-shares"] = [bytes([b[0] ^ 1]) + b[1:] for b in record["b-shares"]]  # every share it reveals
        out = _copy(content)
        out[messages.SECAGG] = ConfigRecord(record)
        return out

    outcome, _ = _round(reply=shift, dropout_rate=0.0)  # t = n: every share is used
    assert outcome.aborted and outcome.total.contributors == 0


def test_malformed_duplicate_and_oversized_replies_are_dropouts_never_a_crash():
    def spoil(stage: Stage, node: int, content: RecordDict) -> RecordDict | None:
        if stage == Stage.ADVERTISE and node == 1:
            return _with_secagg(content, **{"c-pk": None})  # a missing key
        if stage == Stage.ADVERTISE and node == 2:
            return _with_secagg(content, **{"s-pk": "not bytes"})  # a wrong type
        if stage == Stage.SHARE_KEYS and node == 3:
            record = dict(content[messages.SECAGG])
            return _with_secagg(content, receivers=record["receivers"] * 50, ciphertexts=record["ciphertexts"] * 50)
        if stage == Stage.UNMASK and node == 4:
            out = _copy(content)
            out["extra"] = ConfigRecord({"x": 1})  # a record that is not part of the reply
            return out
        return None

    outcome, _ = _round(n=10, reply=spoil)
    assert outcome.aborted == "", outcome.aborted
    assert outcome.dropped["advertise-keys-malformed"] == [1, 2]  # every cause of every dropout, by stage
    assert outcome.dropped["share-keys-malformed"] == [3]
    assert outcome.dropped["unmask-malformed"] == [4]
    survivors = [u for u in range(1, 11) if u not in (1, 2, 3)]
    np.testing.assert_allclose(outcome.total.mean(), _mean_of(survivors), atol=1e-4)


def test_a_second_unmask_request_is_refused():
    asked: list[int] = []

    def replay(stage: Stage, node: int, content: RecordDict) -> RecordDict | None:
        if stage == Stage.UNMASK:
            asked.append(node)
        return None

    outcome, grid = _round(request=replay)
    assert outcome.aborted == "" and asked == list(range(1, 9))
    # the session is gone after the first unmask: asking again is refused, no share is revealed twice
    config = _config(8)
    request = request_content(config.site_request(num_classes=10, channels=1, image_size=28), 1,
                              ArrayRecord({"w": Array(np.zeros(M, np.float32))}))
    request[messages.SECAGG] = ConfigRecord({"stage": "unmask", "round": 1, "model-hash": bytes(32),
                                             "session": bytes(32), "alive": [], "dropped": [], "signers": [],
                                             "signatures": []})
    reply = secagg_mod(Message(request, 1, "train", group_id="1"), grid.contexts[1], _no_training)
    assert reply.content[messages.STATUS]["reason"].startswith("WRONG_STAGE")


def _no_training(msg: Message, context: Context) -> Message:
    raise AssertionError("training must not be reached")


# -- fuzz: hostile requests into the mod, hostile replies into the server -------------------------------------------
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                   st.binary(max_size=80), st.text(max_size=20),
                   st.lists(st.binary(min_size=0, max_size=70), max_size=6),
                   st.lists(st.integers(-5, 2**64), max_size=4))
KEYS = st.sampled_from(["stage", "round", "model-hash", "session", "ids", "c-pks", "s-pks", "signatures", "senders",
                        "ciphertexts", "alive", "dropped", "update-bound", "max-weight", "cohort-size",
                        "protocol-server_round", "protocol-vector_length", "protocol-dropout_rate",
                        "protocol-colluding", "protocol-min_cohort", "protocol-graph_degree",
                        "protocol-require_signatures", "c-pk", "s-pk", "signature", "receivers", "b-owners",
                        "b-shares", "s-owners", "s-shares", "junk"])


def _legal(value: object) -> bool:
    """What a Flower ConfigRecord can hold at all (anything else never reaches a site)."""
    try:
        ConfigRecord({"x": value})
        return value is not None
    except (TypeError, ValueError):
        return False


@settings(max_examples=1500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(stage=st.sampled_from([*list(Stage), "nonsense"]), fields=st.dictionaries(KEYS, VALUES, max_size=12),
       prior=st.sampled_from(list(range(5))))
def test_any_request_into_the_mod_gets_a_reply_or_a_named_refusal(stage, fields, prior):
    context = _context_at(prior)
    record = {k: v for k, v in {**fields, "stage": stage}.items() if _legal(v)}
    content = RecordDict({messages.SECAGG: ConfigRecord(record),
                          messages.GLOBAL_MODEL: ArrayRecord({"w": Array(np.zeros(M, np.float32))})})
    reply = secagg_mod(Message(content, 1, "train", group_id="1"), context, _trained)
    assert not reply.has_error()
    if messages.STATUS in reply.content:
        reason = str(reply.content[messages.STATUS]["reason"])
        assert reason.split(":")[0] in AbortReason.__members__, reason


_SESSIONS: dict[int, dict] = {}


def _context_at(prior: int) -> Context:
    """A site whose session has passed `prior` stages of an honest round (built once, copied per example)."""
    if prior not in _SESSIONS:
        state = _partial_round(prior).contexts[1].state
        _SESSIONS[prior] = dict(state[SESSION_STATE]) if SESSION_STATE in state else {}
    state = RecordDict({SESSION_STATE: ConfigRecord(_SESSIONS[prior])} if _SESSIONS[prior] else {})
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=state, run_config={})


def _partial_round(stages: int) -> TamperingGrid:
    """Run an honest round's first `stages` stages (0: none) and keep the grid with the sites' sessions."""
    grid = TamperingGrid([1, 2, 3, 4])
    config = _config(4)
    content = request_content(config.site_request(num_classes=10, channels=1, image_size=28), 1,
                              ArrayRecord({"w": Array(np.zeros(M, np.float32))}), simulation=config)
    secure = SecAggRound(grid, config, 1, content, M, lambda node, reply_: None)
    if stages >= 1:
        relay = secure.advertise_keys([1, 2, 3, 4])
        if stages >= 2:
            requests = secure.share_keys(relay)
            if stages >= 3:
                unmask = secure.masked_input(requests)
                if stages >= 4:
                    secure.consistency_check(unmask)
    return grid


def _trained(msg: Message, context: Context) -> Message:
    return Message(RecordDict({
        messages.STATUS: ConfigRecord({"state": messages.STATE_TRAINED, "reason": ""}),
        messages.UPDATE: ArrayRecord({"w": Array(np.zeros(M, np.float32))}),
        messages.TRAIN_METRICS: MetricRecord({"site": 1, "num-examples": 10, "steps": 1, "update-clipped": 0}),
    }), reply_to=msg)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(stage=st.sampled_from(STAGES), node=st.integers(1, 6), fields=st.dictionaries(KEYS, VALUES, max_size=6),
       keep=st.booleans())
def test_any_reply_into_the_server_round_is_a_dropout_or_an_abort_never_an_exception(stage, node, fields, keep):
    def hostile(stage_: Stage, node_: int, content: RecordDict) -> RecordDict | None:
        if stage_ != stage or node_ != node:
            return None
        base = dict(content[messages.SECAGG]) if keep and messages.SECAGG in content else {}
        record = {k: v for k, v in {**base, **fields}.items() if _legal(v)}
        return RecordDict({messages.SECAGG: ConfigRecord(record)})

    outcome, _ = _round(n=6, reply=hostile)  # raises nothing: the assertion is that we get here
    if not outcome.aborted:
        assert outcome.total.contributors >= 3 and 0 < outcome.total.weight <= 1000 * outcome.total.contributors


def test_a_wrong_share_is_caught_by_a_spare_share_and_the_round_aborts_by_name():
    def lie(stage: Stage, node: int, content: RecordDict) -> RecordDict | None:
        if stage != Stage.UNMASK or node != 5:
            return None
        record = dict(content[messages.SECAGG])
        record["b-shares"] = [bytes(b[:-1]) + bytes([b[-1] ^ 1]) for b in record["b-shares"]]
        out = _copy(content)
        out[messages.SECAGG] = ConfigRecord(record)
        return out

    outcome, _ = _round(reply=lie, dropout_rate=0.3)  # t < n: spare shares exist
    assert outcome.aborted.startswith(AbortReason.RECONSTRUCTION_FAILED.name), outcome.aborted
    assert outcome.total.contributors == 0


def test_a_round_stricter_than_a_sites_policy_is_joined_with_the_sites_identity():
    """Sites 1 and 2 do not require enrolled peers (their own settings), but they are enrolled: a round that requires
    signatures and the consistency check is stricter than their policy, so they sign it like everyone else. (The
    reverse, a round laxer than a site's policy, is refused: test_gate_attacks.)"""
    def lax_sites(stage: Stage, node: int, content: RecordDict) -> RecordDict | None:
        if node not in (1, 2):
            return None
        out = _copy(content)
        out[messages.SIMULATION] = ConfigRecord({**dict(content[messages.SIMULATION]), "secagg-identities": False})
        return out

    outcome, grid = _round(request=lax_sites, dropout_rate=0.1)
    assert outcome.aborted == "" and outcome.total.contributors == 8
    assert not any(_status(grid, stage, node) for stage in STAGES for node in (1, 2))  # no refusal on the way
    np.testing.assert_allclose(outcome.total.mean(), _mean_of(range(1, 9)), atol=1e-4)


def test_a_coordinator_cannot_switch_a_lax_site_out_of_verification_mid_session():
    """Sites 1 and 2 (policy: identities not required) advertised signed keys; at share-keys the coordinator names
    another study, for which their identity does not load. They stop instead of sharing with unverified peers."""
    def other_study(stage: Stage, node: int, content: RecordDict) -> RecordDict | None:
        if node not in (1, 2):
            return None
        out = _copy(content)
        simulation = {**dict(content[messages.SIMULATION]), "secagg-identities": False}
        if stage == Stage.SHARE_KEYS:
            simulation["study-id"] = "another-study"
            out["study"] = ConfigRecord({**dict(content["study"]), "study-id": "another-study"})
        out[messages.SIMULATION] = ConfigRecord(simulation)
        return out

    _, grid = _round(request=other_study, dropout_rate=0.3)
    for node in (1, 2):
        assert _status(grid, Stage.SHARE_KEYS, node).startswith("NO_IDENTITY"), _status(grid, Stage.SHARE_KEYS, node)
        assert not any(messages.SECAGG in c for s, u, c in grid.seen if s == Stage.SHARE_KEYS and u == node)
