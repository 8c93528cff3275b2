"""CSPRNG (AES-256-CTR) DP-SGD randomness against torch's generator, side by side, as ratios.

    python -m simulations.benchmarks.noise [--repeats 5] [--images 3000] [--batch-size 64] [--threads 1]
                                           [--model cnn] [--device cpu] [--json]

Two measurements, each alternating the arms so drift on a shared machine hits both:
  1. the randomness of one DP-SGD step: Gaussian noise for every parameter of the model (as Opacus's DPOptimizer
     draws it) plus the Poisson-sampling uniforms for every image;
  2. one local epoch of train_locally on synthetic 28x28 images, with and without secure_noise.
Absolute times are printed for context; the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from opacus.optimizers.optimizer import _generate_noise

from client.trainer import train_locally
from common.config import resolve
from common.data.shift import ScannerShift
from common.data.site import SiteData
from common.logs import tidy_logging
from common.models import build_model, count_parameters
from common.privacy import SitePrivacy
from common.privacy.secure_noise import SecureNoise

NOISE_REPEATS = 200  # draws per timing of the step's randomness alone (each a few milliseconds at most)


def main() -> None:
    args = _arguments()
    tidy_logging()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.model, in_channels=1, num_classes=10, image_size=28).to(device)
    step = _step_randomness(model, args.images, args.repeats)
    epoch = _epoch(args, device)
    result = {
        "benchmark": "DP-SGD randomness from AES-256-CTR (secure_noise) vs torch's generator",
        "model": args.model, "parameters": count_parameters(model), "images": args.images,
        "batch_size": args.batch_size, "threads": args.threads, "device": args.device, "repeats": args.repeats,
        **step, **epoch, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2) if args.json else _report(result))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="cnn", choices=["cnn", "resnet18"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser.parse_args()


def _step_randomness(model: torch.nn.Module, images: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of noise + sampling uniforms, each arm drawing exactly what its optimizer draws."""
    params = [p.detach() for p in model.parameters()]
    generator = torch.Generator(device=params[0].device).manual_seed(0)
    sampler = torch.Generator().manual_seed(1)
    source = SecureNoise()

    def seeded() -> None:
        torch.rand(images, generator=sampler, dtype=torch.float64)
        for p in params:
            _generate_noise(std=1.0, reference=p, generator=generator)

    def secure() -> None:
        source.uniform(images)
        source.normal_like(params, std=1.0)

    times = _alternate({"torch": seeded, "secure": secure}, repeats, calls=NOISE_REPEATS, device=params[0].device)
    return {"step_randomness_ms_torch": 1e3 * times["torch"], "step_randomness_ms_secure": 1e3 * times["secure"],
            "step_randomness_ratio": times["secure"] / times["torch"]}


def _epoch(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Median seconds of one local epoch of DP-SGD, seeded vs secure randomness, on the same synthetic site."""
    config = resolve(overrides={"batch-size": args.batch_size, "local-epochs": 1, "model": args.model})
    data = _synthetic_site(args.images)
    batches = math.ceil(args.images / args.batch_size)

    def arm(secure_noise: bool) -> Callable[[], None]:
        def run() -> None:
            privacy = SitePrivacy(8.0, 1e-5, 1.0, 1.0 / batches, batches, 1.0, 1)  # fixed noise: speed only
            model = build_model(args.model, in_channels=1, num_classes=10, image_size=28).to(device)
            train_locally(model, data, config, privacy, torch.Generator().manual_seed(0), secure_noise=secure_noise)
        return run

    times = _alternate({"torch": arm(False), "secure": arm(True)}, args.repeats, calls=1, device=device)
    return {"epoch_seconds_torch": times["torch"], "epoch_seconds_secure": times["secure"],
            "epoch_ratio": times["secure"] / times["torch"], "steps_per_epoch": batches}


def _alternate(arms: dict[str, Callable[[], None]], repeats: int, *, calls: int,
               device: torch.device) -> dict[str, float]:
    """Median seconds per call of each arm, arms interleaved; the first round is a warm-up and is not counted."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(repeats + 1):
        for name, run in arms.items():
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                run()
            _synchronize(device)
            if repeat:
                times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in times.items()}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _synthetic_site(images: int) -> SiteData:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, size=(images, 1, 28, 28)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, size=images))
    return SiteData(0, x, y, np.arange(images), x[:2], y[:2], ScannerShift(1, 0, 1, 0))


def _report(result: dict) -> str:
    return "\n".join([
        f"{result['model']} ({result['parameters']:,} parameters), {result['images']} images, batch "
        f"{result['batch_size']}, {result['threads']} thread(s), {result['device']}, median of {result['repeats']}:",
        f"  one step's randomness: torch {result['step_randomness_ms_torch']:.3f} ms | AES-CTR "
        f"{result['step_randomness_ms_secure']:.3f} ms | ratio secure / torch = {result['step_randomness_ratio']:.2f}x",
        f"  one local epoch ({result['steps_per_epoch']} steps): torch {result['epoch_seconds_torch']:.3f} s | "
        f"AES-CTR {result['epoch_seconds_secure']:.3f} s | ratio secure / torch = {result['epoch_ratio']:.3f}x",
    ])


if __name__ == "__main__":
    main()
