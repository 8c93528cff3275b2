"""Empirical privacy audits of a simulated run: membership inference on the final model, one-run canaries.

These measure what an attacker can actually do, as evidence next to the theoretical epsilon; they are lower
bounds on leakage, never a replacement for the accountant. They need the sites' data, so they run where the
study was simulated (the auditor plays every site).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.trainer import train_locally
from common.config import RunConfig, default_values
from common.data.shift import ScannerShift
from common.data.site import (
    SiteData,
    canaries_for,
    canary_pixels,
    global_model,
    load_site_data,
    load_source_for,
    to_tensor,
)
from common.privacy import SitePrivacy
from common.privacy.membership import (
    cross_entropy,
    lira_offline_scores,
    logit_confidence,
    one_run_epsilon_lower_bound,
    roc,
)
from server.run_folder import write_json

SHADOWS = 8
CANARY_GUESS_FRACTION = 0.1  # guess IN for the top 10% of canary scores and OUT for the bottom 10%; abstain otherwise


def load_run(run_dir: Path) -> tuple[RunConfig, nn.Module]:
    config = run_config(run_dir)
    checkpoint = run_dir / "model_final.pt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{run_dir} has no model_final.pt: the run did not complete")
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    return config, model_from_state(config, state)


def run_config(run_dir: Path) -> RunConfig:
    """The run's config; settings added to CareFed after the run take their defaults."""
    saved = json.loads((run_dir / "config.json").read_text())
    return RunConfig.from_mapping(default_values() | saved)


