"""The privacy audit: verify every ledger, recompute every epsilon independently, flag what does not hold.

What a privacy officer gets per round and site: the logged PRV epsilon (Opacus, the site's own accountant), the
auditor's recomputation with dp-accounting's PLD accountant from the logged mechanism history (it trusts no
number the site computed), and the patient-level epsilon of that same record-level training for the site's
largest patient (k images): the exact mixture-of-Gaussians PLD, not the textbook group-privacy bound.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from common.privacy.budget import DatasetSpend
from common.privacy.independent import History, patient_level_epsilon, pld_epsilon
from common.privacy.ledger import KIND_REFUSAL, KIND_ROUND, LedgerEntry, LedgerError, PrivacyLedger

TOLERANCE = 0.01  # relative disagreement between the logged and the recomputed epsilon that fails the audit
# Opacus's PRV accountant logs the upper end of an estimate within eps_error = 0.01 (its default) on either side,
# so a correct log can sit up to 0.02 above the true epsilon whatever its size: at epsilon 1 that is 2%, and a
# relative tolerance alone fails correct small-epsilon runs (found with a one-round study at epsilon 1).
PRV_EPS_ERROR = 0.01


def disagrees(logged: float, recomputed: float) -> bool:
    """The logged and the independently recomputed epsilon differ by more than the accountants' errors allow."""
    return abs(recomputed - logged) > max(TOLERANCE * max(logged, 1e-12), 2 * PRV_EPS_ERROR)
RUN_LEDGER = "ledger.sqlite"


@dataclass
class AuditRow:
    source: str  # "run" (the server's ledger) or "site" (a site's own ledger)
    run_id: str
    round: int
    site: int
    unit: str
    delta: float
    budget: float
    epsilon_logged: float  # PRV, as the site logged it
    epsilon_recomputed: float  # PLD, recomputed here from the logged history
    epsilon_patient: float | None  # patient-level epsilon of record-level training (largest patient)
    images_per_patient: int
    sample_rate: float
    noise_multiplier: float
    steps_total: int
    flags: list[str] = field(default_factory=list)


@dataclass
class AuditReport:
    rows: list[AuditRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # each fails the audit
    notes: list[str] = field(default_factory=list)  # worth knowing, not a failure
    ledgers: list[dict[str, Any]] = field(default_factory=list)
    lifetime: list[dict[str, Any]] = field(default_factory=list)  # per site ledger: spend per study and in all
    refusals: list[dict[str, Any]] = field(default_factory=list)  # requests the sites refused, with the reason

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "notes": self.notes, "ledgers": self.ledgers,
                "lifetime": self.lifetime, "refusals": self.refusals, "rows": [asdict(row) for row in self.rows]}


@lru_cache(maxsize=4096)
def _recompute(history: History, delta: float) -> float:
    return pld_epsilon(history, delta)


@lru_cache(maxsize=4096)
def _patient(history: History, delta: float, images: int) -> float:
    return patient_level_epsilon(history, delta, images)


