"""The audit on crafted ledgers: what passes, and each kind of failure it must catch."""

import math
import sqlite3
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant

from common.privacy import patient_level_epsilon, pld_epsilon
from common.privacy.audit import audit_run, audit_site, disagrees
from common.privacy.ledger import LedgerEntry, PrivacyLedger

SIGMA, RATE, STEPS = 1.2, 0.05, 40


def prv(steps: int) -> float:
    accountant = PRVAccountant()
    accountant.history = [(SIGMA, RATE, steps)]
    return float(accountant.get_epsilon(1e-5))


def entry(round_: int, site: int = 0, **changes) -> LedgerEntry:
    steps = STEPS * round_
    values = dict(run_id="r", round=round_, site=site, unit="image", sample_rate=RATE, noise_multiplier=SIGMA,
                  clip_norm=1.0, steps_round=STEPS, steps_total=steps, planned_rounds=3, delta=1e-5,
                  epsilon=prv(steps), epsilon_independent=prv(steps), budget=8.0, max_images_per_patient=3,
                  history=((SIGMA, RATE, steps),))
    values.update(changes)
    return LedgerEntry(**values)


def run_folder(tmp_path: Path, entries: list[LedgerEntry], site_entries: list[LedgerEntry] | None = None) -> Path:
    run = tmp_path / "run"
    ledger = PrivacyLedger(run / "ledger.sqlite")
    for e in entries:
        ledger.append(e)
    for e in entries if site_entries is None else site_entries:
        PrivacyLedger(run / "sites" / f"site-{e.site:04d}" / "ledger.sqlite").append(e)
    return run


def test_an_honest_run_passes_with_independent_and_patient_level_epsilon(tmp_path: Path):
    report = audit_run(run_folder(tmp_path, [entry(1), entry(1, site=1), entry(2), entry(2, site=1)]))
    assert report.ok, report.problems
    last = [r for r in report.rows if r.source == "run"][-1]
    assert last.epsilon_recomputed == pytest.approx(last.epsilon_logged, rel=0.01)
    assert last.epsilon_patient > last.epsilon_logged  # 3 images per patient: record-level DP protects less
    assert len(report.ledgers) == 3 and all(ledger["chain_ok"] for ledger in report.ledgers)


def test_a_logged_epsilon_that_the_independent_accountant_does_not_confirm_fails(tmp_path: Path):
    report = audit_run(run_folder(tmp_path, [entry(1), entry(2, epsilon=prv(STEPS * 2) * 0.8)]))
    assert not report.ok
    assert any("logged epsilon" in p and "round 2" in p for p in report.problems)


def test_a_budget_overrun_fails(tmp_path: Path):
    report = audit_run(run_folder(tmp_path, [entry(1, budget=0.5)]))
    assert any("exceeds the site's budget 0.5" in p for p in report.problems)


def test_an_accountant_reset_between_rounds_fails(tmp_path: Path):
    """The classic under-report: round 2 logs only its own steps (a fresh engine each round)."""
    reset = entry(2, steps_total=STEPS, epsilon=prv(STEPS), epsilon_independent=prv(STEPS),
                  history=((SIGMA, RATE, STEPS),))
    report = audit_run(run_folder(tmp_path, [entry(1), reset]))
    assert any("accountant reset" in p for p in report.problems)


def test_a_history_that_does_not_add_up_fails(tmp_path: Path):
    report = audit_run(run_folder(tmp_path, [entry(1, steps_total=STEPS + 5)]))
    assert any("history does not match" in p for p in report.problems)


def test_tampering_with_the_run_ledger_is_caught_by_the_chain_and_by_the_site_ledgers(tmp_path: Path):
    run = run_folder(tmp_path, [entry(1), entry(2)])
    with sqlite3.connect(run / "ledger.sqlite") as db:
        db.execute("DROP TRIGGER entries_no_update")
        db.execute("UPDATE entries SET epsilon = 0.01 WHERE seq = 2")
    problems = audit_run(run).problems
    assert any("entry 2: tampered" in p for p in problems)
    assert any("disagree" in p for p in problems)


