"""Scale: many virtual sites built lazily, scenario faults, per-site budgets, and a real two-node Ray cluster."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from client.simulated_faults import _draw
from common.privacy.ledger import PrivacyLedger
from common.secagg.protocol import threshold
from simulations.runner import run_simulation
from tests.conftest import carefed as _carefed

pytestmark = pytest.mark.slow


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.long
def test_a_large_federation_builds_only_sampled_sites_and_replays_its_faults(make_config):
    # The cohort depends on Flower's random node ids; the fault draws are seeded per (round, site), so the test
    # predicts each round's outcome from its cohort. With these rates a run without any straggler has p < 0.002.
    config = make_config(num_sites=300, sites_per_round=8, num_server_rounds=3, site_epsilons="3,8",
                         privacy_planned_rounds=3,  # noise for every round: a resampled straggler never refuses
                         dropout_share_keys=0.1, dropout_masked_input=0.1, straggler_probability=0.3,
                         secagg_dropout_rate=0.45, run_name="large")  # sites refuse d >= 0.5
    run_dir = run_simulation(config)
    assert _read(run_dir / "status.json")["state"] == "complete"
    rounds = _read(run_dir / "metrics.json")["rounds"][1:]

    sampled: set[int] = set()
    reached_training: set[int] = set()
    aborted_before_training: set[int] = set()
    for row in rounds:
        cohort = row["sites-sampled"]
        assert len(cohort) == 8 and all(isinstance(s, int) for s in cohort)
        sampled |= set(cohort)
        assert row["sites-evaluated"] == "cohort"

        def lost(site: int, stage: str, probability: float, r=row["round"]) -> bool:
            return _draw(config, r, site, stage) < probability

        at_keys = [s for s in cohort if lost(s, "share-keys", config.dropout_share_keys)]
        if len(cohort) - len(at_keys) < threshold(len(cohort), config.secagg_dropout_rate, 0):
            assert row["sites-trained"] == [] and "masked-input" not in row["secagg-dropped"]  # aborted early
            assert row["secagg-aborted"]
            aborted_before_training.add(row["round"])
            continue
        answered = [s for s in cohort if s not in at_keys and not lost(s, "masked-input", config.dropout_masked_input)]
        reached_training |= set(answered)  # a masked-input dropout leaves before training
        arrived = [s for s in answered if not lost(s, "straggler", config.straggler_probability)]
        assert row["sites-trained"] == arrived  # the seeded draws replay exactly
        assert sorted(row["secagg-dropped"].get("share-keys", [])) == at_keys
        assert sorted(row["secagg-dropped"].get("masked-input", [])) == sorted(set(cohort) - set(at_keys) -
                                                                                 set(arrived))
        assert row["updates-aggregated"] in (0, len(arrived))  # all survivors, or an aborted round
        assert bool(row["secagg-aborted"]) == (row["updates-aggregated"] == 0)
    assert any(row["secagg-dropped"] for row in rounds), "the scenario's faults never fired; pick another seed"
    # At scale only a cohort evaluates (300 local evaluations a round would dominate): each round's model is
    # evaluated by the sites that train on it in the next round (their metrics ride on their masked updates;
    # a straggler's never arrive), by sampled sites that dropped before naming themselves (asked separately),
    # and the last model by the last round's cohort, asked once at the end.
    every_row = _read(run_dir / "metrics.json")["rounds"]
    for row, following in zip(every_row, every_row[1:], strict=False):
        evaluated = set(map(int, row["site-accuracy"]))
        assert set(following["sites-trained"]) <= evaluated <= set(following["sites-trained"]) | set(
            row.get("sites-sampled", [])), row["round"]
    assert sorted(map(int, every_row[-1]["site-accuracy"])) == every_row[-1]["sites-sampled"]

    # Lazy: a folder (egress log) only for sampled sites, a ledger only for those that trained, nothing for the
    # 280-odd idle ones.
    site_dirs = {int(p.name.split("-")[1]) for p in (run_dir / "sites").iterdir()}
    assert site_dirs == sampled
    with_ledger = {s for s in site_dirs if (run_dir / "sites" / f"site-{s:04d}" / "ledger.sqlite").exists()}
    assert with_ledger == reached_training
    # Per-site budgets: even sites 3, odd sites 8, each calibrated to and kept within its own budget.
    reports = [r for p in (run_dir / "privacy").iterdir() for r in _read(p)["reports"]]
    assert reports
    for report in reports:
        assert report["budget-epsilon"] == (3.0 if report["site"] % 2 == 0 else 8.0)
        assert report["epsilon"] <= report["budget-epsilon"]
    # A straggler trained and spent budget: its own ledger records the round although the server never heard back.
    # (A round that aborted at key sharing trained nobody: its sites are not stragglers.)
    stragglers = [(row["round"], s) for row in rounds for s in row["sites-sampled"]
                  if row["round"] not in aborted_before_training and s not in row["sites-trained"]
                  and not lost_before_reply(config, row["round"], s)]
    assert stragglers, "no straggler in this scenario; pick another seed"
    for server_round, site in stragglers:
        ledger = PrivacyLedger(run_dir / "sites" / f"site-{site:04d}" / "ledger.sqlite", create=False)
        assert server_round in [e.round for e in ledger.entries(site=site)]
        assert ledger.verify().ok


def lost_before_reply(config, server_round: int, site: int) -> bool:
    return (_draw(config, server_round, site, "share-keys") < config.dropout_share_keys
            or _draw(config, server_round, site, "masked-input") < config.dropout_masked_input)

def test_a_cohort_too_small_for_secure_aggregation_ends_the_run_cleanly(make_config):
    # Noise calibrated for one round: the 3 sites of round 1 exhaust their budgets, 2 eligible remain < 3.
    config = make_config(num_sites=5, sites_per_round=3, num_server_rounds=3, privacy_planned_rounds=1,
                         secagg_min_cohort=3, run_name="small-cohort")
    run_dir = run_simulation(config)
    status = _read(run_dir / "status.json")
    assert status["state"] == "complete"
    assert status["stop_reason"] == "only 2 site(s) can still train, fewer than secagg-min-cohort=3"
    rounds = _read(run_dir / "metrics.json")["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["updates-aggregated"] == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path: Path):
    """A real two-node Ray cluster on this machine: a head and a second node, one CPU each."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray, "the ray CLI ships with flwr[simulation]"
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    address = f"127.0.0.1:{port}"
    try:
        for args in (["--head", f"--port={port}", "--include-dashboard=false"], [f"--address={address}"]):
            done = subprocess.run([ray, "start", *args, "--num-cpus=1", "--disable-usage-stats"], env=env,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-2000:]
        yield address
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.long
def test_simulation_runs_on_an_existing_two_node_ray_cluster(ray_cluster: str, tmp_path: Path):
    result = _carefed("simulate", "--sites", "4", "--rounds", "2", "--ray-address", ray_cluster,
                      "--run-name", "cluster", "--output", str(tmp_path), "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["status"] == "complete"
    placements = [json.loads(line) for p in (tmp_path / "cluster" / "sites").glob("*/placement.jsonl")
                  for line in p.read_text().splitlines()]
    assert len(placements) == 4 * 2  # every site, every round
    # One CPU per node and one per site: Ray must have run sites on both nodes of the cluster.
    assert len({p["ray_node"] for p in placements}) == 2
