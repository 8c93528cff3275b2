"""Accounting: oracle values, calibration, the budget, and that the accountant persists across rounds."""

import pytest
import torch
from opacus.accountants import PRVAccountant

from client.site import model_for
from client.trainer import train_locally
from common.data import load_site_data
from common.privacy import SitePrivacy, calibrate_noise_multiplier, pld_epsilon, rdp_epsilon

REFERENCE = [(1.1, 256 / 60000, 14_062)]  # DP-SGD on MNIST (Abadi et al.), delta 1e-5


def prv_epsilon(history, delta):
    accountant = PRVAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("name", "expected"), [("pld", 2.382), ("prv", 2.392), ("rdp", 2.597)])
def test_reference_epsilons(name: str, expected: float):
    compute = {"pld": pld_epsilon, "prv": prv_epsilon, "rdp": rdp_epsilon}[name]
    assert compute(REFERENCE, 1e-5) == pytest.approx(expected, rel=0.005)


def test_calibration_reaches_the_target_without_exceeding_it():
    sigma = calibrate_noise_multiplier(target_epsilon=3.0, delta=1e-5, sample_rate=0.1, steps=60)
    epsilon = prv_epsilon([(sigma, 0.1, 60)], 1e-5)
    assert 2.95 <= epsilon <= 3.0
    assert calibrate_noise_multiplier(target_epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=60) > sigma


def test_calibration_uses_the_sampling_rate_opacus_uses():
    privacy = SitePrivacy.calibrate(target_epsilon=8, delta=1e-5, num_examples=330, batch_size=32, local_epochs=2,
                                    planned_rounds=3, max_grad_norm=1.0)
    assert privacy.sample_rate == 1 / 11  # Opacus: 1 / len(DataLoader) = 1 / ceil(330 / 32)
    assert privacy.steps_per_round == 22
    assert prv_epsilon([(privacy.noise_multiplier, 1 / 11, 66)], 1e-5) <= 8.0


def test_budget_allows_exactly_the_planned_rounds():
    privacy = SitePrivacy.calibrate(target_epsilon=2, delta=1e-5, num_examples=200, batch_size=20, local_epochs=1,
                                    planned_rounds=3, max_grad_norm=1.0)
    for _ in range(3):
        assert privacy.can_afford_next_round()
        privacy.history = [(privacy.noise_multiplier, privacy.sample_rate, privacy.steps_total + 10)]
    assert privacy.epsilon() <= 2.0
    assert not privacy.can_afford_next_round()
    assert privacy.epsilon_after_next_round() > 2.0


def test_history_may_only_grow():
    privacy = SitePrivacy(8, 1e-5, 1.0, 0.1, 10, 1.0, 3, history=[(1.0, 0.1, 20)])
    with pytest.raises(RuntimeError, match="shrank"):
        privacy.record_steps({"history": [(1.0, 0.1, 10)]})
    with pytest.raises(RuntimeError, match="shrank"):
        privacy.record_steps({"history": []})
    privacy.record_steps({"history": [(1.0, 0.1, 30)]})
    assert privacy.steps_total == 30


def test_record_round_trip_keeps_everything():
    privacy = SitePrivacy(8, 1e-5, 1.3, 0.05, 20, 1.5, 4, history=[(1.3, 0.05, 40), (1.4, 0.05, 20)])
    assert SitePrivacy.from_record(privacy.to_record()) == privacy


def test_accountant_persists_across_rounds_with_real_opacus(make_config):
    """After R rounds the reported epsilon is one accountant over all R rounds' steps, checked independently."""
    rounds = 3
    config = make_config(num_sites=8, num_server_rounds=rounds, target_epsilon=4.0)
    data = load_site_data(config, 1)
    privacy = SitePrivacy.calibrate(target_epsilon=4.0, delta=1e-5, num_examples=data.num_train,
                                    batch_size=config.batch_size, local_epochs=config.local_epochs,
                                    planned_rounds=rounds,
                                    max_grad_norm=1.0)
    reported = []
    for server_round in range(rounds):
        model = model_for(config.site_request(num_classes=10, channels=1, image_size=28).study)
        update = train_locally(model, data, config, privacy, torch.Generator().manual_seed(server_round))
        assert update.steps == privacy.steps_per_round
        privacy = SitePrivacy.from_record(privacy.to_record())  # what Context.state carries between rounds
        reported.append(privacy.epsilon())

    all_steps = rounds * privacy.steps_per_round
    assert privacy.history == [(privacy.noise_multiplier, privacy.sample_rate, all_steps)]
    composed = prv_epsilon([(privacy.noise_multiplier, privacy.sample_rate, all_steps)], 1e-5)
    one_round = prv_epsilon([(privacy.noise_multiplier, privacy.sample_rate, privacy.steps_per_round)], 1e-5)
    assert reported[-1] == pytest.approx(composed, rel=1e-9)
    assert privacy.independent_epsilon() == pytest.approx(reported[-1], rel=0.01)
    assert reported == sorted(reported) and reported[0] == pytest.approx(one_round, rel=1e-9)
    assert reported[-1] > one_round * 1.2  # not a one-round epsilon
    assert reported[-1] < rounds * one_round * 0.9  # not R times a one-round epsilon
    assert reported[-1] <= 4.0
