"""A dishonest coordinator against the site's gate, through the real ClientApp at deployed-style sites.

Each site is what a partner hospital runs (tests.deployed_grid): its own image files, state folder and policy
file, every mod of client.app. The coordinator here may send anything: fuzzed sections and stage records, replays,
equivocation between two Flower runs, recipe changes in the middle of a run, a swapped model.

The secure behaviour asserted for every request: the reply is a named refusal ("refused"), a named protocol abort
("aborted"), a protocol reply, or a named CareFed error (what a SuperNode turns into Flower's error reply); a
request beyond the policy is refused before any key, image, calibration or gradient, and the refusal is in the
site's ledger; the ledger composes every step the site trained; nothing local (paths) is named to the
coordinator. Written by an independent review as an attacker: the holes it found (a plain training request where
secure aggregation is required, a replayed masked input or round, a key stage inside an evaluation, a model that
is not the study's, unbounded calibration, stale Flower state, a run name reused across studies, a recipe or unit
changed mid-run, refusals with a bad round number going unrecorded) failed against 2f07090 and pass since.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.egress import EgressRefused
from client.site import PRIVACY_STATE
from common import messages
from common.config import resolve
from common.errors import CareFedError
from common.models import build_model, count_parameters
from common.policy import SitePolicy, policy_text
from common.privacy.budget import DatasetSpend, epsilon
from common.privacy.ledger import KIND_REFUSAL, LedgerEntry, PrivacyLedger
from common.secagg.protocol import model_digest
from common.secagg.stages import protocol_record
from server.secagg_round import SecAggRound, protocol_config
from server.training import request_content
from tests.deployed_grid import FIRST_NODE, DeployedGrid, mutated

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # messages need a task identity

SESSION_STATE = "carefed.secagg-session"
STUDY_A, STUDY_B = "carefed-demo", "carefed-demo-2"
# The default: secure aggregation required, so a deployed site never sends a plain update.
# Identities are off here (these attacks are on the policy gate; test_active_coordinator covers enrolled sites).
STRICT = SitePolicy(studies=(STUDY_A, STUDY_B), max_epsilon_per_study=8.0, lifetime_epsilon=9.5, models=("cnn",),
                    require_signatures=False)
# For the budget attacks: plain updates allowed by the policy (and the node config), so what is tested is the
# accounting, not the secure-aggregation path.
PLAIN = dataclasses.replace(STRICT, secagg_required=False, lifetime_epsilon=20.0, models=("cnn", "resnet18"))
PLAIN_NODE = {"allow-plain-updates": "true"}


@pytest.fixture
def make_config(make_config):
    """These attacks are on the gate and the protocol, with the CNN the policies here name (any model would do)."""
    return lambda **overrides: make_config(**{"model": "cnn", **overrides})




def _sites(data_root: Path, tmp_path: Path, policy: SitePolicy = STRICT, **node: str) -> dict[int, dict]:
    """Node id -> node config for three sites with this test's own policy files and state folders."""
    sites = {}
    for k in range(3):
        policy_file = tmp_path / "policies" / f"site-{k}.toml"
        policy_file.parent.mkdir(parents=True, exist_ok=True)
        policy_file.write_text(policy_text(policy, policy_file))
        sites[FIRST_NODE + k] = {"site-id": k, "data": str(data_root / f"site-{k}"),
                                 "state-dir": str(tmp_path / "state" / f"site-{k}"), "policy": str(policy_file),
                                 **node}
    return sites


def _config(tmp_path: Path, **overrides: object):
    values = {"run-name": "study-run", "output-dir": str(tmp_path / "runs"), "num-sites": 3, "local-epochs": 1,
              "num-server-rounds": 2, "target-epsilon": 8.0, "secagg-identities": False, "model": "cnn"}
    return resolve(overrides={**values, **overrides})


@lru_cache(maxsize=4)
def _model_arrays(num_classes: int = 10) -> ArrayRecord:
    return ArrayRecord(build_model("cnn", in_channels=1, num_classes=num_classes, image_size=28).state_dict())


def _train_request(config, server_round: int = 1, mutate: dict | None = None) -> RecordDict:
    """A plain training request (what FederatedTraining sends without secure aggregation)."""
    content = request_content(config.site_request(num_classes=10, channels=1, image_size=28), server_round,
                              _model_arrays())
    return mutated(content, mutate)


def _advertise_record(config) -> dict:
    return {"stage": messages.STAGE_ADVERTISE, "round": 1,
            **protocol_record(protocol_config(config, 1, count_parameters(
                build_model("cnn", in_channels=1, num_classes=10, image_size=28))))}


