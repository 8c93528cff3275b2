"""A dishonest coordinator against deployed-style hospitals, through the real ClientApp and server adapters.

Every request beyond a site's policy (or outside the protocol) must be refused by name before any key, data,
calibration or gradient is touched: the reply is a status and nothing else, the refusal is in the site's ledger
and egress log, and the site's Flower state holds no session and no privacy state. A new run id, a new study or an
empty Flower context must not reset what the dataset has already spent.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict

from client.site import PRIVACY_STATE
from common import messages
from common.config import resolve
from common.data.site import global_model
from common.models import count_parameters
from common.policy import SitePolicy
from common.privacy.audit import audit_site
from common.privacy.budget import DatasetSpend, independent_epsilon
from common.privacy.ledger import KIND_REFUSAL, PrivacyLedger
from common.secagg.stages import protocol_record
from server.secagg_round import protocol_config
from server.training import FederatedTraining, request_content
from tests.deployed_grid import FIRST_NODE, DeployedGrid, make_sites, mutated

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # messages need a task identity

POLICY = SitePolicy(studies=("carefed-demo", "carefed-demo-2"), max_epsilon_per_study=8.0, lifetime_epsilon=9.5,
                    models=("cnn",))
STRICT = dataclasses.replace(POLICY, min_neighbours=4)  # SecAgg+ graphs: at least 4 neighbours per site
SESSION_STATE = "carefed.secagg-session"


@pytest.fixture
def make_config(make_config):
    """These attacks are on the gate and the protocol, with the CNN the policies here name (any model would do)."""
    return lambda **overrides: make_config(**{"model": "cnn", **overrides})




@pytest.fixture(scope="module")
def site_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hospitals")
    make_sites(root, 3, POLICY)  # image files once for the module; each test gets fresh state and policies
    return root


def _sites(root: Path, tmp_path: Path, policy: SitePolicy = POLICY) -> dict[int, dict[str, object]]:
    sites = make_sites(root, 3, policy)
    for config in sites.values():  # this test's own state folders
        config["state-dir"] = str(tmp_path / "state" / f"site-{config['site-id']}")
    return sites


def _honest(tmp_path: Path, **overrides: object):
    config = resolve(overrides={"run-name": "study-run", "output-dir": str(tmp_path / "runs"), "num-sites": 3,
                                "model": "cnn", **overrides})
    model = global_model(config)
    return config, model


def _advertise(config, model, mutate: dict[str, dict[str, object]] | None = None) -> RecordDict:
    """What SecAggRound sends first (the advertise-keys stage), with the coordinator's mutations applied."""
    content = request_content(config.site_request(num_classes=10, channels=1, image_size=28), 1,
                              ArrayRecord(model.state_dict()))
    del content[messages.GLOBAL_MODEL]
    record = {"stage": messages.STAGE_ADVERTISE, "round": 1,
              **protocol_record(protocol_config(config, 1, count_parameters(model)))}
    content[messages.SECAGG] = ConfigRecord(record)
    return mutated(content, mutate)


def _send(grid: DeployedGrid, content: RecordDict, node: int = FIRST_NODE,
          message_type: str = MessageType.TRAIN):
    from flwr.app import Message

    [reply] = grid.send_and_receive([Message(content, node, message_type, group_id="1")])
    return reply


def _assert_refused_and_recorded(grid: DeployedGrid, reply, sites, expected: str, node: int = FIRST_NODE):
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    status = reply.content[messages.STATUS]
    assert status["state"] == messages.STATE_REFUSED and expected in status["reason"], status["reason"]
    assert set(reply.content.keys()) == {messages.STATUS}  # nothing but the refusal leaves
    state = grid.contexts[node].state
    assert SESSION_STATE not in state and PRIVACY_STATE not in state  # no keys made, no noise calibrated
    folder = Path(str(sites[node]["state-dir"]))
    refusals = [e for e in PrivacyLedger(folder / "ledger.sqlite").entries() if e.kind == KIND_REFUSAL]
    assert refusals and expected in refusals[-1].reason
    assert PrivacyLedger(folder / "ledger.sqlite").verify().ok
    egress = [json.loads(line) for line in (folder / "egress.jsonl").read_text().splitlines()]
    assert egress[-1]["verdict"] == "sent" and egress[-1]["status"]["state"] == messages.STATE_REFUSED
    assert expected in egress[-1]["status"]["reason"]


