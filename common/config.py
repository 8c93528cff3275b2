"""The run configuration: one typed, validated view of `[tool.flwr.app.config]`.

Defaults live in pyproject.toml only. Scenario files (simulations/scenarios/*.toml) and CLI flags override
them; `RunConfig.from_mapping` checks every value once, at the edge, so the rest of the code can trust it.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.study import (
    MAX_AUGMENTATIONS,
    MODELS,
    PrivacySection,
    RequestError,
    SecAggSection,
    SiteRequest,
    StudySection,
    check_name,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = PROJECT_ROOT / "pyproject.toml"

PARTITIONINGS = ("auto", "iid", "dirichlet", "resample")
SITE_EVALUATIONS = ("auto", "all", "cohort")
DP_SGD_ENGINES = ("auto", "fused", "opacus")  # client.fused_dp: compiled per-sample gradients, or Opacus's hooks
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")  # server.aggregation.ServerOptimizer
PRIVACY_UNITS = ("image", "patient")


PARTICIPATION_QUANTILE = 0.9


def participation_quantile(rounds: int, rate: float, quantile: float = PARTICIPATION_QUANTILE) -> int:
    """The smallest k >= 1 with P(Binomial(rounds, rate) <= k) >= quantile."""
    cumulative = 0.0
    for k in range(rounds + 1):
        cumulative += math.comb(rounds, k) * rate**k * (1 - rate) ** (rounds - k)
        if cumulative >= quantile:
            return max(k, 1)
    return rounds


def recipe_local_epochs(dp: bool, target_epsilon: float) -> int:
    """`local-epochs = 0`: the local epochs chosen on the validation half (README "Privacy-utility", three seeds).
    Below epsilon 8 one epoch: half the steps buy a smaller noise multiplier, worth more than the steps (the
    noise/batch trade-off). At epsilon 8 and without DP, two: the noise grows slowly enough that the steps win.
    Between 3 and 8 it was not measured; one epoch is the choice that held at both 1 and 3. Epochs are study-wide
    (every site is sent the same), so this reads the study's target epsilon, not a site's own budget."""
    return 2 if not dp or target_epsilon >= 8 else 1


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a run. Field `foo_bar` is the run-config key `foo-bar`."""

    num_server_rounds: int
    num_sites: int
    sites_per_round: int  # 0: every site that can still train
    local_epochs: int  # 0 in a mapping: the recipe's choice for the study's epsilon (recipe_local_epochs)
    batch_size: int  # expected Poisson batch size; sampling rate q = 1 / ceil(n / batch_size)
    augmentations: int  # augmentation multiplicity K: each image's gradient averaged over K shifted copies; 1: off
    learning_rate: float
    no_dp_learning_rate: float  # the non-private baseline's step: unclipped gradients are far larger
    momentum: float
    dp: bool
    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    privacy_planned_rounds: int  # rounds the noise is calibrated for; 0: num-server-rounds
    privacy_unit: str
    data: str  # "embedded" or a path to a MedMNIST-layout .npz
    num_classes: int  # 0: infer from the data
    global_test_size: int
    partitioning: str
    dirichlet_alpha: float
    min_site_images: int
    site_size_median: int  # resample: median images per site (log-normal sizes: many small clinics, few large)
    site_size_spread: float  # resample: sigma of log(site size); 0: every site the median size
    site_epsilons: str  # "" : every site's budget is target-epsilon; "3,8": site k gets the k mod 2-th value
    site_evaluation: str  # "all" sites every round, the round's "cohort" only, or "auto" (all up to 50 sites)
    dropout_advertise: float  # simulated dropout probabilities per secure-aggregation stage
    dropout_share_keys: float
    dropout_masked_input: float  # the site leaves before training (plain mode: before replying)
    dropout_unmask: float
    straggler_probability: float  # the site trains (and spends budget) but its reply never arrives
    site_shift: float  # strength of the per-site scanner shift; 0 disables it
    local_test_fraction: float
    update_clip_norm: float  # L2 bound on a site's model delta (post-processing; makes secure aggregation exact)
    server_optimizer: str  # the server's step on the mean update: fedavg, fedavgm or fedadam (post-processing)
    server_learning_rate: float
    server_momentum: float  # FedAvgM's momentum; FedAdam's beta1
    server_averaging: float  # decay of an exponential moving average of the global model over rounds; 0: off
    secagg: bool  # secure aggregation (the server learns only the sum); off only for comparison
    secagg_dropout_rate: float  # tolerated fraction of a neighbourhood dropping after advertising keys
    secagg_colluding: int  # clients assumed to collude with the server (raises the threshold)
    secagg_min_cohort: int  # never aggregate fewer sites than this
    secagg_graph_degree: int  # 0: chosen per round from the cohort size; k (even): a fixed k-regular SecAgg+ graph
    secagg_max_weight: int  # cap on a site's example count (the weight); sets the fixed-point scale
    secagg_identities: bool  # simulation: enrol the virtual sites with a per-run study CA (signed advertisements)
    identity_ca: str  # the coordinator's copy of the study CA certificate: drop unverifiable advertisements early
    round_timeout: float  # seconds to wait for replies to one message round
    canaries: int  # one-run privacy audit: mislabelled canaries, each in training with probability 1/2; 0: none
    model: str
    study_id: str  # the study this run belongs to; a site's policy lists the studies it joins
    site_policy: str  # simulation: policy file for the virtual sites ("" : the default policy, joining study-id)
    seed: int
    output_dir: str
    run_name: str  # "" : generated from the time and seed
    client_threads: int
    dp_sgd_engine: str  # how a site computes DP-SGD's clipped sum (same result, different speed): its own choice
    client_num_cpus: float
    client_num_gpus: float

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case run-config keys, rejecting unknown keys and bad values."""
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(values) - set(by_key))
        if unknown:
            raise ConfigError(
                unknown[0], values[unknown[0]], "unknown setting",
                f"Known settings: {', '.join(sorted(by_key))}.",
            )
        missing = sorted(set(by_key) - set(values))
        if missing:
            raise ConfigError(missing[0], None, "missing", "Set it in pyproject.toml [tool.flwr.app.config].")
        kwargs = {f.name: _coerce(key, values[key], f.type) for key, f in by_key.items()}
        if kwargs["local_epochs"] == 0:
            kwargs["local_epochs"] = recipe_local_epochs(kwargs["dp"], kwargs["target_epsilon"])
        config = cls(**kwargs)
        config.validate()
        return config

    def to_mapping(self) -> dict[str, Any]:
        """The kebab-case mapping Flower carries in run configs and ConfigRecords."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def site_request(self, *, num_classes: int, channels: int, image_size: int) -> SiteRequest:
        """The sections a site receives: the study, its privacy and its secure aggregation; nothing else."""
        study = StudySection(
            study_id=self.study_id, run_name=self.run_name, model=self.model, num_classes=num_classes,
            channels=channels, image_size=image_size, num_server_rounds=self.num_server_rounds,
            local_epochs=self.local_epochs, batch_size=self.batch_size, augmentations=self.augmentations,
            learning_rate=self.learning_rate,
            no_dp_learning_rate=self.no_dp_learning_rate, momentum=self.momentum,
            update_clip_norm=self.update_clip_norm, local_test_fraction=self.local_test_fraction)
        privacy = PrivacySection(dp=self.dp, privacy_unit=self.privacy_unit, target_epsilon=self.target_epsilon,
                                 target_delta=self.target_delta, max_grad_norm=self.max_grad_norm,
                                 planned_rounds=self.planned_rounds)
        secagg = SecAggSection(secagg=self.secagg, dropout_rate=self.secagg_dropout_rate,
                               colluding=self.secagg_colluding, min_cohort=self.secagg_min_cohort,
                               graph_degree=self.secagg_graph_degree, max_weight=self.secagg_max_weight)
        return SiteRequest(study, privacy, secagg)

    def with_request(self, request: SiteRequest) -> RunConfig:
        """This config with every value a site request carries (what a site trains with)."""
        study, privacy, secagg = request.study, request.privacy, request.secagg
        return self.replace(
            study_id=study.study_id, run_name=study.run_name, model=study.model, num_classes=study.num_classes,
            num_server_rounds=study.num_server_rounds, local_epochs=study.local_epochs, batch_size=study.batch_size,
            augmentations=study.augmentations,
            learning_rate=study.learning_rate, no_dp_learning_rate=study.no_dp_learning_rate,
            momentum=study.momentum, update_clip_norm=study.update_clip_norm,
            local_test_fraction=study.local_test_fraction, dp=privacy.dp, privacy_unit=privacy.privacy_unit,
            target_epsilon=privacy.target_epsilon, target_delta=privacy.target_delta,
            max_grad_norm=privacy.max_grad_norm, privacy_planned_rounds=privacy.planned_rounds,
            secagg=secagg.secagg, secagg_dropout_rate=secagg.dropout_rate, secagg_colluding=secagg.colluding,
            secagg_min_cohort=secagg.min_cohort, secagg_graph_degree=secagg.graph_degree,
            secagg_max_weight=secagg.max_weight)

    @property
    def site_budgets(self) -> list[float]:
        return [float(v) for v in self.site_epsilons.split(",")] if self.site_epsilons.strip() else []

    def budget_for(self, site: int) -> float:
        """Site `site`'s epsilon budget for the whole run."""
        budgets = self.site_budgets
        return budgets[site % len(budgets)] if budgets else self.target_epsilon

    @property
    def evaluates_all_sites(self) -> bool:
        return self.site_evaluation == "all" or (self.site_evaluation == "auto" and self.num_sites <= 50)

    @property
    def step_size(self) -> float:
        """The local SGD learning rate of this run: DP-SGD's, or the non-private baseline's."""
        return self.learning_rate if self.dp else self.no_dp_learning_rate

    @property
    def planned_rounds(self) -> int:
        """The rounds each site's noise is calibrated for: `privacy-planned-rounds`, or (0) the rounds a site
        expects to train in. When every site trains every round that is all of them; when the server samples
        `sites-per-round` of `num-sites` it is the 90% quantile of Binomial(rounds, sites-per-round / num-sites):
        calibrating for every round would leave a site that trains in a few far below its budget (more noise for
        nothing). A site sampled more often than that refuses once its budget is spent (the budget check before
        training), and the server stops sampling it, so the guarantee never depends on this estimate."""
        if self.privacy_planned_rounds:
            return self.privacy_planned_rounds
        if self.sites_per_round in (0, self.num_sites):
            return self.num_server_rounds
        return participation_quantile(self.num_server_rounds, self.sites_per_round / self.num_sites)

    def validate(self) -> None:
        """Check ranges; raise ConfigError naming the key, the value and the fix."""
        if self.local_epochs < 1:
            _fail("local_epochs", self.local_epochs, "must be at least 1 (0: the recipe for the study's epsilon)")
        positive_ints = ("num_server_rounds", "num_sites", "batch_size", "client_threads",
                         "global_test_size", "min_site_images")
        for name in positive_ints:
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be at least 1")
        if not 1 <= self.augmentations <= MAX_AUGMENTATIONS:
            _fail("augmentations", self.augmentations, f"must be 1 (off) to {MAX_AUGMENTATIONS}")
        for name in ("sites_per_round", "privacy_planned_rounds", "num_classes"):
            if getattr(self, name) < 0:
                _fail(name, getattr(self, name), "must be 0 or more")
        if self.sites_per_round > self.num_sites:
            _fail("sites_per_round", self.sites_per_round, f"exceeds num-sites ({self.num_sites})")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            _fail("learning_rate", self.learning_rate, "must be a positive number")
        if not (self.no_dp_learning_rate > 0 and math.isfinite(self.no_dp_learning_rate)):
            _fail("no_dp_learning_rate", self.no_dp_learning_rate, "must be a positive number")
        if not 0 <= self.momentum < 1:
            _fail("momentum", self.momentum, "must be in [0, 1)")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            _fail("max_grad_norm", self.max_grad_norm, "must be a positive clipping bound")
        if self.dp:
            if not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
                _fail("target_epsilon", self.target_epsilon,
                      "must be a positive, finite privacy budget (e.g. 1, 3 or 8); use --no-dp for a "
                      "non-private baseline")
            if not 0 < self.target_delta < 1:
                _fail("target_delta", self.target_delta,
                      "must be in (0, 1), and well below 1/(images per site), e.g. 1e-5")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            _fail("server_optimizer", self.server_optimizer, f"must be one of {SERVER_OPTIMIZERS}")
        if not (self.server_learning_rate > 0 and math.isfinite(self.server_learning_rate)):
            _fail("server_learning_rate", self.server_learning_rate, "must be a positive number")
        if not 0 <= self.server_momentum < 1:
            _fail("server_momentum", self.server_momentum, "must be in [0, 1)")
        if not 0 <= self.server_averaging < 1:
            _fail("server_averaging", self.server_averaging, "must be in [0, 1) (0: no averaging)")
        if self.dp_sgd_engine not in DP_SGD_ENGINES:
            _fail("dp_sgd_engine", self.dp_sgd_engine, f"must be one of {DP_SGD_ENGINES}")
        if self.privacy_unit not in PRIVACY_UNITS:
            _fail("privacy_unit", self.privacy_unit, f"must be one of {PRIVACY_UNITS}")
        if self.partitioning not in PARTITIONINGS:
            _fail("partitioning", self.partitioning, f"must be one of {PARTITIONINGS}")
        if self.site_size_median < self.min_site_images:
            _fail("site_size_median", self.site_size_median,
                  f"must be at least min-site-images ({self.min_site_images})")
        if not self.site_size_spread >= 0:
            _fail("site_size_spread", self.site_size_spread, "must be 0 or more")
        if self.site_evaluation not in SITE_EVALUATIONS:
            _fail("site_evaluation", self.site_evaluation, f"must be one of {SITE_EVALUATIONS}")
        for name in ("dropout_advertise", "dropout_share_keys", "dropout_masked_input", "dropout_unmask",
                     "straggler_probability"):
            if not 0 <= getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be a probability in [0, 1)")
        try:
            budgets = self.site_budgets
        except ValueError:
            _fail("site_epsilons", self.site_epsilons, "must be empty or comma-separated numbers, e.g. \"3,8\"")
        if any(not (b > 0 and math.isfinite(b)) for b in budgets):
            _fail("site_epsilons", self.site_epsilons, "every budget must be a positive, finite epsilon")
        if self.partitioning in ("dirichlet", "resample") and not self.dirichlet_alpha > 0:
            _fail("dirichlet_alpha", self.dirichlet_alpha, "must be positive (smaller = more label skew)")
        if not self.site_shift >= 0:
            _fail("site_shift", self.site_shift, "must be 0 (off) or positive")
        if not 0 < self.local_test_fraction < 1:
            _fail("local_test_fraction", self.local_test_fraction, "must be in (0, 1)")
        if self.model not in MODELS:
            _fail("model", self.model, f"must be one of {MODELS}")
        if not (self.update_clip_norm > 0 and math.isfinite(self.update_clip_norm)):
            _fail("update_clip_norm", self.update_clip_norm, "must be a positive L2 bound")
        if not 0 <= self.secagg_dropout_rate < 1:
            _fail("secagg_dropout_rate", self.secagg_dropout_rate, "must be in [0, 1)")
        if self.secagg_colluding < 0:
            _fail("secagg_colluding", self.secagg_colluding, "must be 0 or more")
        if self.secagg_min_cohort < 2:
            _fail("secagg_min_cohort", self.secagg_min_cohort, "must be at least 2 (a sum of one is the update)")
        if self.secagg_graph_degree < 0 or self.secagg_graph_degree % 2:
            _fail("secagg_graph_degree", self.secagg_graph_degree,
                  "must be 0 (chosen from the cohort size) or a positive even k")
        if self.canaries < 0:
            _fail("canaries", self.canaries, "must be 0 (none) or a positive number of canaries")
        if self.secagg_max_weight < 1:
            _fail("secagg_max_weight", self.secagg_max_weight, "must be at least 1")
        if not self.round_timeout > 0:
            _fail("round_timeout", self.round_timeout, "must be a positive number of seconds")
        if not self.data:
            _fail("data", self.data, "is empty")
        if not self.client_num_cpus > 0:
            _fail("client_num_cpus", self.client_num_cpus, "must be a positive number of CPUs per virtual site")
        if not (self.client_num_gpus >= 0 or self.client_num_gpus == -1):
            _fail("client_num_gpus", self.client_num_gpus, "must be -1 (auto) or a non-negative GPU share")
        for name in ("study_id", "run_name"):
            if getattr(self, name) or name == "study_id":
                try:
                    check_name(name.replace("_", "-"), getattr(self, name))
                except RequestError:
                    _fail(name, getattr(self, name), "must be letters, digits, '.', '_' or '-' (no path)")


