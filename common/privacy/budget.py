"""A dataset's privacy spend over its lifetime: every run of every study that touched it, composed as one.

The site's ledger holds each run's accountant history (the latest round entry of a run has its whole history).
Runs release independent DP-SGD outputs from the same data, so the dataset's privacy loss is the composition of
all of them: one PRV accountant over the concatenated histories (never a sum of per-run epsilons). A new run id,
a restarted SuperNode or an empty Flower context cannot reset it: the ledger on disk is the source of truth.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from common.privacy.accountant import SitePrivacy, prv_epsilon
from common.privacy.independent import pld_epsilon
from common.privacy.ledger import KIND_ROUND, LedgerEntry

History = tuple[tuple[float, float, int], ...]


@dataclass(frozen=True)
class DatasetSpend:
    """Each run's accountant history and its study, from the ledger's round entries."""

    runs: dict[str, History]
    study_of: dict[str, str]

    @classmethod
    def from_entries(cls, entries: Iterable[LedgerEntry]) -> DatasetSpend:
        runs: dict[str, History] = {}
        study_of: dict[str, str] = {}
        for entry in entries:
            if entry.kind != KIND_ROUND:
                continue
            # a run's entries grow its history; the longest one holds every step of that run
            if sum(n for *_, n in entry.history) >= sum(n for *_, n in runs.get(entry.run_id, ())):
                runs[entry.run_id] = tuple(entry.history)
            study_of[entry.run_id] = entry.study
        return cls(runs, study_of)

    def history(self, *, exclude_run: str | None = None, study: str | None = None) -> History:
        """The concatenated histories of every run (or one study's runs), optionally without one run."""
        out: list[tuple[float, float, int]] = []
        for run, history in self.runs.items():
            if run != exclude_run and (study is None or self.study_of[run] == study):
                out.extend(history)
        return tuple(out)

    def studies(self) -> list[str]:
        return sorted(set(self.study_of.values()))


def epsilon(history: History, delta: float) -> float:
    """PRV epsilon of a composed history (0 for nothing released)."""
    return prv_epsilon(history, delta) if history else 0.0


def independent_epsilon(history: History, delta: float) -> float:
    """The same composition through dp-accounting's PLD accountant (the auditor's number)."""
    return pld_epsilon(list(history), delta) if history else 0.0


def planned_history(privacy: SitePrivacy, rounds: int) -> History:
    """This run's history after `rounds` more rounds at its calibrated noise and sampling rate."""
    return tuple(privacy.accountant(privacy.steps_per_round * rounds).history) if rounds > 0 \
        else tuple(privacy.history)
