"""Secure aggregation end to end through Flower's simulation engine."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import load_site_data
from common.models import build_model
from common.secagg.encoding import FixedPoint
from simulations.runner import run_simulation

pytestmark = pytest.mark.slow


def _final_weights(run_dir: Path) -> dict[str, np.ndarray]:
    state = torch.load(run_dir / "model_final.pt", weights_only=False)["state_dict"]
    return {k: v.numpy() for k, v in state.items()}


def test_secure_aggregation_gives_plain_fedavg_of_the_same_dp_updates(make_config):
    """Simulated DP noise is seeded per (seed, site, round), so both runs train identical updates."""
    common = {"num_sites": 3, "num_server_rounds": 1, "seed": 11}
    secure_dir = run_simulation(make_config(secagg=True, run_name="secure", **common))
    plain_dir = run_simulation(make_config(secagg=False, run_name="plain", **common))

    secure_rounds = json.loads((secure_dir / "metrics.json").read_text())["rounds"]
    plain_rounds = json.loads((plain_dir / "metrics.json").read_text())["rounds"]
    assert secure_rounds[1]["secure-aggregation"] and not plain_rounds[1]["secure-aggregation"]
    assert secure_rounds[1]["updates-aggregated"] == plain_rounds[1]["updates-aggregated"] == 3
    assert secure_rounds[1]["secagg-aborted"] == ""

    config = make_config(**common)
    codec = FixedPoint.for_cohort(config.secagg_max_weight * config.update_clip_norm, 3)
    total_examples = sum(load_site_data(config, site).num_train for site in range(3))
    secure, plain = _final_weights(secure_dir), _final_weights(plain_dir)
    assert secure.keys() == plain.keys()
    max_diff = max(float(np.abs(secure[k] - plain[k]).max()) for k in plain)
    # each of the 3 encodings is off by < 1/scale in units of n_k * delta; the mean divides by sum n_k;
    # float32 storage of the weights adds at most a few ulps
    bound = 3 * codec.resolution / total_examples + 1e-6
    assert max_diff <= bound, (max_diff, bound)
    # and the round did move the model far more than that (the comparison is not vacuous)
    torch.manual_seed(config.seed)
    initial = build_model(config.model, in_channels=1, num_classes=10, image_size=28).state_dict()
    moved = max(float(np.abs(plain[k] - initial[k].numpy()).max()) for k in plain)
    assert moved > 100 * bound
