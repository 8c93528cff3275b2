"""End to end through Flower's simulation engine (Ray), real Opacus, real files."""

import json
from pathlib import Path

import pytest
import torch
from opacus.accountants import PRVAccountant

from common.data.site import resolve_partitioning
from common.privacy import pld_epsilon
from simulations.runner import resolve_resources, run_simulation
from tests.conftest import carefed as _carefed

pytestmark = pytest.mark.slow
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name).read_text())


def test_three_sites_two_rounds_write_a_consistent_run_folder(make_config):
    config = make_config(num_sites=3, num_server_rounds=2, run_name="three-sites")
    run_dir = run_simulation(config)

    assert _read(run_dir, "status.json")["state"] == "complete"
    # the run folder records what ran: "auto" settings resolved (client-num-gpus -1 -> this machine's GPU share)
    assert _read(run_dir, "config.json") == resolve_resources(resolve_partitioning(config)).to_mapping()
    rounds = _read(run_dir, "metrics.json")["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for row in rounds:
        assert 0.0 <= row["global-accuracy"] <= 1.0
        assert set(row["site-accuracy"]) == {"0", "1", "2"}
        assert row["worst-site-accuracy"] == min(row["site-accuracy"].values())
    assert all(sorted(r["sites-trained"]) == [0, 1, 2] for r in rounds[1:])
    assert rounds[-1]["global-accuracy"] > rounds[0]["global-accuracy"]  # training does something

    for site in range(3):
        reports = _read(run_dir, f"privacy/site-{site:04d}.json")["reports"]
        assert [r["round"] for r in reports] == [1, 2]
        epsilons = [r["epsilon"] for r in reports]
        assert epsilons == sorted(epsilons) and epsilons[0] > 0
        assert epsilons[-1] <= config.target_epsilon
        last = reports[-1]
        assert last["steps-total"] == 2 * last["steps-round"]
        # the reported epsilon is one accountant composed over both rounds, confirmed independently
        history = [(last["noise-multiplier"], last["sample-rate"], last["steps-total"])]
        accountant = PRVAccountant()
        accountant.history = history
        assert last["epsilon"] == pytest.approx(accountant.get_epsilon(last["delta"]), rel=1e-9)
        assert pld_epsilon(history, last["delta"]) == pytest.approx(last["epsilon"], rel=0.01)
    assert rounds[-1]["max-epsilon"] == pytest.approx(
        max(_read(run_dir, f"privacy/site-{s:04d}.json")["reports"][-1]["epsilon"] for s in range(3)))

    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001.pt", "round-0002.pt"]
    assert (run_dir / "model_final.pt").stat().st_size > 0
    for plot in ("accuracy.png", "epsilon.png"):
        assert (run_dir / "plots" / plot).read_bytes()[:8] == PNG_MAGIC

    # the audit: every ledger chained and agreeing, every epsilon recomputed independently
    audited = _carefed("audit", str(run_dir), "--json", cwd=run_dir)
    assert audited.returncode == 0, audited.stdout[-2000:] + audited.stderr[-2000:]
    report = json.loads(audited.stdout)
    assert report["ok"] and len(report["ledgers"]) == 4  # the run ledger and three site ledgers
    run_rows = [r for r in report["rows"] if r["source"] == "run"]
    assert sorted((r["round"], r["site"]) for r in run_rows) == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    for row in run_rows:
        assert row["epsilon_recomputed"] == pytest.approx(row["epsilon_logged"], rel=0.01)
        assert row["epsilon_patient"] > row["epsilon_logged"]

    # tampering with a site's ledger fails the audit with exit code 1, naming the entry
    import sqlite3

    with sqlite3.connect(run_dir / "sites" / "site-0001" / "ledger.sqlite") as db:
        db.execute("DROP TRIGGER entries_no_update")
        db.execute("UPDATE entries SET epsilon = 1.0 WHERE seq = 2")
    tampered = _carefed("audit", str(run_dir), cwd=run_dir)
    assert tampered.returncode == 1
    assert "entry 2: tampered" in " ".join(tampered.stdout.split())


def test_sites_that_cannot_afford_another_round_are_not_sampled_and_the_run_ends_cleanly(make_config):
    config = make_config(num_sites=3, num_server_rounds=4, privacy_planned_rounds=1, run_name="budget")
    run_dir = run_simulation(config)

    status = _read(run_dir, "status.json")
    assert status["state"] == "complete"
    assert status["stop_reason"] == "no site can train within its privacy budget"
    rounds = _read(run_dir, "metrics.json")["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert sorted(rounds[1]["sites-trained"]) == [0, 1, 2]
    for site in range(3):
        reports = _read(run_dir, f"privacy/site-{site:04d}.json")["reports"]
        assert len(reports) == 1 and reports[0]["next-round-affordable"] == 0
        assert reports[0]["epsilon"] <= config.target_epsilon
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001.pt"]


@pytest.mark.long
def test_server_side_and_feature_options_change_the_model_but_no_sites_epsilon(make_config):
    """Post-processing at the server (FedAdam on the secure sum's mean, a moving average of the global models) and a
    different function inside the clipped unit (weight-standardised convolutions; ScatterNet's fixed features, each
    image's gradient averaged over two shifted copies) change what is learned, not what is released about an
    image: with the same DP-SGD settings the ledgers' epsilons are exactly FedAvg's on the CNN."""
    arms = {"fedavg": {"model": "cnn"},
            "server-side": {"model": "cnn-ws", "server_optimizer": "fedadam", "server_learning_rate": 0.01,
                            "server_momentum": 0.9, "server_averaging": 0.5},
            "features": {"model": "scatternet", "augmentations": 2}}
    # one round, Opacus's hooks: what is compared is the accounting, and compiling three models costs a minute
    runs = {arm: run_simulation(make_config(num_sites=3, num_server_rounds=1, run_name=arm, dp_sgd_engine="opacus",
                                            **settings))
            for arm, settings in arms.items()}
    for site in range(3):
        reports = {arm: _read(run, f"privacy/site-{site:04d}.json")["reports"] for arm, run in runs.items()}
        for arm in ("server-side", "features"):
            assert [r["epsilon"] for r in reports[arm]] == [r["epsilon"] for r in reports["fedavg"]]
            assert [r["steps-total"] for r in reports[arm]] == [r["steps-total"] for r in reports["fedavg"]]
    saved = {arm: torch.load(run / "model_final.pt", weights_only=False) for arm, run in runs.items()}
    final = {arm: content["state_dict"] for arm, content in saved.items()}
    assert sorted(final["features"]) == ["head.2.bias", "head.2.weight"]  # no filter bank is ever sent
    checkpoint = torch.load(runs["server-side"] / "checkpoints" / "round-0001.pt", weights_only=False)
    assert set(checkpoint["server_optimizer"]) == {"first", "second"}
    assert set(checkpoint["model_average"]) == {"sum", "weight"}
    # the average of the rounds' global models is saved and scored beside the global model; after one round the
    # bias-corrected average is that round's model (no pull towards zero or the initial model)
    averaged = saved["server-side"]["averaged_state_dict"]
    assert sorted(averaged) == sorted(final["server-side"])
    for key, value in averaged.items():
        torch.testing.assert_close(value, final["server-side"][key])
    assert "averaged_state_dict" not in saved["fedavg"]
    rounds = _read(runs["server-side"], "metrics.json")["rounds"]
    assert all(0.0 <= r["averaged-accuracy"] <= 1.0 for r in rounds)
    assert all(r["averaged-accuracy"] is None for r in _read(runs["fedavg"], "metrics.json")["rounds"])


@pytest.mark.long
def test_cli_runs_a_small_study_and_prints_json(tmp_path: Path):
    result = _carefed("simulate", "--sites", "3", "--rounds", "1", "--no-dp", "--run-name", "cli",
                      "--output", str(tmp_path), "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["status"] == "complete" and summary["dp"] is False and summary["secure_aggregation"] is True
    assert summary["max_epsilon"] == 0.0
    assert Path(summary["run_dir"]) == tmp_path / "cli"


def test_virtual_sites_apply_their_own_policies_from_the_scenario(tmp_path: Path):
    """simulations/scenarios/site-policies.toml: site 3 allows epsilon 3 and refuses a study at 8 by name; site 7
    trains but never sends its evaluation metrics. The rest of the federation trains on."""
    from common.config import PROJECT_ROOT, resolve
    from common.privacy.ledger import KIND_REFUSAL, PrivacyLedger

    scenario = PROJECT_ROOT / "simulations" / "scenarios" / "site-policies.toml"
    config = resolve(scenario, {"num-server-rounds": 1, "output-dir": str(tmp_path), "run-name": "policies"})
    run_dir = run_simulation(config)
    assert _read(run_dir, "status.json")["state"] == "complete"
    first = _read(run_dir, "metrics.json")["rounds"][1]
    assert first["updates-aggregated"] == 9 and 3 not in first["sites-trained"] and 7 in first["sites-trained"]
    assert len(first["sites-refused"]) == 1
    assert set(first["site-accuracy"]) == {str(s) for s in range(10)} - {"3", "7"}
    refusing = PrivacyLedger(run_dir / "sites" / "site-0003" / "ledger.sqlite", create=False)
    assert not refusing.spends()
    assert all("policy refuses target-epsilon" in e.reason for e in refusing.entries() if e.kind == KIND_REFUSAL)
    silent = PrivacyLedger(run_dir / "sites" / "site-0007" / "ledger.sqlite", create=False)
    assert silent.spends() and any("policy refuses evaluate" in e.reason for e in silent.entries())
