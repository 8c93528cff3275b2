"""One local epoch of DP-SGD, by each way of computing its clipped sums, against the same epoch without DP.

    python -m simulations.benchmarks.dp_epoch [--models cnn scatternet resnet18] [--repeats 5] [--threads 1] [--json]

Arms, side by side in one run, on the same site data (the embedded pool as one site; ResNet-18 on a subset, it is
slow on a CPU) with the same expected batch size:
  - no-dp          plain SGD, eager (the reference: every ratio is over this arm)
  - no-dp-compiled plain SGD, the model compiled with torch.compile
  - opacus         DP-SGD with Opacus's per-sample-gradient hooks (CareFed's previous path)
  - fused          DP-SGD through client.fused_dp: vmap(grad) + clip + sum, compiled, in fixed-size chunks
The arms run in a new random order in each repeat, so drift on a shared machine, and whatever one arm leaves
behind for the next, hits all of them. The first epoch of each arm
is a warm-up, reported on its own (it holds the compilation); the result is the median of the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import time

import torch

from client.trainer import train_locally
from common.config import resolve
from common.data import SiteData, load_site_data
from common.logs import tidy_logging
from common.models import build_model
from common.privacy import SitePrivacy
from common.study import MODELS

ARMS = ("no-dp", "no-dp-compiled", "opacus", "fused")


def epoch_seconds(model_name: str, arm: str, data: SiteData, batch_size: int, seed: int,
                  device: str = "cpu") -> float:
    config = resolve(overrides={"num-sites": 1, "batch-size": batch_size, "local-epochs": 1, "model": model_name,
                                "num-server-rounds": 1, "dp": not arm.startswith("no-dp"),
                                "dp-sgd-engine": arm if arm in ("opacus", "fused") else "auto"})
    privacy = None
    if config.dp:
        privacy = SitePrivacy.calibrate(target_epsilon=8.0, delta=1e-5, num_examples=data.num_train,
                                        batch_size=batch_size, local_epochs=1, planned_rounds=1, max_grad_norm=1.0)
    torch.manual_seed(seed)
    model = build_model(model_name, in_channels=data.train_x.shape[1], num_classes=10,
                        image_size=data.train_x.shape[-1]).to(device)  # noise is drawn on the model's device
    if arm == "no-dp-compiled":
        model.compile()  # in place: the same state-dict keys
    start = time.perf_counter()
    train_locally(model, data, config, privacy, torch.Generator().manual_seed(seed))
    return time.perf_counter() - start


def measure(model_name: str, images: int, repeats: int, batch_size: int, device: str) -> dict:
    config = resolve(overrides={"num-sites": 1, "model": model_name})
    data = load_site_data(config, 0)
    if images < data.num_train:
        data = dataclasses.replace(data, train_x=data.train_x[:images], train_y=data.train_y[:images],
                                   train_patients=data.train_patients[:images])
    first: dict[str, float] = {}
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    order = random.Random(0)
    for repeat in range(repeats + 1):
        for arm in order.sample(ARMS, len(ARMS)):  # a new order each repeat: no arm always follows another
            seconds = epoch_seconds(model_name, arm, data, batch_size, repeat, device)
            (times[arm].append(seconds) if repeat else first.__setitem__(arm, seconds))
    median = {arm: statistics.median(times[arm]) for arm in ARMS}
    paired = {arm: sorted(t / p for t, p in zip(times[arm], times["no-dp"], strict=True)) for arm in ARMS}
    return {
        "model": model_name, "images": data.num_train, "batch_size": batch_size, "repeats": repeats,
        "median_seconds": {arm: round(median[arm], 4) for arm in ARMS},
        "first_epoch_seconds": {arm: round(first[arm], 3) for arm in ARMS},
        "ratio_over_no_dp": {arm: round(median[arm] / median["no-dp"], 3) for arm in ARMS},
        "ratio_range_within_repeats": {arm: [round(paired[arm][0], 3), round(paired[arm][-1], 3)] for arm in ARMS},
        "fused_over_opacus": round(median["fused"] / median["opacus"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn"], choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resnet-images", type=int, default=256, help="ResNet-18's subset (a CPU epoch is slow)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    tidy_logging()
    torch.set_num_threads(args.threads)
    results = [measure(m, args.resnet_images if m == "resnet18" else 10**9, args.repeats, args.batch_size,
                       args.device) for m in args.models]
    report = {"benchmark": "one local epoch: DP-SGD (Opacus hooks, CareFed fused) vs non-private SGD",
              "threads": args.threads, "device": args.device, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for r in results:
        print(f"{r['model']}, {r['images']} images, batch {r['batch_size']}, {args.threads} thread(s), "
              f"median of {r['repeats']} (first epoch, with compilation, in brackets):")
        for arm in ARMS:
            low, high = r["ratio_range_within_repeats"][arm]
            print(f"  {arm:15s} {r['median_seconds'][arm]:8.3f} s  ({r['first_epoch_seconds'][arm]:.2f} s)  "
                  f"{r['ratio_over_no_dp'][arm]:.2f}x non-private (per repeat {low:.2f}-{high:.2f}x)")


if __name__ == "__main__":
    main()
