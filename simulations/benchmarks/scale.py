"""Round time and peak memory as the federation grows: 10, 100, 1000 sites at 20 per round.

    python -m simulations.benchmarks.scale                          # the README table (about 20 minutes)
    python -m simulations.benchmarks.scale --sites 10 100 --rounds 2

Each configuration is a real `carefed simulate` (Flower's simulation engine on Ray, DP-SGD on) in its own process
tree, with secure aggregation on and off (`--no-secagg`, plain FedAvg: the peer), and one non-private,
plain row per size (`--no-dp --no-secagg`) that shows what DP-SGD itself costs. Sites are drawn lazily from the
embedded pool (partitioning = resample) with every site the same size (300 images, site-size-spread 0): which
sites a round samples depends on Flower's random node ids, and with unequal sites that luck would dominate the
round time. So every configuration trains the same amount per round; only the number of idle sites changes.

Reported per configuration:
- round s: median wall time of the training rounds after the first (the first also starts Ray's workers and
  calibrates new sites' noise); first round s separately;
- peak MiB: peak summed RSS of the whole process tree (the CLI, Ray's raylet, GCS and workers), sampled every
  0.1 s; shared pages count once per process, so this overstates physical memory;
- x 10 sites: the ratio to the same configuration with 10 sites (how it grows with idle sites);
- x plain: round time over the plain FedAvg row of the same size (secure aggregation's cost).
With 10 sites and 20 per round the cohort is all 10 sites (it cannot be 20); the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from simulations.benchmarks.peak_memory import measure_tree

MODES = {"secagg": [], "plain": ["--no-secagg"], "no-dp plain": ["--no-dp", "--no-secagg"]}


def measure(sites: int, per_round: int, rounds: int, mode: str, output: Path, seed: int) -> dict[str, Any]:
    name = f"scale-{sites}-{mode.replace(' ', '-')}"
    scenario = output / "equal-sites.toml"
    scenario.write_text('[config]\npartitioning = "resample"\nsite-size-median = 300\nsite-size-spread = 0.0\n')
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--sites", str(sites), "--per-round",
               str(min(per_round, sites)), "--rounds", str(rounds), "--scenario", str(scenario), "--seed", str(seed),
               "--output", str(output), "--run-name", name, "--format", "json", *MODES[mode]]
    measured = measure_tree(command, capture=True)
    if measured.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({measured.returncode}):\n{measured.stderr[-3000:]}")
    metrics = json.loads((output / name / "metrics.json").read_text())["rounds"]
    seconds = [r["seconds"] for r in metrics if r["round"] >= 1]
    later = seconds[1:] or seconds
    return {"sites": sites, "per_round": min(per_round, sites), "mode": mode, "rounds": rounds,
            "first_round_s": round(seconds[0], 2), "round_s": round(statistics.median(later), 2),
            "wall_s": round(measured.wall_seconds, 1), "peak_mib": round(measured.peak_bytes / 2**20),
            "global_accuracy": metrics[-1]["global-accuracy"]}


def table(rows: list[dict[str, Any]]) -> str:
    base = {(r["mode"]): r for r in rows if r["sites"] == min(x["sites"] for x in rows)}
    plain = {r["sites"]: r for r in rows if r["mode"] == "plain"}
    lines = ["| sites | per round | mode | round s | first round s | peak MiB | round x smallest | memory x smallest "
             "| x plain |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, p = base.get(r["mode"]), plain.get(r["sites"])
        lines.append(
            f"| {r['sites']} | {r['per_round']} | {r['mode']} | {r['round_s']:.1f} | {r['first_round_s']:.1f} | "
            f"{r['peak_mib']} | {r['round_s'] / b['round_s']:.2f} | {r['peak_mib'] / b['peak_mib']:.2f} | "
            + (f"{r['round_s'] / p['round_s']:.2f} |" if p else "- |")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="Also write the rows as JSON here.")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    rows = []
    with tempfile.TemporaryDirectory(prefix="carefed-scale-") as tmp:
        for sites in args.sites:
            for mode in args.modes:
                row = measure(sites, args.per_round, args.rounds, mode, Path(tmp), args.seed)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
