"""PNG plots of a run: accuracy per round (global, mean and worst site) and epsilon per site per round."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_accuracy(rounds: Sequence[Mapping[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [r["global-accuracy"] for r in rounds], marker="o", label="global test set")
    site_rounds = [r for r in rounds if r.get("worst-site-accuracy") is not None]
    if site_rounds:
        ax.plot([r["round"] for r in site_rounds], [r["mean-site-accuracy"] for r in site_rounds],
                marker=".", label="mean over sites")
        ax.plot([r["round"] for r in site_rounds], [r["worst-site-accuracy"] for r in site_rounds],
                marker="v", label="worst site")
    ax.set(xlabel="round", ylabel="accuracy", ylim=(0, 1), title="Accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_epsilon(reports: Mapping[int, Sequence[Mapping[str, Any]]], budget: float | None, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for site, site_reports in sorted(reports.items()):
        trained = [r for r in site_reports if r["status"] == "trained"]
        ax.plot([r["round"] for r in trained], [r["epsilon"] for r in trained], marker=".", label=f"site {site}")
    if budget is not None:
        ax.axhline(budget, color="red", linestyle="--", label="budget")
    ax.set(xlabel="round", ylabel="epsilon spent (PRV, image-level)", title="Privacy spent per site")
    ax.grid(alpha=0.3)
    if len(reports) <= 12:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