def _advertise(config, mutate: dict | None = None) -> RecordDict:
    """The first secure-aggregation stage (no model, so nothing can train), with the coordinator's mutations."""
    content = _train_request(config)
    del content[messages.GLOBAL_MODEL]
    content[messages.SECAGG] = ConfigRecord(_advertise_record(config))
    return mutated(content, mutate)


@dataclass
class Outcome:
    """What the site did with one message: its reply, or the exception its ClientApp raised."""

    reply: Message | None = None
    raised: BaseException | None = None

    @property
    def status(self) -> dict:
        if self.reply is None or self.reply.has_error() or messages.STATUS not in self.reply.content:
            return {}
        return dict(self.reply.content[messages.STATUS])

    @property
    def state(self) -> str:
        return self.status.get("state", "")

    @property
    def cause(self) -> BaseException | None:
        """The error behind what was raised (the egress guard re-raises any failure as a type-only wrapper)."""
        err = self.raised
        while err is not None and not isinstance(err, CareFedError | EgressRefused) and err.__context__ is not None \
                and type(err).__module__.startswith("client."):
            err = err.__context__
        return err

    def named(self) -> bool:
        """A reply, or an exception that names a CareFed error (Flower's error reply carries its type)."""
        return self.raised is None or isinstance(self.cause, CareFedError | EgressRefused)

    def leaving_text(self) -> str:
        """What goes back to the coordinator as text: the status reason, or Flower's error reason."""
        if self.raised is not None:
            return f"{type(self.raised)}:<'{self.raised}'>"  # flwr.supernode.runtime.run_clientapp's format
        return str(self.status.get("reason", ""))

    def describe(self) -> str:
        if self.raised is not None:
            cause = self.cause
            return (f"raised {type(self.raised).__name__}: {str(self.raised)[:200]}"
                    + (f" (from {type(cause).__name__}: {str(cause)[:200]})" if cause is not self.raised else ""))
        return f"reply {self.status or sorted(self.reply.content.keys())}"


def _deliver(grid: DeployedGrid, content: RecordDict, node: int = FIRST_NODE,
             message_type: str = MessageType.TRAIN) -> Outcome:
    try:
        [reply] = grid.send_and_receive([Message(content, node, message_type, group_id="1")])
    except Exception as err:  # noqa: BLE001 - whatever the ClientApp raised is what a SuperNode would report
        return Outcome(raised=err)
    return Outcome(reply=reply)


def _ledger(sites: dict, node: int = FIRST_NODE) -> PrivacyLedger:
    return PrivacyLedger(Path(str(sites[node]["state-dir"])) / "ledger.sqlite")


def _refusals(sites: dict, node: int = FIRST_NODE) -> list[LedgerEntry]:
    return [e for e in _ledger(sites, node).entries() if e.kind == KIND_REFUSAL]


def _assert_refused_before_anything(grid: DeployedGrid, sites: dict, outcome: Outcome, expected: str = "",
                                    node: int = FIRST_NODE) -> None:
    """Refused by name, recorded, and nothing computed: no session keys, no calibrated noise, no spend."""
    assert outcome.raised is None, outcome.describe()
    assert outcome.state == messages.STATE_REFUSED and expected in outcome.status["reason"], outcome.describe()
    assert SESSION_STATE not in grid.contexts[node].state and PRIVACY_STATE not in grid.contexts[node].state
    refusals = _refusals(sites, node)
    assert refusals and expected in refusals[-1].reason
    assert not _ledger(sites, node).spends()


# == Resisted: requests the gate refuses by name (or handles) ===================================================
SCALARS = st.one_of(
    st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(), st.text(max_size=12),
    st.binary(max_size=12), st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=3),
    st.lists(st.floats(), min_size=1, max_size=3), st.lists(st.text(max_size=4), min_size=1, max_size=3),
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 0.0, -0.0, 1e-300, 1e300, math.nan, math.inf, -math.inf, "",
                     "../../etc", "cnn", "patient", "image", True, False]),
)
SECTIONS = (messages.STUDY, messages.PRIVACY, messages.SECURE_AGGREGATION)


@st.composite
def _section_mutation(draw) -> tuple[str, str, str, object]:
    section = draw(st.sampled_from(SECTIONS))
    keys = sorted(_train_request(_fuzz_config()).get(section).keys())
    action = draw(st.sampled_from(["set", "set", "set", "delete", "add"]))
    key = draw(st.sampled_from(keys)) if action != "add" else draw(st.text(min_size=1, max_size=10))
    return section, action, key, draw(SCALARS)


@lru_cache(maxsize=1)
def _fuzz_config():
    return resolve(overrides={"run-name": "fuzz-run", "num-sites": 3, "secagg-identities": False, "model": "cnn"})