def audit_ledger(path: Path, source: str, report: AuditReport, *, patient_level: bool = True) -> list[LedgerEntry]:
    """Verify one ledger file's chain and every entry in it; add rows and problems to `report`."""
    ledger = PrivacyLedger(path, create=False)
    verification = ledger.verify()
    report.ledgers.append({"path": str(path), "source": source, "entries": verification.entries,
                           "chain_ok": verification.ok})
    for problem in verification.problems:
        report.problems.append(f"{path}: entry {problem.seq}: {problem.problem}")
    entries = ledger.entries()
    for entry in entries:
        if entry.kind == KIND_REFUSAL:
            report.refusals.append({"path": str(path), "run_id": entry.run_id, "study": entry.study,
                                    "round": entry.round, "site": entry.site, "reason": entry.reason,
                                    "recorded_at": entry.recorded_at})
    entries = [e for e in entries if e.kind == KIND_ROUND]
    if source == "site" and entries:
        report.lifetime.append(_lifetime(path, entries, report))
    previous: dict[tuple[str, int], LedgerEntry] = {}
    for entry in entries:
        where = f"{path}: entry {entry.seq} (run {entry.run_id}, round {entry.round}, site {entry.site})"
        row = AuditRow(source, entry.run_id, entry.round, entry.site, entry.unit, entry.delta, entry.budget,
                       entry.epsilon, float("nan"), None, entry.max_images_per_patient, entry.sample_rate,
                       entry.noise_multiplier, entry.steps_total)
        history = tuple(entry.history)
        if sum(n for _, _, n in history) != entry.steps_total or not history \
                or history[-1][:2] != (entry.noise_multiplier, entry.sample_rate):
            report.problems.append(f"{where}: the logged accountant history does not match its noise multiplier, "
                                   "sampling rate and step count")
            row.flags.append("history-mismatch")
        if history:
            row.epsilon_recomputed = _recompute(history, entry.delta)
            if disagrees(entry.epsilon, row.epsilon_recomputed):
                report.problems.append(f"{where}: logged epsilon {entry.epsilon:.4f} but the independent PLD "
                                       f"accountant gives {row.epsilon_recomputed:.4f} (more than {TOLERANCE:.0%} or "
                                       f"{2 * PRV_EPS_ERROR:g} apart)")
                row.flags.append("epsilon-disagrees")
            if patient_level and entry.unit == "image" and entry.max_images_per_patient > 1:
                try:
                    row.epsilon_patient = _patient(history, entry.delta, entry.max_images_per_patient)
                except (RecursionError, ArithmeticError, ValueError):  # dp-accounting's answer to absurd values
                    report.problems.append(f"{where}: its patient-level epsilon cannot be computed from the logged "
                                           "history (dp-accounting fails on these values)")
                    row.flags.append("patient-epsilon-uncomputable")
            elif entry.unit == "patient" or entry.max_images_per_patient == 1:
                row.epsilon_patient = row.epsilon_recomputed
        if entry.epsilon > entry.budget * (1 + 1e-9) or row.epsilon_recomputed > entry.budget * (1 + TOLERANCE):
            report.problems.append(f"{where}: epsilon {max(entry.epsilon, row.epsilon_recomputed):.4f} exceeds the "
                                   f"site's budget {entry.budget}")
            row.flags.append("over-budget")
        before = previous.get((entry.run_id, entry.site))
        if before is not None and (entry.steps_total <= before.steps_total or entry.epsilon < before.epsilon):
            report.problems.append(f"{where}: steps or epsilon went down after round {before.round} "
                                   "(was the accountant reset?)")
            row.flags.append("accountant-reset")
        previous[(entry.run_id, entry.site)] = entry
        report.rows.append(row)
    return entries


def _lifetime(path: Path, entries: list[LedgerEntry], report: AuditReport) -> dict[str, Any]:
    """The dataset's spend per study and over its lifetime, recomputed independently (dp-accounting PLD over the
    concatenated run histories) and compared with what the site logged and its policy's lifetime budget."""
    spend = DatasetSpend.from_entries(entries)
    last = entries[-1]
    studies = {}
    for study in spend.studies():
        delta = max(e.delta for e in entries if e.study == study)
        runs = sorted(run for run, s in spend.study_of.items() if s == study)
        studies[study or "(none)"] = {"runs": runs, "delta": delta,
                                      "epsilon_recomputed": _recompute(spend.history(study=study), delta)}
    summary: dict[str, Any] = {"path": str(path), "studies": studies, "runs": len(spend.runs),
                               "lifetime_epsilon_logged": last.lifetime_epsilon, "budget": last.lifetime_budget,
                               "delta": last.lifetime_delta, "lifetime_epsilon_recomputed": None}
    if last.lifetime_delta <= 0:  # written before lifetime accounting: nothing logged to check
        report.notes.append(f"{path}: no lifetime epsilon logged (ledger entries from before schema 2)")
        return summary
    recomputed = _recompute(spend.history(), last.lifetime_delta)
    summary["lifetime_epsilon_recomputed"] = recomputed
    if disagrees(last.lifetime_epsilon, recomputed):
        report.problems.append(f"{path}: lifetime epsilon logged {last.lifetime_epsilon:.4f} but the independent "
                               f"PLD accountant gives {recomputed:.4f} over every run in the ledger")
    if max(recomputed, last.lifetime_epsilon) > last.lifetime_budget * (1 + TOLERANCE):
        report.problems.append(f"{path}: lifetime epsilon {max(recomputed, last.lifetime_epsilon):.4f} exceeds "
                               f"the site's lifetime budget {last.lifetime_budget:g}")
    logged = [e.lifetime_epsilon for e in entries if e.lifetime_delta > 0]
    if any(b < a - 1e-9 for a, b in zip(logged, logged[1:], strict=False)):
        report.problems.append(f"{path}: the logged lifetime epsilon went down (was the dataset's spend reset?)")
    return summary


