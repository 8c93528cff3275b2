"""The run folder, runs/<run-id>/: config, metrics, privacy reports, checkpoints, final model, plots.

Every file is written atomically (temp file + rename). status.json says "running" until the last artifact is
written, then "complete" (or "failed" with the reason), so a crashed or refused run never looks complete.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import RunConfig
from common.errors import ConfigError
from common.privacy.ledger import LedgerEntry, PrivacyLedger, history_tuple

STATUS_RUNNING, STATUS_COMPLETE, STATUS_FAILED = "running", "complete", "failed"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(_clean(value), indent=2, default=_json_default).encode() + b"\n")


def with_run_name(config: RunConfig) -> RunConfig:
    """Give an unnamed run its id (UTC time and seed) before anything is sent to the sites."""
    return config if config.run_name else config.replace(
        run_name=f"{datetime.now(UTC):%Y%m%d-%H%M%S}-seed{config.seed}")


def ledger_entry_from_report(config: RunConfig, site: int, report: Mapping[str, Any]) -> LedgerEntry:
    """The run ledger's copy of what a site reported for a round."""
    steps = [int(n) for n in report["history-steps"]]
    history = history_tuple(zip(report["history-noise"], report["history-rate"], steps, strict=True))
    return LedgerEntry(
        run_id=config.run_name, round=int(report["round"]), site=site, unit=config.privacy_unit,
        sample_rate=float(report["sample-rate"]), noise_multiplier=float(report["noise-multiplier"]),
        clip_norm=float(report["max-grad-norm"]), steps_round=int(report["steps-round"]),
        steps_total=int(report["steps-total"]), planned_rounds=int(report["planned-rounds"]),
        delta=float(report["delta"]), epsilon=float(report["epsilon"]),
        epsilon_independent=float(report["epsilon-independent"]), budget=float(report["budget-epsilon"]),
        max_images_per_patient=int(report["max-images-per-patient"]),
        history=tuple(h for h in history if h[2] > 0),
    )


def read_status(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "status.json").read_text())


def mark_failed(run_dir: Path, reason: str) -> None:
    """For a run whose RunFolder cannot say so itself (its thread was stopped): status failed, rounds recorded."""
    metrics = run_dir / "metrics.json"
    rounds = json.loads(metrics.read_text())["rounds"] if metrics.exists() else []
    write_status(run_dir, STATUS_FAILED, reason=reason, rounds=max(len(rounds) - 1, 0))


def write_status(run_dir: Path, state: str, **extra: Any) -> None:
    write_json(run_dir / "status.json",
               {"state": state, "updated": datetime.now(UTC).isoformat(timespec="seconds"), **extra})


class RunFolder:
    """Owns one run's folder; the only writer of it."""

    def __init__(self, path: Path, config: RunConfig) -> None:
        self.path = path
        self.config = config
        self.ledger: PrivacyLedger | None = None
        self.rounds: list[dict[str, Any]] = []
        self.privacy: dict[int, list[dict[str, Any]]] = defaultdict(list)

    @classmethod
    def create(cls, config: RunConfig) -> RunFolder:
        """Make runs/<run-name>/ (never reusing one); config.run_name must be set (see `with_run_name`)."""
        run_id = config.run_name
        path = Path(config.output_dir).expanduser().resolve() / run_id
        try:
            path.mkdir(parents=True, exist_ok=False)
        except FileExistsError as err:
            raise ConfigError("run-name", run_id, f"the run folder {path} already exists",
                              "Choose another run name or move the old run away; runs are never overwritten.") from err
        folder = cls(path, config)
        folder.ledger = PrivacyLedger(path / "ledger.sqlite")
        write_json(path / "config.json", config.to_mapping())
        write_status(path, STATUS_RUNNING)
        return folder

    def record_round(self, metrics: Mapping[str, Any]) -> None:
        self.rounds.append(dict(metrics))
        write_json(self.path / "metrics.json", {"rounds": self.rounds})

    def amend_round(self, server_round: int, fields: Mapping[str, Any]) -> None:
        """Fill in what arrives after a round's row (its sites evaluate its model during the next round)."""
        [row] = [r for r in self.rounds if r["round"] == server_round]
        row.update(fields)
        write_json(self.path / "metrics.json", {"rounds": self.rounds})

    def record_privacy(self, site: int, report: Mapping[str, Any]) -> None:
        """Keep a site's report: in privacy/site-NNNN.json and, for rounds it trained, in the run ledger."""
        self.privacy[site].append(dict(report))
        write_json(self.path / "privacy" / f"site-{site:04d}.json", {"site": site, "reports": self.privacy[site]})
        if self.ledger is not None and report["status"] == "trained":
            self.ledger.append(ledger_entry_from_report(self.config, site, report))

    def checkpoint(self, server_round: int, state_dict: Mapping[str, torch.Tensor],
                   server_optimizer: Mapping[str, np.ndarray] | None = None,
                   model_average: Mapping[str, np.ndarray] | None = None) -> None:
        """The global model after `server_round`, with the server optimizer's state (momenta) and the moving
        average's (server-averaging) to resume from."""
        self._save_model(self.path / "checkpoints" / f"round-{server_round:04d}.pt", server_round, state_dict,
                         {"server_optimizer": dict(server_optimizer or {}), "model_average": dict(model_average or {})})

    def _save_model(self, path: Path, server_round: int, state_dict: Mapping[str, torch.Tensor],
                    extra: Mapping[str, object] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
            torch.save({"round": server_round, "config": self.config.to_mapping(),
                        "state_dict": dict(state_dict), **(extra or {})}, tmp)
        os.replace(tmp.name, path)

    def finish(self, server_round: int, state_dict: Mapping[str, torch.Tensor], stop_reason: str,
               averaged: Mapping[str, torch.Tensor] | None = None) -> None:
        """The final global model (and the moving average of the global models, when the run keeps one)."""
        from server.plots import plot_accuracy, plot_epsilon

        self._save_model(self.path / "model_final.pt", server_round, state_dict,
                         {"averaged_state_dict": dict(averaged)} if averaged is not None else None)
        plots = self.path / "plots"
        plots.mkdir(exist_ok=True)
        plot_accuracy(self.rounds, plots / "accuracy.png")
        plot_epsilon(self.privacy, self.config.target_epsilon if self.config.dp else None, plots / "epsilon.png")
        write_status(self.path, STATUS_COMPLETE, rounds=server_round, stop_reason=stop_reason)

    def fail(self, reason: str) -> None:
        mark_failed(self.path, reason)