def _apply(content: RecordDict, section: str, action: str, key: str, value: object) -> RecordDict:
    record = dict(content[section])
    if action == "delete":
        record.pop(key, None)
    else:
        record[key] = value
    content[section] = ConfigRecord(record)
    return content


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutation=_section_mutation())
def test_fuzzed_request_sections_are_refused_by_name_before_any_key_or_admitted_within_the_policy(
        mutation, data_root, tmp_path):
    sites = _sites(data_root, tmp_path)
    grid = DeployedGrid(sites)
    content = _apply(_advertise(_fuzz_config()), *mutation)
    before = len(_refusals(sites))
    outcome = _deliver(grid, content)
    assert outcome.raised is None, f"{mutation}: {outcome.describe()}"
    assert PRIVACY_STATE not in grid.contexts[FIRST_NODE].state  # a key stage never calibrates noise
    if outcome.state == messages.STATE_REFUSED:
        assert SESSION_STATE not in grid.contexts[FIRST_NODE].state, mutation
        assert len(_refusals(sites)) == before + 1, mutation  # every refusal is in the ledger
        assert set(outcome.reply.content.keys()) == {messages.STATUS}
    else:  # admitted: the mutation was a value inside the policy; the site advertises keys
        assert set(outcome.reply.content.keys()) == {messages.SECAGG}, f"{mutation}: {outcome.describe()}"


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=SCALARS, where=st.sampled_from([messages.SECAGG, messages.ROUND]))
def test_a_fuzzed_round_number_is_refused_by_name_or_used_as_is(value, where, data_root, tmp_path):
    sites = _sites(data_root, tmp_path)
    grid = DeployedGrid(sites)
    content = _advertise(_fuzz_config(), {where: {"round": value}})
    outcome = _deliver(grid, content)
    assert outcome.raised is None, outcome.describe()
    assert outcome.state in ("", messages.STATE_REFUSED, messages.STATE_ABORTED), outcome.describe()


def test_fewer_planned_rounds_than_rounds_cannot_buy_a_second_round(data_root, tmp_path):
    """Noise calibrated for one planned round spends the run's budget in that round; round 2 is refused."""
    sites = _sites(data_root, tmp_path, PLAIN, **PLAIN_NODE)
    grid = DeployedGrid(sites)
    config = _config(tmp_path, **{"secagg": False, "privacy-planned-rounds": 1, "num-server-rounds": 50})
    first = _deliver(grid, _train_request(config, 1))
    assert first.state == messages.STATE_TRAINED, first.describe()
    for server_round, changes in ((2, {}), (3, {"privacy": {"planned-rounds": 50}}),
                                  (4, {"study": {"model": "resnet18"}})):  # nor a new plan, nor another model
        again = _deliver(grid, _train_request(config, server_round, changes))
        reason = again.status["reason"]
        assert again.state == messages.STATE_REFUSED and ("num-server-rounds" in reason  # (another model: refused
                                                          or "global model" in reason)  # before any data is read)
        assert messages.UPDATE not in again.reply.content
    spends = _ledger(sites).spends()
    assert len(spends) == 1 and spends[0].epsilon <= 8.0 + 1e-6
    assert len(_refusals(sites)) == 3 and _ledger(sites).verify().ok


def test_a_new_run_id_a_restart_or_a_second_study_cannot_reset_the_datasets_budget(data_root, tmp_path):
    policy = dataclasses.replace(PLAIN, lifetime_epsilon=9.0)
    sites = _sites(data_root, tmp_path, policy, **PLAIN_NODE)
    config = _config(tmp_path, **{"secagg": False, "privacy-planned-rounds": 1})
    first = _deliver(DeployedGrid(sites), _train_request(config, 1))
    assert first.state == messages.STATE_TRAINED, first.describe()
    # fresh Flower contexts (a restarted SuperNode, or another Flower run), new run ids
    same_study = _deliver(DeployedGrid(sites), _train_request(config.replace(run_name="run-2"), 1))
    assert same_study.state == messages.STATE_REFUSED, same_study.describe()
    assert "max-epsilon-per-study" in same_study.status["reason"]
    other_study = _deliver(DeployedGrid(sites), _train_request(config.replace(run_name="run-3", study_id=STUDY_B), 1))
    assert other_study.state == messages.STATE_REFUSED and "lifetime-epsilon" in other_study.status["reason"]
    smaller_delta = _deliver(DeployedGrid(sites), _train_request(
        config.replace(run_name="run-4", study_id=STUDY_B, target_delta=1e-9), 1))
    assert smaller_delta.state == messages.STATE_REFUSED  # a smaller delta only makes every epsilon larger
    assert [e.run_id for e in _ledger(sites).spends()] == ["study-run"]
    assert len(_refusals(sites)) == 3 and _ledger(sites).verify().ok


