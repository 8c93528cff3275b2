"""Privacy-utility sweep: the default study without DP and at target epsilon 1, 3 and 8 (delta 1e-5).

    python -m simulations.sweep_privacy [--epsilons 1 3 8] [--output runs/sweep] [--scenario FILE] [--no-baseline]
                                        [--run-config "server-optimizer='fedavgm' server-momentum=0.5"]

Every arm runs through Flower's simulation engine with the same data, partition, model init and rounds; only
the privacy setting changes. Prints a Markdown table (the one in the README) and writes sweep.json.

Honest tuning: besides the run's own global accuracy (the server's whole held-out set), each final model is
scored on two fixed, stratified halves of that held-out set, "validation" and "test". Choose settings by the
validation column and report the test column; no site's data is in either (Papernot and Steinke 2022 on why
choosing on the reported set, or on private data without accounting, overstates results).
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.config import RunConfig, resolve  # noqa: E402
from common.data.site import global_model, load_source_for, to_tensor  # noqa: E402
from common.data.sources import ImageSet  # noqa: E402
from common.evaluation import evaluate_model  # noqa: E402
from server.run_folder import write_json  # noqa: E402
from simulations.runner import run_simulation, validate_inputs  # noqa: E402


def held_out_halves(config: RunConfig) -> tuple[ImageSet, ImageSet]:
    """The server's held-out set split per class into two fixed halves: (validation, test)."""
    held_out = load_source_for(config).test
    rng = np.random.default_rng([config.seed, 0x5A11D])
    first = np.concatenate([rng.permutation(np.flatnonzero(held_out.labels == c))[: (held_out.labels == c).sum() // 2]
                            for c in np.unique(held_out.labels)])
    second = np.setdiff1d(np.arange(len(held_out)), first)
    return held_out.subset(np.sort(first)), held_out.subset(second)


def final_accuracy(config: RunConfig, run_dir: Path, images: ImageSet, which: str = "state_dict") -> float | None:
    """The final global model's accuracy on `images` (`which="averaged_state_dict"`: the moving average's, or None
    when the run kept none)."""
    saved = torch.load(run_dir / "model_final.pt", weights_only=False)
    if which not in saved:
        return None
    model = global_model(config)
    model.load_state_dict(saved[which])
    return evaluate_model(model, to_tensor(images.images), torch.from_numpy(images.labels))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 3.0, 8.0], help="none: the no-DP arm only")
    parser.add_argument("--output", type=Path, default=Path("runs") / f"sweep-{datetime.now(UTC):%Y%m%d-%H%M%S}")
    parser.add_argument("--scenario", type=Path, default=None)
    parser.add_argument("--no-baseline", action="store_true", help="skip the no-DP arm (tuning DP settings only)")
    parser.add_argument("--run-config", action="append", default=[],
                        help="run-config overrides for every arm, as `flwr run --run-config` takes them")
    args = parser.parse_args()
    from flwr.common.config import parse_config_args

    common = dict(parse_config_args(args.run_config))

    arms: list[tuple[str, dict]] = [] if args.no_baseline else [("no DP", {"dp": False})]
    arms += [(f"epsilon {eps:g}", {"dp": True, "target-epsilon": eps}) for eps in args.epsilons]
    rows = []
    for name, overrides in arms:
        run_name = name.replace(" ", "-")
        config = resolve(args.scenario, {**common, **overrides, "output-dir": str(args.output),
                                         "run-name": run_name})
        validate_inputs(config)
        started = time.perf_counter()
        run_dir = run_simulation(config)
        rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
        last = rounds[-1]
        validation, test = held_out_halves(config)
        rows.append({
            "arm": name, "target_epsilon": config.target_epsilon if config.dp else None,
            "delta": config.target_delta if config.dp else None,
            "global_accuracy": last["global-accuracy"],
            "validation_accuracy": final_accuracy(config, run_dir, validation),
            "test_accuracy": final_accuracy(config, run_dir, test),
            "averaged_validation_accuracy": final_accuracy(config, run_dir, validation, "averaged_state_dict"),
            "averaged_test_accuracy": final_accuracy(config, run_dir, test, "averaged_state_dict"),
            "mean_site_accuracy": last["mean-site-accuracy"],
            "worst_site_accuracy": last["worst-site-accuracy"], "max_epsilon_spent": last["max-epsilon"],
            "rounds": last["round"], "seconds": round(time.perf_counter() - started, 1), "run_dir": str(run_dir),
        })
    write_json(args.output / "sweep.json", {"rows": rows})
    print("| setting | global acc | validation half | test half | averaged: validation, test | mean site acc | "
          "worst site acc | max epsilon spent (PRV) | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        spent = f"{row['max_epsilon_spent']:.2f}" if row["target_epsilon"] else "none (not private)"
        averaged = (f"{row['averaged_validation_accuracy']:.3f}, {row['averaged_test_accuracy']:.3f}"
                    if row["averaged_validation_accuracy"] is not None else "-")
        print(f"| {row['arm']} | {row['global_accuracy']:.3f} | {row['validation_accuracy']:.3f} | "
              f"{row['test_accuracy']:.3f} | {averaged} | {row['mean_site_accuracy']:.3f} | "
              f"{row['worst_site_accuracy']:.3f} | {spent} | {row['seconds']} |")


if __name__ == "__main__":
    main()
