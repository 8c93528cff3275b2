"""The site policy, the request schema, the lifetime composition and the bounded calibration, as pure parts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from common.config import resolve
from common.errors import ConfigError
from common.policy import PolicyError, PolicyRefusal, SitePolicy, load_policy, policy_text
from common.privacy.accountant import calibrate_noise_multiplier, prv_epsilon
from common.privacy.budget import DatasetSpend, epsilon
from common.privacy.ledger import KIND_REFUSAL, LedgerEntry, PrivacyLedger
from common.study import PrivacySection, RequestError, SecAggSection, SiteRequest, StudySection


def _request(**overrides) -> SiteRequest:
    config = resolve(overrides={"run-name": "r1", **overrides})
    return config.site_request(num_classes=10, channels=1, image_size=28)


def test_the_written_policy_file_reads_back_as_the_same_policy(tmp_path: Path):
    policy = SitePolicy(studies=("a", "b"), max_epsilon_per_study=3.0, lifetime_epsilon=10.0, models=("cnn",))
    path = tmp_path / "policy.toml"
    path.write_text(policy_text(policy, path))
    assert load_policy(path) == policy
    assert "# The dataset's lifetime budget" in path.read_text()


@pytest.mark.parametrize("text, problem", [
    ('studies = []', "'studies'"),
    ('studies = ["a"]\nmax-epsilon-per-study = 1000.0\nlifetime-epsilon = 1000.0', "'max-epsilon-per-study'"),
    ('studies = ["a"]\nmax-epsilon-per-study = 8.0\nlifetime-epsilon = 4.0', "'lifetime-epsilon'"),
    ('studies = ["a"]\nmax-dropout-rate = 0.6', "'max-dropout-rate'"),
    ('studies = ["a"]\ndp-required = "yes"', "'dp-required'"),
    ('studies = ["a"]\nsurprise = 1', "unknown setting 'surprise'"),
    ('studies = ["a"]\n[sites.3]\nmin-cohort = 5', "[sites.*] tables are for simulated federations"),
    ('studies = [', "not a readable TOML policy"),
])
def test_a_bad_policy_file_is_refused_by_name(tmp_path: Path, text: str, problem: str):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=problem.replace("[", r"\[").replace("*", r"\*")):
        load_policy(path)


def test_a_simulation_policy_file_gives_each_site_its_own_table(tmp_path: Path):
    path = tmp_path / "policy.toml"
    path.write_text('studies = ["a"]\nmax-epsilon-per-study = 8.0\n[sites.3]\nmax-epsilon-per-study = 3.0\n')
    assert load_policy(path, 3).max_epsilon_per_study == 3.0
    assert load_policy(path, 4).max_epsilon_per_study == 8.0


def test_a_proposal_inside_the_policy_is_accepted_and_one_beyond_it_is_named():
    policy = SitePolicy(studies=("carefed-demo",), max_epsilon_per_study=8.0, min_privacy_unit="patient")
    inside = _request(**{"target-epsilon": 3.0, "privacy-unit": "patient"})
    policy.check_study(inside.study, inside.privacy, inside.secagg)
    beyond = _request(**{"privacy-unit": "image"})
    with pytest.raises(PolicyRefusal) as refused:
        policy.check_study(beyond.study, beyond.privacy, beyond.secagg)
    assert (refused.value.setting, refused.value.asked) == ("privacy-unit", "image")
    with pytest.raises(PolicyRefusal, match="policy refuses cohort: asked 1001"):
        policy.check_cohort(1001, 0)
    with pytest.raises(PolicyRefusal, match="policy refuses neighbours: asked 1"):
        SitePolicy(studies=("x",), min_neighbours=2).check_cohort(10, 1)


def test_request_sections_round_trip_and_refuse_anything_else():
    request = _request()
    assert SiteRequest.parse(request.records()) == request
    records = request.records()
    with pytest.raises(RequestError, match="unexpected or missing key 'extra'"):
        StudySection.parse({**records["study"], "extra": 1})
    with pytest.raises(RequestError, match="'target-epsilon' must be float, got str"):
        PrivacySection.parse({**records["privacy"], "target-epsilon": "8"})
    with pytest.raises(RequestError, match="'target-epsilon' = nan"):
        PrivacySection.parse({**records["privacy"], "target-epsilon": float("nan")})
    with pytest.raises(RequestError, match="'max-weight' = 0"):
        SecAggSection.parse({**records["secure-aggregation"], "max-weight": 0})
    with pytest.raises(RequestError, match="'run-name' = 'a/b' is not a valid id"):
        StudySection.parse({**records["study"], "run-name": "a/b"})


def test_the_run_config_refuses_a_run_name_that_is_a_path():
    with pytest.raises(ConfigError, match="'run-name' = '../x'"):
        resolve(overrides={"run-name": "../x"})


def _spend(run: str, study: str, history, round_: int = 1) -> LedgerEntry:
    return LedgerEntry(run_id=run, round=round_, site=0, unit="image", sample_rate=history[-1][1],
                       noise_multiplier=history[-1][0], clip_norm=1.0, steps_round=history[-1][2],
                       steps_total=sum(h[2] for h in history), planned_rounds=1, delta=1e-5, epsilon=1.0,
                       epsilon_independent=1.0, budget=8.0, max_images_per_patient=1, history=tuple(history),
                       study=study)


def test_the_lifetime_composes_every_runs_whole_history_in_one_accountant(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    ledger.append(_spend("a", "s1", [(1.0, 0.1, 20)]))
    ledger.append(_spend("a", "s1", [(1.0, 0.1, 40)], 2))  # run a's history grows: the longest one counts
    ledger.refusal(run_id="b", study="s1", round=1, site=0, reason="PolicyRefusal: ...")
    ledger.append(_spend("c", "s2", [(2.0, 0.2, 30)]))
    spend = DatasetSpend.from_entries(ledger.spends())
    assert spend.runs == {"a": ((1.0, 0.1, 40),), "c": ((2.0, 0.2, 30),)}
    assert spend.history(study="s1") == ((1.0, 0.1, 40),)
    lifetime = epsilon(spend.history(), 1e-5)
    parts = [epsilon(spend.history(study=s), 1e-5) for s in ("s1", "s2")]
    assert max(parts) < lifetime < sum(parts)
    assert lifetime == prv_epsilon(((1.0, 0.1, 40), (2.0, 0.2, 30)), 1e-5)
    assert [e.kind for e in ledger.entries()].count(KIND_REFUSAL) == 1 and ledger.verify().ok
    assert ledger.last("b", 0) is None  # a refusal spends nothing and is not a run's state


def test_a_schema_1_ledger_gains_the_new_columns_and_still_verifies(tmp_path: Path):
    path = tmp_path / "old.sqlite"
    PrivacyLedger(path).append(_spend("a", "", [(1.0, 0.1, 20)]))  # no study: hashes as schema 1 did
    with sqlite3.connect(path) as db:  # make it look exactly like a schema-1 file
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
        db.execute("DROP TRIGGER entries_no_update")
        for column in ("study", "dataset", "kind", "reason", "lifetime_epsilon", "lifetime_budget",
                       "lifetime_delta"):
            db.execute(f"ALTER TABLE entries DROP COLUMN {column}")
    ledger = PrivacyLedger(path)
    assert ledger.verify().ok and ledger.entries()[0].kind == "round"
    ledger.append(_spend("a", "s", [(1.0, 0.1, 40)], 2))
    assert ledger.verify().ok


def test_calibration_is_bounded_for_any_epsilon_a_policy_allows_and_refuses_beyond():
    sigma = calibrate_noise_multiplier(target_epsilon=30.0, delta=1e-5, sample_rate=0.2, steps=150)
    assert 29.9 <= prv_epsilon(((sigma, 0.2, 150),), 1e-5) <= 30.0
    with pytest.raises(ConfigError, match="cannot calibrate noise"):
        calibrate_noise_multiplier(target_epsilon=1000.0, delta=1e-5, sample_rate=0.2, steps=150)


def test_a_simulated_sites_run_config_is_parsed_once_and_a_changed_type_is_still_refused():
    """Virtual sites parse the simulation section of every message; it is parsed once per worker process, keyed by
    each value with its type, so a section the parser refuses (an int where a bool is due) is refused every time,
    even after the same values with the right types were accepted."""
    from client.policy_gate import _simulation_config, _tagged

    values = resolve(overrides={"run-name": "r1"}).to_mapping()
    first = _simulation_config(_tagged(values))
    assert _simulation_config(_tagged(dict(values))) is first
    with pytest.raises(ConfigError, match="expected bool, got int"):
        _simulation_config(_tagged({**values, "dp": int(values["dp"])}))