def test_a_delta_switch_between_runs_never_lets_a_study_pass_its_ceiling_at_the_policys_delta(data_root, tmp_path):
    sites = _sites(data_root, tmp_path, PLAIN, **PLAIN_NODE)
    small = _config(tmp_path, **{"secagg": False, "privacy-planned-rounds": 1, "target-delta": 1e-9,
                                 "target-epsilon": 7.0})
    assert _deliver(DeployedGrid(sites), _train_request(small, 1)).state == messages.STATE_TRAINED
    large = small.replace(run_name="run-2", target_delta=PLAIN.max_delta, target_epsilon=8.0)
    _deliver(DeployedGrid(sites), _train_request(large, 1))
    history = DatasetSpend.from_entries(_ledger(sites).spends()).history(study=STUDY_A)
    assert epsilon(history, PLAIN.max_delta) <= PLAIN.max_epsilon_per_study + 0.02


def test_a_patient_level_policy_refuses_image_level_training_before_anything(data_root, tmp_path):
    policy = dataclasses.replace(PLAIN, min_privacy_unit="patient")
    sites = _sites(data_root, tmp_path, policy, **PLAIN_NODE)
    grid = DeployedGrid(sites)
    outcome = _deliver(grid, _train_request(_config(tmp_path, secagg=False), 1))
    _assert_refused_before_anything(grid, sites, outcome, "policy refuses privacy-unit")


def test_more_augmented_copies_than_the_policy_allows_are_refused_before_anything(data_root, tmp_path):
    """Augmentation multiplicity costs the site K forward and backward passes per sampled image: a coordinator
    asking more copies than the site's policy allows (a compute attack; privacy is unchanged) is refused by name."""
    sites = _sites(data_root, tmp_path, dataclasses.replace(PLAIN, max_augmentations=2), **PLAIN_NODE)
    grid = DeployedGrid(sites)
    outcome = _deliver(grid, _train_request(_config(tmp_path, secagg=False, augmentations=16), 1))
    _assert_refused_before_anything(grid, sites, outcome, "policy refuses augmentations: asked 16")


@pytest.mark.parametrize("message_type", ["query", "train.other", "evaluate.other"])
def test_a_message_type_outside_the_protocol_touches_nothing(message_type, data_root, tmp_path):
    sites = _sites(data_root, tmp_path)
    grid = DeployedGrid(sites)
    outcome = _deliver(grid, _train_request(_config(tmp_path)), message_type=message_type)
    # Flower itself rejects it before any mod runs (the SuperNode answers with Flower's error reply)
    assert outcome.reply is None and "registered" in str(outcome.raised)
    assert not grid.contexts[FIRST_NODE].state.keys()
    assert not (Path(str(sites[FIRST_NODE]["state-dir"])) / "ledger.sqlite").exists()


def test_refusal_reasons_name_the_setting_and_nothing_local(data_root, tmp_path):
    sites = _sites(data_root, tmp_path, PLAIN, **PLAIN_NODE)
    config = _config(tmp_path, **{"secagg": False, "privacy-planned-rounds": 1})
    outcomes = [_deliver(DeployedGrid(sites), _train_request(config, 1, mutate))
                for mutate in ({"privacy": {"target-epsilon": 9.0}}, {"study": {"study-id": "other"}},
                               {messages.SIMULATION: {"output-dir": "/etc"}}, {"privacy": {"target-delta": 0.01}})]
    grid = DeployedGrid(sites)
    assert _deliver(grid, _train_request(config, 1)).state == messages.STATE_TRAINED
    outcomes.append(_deliver(grid, _train_request(config, 2)))  # refused after the site read its data
    node = sites[FIRST_NODE]
    fingerprint = _ledger(sites).spends()[0].dataset
    for outcome in outcomes:
        assert outcome.state == messages.STATE_REFUSED, outcome.describe()
        text = outcome.leaving_text()
        assert text.startswith("PolicyRefusal: policy refuses ")
        for local in (str(node["data"]), str(node["state-dir"]), str(node["policy"]), fingerprint, str(tmp_path)):
            assert local not in text


# == Secure-aggregation stage records: malformed, swapped or replayed (resisted since 38c3eab, which parses
# every stage with one schema before anything is computed and binds the model at key sharing) ==========
class EvilGrid(DeployedGrid):
    """Deployed sites behind a coordinator that rewrites (or drops, or repeats) what SecAggRound sends."""

    def __init__(self, sites: dict, tamper) -> None:
        super().__init__(sites)
        self.tamper = tamper
        self.raised: dict[int, list[BaseException]] = {}

    def send_and_receive(self, messages_, *, timeout=None):
        out = []
        for msg in messages_:
            for delivered in self.tamper(msg):
                try:
                    out += list(super().send_and_receive([delivered], timeout=timeout))
                except Exception as err:  # noqa: BLE001 - recorded for the test to judge
                    self.raised.setdefault(delivered.metadata.dst_node_id, []).append(err)
        return out