def _fail(name: str, value: object, problem: str) -> None:
    raise ConfigError(name.replace("_", "-"), value, problem,
                      "Fix the value in your scenario file, pyproject.toml or the matching CLI flag.")


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    """TOML and Flower hand us ints for floats and the like; accept the harmless cases only."""
    kind = {"int": int, "float": float, "bool": bool, "str": str}[str(type_name)]
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(key, value, f"expected {kind.__name__}, got {type(value).__name__}",
                      "Fix the value in your scenario file, pyproject.toml or the matching CLI flag.")


def default_values() -> dict[str, Any]:
    """The defaults from pyproject.toml's [tool.flwr.app.config] (the one source of truth)."""
    try:
        with PYPROJECT.open("rb") as f:
            return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as err:
        raise ConfigError("pyproject.toml", str(PYPROJECT), f"cannot read [tool.flwr.app.config] ({err})",
                          "Run CareFed from its project checkout (pip install -e .).") from err


def load_scenario(path: Path) -> dict[str, Any]:
    """Read a scenario TOML: run-config keys under [config]."""
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError as err:
        raise ConfigError("scenario", str(path), "file not found",
                          "Pass a TOML file, e.g. simulations/scenarios/default.toml.") from err
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError("scenario", str(path), f"not valid TOML ({err})", "Fix the file's syntax.") from err
    config = doc.get("config")
    if not isinstance(config, dict):
        raise ConfigError("scenario", str(path), "has no [config] table",
                          "Put run-config keys (as in pyproject.toml) under [config].")
    policy = config.get("site-policy")
    if isinstance(policy, str) and policy and not Path(policy).expanduser().is_absolute():
        config["site-policy"] = str((path.parent / policy).resolve())  # relative to the scenario file
    return config


def resolve(scenario: Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """pyproject defaults, then the scenario file, then explicit overrides (CLI flags)."""
    values = default_values()
    if scenario is not None:
        values.update(load_scenario(scenario))
    values.update(overrides or {})
    return RunConfig.from_mapping(values)