def test_a_site_audits_its_own_ledger_without_the_server(tmp_path: Path):
    run = run_folder(tmp_path, [entry(1), entry(2)])
    report = audit_site(run / "sites" / "site-0000")
    assert report.ok and [r.round for r in report.rows] == [1, 2]
    with pytest.raises(FileNotFoundError, match="no ledger"):
        audit_site(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no ledger.sqlite"):
        audit_run(tmp_path)


def test_patient_level_epsilon_is_exact_for_one_image_and_grows_with_images_per_patient():
    history = [(SIGMA, RATE, 200)]
    record = pld_epsilon(history, 1e-5)
    assert patient_level_epsilon(history, 1e-5, 1) == pytest.approx(record, rel=1e-9)
    two, four = patient_level_epsilon(history, 1e-5, 2), patient_level_epsilon(history, 1e-5, 4)
    assert record < two < four


def test_a_noiseless_step_has_no_patient_level_guarantee_as_dp_accounting_says():
    """A ledger entry with noise 0 (corrupt or tampered) is reported as infinite epsilon, not a crash."""
    history = [(SIGMA, RATE, 30), (0.0, RATE, 5)]
    assert pld_epsilon(history, 1e-5) == math.inf
    assert patient_level_epsilon(history, 1e-5, 3) == math.inf


def test_a_history_whose_patient_level_epsilon_cannot_be_computed_fails_the_audit_by_name(tmp_path: Path):
    """A ledger entry with an absurd noise multiplier (corrupt or forged) makes dp-accounting's mixture-of-Gaussians
    construction fail: the audit names the entry and fails, it does not crash."""
    absurd = entry(1, noise_multiplier=1e9, history=((1e9, RATE, STEPS),), epsilon=0.0, epsilon_independent=0.0)
    report = audit_run(run_folder(tmp_path, [absurd]))
    assert not report.ok
    assert any("patient-level epsilon cannot be computed" in p for p in report.problems), report.problems
    assert all("patient-epsilon-uncomputable" in row.flags for row in report.rows)


def test_patient_level_epsilon_is_dp_accountings_mixture_of_gaussians_accountant():
    """The reused per-step distribution gives what dp-accounting's PLDAccountant gives for the same
    MixtureOfGaussiansDpEvents, over a history of two calibrations."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from scipy.stats import binom

    from common.privacy.independent import PATIENT_DISCRETIZATION

    history, k = [(SIGMA, RATE, 30), (SIGMA * 1.5, RATE / 2, 40), (SIGMA, RATE, 30)], 3
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PATIENT_DISCRETIZATION)
    for sigma, rate, steps in history:
        probs = [float(binom.pmf(j, k, rate)) for j in range(k + 1)]
        accountant.compose(dp_event.MixtureOfGaussiansDpEvent(sigma, list(range(k + 1)), probs), steps)
    assert patient_level_epsilon(history, 1e-5, k) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def test_a_patients_per_step_distribution_is_dp_accountings_to_the_bit():
    """The vectorised inversion gives the very distribution dp-accounting's own mixture-of-Gaussians mechanism
    gives (both sides, every bucket, the infinite mass): the speed-up changes no number."""
    from dp_accounting.pld import privacy_loss_distribution
    from scipy.stats import binom

    from common.privacy.independent import PATIENT_DISCRETIZATION, _patient_mechanism

    sigma, rate, k = 1.0, 0.05, 2
    ours = _patient_mechanism(sigma, rate, k)
    library = privacy_loss_distribution.from_mixture_gaussian_mechanism(
        sigma, list(range(k + 1)), [float(binom.pmf(j, k, rate)) for j in range(k + 1)],
        value_discretization_interval=PATIENT_DISCRETIZATION)
    for mine, theirs in ((ours._pmf_remove, library._pmf_remove), (ours._pmf_add, library._pmf_add)):
        assert mine._lower_loss == theirs._lower_loss and mine._infinity_mass == theirs._infinity_mass
        assert mine._probs.tolist() == theirs._probs.tolist()
    # where floats are too coarse to bisect (an absurd noise multiplier) it ends as the library does, never hangs
    with pytest.raises(RecursionError):
        privacy_loss_distribution.from_mixture_gaussian_mechanism(
            1e6, [0, 1, 2], [float(binom.pmf(j, 2, 0.01)) for j in range(3)],
            value_discretization_interval=PATIENT_DISCRETIZATION)
    with pytest.raises(RecursionError):
        _patient_mechanism.__wrapped__(1e6, 0.01, 2)


def test_a_correct_small_epsilon_agrees_with_the_independent_accountant_and_a_wrong_one_does_not():
    """Opacus's PRV accountant logs an upper estimate within 0.01 on either side: at epsilon ~1 (one round of five
    steps) a correct log may be 1-2% above the PLD accountant and must pass; a log off by more still fails."""
    history = [(2.2, 0.2, 5)]
    accountant = PRVAccountant()
    accountant.history = list(history)
    logged, recomputed = accountant.get_epsilon(1e-5), pld_epsilon(history, 1e-5)
    assert 0.5 < recomputed < 2.0
    assert not disagrees(logged, recomputed)
    assert disagrees(recomputed - 0.03, recomputed) and disagrees(recomputed + 0.03, recomputed)
    assert disagrees(0.9 * 8.0, 8.0) and not disagrees(8.05, 8.0)