def _stage(msg: Message) -> str:
    return str(msg.content[messages.SECAGG]["stage"]) if messages.SECAGG in msg.content else ""


def _copy(msg: Message, **records: dict) -> Message:
    content = RecordDict(dict(msg.content.items()))
    for name, values in records.items():
        content[name] = ConfigRecord({**dict(content[name]), **values}) if name in content else ConfigRecord(values)
    return Message(content, msg.metadata.dst_node_id, msg.metadata.message_type, group_id=msg.metadata.group_id)


def _secagg_round(data_root: Path, tmp_path: Path, at_masked_input) -> tuple[EvilGrid, dict]:
    """One honest-looking secure-aggregation round whose masked-input stage reaches only the first site, as
    `at_masked_input(msg)` rewrites it (a list of messages: none, one, or a replay). The others drop there."""
    sites = _sites(data_root, tmp_path, STRICT)
    reached = []

    def tamper(msg: Message) -> list[Message]:
        if _stage(msg) != messages.STAGE_MASKED_INPUT:
            return [msg]
        if msg.metadata.dst_node_id != FIRST_NODE:
            return []
        reached.append(msg)
        return at_masked_input(msg)

    grid = EvilGrid(sites, tamper)
    config = _config(tmp_path)
    content = request_content(config.site_request(num_classes=10, channels=1, image_size=28), 1, _model_arrays())
    num_parameters = count_parameters(build_model("cnn", in_channels=1, num_classes=10, image_size=28))
    SecAggRound(grid, config, 1, content, num_parameters, lambda node, reply: None).run(list(sites))
    assert reached, "setup: the honest key stages did not bring the first site to masked input"
    return grid, sites


def _masked_input_replies(grid: EvilGrid) -> list[Outcome]:
    """The first site's answers to the masked-input stage (replies and what it raised), in order."""
    outcomes = [Outcome(reply=r) for r in grid.replies
                if r.metadata.src_node_id == FIRST_NODE and not r.has_error()
                and (messages.MASKED_UPDATE in r.content or messages.STATUS in r.content)]
    return outcomes + [Outcome(raised=err) for err in grid.raised.get(FIRST_NODE, [])]


def test_a_model_swapped_after_key_sharing_is_refused_at_masked_input(data_root, tmp_path):
    def swap(msg: Message) -> list[Message]:
        swapped = ArrayRecord({k: Array(v.numpy() + 1.0) for k, v in msg.content[messages.GLOBAL_MODEL].items()})
        evil = _copy(msg, **{messages.SECAGG: {"model-hash": model_digest([a.data for a in swapped.values()])}})
        evil.content[messages.GLOBAL_MODEL] = swapped
        return [evil]

    grid, sites = _secagg_round(data_root, tmp_path, swap)
    [outcome] = _masked_input_replies(grid)
    assert outcome.state in (messages.STATE_ABORTED, messages.STATE_REFUSED), outcome.describe()
    assert messages.MASKED_UPDATE not in outcome.reply.content
    assert not _ledger(sites).spends()  # nothing trained on the swapped model


MASKED_INPUT_DEFECTS = {
    "an alive id of 7 bytes": {"alive": [b"1234567"]},
    "no cohort size (so no cohort check either)": {"cohort-size": None},
    "a NaN update bound": {"update-bound": math.nan},
    "senders without ciphertexts": {"ciphertexts": None},
}


@pytest.mark.parametrize("defect", list(MASKED_INPUT_DEFECTS))
def test_a_malformed_masked_input_record_is_aborted_before_training(defect, data_root, tmp_path):
    def malform(msg: Message) -> list[Message]:
        record = dict(msg.content[messages.SECAGG])
        for key, value in MASKED_INPUT_DEFECTS[defect].items():
            if value is None:
                record.pop(key)
            else:
                record[key] = value
        evil = _copy(msg)
        evil.content[messages.SECAGG] = ConfigRecord(record)
        return [evil]

    grid, sites = _secagg_round(data_root, tmp_path, malform)
    [outcome] = _masked_input_replies(grid)
    assert outcome.raised is None, outcome.describe()
    assert outcome.state in (messages.STATE_ABORTED, messages.STATE_REFUSED), outcome.describe()
    assert not _ledger(sites).spends()


ADVERTISE_DEFECTS = {
    "no stage": {"stage": None},
    "no protocol key": {"protocol-vector_length": None},
    "vector length 0": {"protocol-vector_length": 0},
    "signatures required by the coordinator": {"protocol-require_signatures": True},
}


