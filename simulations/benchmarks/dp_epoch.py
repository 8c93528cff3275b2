"""One local epoch of DP-SGD (Opacus) against the same epoch without DP, side by side, as a ratio.

    python -m simulations.benchmarks.dp_epoch [--repeats 5] [--batch-size 64] [--threads 1] [--model cnn]

Both arms train the default model on the same site data (the whole embedded pool as one site) with the same
expected batch size; the arms alternate so drift on a shared machine hits both. Absolute times are printed for
context; the ratio is the result.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from client.site import model_for
from client.trainer import train_locally
from common.config import resolve
from common.data import load_site_data
from common.logs import tidy_logging
from common.privacy import SitePrivacy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="cnn", choices=["cnn", "resnet18"])
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    tidy_logging()
    torch.set_num_threads(args.threads)

    config = resolve(overrides={"num-sites": 1, "batch-size": args.batch_size, "local-epochs": 1,
                                "model": args.model, "num-server-rounds": 1})
    data = load_site_data(config, 0)
    times: dict[str, list[float]] = {"dp": [], "no-dp": []}
    for repeat in range(args.repeats + 1):  # the first pair is a warm-up and is not counted
        for arm in ("no-dp", "dp"):
            privacy = None
            if arm == "dp":
                privacy = SitePrivacy.calibrate(target_epsilon=8.0, delta=1e-5, num_examples=data.num_train,
                                                batch_size=args.batch_size, local_epochs=1, planned_rounds=1,
                                                max_grad_norm=1.0)
            torch.manual_seed(repeat)
            model = model_for(config, data, 10)
            start = time.perf_counter()
            train_locally(model, data, config, privacy, torch.Generator().manual_seed(repeat))
            if repeat:
                times[arm].append(time.perf_counter() - start)
    dp, plain = statistics.median(times["dp"]), statistics.median(times["no-dp"])
    result = {
        "benchmark": "one local epoch, DP-SGD (Opacus hooks, Poisson) vs non-private SGD",
        "model": args.model, "images": data.num_train, "batch_size": args.batch_size, "threads": args.threads,
        "repeats": args.repeats, "median_seconds_dp": round(dp, 4), "median_seconds_no_dp": round(plain, 4),
        "ratio_dp_over_no_dp": round(dp / plain, 2), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model}, {data.num_train} images, batch {args.batch_size}, {args.threads} thread(s), "
              f"median of {args.repeats}:")
        print(f"  non-private epoch {plain:.3f} s | DP-SGD epoch {dp:.3f} s | "
              f"ratio DP / non-private = {dp / plain:.2f}x")


if __name__ == "__main__":
    main()