def audit_site(path: Path) -> AuditReport:
    """A hospital's own audit: its ledger file (or the folder holding ledger.sqlite), without the server."""
    report = AuditReport()
    ledger = path / RUN_LEDGER if path.is_dir() else path
    try:
        audit_ledger(ledger, "site", report)
    except LedgerError as err:
        raise FileNotFoundError(str(err)) from err
    return report


def audit_run(run_dir: Path) -> AuditReport:
    """The study's audit: the server's run ledger, every site ledger in the run folder, and their agreement."""
    report = AuditReport()
    run_ledger = run_dir / RUN_LEDGER
    if not run_ledger.is_file():
        raise FileNotFoundError(f"{run_dir} has no {RUN_LEDGER}; is it a CareFed run folder (runs/<run-id>/)?")
    run_entries = audit_ledger(run_ledger, "run", report)
    site_entries: dict[tuple[str, int, int], LedgerEntry] = {}
    site_ledgers = sorted((run_dir / "sites").glob(f"site-*/{RUN_LEDGER}"))
    for path in site_ledgers:
        for entry in audit_ledger(path, "site", report):
            site_entries[(entry.run_id, entry.round, entry.site)] = entry
    if not site_ledgers:
        report.notes.append("no site ledgers in the run folder (deployed sites keep theirs; audit them with --site)")
        return report
    by_key = {(e.run_id, e.round, e.site): e for e in run_entries}
    for key, entry in sorted(by_key.items()):
        mine = site_entries.get(key)
        if mine is None:
            report.problems.append(f"run ledger has round {key[1]} of site {key[2]}, which that site's ledger lacks")
        elif (mine.epsilon, mine.steps_total, mine.history) != (entry.epsilon, entry.steps_total, entry.history):
            report.problems.append(f"round {key[1]} of site {key[2]}: the run ledger and the site's ledger disagree "
                                   f"(epsilon {entry.epsilon:.4f} vs {mine.epsilon:.4f})")
    missing = sorted(set(site_entries) - set(by_key))
    for run_id, round_, site in missing:
        report.notes.append(f"site {site} logged round {round_} of run {run_id} but the server has no report of it "
                            "(the site dropped out after training, or the round aborted)")
    return report


def summarise(report: AuditReport) -> dict[tuple[str, int], AuditRow]:
    """The latest row per (run, site) from the run ledger when present, else from the site ledgers."""
    latest: dict[tuple[str, int], AuditRow] = {}
    preferred = [r for r in report.rows if r.source == "run"] or report.rows
    for row in preferred:
        latest[(row.run_id, row.site)] = row
    return latest


def epsilon_series(report: AuditReport) -> dict[int, list[tuple[int, float, float | None]]]:
    """Per site: (round, image-level epsilon, patient-level epsilon) in round order."""
    series: dict[int, list[tuple[int, float, float | None]]] = defaultdict(list)
    preferred = [r for r in report.rows if r.source == "run"] or report.rows
    for row in preferred:
        series[row.site].append((row.round, row.epsilon_logged, row.epsilon_patient))
    return dict(series)