@pytest.mark.parametrize("defect", list(ADVERTISE_DEFECTS))
def test_a_malformed_advertise_record_is_aborted_by_name(defect, data_root, tmp_path):
    sites = _sites(data_root, tmp_path)
    grid = DeployedGrid(sites)
    record = _advertise_record(_config(tmp_path))
    for key, value in ADVERTISE_DEFECTS[defect].items():
        if value is None:
            record.pop(key)
        else:
            record[key] = value
    content = _advertise(_config(tmp_path))
    content[messages.SECAGG] = ConfigRecord(record)
    outcome = _deliver(grid, content)
    assert outcome.raised is None, outcome.describe()
    assert outcome.state in (messages.STATE_ABORTED, messages.STATE_REFUSED), outcome.describe()
    assert SESSION_STATE not in grid.contexts[FIRST_NODE].state


SHARE_KEYS_DEFECTS = {
    "ids of 7 bytes": lambda r: {**r, "ids": [b"1234567"] * len(r["ids"])},
    "fewer keys than ids": lambda r: {**r, "c-pks": r["c-pks"][:-1]},
    "no signatures": lambda r: {k: v for k, v in r.items() if k != "signatures"},
    "a text model hash": lambda r: {**r, "model-hash": "not bytes"},
}


@pytest.mark.parametrize("defect", list(SHARE_KEYS_DEFECTS))
def test_a_malformed_share_keys_record_is_aborted_by_name(defect, data_root, tmp_path):
    def malform(msg: Message) -> list[Message]:
        if _stage(msg) == messages.STAGE_SHARE_KEYS and msg.metadata.dst_node_id == FIRST_NODE:
            evil = _copy(msg)
            evil.content[messages.SECAGG] = ConfigRecord(SHARE_KEYS_DEFECTS[defect](dict(msg.content[messages.SECAGG])))
            return [evil]
        return [] if _stage(msg) == messages.STAGE_MASKED_INPUT else [msg]

    sites = _sites(data_root, tmp_path)
    grid = EvilGrid(sites, malform)
    config = _config(tmp_path)
    content = request_content(config.site_request(num_classes=10, channels=1, image_size=28), 1, _model_arrays())
    SecAggRound(grid, config, 1, content, 1, lambda node, reply: None).run(list(sites))
    advertised = [r for r in grid.replies if r.metadata.src_node_id == FIRST_NODE and not r.has_error()
                  and messages.SECAGG in r.content and "c-pk" in r.content[messages.SECAGG]]
    assert advertised, "setup: the first site did not advertise keys"
    assert FIRST_NODE not in grid.raised, repr(grid.raised[FIRST_NODE][0])
    states = [r.content[messages.STATUS]["state"] for r in grid.replies
              if r.metadata.src_node_id == FIRST_NODE and not r.has_error() and messages.STATUS in r.content]
    assert states and set(states) <= {messages.STATE_ABORTED, messages.STATE_REFUSED}, states
    assert SESSION_STATE not in grid.contexts[FIRST_NODE].state  # the aborted session's secrets are gone


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(_advertise_record(_fuzz_config()))),
       value=SCALARS,
       delete=st.booleans())
def test_a_fuzzed_advertise_record_never_crashes_the_site(key, value, delete, data_root, tmp_path):
    sites = _sites(data_root, tmp_path)
    grid = DeployedGrid(sites)
    content = _advertise(_fuzz_config())
    record = dict(content[messages.SECAGG])
    if delete:
        record.pop(key)
    else:
        record[key] = value
    content[messages.SECAGG] = ConfigRecord(record)
    outcome = _deliver(grid, content)
    assert outcome.named(), f"{key}={value!r} delete={delete}: {outcome.describe()}"


# == Holes ======================================================================================================
# -- (a) training, keys or spend beyond the policy --------------------------------------------------------------
@pytest.mark.parametrize("allow_plain", [False, True])
def test_a_plain_training_request_is_refused_where_the_policy_requires_secure_aggregation(
        allow_plain, data_root, tmp_path):
    sites = _sites(data_root, tmp_path, STRICT, **(PLAIN_NODE if allow_plain else {}))
    grid = DeployedGrid(sites)
    outcome = _deliver(grid, _train_request(_config(tmp_path), 1))  # the sections say secagg = true
    _assert_refused_before_anything(grid, sites, outcome)


def test_a_replayed_masked_input_stage_does_not_train_again(data_root, tmp_path):
    grid, sites = _secagg_round(data_root, tmp_path, lambda msg: [msg, _copy(msg)])
    first, again = _masked_input_replies(grid)[:2]
    assert first.state == messages.STATE_TRAINED, first.describe()
    assert again.state in (messages.STATE_ABORTED, messages.STATE_REFUSED), again.describe()
    ledger = _ledger(sites)
    assert len(ledger.spends()) == 1 and ledger.verify().ok


