import math
from pathlib import Path

import pytest

from common.config import (
    PARTICIPATION_QUANTILE,
    RunConfig,
    default_values,
    load_scenario,
    participation_quantile,
    resolve,
)
from common.errors import ConfigError

SCENARIOS = Path(__file__).resolve().parents[2] / "simulations" / "scenarios"


def test_pyproject_defaults_are_a_valid_config():
    config = resolve()
    assert config.num_sites == 10 and config.dp and config.target_epsilon > 0
    assert RunConfig.from_mapping(config.to_mapping()) == config


def test_overrides_win_over_scenario_and_defaults(tmp_path: Path):
    scenario = tmp_path / "s.toml"
    scenario.write_text('[config]\nnum-sites = 4\nmodel = "resnet18"\n')
    config = resolve(scenario, {"num-sites": 6})
    assert config.num_sites == 6 and config.model == "resnet18"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("target-epsilon", 0.0, "'target-epsilon' = 0.0: must be a positive"),
    ("target-epsilon", -3.0, "'target-epsilon' = -3.0"),
    ("target-delta", 1.5, "'target-delta' = 1.5: must be in \\(0, 1\\)"),
    ("num-sites", 0, "'num-sites' = 0: must be at least 1"),
    ("partitioning", "random", "'partitioning' = 'random': must be one of"),
    ("model", "vgg", "'model' = 'vgg'"),
    ("sites-per-round", 50, "exceeds num-sites"),
    ("num-sites", "ten", "expected int, got str"),
    ("dp", 1, "expected bool, got int"),
    ("num-sitez", 3, "'num-sitez' = 3: unknown setting"),
])
def test_bad_values_name_the_key_and_value(key: str, value: object, message: str):
    with pytest.raises(ConfigError, match=message):
        resolve(overrides={key: value})


def test_no_dp_does_not_need_a_privacy_target():
    assert not resolve(overrides={"dp": False, "target-epsilon": 0.0}).dp


def test_missing_scenario_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="file not found"):
        load_scenario(tmp_path / "none.toml")


def test_scenario_without_config_table_is_refused(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text("num-sites = 3\n")
    with pytest.raises(ConfigError, match="no \\[config\\] table"):
        load_scenario(path)


def test_scenario_with_broken_toml_is_refused(tmp_path: Path):
    path = tmp_path / "broken.toml"
    path.write_text("[config\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_scenario(path)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_scenarios_are_valid(scenario: Path):
    values = default_values() | load_scenario(scenario)
    RunConfig.from_mapping(values)


def test_auto_gpu_share_splits_the_gpus_among_concurrent_sites_and_is_zero_without_one():
    from simulations.runner import gpu_share, resolve_resources

    assert gpu_share(0, 16, 1.0) == 0.0
    assert gpu_share(1, 16, 1.0) == 1 / 16  # 16 sites at once share one GPU
    assert gpu_share(2, 4, 2.0) == 1.0  # two sites at once, one GPU each
    config = resolve(overrides={"client-num-gpus": -1.0})
    import torch

    share = resolve_resources(config).client_num_gpus
    assert share > 0 if torch.cuda.is_available() else share == 0.0  # GPUs are used when present
    assert resolve_resources(config.replace(client_num_gpus=0.5)).client_num_gpus == 0.5
    with pytest.raises(ConfigError, match="'client-num-gpus' = -0.5: must be -1"):
        resolve(overrides={"client-num-gpus": -0.5})
    with pytest.raises(ConfigError, match="'client-num-cpus' = 0"):  # named by its own key, not the GPUs'
        resolve(overrides={"client-num-cpus": 0})
    with pytest.raises(ConfigError, match="'site-size-spread' = -1.0"):
        resolve(overrides={"site-size-spread": -1.0})


def test_simulate_takes_any_key_from_run_config_and_names_the_wrong_one(tmp_path):
    from tests.conftest import carefed

    bad = carefed("simulate", "--run-config", "num-sites=0 study-id='lung-2026'", "--output", str(tmp_path),
                  cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "'num-sites' = 0" in bad.stderr
    path = carefed("simulate", "--run-config", "run-name='../x'", "--output", str(tmp_path), cwd=tmp_path,
                   timeout=120)
    assert path.returncode == 2 and "'run-name' = '../x'" in path.stderr
    assert not any(tmp_path.iterdir())  # nothing was written


def test_noise_is_calibrated_for_the_rounds_a_sampled_site_expects_to_train(make_config):
    assert make_config(num_sites=10, num_server_rounds=15).planned_rounds == 15  # every site, every round
    assert make_config(num_sites=10, sites_per_round=10, num_server_rounds=15).planned_rounds == 15
    # 20 of 100 per round for 6 rounds: P(Binomial(6, 0.2) <= 2) = 0.901 >= 0.9 > P(<= 1) = 0.655
    assert make_config(num_sites=100, sites_per_round=20, num_server_rounds=6).planned_rounds == 2
    assert make_config(num_sites=1000, sites_per_round=20, num_server_rounds=10).planned_rounds == 1
    assert make_config(num_sites=100, sites_per_round=20, num_server_rounds=6,
                       privacy_planned_rounds=6).planned_rounds == 6  # an explicit plan wins
    for rounds, rate in [(6, 0.2), (10, 0.02), (40, 0.5), (3, 0.9)]:
        k = participation_quantile(rounds, rate)
        below = sum(math.comb(rounds, j) * rate**j * (1 - rate) ** (rounds - j) for j in range(k))
        assert below < PARTICIPATION_QUANTILE <= below + math.comb(rounds, k) * rate**k * (1 - rate) ** (rounds - k) \
            or k == 1


def test_local_epochs_zero_takes_the_recipe_for_the_studys_epsilon():
    assert resolve(overrides={"local-epochs": 0, "target-epsilon": 1.0}).local_epochs == 1
    assert resolve(overrides={"local-epochs": 0, "target-epsilon": 3.0}).local_epochs == 1
    assert resolve(overrides={"local-epochs": 0, "target-epsilon": 8.0}).local_epochs == 2
    assert resolve(overrides={"local-epochs": 0, "dp": False}).local_epochs == 2
    assert resolve(overrides={"local-epochs": 3, "target-epsilon": 1.0}).local_epochs == 3  # an explicit choice
    with pytest.raises(ConfigError, match="local-epochs"):
        resolve(overrides={"local-epochs": -1})