ATTACKS = {
    "dp off": ({"privacy": {"dp": False}}, "policy refuses dp"),
    "epsilon 1000": ({"privacy": {"target-epsilon": 1000.0}}, "policy refuses target-epsilon"),
    "delta 0.5": ({"privacy": {"target-delta": 0.5}}, "policy refuses target-delta"),
    "a study the site did not join": ({"study": {"study-id": "someone-elses-study"}}, "policy refuses study-id"),
    "secure aggregation off": ({"secure-aggregation": {"secagg": False}}, "policy refuses secagg"),
    "dropout rate 0.99": ({"secure-aggregation": {"dropout-rate": 0.99}, messages.SECAGG:
                           {"protocol-dropout_rate": 0.99}}, "policy refuses secagg-dropout-rate"),
    "min cohort 1": ({"secure-aggregation": {"min-cohort": 1}}, "'min-cohort' = 1 must be at least 2"),
    "min cohort 2": ({"secure-aggregation": {"min-cohort": 2}, messages.SECAGG: {"protocol-min_cohort": 2}},
                     "policy refuses secagg-min-cohort"),
    "degree 2": ({"secure-aggregation": {"graph-degree": 2}, messages.SECAGG: {"protocol-graph_degree": 2}},
                 "policy refuses secagg-graph-degree"),
    "a model the policy does not list": ({"study": {"model": "resnet18"}}, "policy refuses model"),
    "an unknown model": ({"study": {"model": "vit-huge"}}, "'model' = 'vit-huge' must be one of"),
    "run name with a path": ({"study": {"run-name": "../../x"}}, "'run-name' = '../../x' is not a valid id"),
    "output paths in the message": ({messages.SIMULATION: {"output-dir": "/etc", "run-name": "x"}},
                                    "policy refuses simulation"),
    "a protocol that differs from the section": ({messages.SECAGG: {"protocol-dropout_rate": 0.99}},
                                                 "'protocol-dropout_rate' differs"),
    "a missing section": ({"privacy": None}, "no 'privacy' section"),
    "a wrong type": ({"privacy": {"target-epsilon": "8"}}, "'target-epsilon' must be float"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_request_beyond_the_policy_is_refused_by_name_before_any_key_is_made(attack, site_root, tmp_path):
    mutation, expected = ATTACKS[attack]
    sites = _sites(site_root, tmp_path, STRICT)
    grid = DeployedGrid(sites)
    config, model = _honest(tmp_path)
    reply = _send(grid, _advertise(config, model, mutation))
    _assert_refused_and_recorded(grid, reply, sites, expected)


def test_a_huge_cohort_is_refused_at_key_sharing(site_root, tmp_path):
    sites = _sites(site_root, tmp_path)
    grid = DeployedGrid(sites)
    config, model = _honest(tmp_path)
    content = _advertise(config, model, {messages.SECAGG: {
        "stage": messages.STAGE_SHARE_KEYS, "ids": [k.to_bytes(8, "big") for k in range(1, 1002)],
        "c-pks": [bytes(32)] * 1001, "s-pks": [bytes(32)] * 1001, "signatures": [b""] * 1001}})
    _assert_refused_and_recorded(grid, _send(grid, content), sites, "policy refuses cohort")


def test_training_with_dp_off_is_refused_and_evaluation_when_metrics_are_not_allowed(site_root, tmp_path):
    policy = SitePolicy(studies=("carefed-demo",), send_evaluation_metrics=False)
    sites = _sites(site_root, tmp_path, policy)
    grid = DeployedGrid(sites)
    config, model = _honest(tmp_path)
    train = request_content(config.replace(dp=False).site_request(num_classes=10, channels=1, image_size=28), 1,
                            ArrayRecord(model.state_dict()))
    _assert_refused_and_recorded(grid, _send(grid, train), sites, "policy refuses dp")
    evaluate = request_content(config.site_request(num_classes=10, channels=1, image_size=28), 1,
                               ArrayRecord(model.state_dict()))
    reply = _send(grid, evaluate, message_type=MessageType.EVALUATE)
    _assert_refused_and_recorded(grid, reply, sites, "policy refuses evaluate")


@pytest.mark.slow
def test_the_real_server_with_dp_switched_off_gets_refusals_and_aggregates_nothing(site_root, tmp_path):
    sites = _sites(site_root, tmp_path)
    grid = DeployedGrid(sites)
    config, _ = _honest(tmp_path, **{"dp": False, "num-server-rounds": 1})
    FederatedTraining(grid, config).run()
    run_dir = tmp_path / "runs" / "study-run"
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert rounds[1]["updates-aggregated"] == 0 and rounds[1]["secagg-aborted"]
    for reply in grid.replies:  # not one update, masked or plain, nor a key, left any site
        assert not ({messages.UPDATE, messages.MASKED_UPDATE, messages.SECAGG} & set(reply.content.keys()))
    for config_ in sites.values():
        ledger = PrivacyLedger(Path(str(config_["state-dir"])) / "ledger.sqlite")
        assert not ledger.spends() and "policy refuses dp" in ledger.entries()[-1].reason


def _study(grid: DeployedGrid, tmp_path: Path, run: str, study: str, epsilon: float) -> dict:
    config, _ = _honest(tmp_path, **{"run-name": run, "study-id": study, "target-epsilon": epsilon,
                                     "num-server-rounds": 1, "local-epochs": 1})
    FederatedTraining(grid, config).run()
    return json.loads((tmp_path / "runs" / run / "metrics.json").read_text())["rounds"][-1]


@pytest.mark.slow
def test_a_new_run_or_study_cannot_reset_the_datasets_budget(site_root, tmp_path):
    sites = _sites(site_root, tmp_path)
    first = _study(DeployedGrid(sites), tmp_path, "run-a", "carefed-demo", 8.0)
    assert first["updates-aggregated"] == 3
    # A fresh grid: empty Flower contexts, as after every SuperNode restarted; the ledgers on disk remain.
    again = _study(DeployedGrid(sites), tmp_path, "run-b", "carefed-demo", 8.0)
    assert again["updates-aggregated"] == 0
    other = _study(DeployedGrid(sites), tmp_path, "run-c", "carefed-demo-2", 8.0)
    assert other["updates-aggregated"] == 0
    small = _study(DeployedGrid(sites), tmp_path, "run-d", "carefed-demo-2", 2.0)
    assert small["updates-aggregated"] == 3
    for config in sites.values():
        path = Path(str(config["state-dir"])) / "ledger.sqlite"
        ledger = PrivacyLedger(path)
        reasons = [e.reason for e in ledger.entries() if e.kind == KIND_REFUSAL]
        assert any("policy refuses max-epsilon-per-study" in r for r in reasons)  # run-b: same study again
        assert any("policy refuses lifetime-epsilon" in r for r in reasons)  # run-c: 8 composed with 8 > 9.5
        spends = ledger.spends()
        assert [e.run_id for e in spends] == ["run-a", "run-d"] and {e.dataset for e in spends} != {""}
        spend = DatasetSpend.from_entries(spends)
        lifetime = independent_epsilon(spend.history(), POLICY.max_delta)
        assert spends[-1].lifetime_epsilon == pytest.approx(lifetime, rel=0.01)
        assert spends[0].epsilon < lifetime <= POLICY.lifetime_epsilon  # composed, not reset, within budget
        assert lifetime < spends[0].epsilon + spends[1].epsilon  # one accountant, not a sum
        report = audit_site(path)
        assert report.ok, report.problems
        [summary] = report.lifetime
        assert set(summary["studies"]) == {"carefed-demo", "carefed-demo-2"}
        assert summary["lifetime_epsilon_recomputed"] == pytest.approx(lifetime)
        assert len(report.refusals) == 2 * 1  # each refused study was refused once, at its first message
    assert np.isfinite(lifetime)


@pytest.mark.parametrize("missing", ["state-dir", "policy"])
def test_a_deployed_site_without_its_own_state_folder_or_policy_refuses_every_request(missing, site_root, tmp_path):
    sites = _sites(site_root, tmp_path)
    for config in sites.values():
        del config[missing]
    grid = DeployedGrid(sites)
    config, model = _honest(tmp_path)
    for message_type, content in ((MessageType.TRAIN, _advertise(config, model)),
                                  (MessageType.EVALUATE, request_content(config.site_request(
                                      num_classes=10, channels=1, image_size=28), 1, ArrayRecord(model.state_dict())))):
        reply = _send(grid, content, message_type=message_type)
        status = reply.content[messages.STATUS]
        assert status["state"] == messages.STATE_REFUSED and f"no '{missing}' in its node config" in status["reason"]
        assert set(reply.content.keys()) == {messages.STATUS}
        assert SESSION_STATE not in grid.contexts[FIRST_NODE].state


# ===== a site's state folder turns read-only or fills up: it refuses to train, and nothing it holds is lost ======
@pytest.fixture
def small_mount(tmp_path):
    """A real tmpfs of 24 MiB, unmounted afterwards. Mounting needs root with CAP_SYS_ADMIN, which CI has here:
    without it the test fails (it is not skipped), so a missing check is never mistaken for a passing one."""
    point = tmp_path / "mount"
    point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(point)], capture_output=True)
    assert done.returncode == 0, f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {done.stderr.decode().strip()}"
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=True)


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_a_site_whose_state_folder_turns_read_only_or_full_refuses_to_train(fault, site_root, tmp_path,
                                                                            small_mount):
    sites = _sites(site_root, tmp_path)
    folder = small_mount / "state"
    sites[FIRST_NODE]["state-dir"] = str(folder)
    grid = DeployedGrid(sites)
    config, model = _honest(tmp_path)
    _send(grid, _advertise(config, model, {"privacy": {"dp": False}}))  # a refusal on record, while it can write
    before = PrivacyLedger(folder / "ledger.sqlite").entries()
    assert len(before) == 1
    if fault == "read-only":
        subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    else:
        (small_mount / "filler").write_bytes(bytes(20 * 2**20))  # 24 MiB: under 16 MiB left
    reply = _send(grid, _advertise(config, model))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    status = reply.content[messages.STATUS]
    expected = "state folder cannot be written" if fault == "read-only" else "state folder is full"
    assert status["state"] == messages.STATE_REFUSED and expected in status["reason"], status["reason"]
    assert str(folder) not in status["reason"]  # the site's paths stay at the site
    assert set(reply.content.keys()) == {messages.STATUS}
    assert SESSION_STATE not in grid.contexts[FIRST_NODE].state  # no keys made
    ledger = PrivacyLedger(folder / "ledger.sqlite", create=False)
    entries = ledger.entries()
    assert entries[:1] == before and ledger.verify().ok  # what it held is intact
    if fault == "full":  # a few kilobytes still fit: the refusal is recorded
        assert len(entries) == 2 and expected in entries[-1].reason
    healthy = _send(grid, _advertise(config, model), node=FIRST_NODE + 1)
    assert not healthy.has_error() and messages.SECAGG in healthy.content  # another site advertises its keys