def test_an_evaluate_message_carrying_a_key_stage_is_refused_before_any_key(data_root, tmp_path):
    sites = _sites(data_root, tmp_path)
    grid = DeployedGrid(sites)
    content = _advertise(_config(tmp_path))
    content[messages.GLOBAL_MODEL] = _model_arrays()
    outcome = _deliver(grid, content, message_type=MessageType.EVALUATE)
    _assert_refused_before_anything(grid, sites, outcome)


MODEL_DEFECTS = {
    "train without a global model": (MessageType.TRAIN, "missing", {}),
    "train with another architecture's weights": (MessageType.TRAIN, "other", {}),
    "train with a study section that does not fit the model": (MessageType.TRAIN, "honest",
                                                               {"study": {"num-classes": 10_000}}),
    "evaluate with another architecture's weights": (MessageType.EVALUATE, "other", {}),
}


@pytest.mark.parametrize("defect", list(MODEL_DEFECTS))
def test_a_global_model_that_does_not_fit_the_study_is_refused_before_data_or_calibration(
        defect, data_root, tmp_path):
    message_type, model, mutate = MODEL_DEFECTS[defect]
    sites = _sites(data_root, tmp_path, PLAIN, **PLAIN_NODE)
    grid = DeployedGrid(sites)
    content = _train_request(_config(tmp_path, secagg=False), 1, mutate)
    if model == "missing":
        del content[messages.GLOBAL_MODEL]
    elif model == "other":
        content[messages.GLOBAL_MODEL] = _model_arrays(num_classes=3)
    outcome = _deliver(grid, content, message_type=message_type)
    _assert_refused_before_anything(grid, sites, outcome)


def test_a_request_planning_more_steps_than_calibration_can_bound_is_refused_by_name(data_root, tmp_path):
    """batch-size 1 with 100,000 planned rounds: 6.4e6 steps at a 64-image site, whose PRV calibration ran for
    minutes. The site refuses by name before calibrating (a bound on steps, checked, not a timer)."""
    sites = _sites(data_root, tmp_path, PLAIN, **PLAIN_NODE)
    config = _config(tmp_path, **{"secagg": False, "batch-size": 1, "num-server-rounds": 100_000})
    grid = DeployedGrid(sites)
    outcome = _deliver(grid, _train_request(config, 1))
    assert outcome.state == messages.STATE_REFUSED and "policy refuses planned-steps" in outcome.status["reason"]
    assert PRIVACY_STATE not in grid.contexts[FIRST_NODE].state  # nothing was calibrated
    assert _refusals(sites) and _ledger(sites).verify().ok


# -- (c) evading the per-run, per-study or lifetime budget --------------------------------------------------------
def test_two_flower_runs_sharing_a_run_name_cannot_train_steps_the_ledger_does_not_compose(data_root, tmp_path):
    sites = _sites(data_root, tmp_path, PLAIN, **PLAIN_NODE)
    config = _config(tmp_path, secagg=False)  # 2 planned rounds
    first_run, second_run = DeployedGrid(sites), DeployedGrid(sites)  # same SuperNode, two Flower contexts
    for server_round, grid in ((1, first_run), (2, second_run), (3, first_run)):
        _deliver(grid, _train_request(config, server_round))
    spends = _ledger(sites).spends()
    trained_steps = sum(e.steps_round for e in spends)
    composed_steps = sum(n for *_, n in DatasetSpend.from_entries(spends).history())
    assert trained_steps == composed_steps, f"{trained_steps} steps trained, {composed_steps} in the lifetime spend"
    assert all(e.epsilon <= e.budget + 0.02 for e in spends)


def test_reusing_a_run_name_in_another_study_does_not_hide_the_first_studys_spend(data_root, tmp_path):
    sites = _sites(data_root, tmp_path, PLAIN, **PLAIN_NODE)
    in_a = _config(tmp_path, **{"secagg": False, "run-name": "shared-name"})
    grid = DeployedGrid(sites)
    _deliver(grid, _train_request(in_a, 1))
    _deliver(grid, _train_request(in_a.replace(study_id=STUDY_B), 2))  # same run name, the other study
    _deliver(DeployedGrid(sites), _train_request(in_a.replace(run_name="again-a", privacy_planned_rounds=1), 1))
    trained_in_a: dict[str, tuple] = {}  # per run, the longest history trained under study A's requests
    for entry in _ledger(sites).spends():
        if entry.study == STUDY_A and sum(n for *_, n in entry.history) >= sum(
                n for *_, n in trained_in_a.get(entry.run_id, ())):
            trained_in_a[entry.run_id] = entry.history
    spent = epsilon(tuple(h for history in trained_in_a.values() for h in history), PLAIN.max_delta)
    assert spent <= PLAIN.max_epsilon_per_study + 0.02, f"study A spent epsilon {spent:.2f}"