def model_from_state(config: RunConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    model = global_model(config)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def logits_of(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.cat([model(images[i : i + 512]) for i in range(0, len(images), 512)]).double().numpy()


def train_like_the_run(config: RunConfig, data: SiteData, seed: int) -> nn.Module:
    """A model trained on `data` the way a site trained in the run: same model, optimiser, rounds, epochs, DP."""
    torch.manual_seed(seed)
    model = global_model(config)
    privacy = None
    if config.dp:
        privacy = SitePrivacy.calibrate(target_epsilon=config.target_epsilon, delta=config.target_delta,
                                        num_examples=data.num_train, batch_size=config.batch_size,
                                        local_epochs=config.local_epochs, planned_rounds=config.planned_rounds,
                                        max_grad_norm=config.max_grad_norm)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(config.num_server_rounds):
        train_locally(model, data, config, privacy, generator)
    return model.eval()


def membership_inference(run_dir: Path, shadows: int = SHADOWS) -> dict[str, Any]:
    """Loss-threshold and offline-LiRA attacks on every site: members are its training images, non-members its
    held-out test split. Shadow models train on halves of the population pool (the global test set, which no
    site trained on), so every target example is OUT for every shadow, as offline LiRA requires."""
    config, model = load_run(run_dir)
    sites = [load_site_data(config, site) for site in range(config.num_sites)]
    pool = load_source_for(config).test
    rng = np.random.default_rng([config.seed, 0x11A])
    shadow_models = []
    for k in range(shadows):
        half = rng.permutation(len(pool))[: len(pool) // 2]
        x = to_tensor(pool.images[half])
        shadow_data = SiteData(-1, x, torch.from_numpy(pool.labels[half]), np.arange(len(half)), x[:1],
                               torch.from_numpy(pool.labels[half][:1]), ScannerShift(1.0, 0.0, 1.0, 0.0))
        shadow_models.append(train_like_the_run(config, shadow_data, seed=1000 + k))

    per_site, pooled = {}, {"loss": ([], []), "lira": ([], [])}
    for data in sites:
        scores = {}
        for group, (x, y) in (("members", (data.train_x, data.train_y)), ("non_members", (data.test_x, data.test_y))):
            logits = logits_of(model, x)
            labels = y.numpy()
            target_conf = logit_confidence(logits, labels)
            shadow_conf = np.stack([logit_confidence(logits_of(s, x), labels) for s in shadow_models])
            scores[group] = {"loss": -cross_entropy(logits, labels),
                             "lira": lira_offline_scores(target_conf, shadow_conf)}
        per_site[data.site] = {}
        for attack in ("loss", "lira"):
            members, others = scores["members"][attack], scores["non_members"][attack]
            summary = roc(members, others)
            per_site[data.site][attack] = _roc_json(summary, curve=False)
            pooled[attack][0].append(members)
            pooled[attack][1].append(others)
    result = {
        "run": str(run_dir), "shadow_models": shadows, "dp": config.dp,
        "target_epsilon": config.target_epsilon if config.dp else None,
        "pooled": {attack: _roc_json(roc(np.concatenate(m), np.concatenate(o)), curve=True)
                   for attack, (m, o) in pooled.items()},
        "per_site": per_site,
    }
    write_json(run_dir / "audit" / "mia.json", result)
    return result


def _roc_json(summary: Any, curve: bool) -> dict[str, Any]:
    data = asdict(summary)
    if not curve:
        data.pop("fpr")
        data.pop("tpr")
    else:  # keep the plotted curve small
        step = max(1, len(summary.fpr) // 400)
        data["fpr"], data["tpr"] = summary.fpr[::step] + [1.0], summary.tpr[::step] + [1.0]
    data["fpr_resolution"] = summary.fpr_resolution
    return data


def canary_audit(run_dir: Path, canaries: int, control: bool = True) -> dict[str, Any]:
    """Steinke, Nasr & Jagielski (2023): retrain the study once with `canaries` mislabelled images, each in its
    site's training data with probability 1/2, then guess membership from the final model; the number of correct
    guesses gives an epsilon lower bound at 95% confidence. A no-DP control run shows what leakage looks like."""
    from simulations.runner import run_simulation

    base, audited_model = load_run(run_dir)
    arms = [("as-run", base)] + ([("no-dp-control", base.replace(dp=False))] if control and base.dp else [])
    results = {}
    for name, config in arms:
        audit_dir = str(run_dir / "audit")
        if name == "as-run":
            reference = audited_model  # the audited run: the same training without canaries
        else:  # the control's reference: the same no-DP training without canaries
            _, reference = load_run(run_simulation(config.replace(output_dir=audit_dir, run_name=f"reference-{name}")))
        audit_config = config.replace(canaries=canaries, output_dir=audit_dir, run_name=f"canaries-{name}")
        audit_run = run_simulation(audit_config)
        _, model = load_run(audit_run)
        results[name] = score_canaries(audit_config, model, reference)
        results[name]["run"] = str(audit_run)
    result = {"canaries": canaries, "guess_fraction": CANARY_GUESS_FRACTION, "confidence": 0.95, "arms": results}
    write_json(run_dir / "audit" / "canaries.json", result)
    return result


def score_canaries(config: RunConfig, model: nn.Module, reference: nn.Module) -> dict[str, Any]:
    """Score = the relative drop of a canary's loss, log(loss under `reference`) - log(loss under the canary
    run's model), where `reference` is the same training without canaries. The reference does not depend on the
    coins, so the one-run analysis still holds; the ratio takes each canary's own difficulty out of its score
    (a plain difference is dominated by the large losses of confidently wrong canaries)."""
    planted = canaries_for(config)
    m = len(planted.included)
    scores = np.empty(m)
    for site in range(config.num_sites):
        mine = np.flatnonzero(planted.site == site)
        shift = ScannerShift.for_site(site, config.seed, config.site_shift)
        pixels = to_tensor(canary_pixels(planted, mine, shift))
        labels = planted.images.labels[mine]
        before = np.maximum(cross_entropy(logits_of(reference, pixels), labels), 1e-12)
        after = np.maximum(cross_entropy(logits_of(model, pixels), labels), 1e-12)
        scores[mine] = np.log(before) - np.log(after)
    k = max(1, int(math.floor(CANARY_GUESS_FRACTION * m)))
    order = np.argsort(-scores, kind="stable")
    guessed_in, guessed_out = order[:k], order[-k:]
    correct = int(planted.included[guessed_in].sum() + (~planted.included[guessed_out]).sum())
    bound = one_run_epsilon_lower_bound(m, 2 * k, correct, config.target_delta)
    return {
        "dp": config.dp, "theoretical_epsilon": config.target_epsilon if config.dp else math.inf,
        "delta": config.target_delta, "included": int(planted.included.sum()), "guesses": 2 * k,
        "correct": correct, "epsilon_lower_bound": bound,
        "ceiling": one_run_epsilon_lower_bound(m, 2 * k, 2 * k, config.target_delta),  # every guess right
        "consistent": (not config.dp) or bound <= config.target_epsilon,
    }


def whitebox_audit(run_dir: Path, canaries: int, epsilon: float | None = None) -> dict[str, Any]:
    """Every site of the run plays the white-box canary game (client.canaries) with the run's model, data, batch
    size, epochs and planned rounds, its noise calibrated for `epsilon` (None: each site's own budget): its own
    DP-SGD audited as it runs, each site at 1 - 0.05 / sites so the run's verdict is at 95%. Refused (CareFedError)
    where this many canaries could not fail it."""
    from client.canaries import play

    config = run_config(run_dir)
    if epsilon is not None:
        config = config.replace(target_epsilon=epsilon, site_epsilons="")
    sites = {}
    confidence = 1 - 0.05 / config.num_sites  # the run's verdict is at 95%: any site's false alarm fails it
    for site in range(config.num_sites):
        result = play(config, load_site_data(config, site), canaries=canaries, seed=config.seed + site,
                      confidence=confidence)
        sites[str(site)] = result.to_json()
    result = {"canaries": canaries, "audit_epsilon": epsilon or config.target_epsilon, "sites": sites,
              "can_fail": all(s["ceiling"] > s["claimed_epsilon"] for s in sites.values())}
    write_json(run_dir / "audit" / "whitebox.json", result)
    return result