@pytest.mark.slow
def test_a_ledger_entry_that_cannot_be_committed_withholds_the_update(site_root, tmp_path, monkeypatch):
    """The disk fills while the site trains (after its admission check): the entry's commit fails, so the update
    never leaves; the round goes on without that site. The failing disk is the one stand-in here: SQLite's own
    'database or disk is full' error, raised from the commit of a round entry at one site."""
    sites = _sites(site_root, tmp_path)
    failing = Path(str(sites[FIRST_NODE]["state-dir"])) / "ledger.sqlite"
    append = PrivacyLedger.append

    def disk_full(self, entry):
        if self.path == failing and entry.kind != KIND_REFUSAL:
            raise sqlite3.OperationalError("database or disk is full")
        return append(self, entry)

    monkeypatch.setattr(PrivacyLedger, "append", disk_full)
    grid = DeployedGrid(sites)
    config, _ = _honest(tmp_path, **{"num-server-rounds": 1, "local-epochs": 1})
    FederatedTraining(grid, config).run()
    ledger = PrivacyLedger(failing, create=False)
    assert not ledger.spends() and ledger.verify().ok
    assert "ledger entry could not be committed" in ledger.entries()[-1].reason
    from_failing = [r for r in grid.replies if r.metadata.src_node_id == FIRST_NODE and not r.has_error()]
    assert from_failing and not any(messages.MASKED_UPDATE in r.content or messages.UPDATE in r.content
                                    for r in from_failing)
    for node in (FIRST_NODE + 1, FIRST_NODE + 2):
        assert len(PrivacyLedger(Path(str(sites[node]["state-dir"])) / "ledger.sqlite").spends()) == 1


@pytest.mark.slow
def test_a_site_that_keeps_its_metrics_sends_none_with_its_updates(site_root, tmp_path):
    """Evaluation now rides on the masked-input reply: a site whose policy keeps its metrics must not let them out
    that way either. The real server, one round; no reply from any site carries evaluation metrics."""
    sites = _sites(site_root, tmp_path, dataclasses.replace(POLICY, send_evaluation_metrics=False))
    grid = DeployedGrid(sites)
    config, _ = _honest(tmp_path, **{"num-server-rounds": 1, "local-epochs": 1})
    FederatedTraining(grid, config).run()
    rounds = json.loads((tmp_path / "runs" / "study-run" / "metrics.json").read_text())["rounds"]
    assert rounds[1]["updates-aggregated"] == 3  # they trained
    assert all(row["site-accuracy"] == {} for row in rounds)
    assert grid.replies and not any(messages.EVAL_METRICS in r.content for r in grid.replies if not r.has_error())