def test_a_second_run_in_the_same_flower_context_is_calibrated_for_its_own_proposal(data_root, tmp_path):
    sites = _sites(data_root, tmp_path, PLAIN, **PLAIN_NODE)
    grid = DeployedGrid(sites)
    first = _config(tmp_path, secagg=False)
    assert _deliver(grid, _train_request(first, 1)).state == messages.STATE_TRAINED
    second = first.replace(run_name="second-run", study_id=STUDY_B, target_epsilon=2.0)
    outcome = _deliver(grid, _train_request(second, 2))
    assert outcome.state == messages.STATE_TRAINED, outcome.describe()
    [entry] = [e for e in _ledger(sites).spends() if e.run_id == "second-run"]
    assert entry.budget == 2.0 and entry.epsilon <= 2.0 + 0.02, (entry.budget, entry.epsilon)


@pytest.mark.parametrize("change", [{"batch-size": 16}, {"local-epochs": 3}], ids=["batch-size", "local-epochs"])
def test_changing_the_local_recipe_in_the_middle_of_a_run_is_refused_by_name_and_recorded(
        change, data_root, tmp_path):
    sites = _sites(data_root, tmp_path, PLAIN, **PLAIN_NODE)
    grid = DeployedGrid(sites)
    config = _config(tmp_path, secagg=False)
    assert _deliver(grid, _train_request(config, 1)).state == messages.STATE_TRAINED
    outcome = _deliver(grid, _train_request(config, 2, {"study": change}))
    assert outcome.raised is None, outcome.describe()
    assert outcome.state == messages.STATE_REFUSED, outcome.describe()
    assert _refusals(sites) and len(_ledger(sites).spends()) == 1


@pytest.mark.parametrize("units", [("image", "patient"), ("patient", "image")], ids=["image-then-patient",
                                                                                     "patient-then-image"])
def test_a_runs_privacy_unit_cannot_switch_between_rounds(units, data_root, tmp_path):
    sites = _sites(data_root, tmp_path, PLAIN, **PLAIN_NODE)
    grid = DeployedGrid(sites)
    config = _config(tmp_path, **{"secagg": False, "privacy-unit": units[0]})
    assert _deliver(grid, _train_request(config, 1)).state == messages.STATE_TRAINED
    outcome = _deliver(grid, _train_request(config, 2, {"privacy": {"privacy-unit": units[1]}}))
    assert outcome.state == messages.STATE_REFUSED, outcome.describe()
    assert {e.unit for e in _ledger(sites).spends()} == {units[0]}


# -- (d) refusals not recorded, ledger corrupted -------------------------------------------------------------------
def test_a_replayed_round_number_is_refused_and_the_ledger_still_verifies(data_root, tmp_path):
    sites = _sites(data_root, tmp_path, PLAIN, **PLAIN_NODE)
    grid = DeployedGrid(sites)
    config = _config(tmp_path, **{"secagg": False, "num-server-rounds": 5})
    assert _deliver(grid, _train_request(config, 2)).state == messages.STATE_TRAINED
    for server_round in (2, 1):  # the same round again, then an earlier one
        outcome = _deliver(grid, _train_request(config, server_round))
        assert outcome.state == messages.STATE_REFUSED, outcome.describe()
    assert _ledger(sites).verify().ok and len(_ledger(sites).spends()) == 1


@pytest.mark.parametrize("round_record", [{"round": -1}, {"round": "1"}, None], ids=["negative", "string", "missing"])
def test_a_refusal_with_an_invalid_round_number_is_still_recorded(round_record, data_root, tmp_path):
    sites = _sites(data_root, tmp_path)
    grid = DeployedGrid(sites)
    content = _train_request(_config(tmp_path), 1, {"privacy": {"dp": False}, messages.ROUND: round_record})
    outcome = _deliver(grid, content)
    assert outcome.state == messages.STATE_REFUSED, outcome.describe()
    assert _refusals(sites), "the refusal is not in the site's ledger"


# -- (e) local details in what goes back: resisted since 38c3eab (only the error type leaves a failing site) -----
def test_a_study_that_does_not_fit_the_sites_files_fails_by_name_without_naming_local_paths(data_root, tmp_path):
    sites = _sites(data_root, tmp_path, PLAIN, **PLAIN_NODE)
    grid = DeployedGrid(sites)
    outcome = _deliver(grid, _train_request(_config(tmp_path, secagg=False), 1, {"study": {"num-classes": 2}}))
    assert outcome.named(), outcome.describe()  # a DataError: 2 classes asked, 10 class folders found
    text = outcome.leaving_text()
    for local in (str(data_root), str(sites[FIRST_NODE]["state-dir"]), "site-0"):
        assert local not in text, text
    assert not _ledger(sites).spends()
