"""The site's privacy policy: the hospital's ceiling on everything a coordinator may ask of it.

A privacy officer writes it (`carefed site policy init`, a commented TOML file at the site) and names it in the
SuperNode's node config (`policy=...`). Every request is checked against it before any key, data, calibration or
gradient is touched; what exceeds it is refused by name (`PolicyRefusal`: which setting, what was asked, what the
policy allows). Nothing the coordinator sends can raise a limit here: the file is read at the site, never from a
message. A value inside the policy (a smaller epsilon, a larger cohort) is used as proposed.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from common.errors import CareFedError
from common.study import MAX_AUGMENTATIONS, MODELS, PrivacySection, SecAggSection, StudySection

PRIVACY_UNITS = ("image", "patient")  # weakest first: a patient-level policy refuses image-level training
# Hard ceilings on what a policy itself may allow: they keep noise calibration bounded in time and memory
# (the PRV accountant's cost grows with epsilon) and rule out values no privacy officer should sign.
MAX_STUDY_EPSILON = 20.0
MAX_LIFETIME_EPSILON = 50.0
MAX_DELTA = 1e-3


class PolicyError(CareFedError):
    """The policy file itself is missing, unreadable or invalid."""


class PolicyRefusal(CareFedError):
    """A request exceeds the site's policy; nothing was computed. Names the setting, the ask and the limit."""

    exit_code = 1

    def __init__(self, setting: str, asked: object, allowed: str) -> None:
        self.setting, self.asked, self.allowed = setting, asked, allowed
        super().__init__(f"policy refuses {setting}: asked {asked!r}, the site's policy allows {allowed}")


@dataclass(frozen=True)
class SitePolicy:
    """Field `foo_bar` is the policy key `foo-bar`. Defaults are what `carefed site policy init` writes."""

    studies: tuple[str, ...] = ()
    dp_required: bool = True
    min_privacy_unit: str = "image"
    max_epsilon_per_study: float = 8.0
    lifetime_epsilon: float = 20.0
    max_delta: float = 1e-5
    secagg_required: bool = True
    require_signatures: bool = True
    min_cohort: int = 3
    min_neighbours: int = 2
    max_dropout_rate: float = 0.4
    max_cohort: int = 1000
    models: tuple[str, ...] = MODELS
    max_augmentations: int = 4
    send_evaluation_metrics: bool = True

    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str = "policy") -> SitePolicy:
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(values) - set(by_key))
        if unknown:
            raise PolicyError(f"{where}: unknown setting '{unknown[0]}'; known: {', '.join(sorted(by_key))}")
        kwargs = {by_key[k].name: _coerce(where, k, v, getattr(cls, by_key[k].name)) for k, v in values.items()}
        policy = cls(**kwargs)
        policy.validate(where)
        return policy

    def validate(self, where: str = "policy") -> None:
        def bad(key: str, problem: str) -> None:
            raise PolicyError(f"{where}: '{key}' = {getattr(self, key.replace('-', '_'))!r} {problem}")

        if not self.studies or any(not isinstance(s, str) or not s for s in self.studies):
            bad("studies", "must list the study ids this site joins, e.g. [\"chest-xray-2026\"]")
        if self.min_privacy_unit not in PRIVACY_UNITS:
            bad("min-privacy-unit", f"must be one of {PRIVACY_UNITS}")
        if not 0 < self.max_epsilon_per_study <= MAX_STUDY_EPSILON:
            bad("max-epsilon-per-study", f"must be in (0, {MAX_STUDY_EPSILON:g}]")
        if not self.max_epsilon_per_study <= self.lifetime_epsilon <= MAX_LIFETIME_EPSILON:
            bad("lifetime-epsilon", f"must be at least max-epsilon-per-study and at most {MAX_LIFETIME_EPSILON:g}")
        if not 0 < self.max_delta <= MAX_DELTA:
            bad("max-delta", f"must be in (0, {MAX_DELTA:g}]")
        if self.min_cohort < 2:
            bad("min-cohort", "must be at least 2 (a sum of one site is its update)")
        if not 1 <= self.min_neighbours < self.max_cohort or self.min_cohort > self.max_cohort:
            bad("min-neighbours", "must be at least 1, and min-cohort and min-neighbours below max-cohort")
        if not 0 <= self.max_dropout_rate < 0.5:
            bad("max-dropout-rate", "must be in [0, 0.5): above, an active server can split the cohort")
        if not self.models:
            bad("models", "must list the model architectures this site trains")
        if not 1 <= self.max_augmentations <= MAX_AUGMENTATIONS:
            bad("max-augmentations", f"must be 1 (none) to {MAX_AUGMENTATIONS}")

    def to_mapping(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self)}

    # -- checks, each before anything is computed ----------------------------------------------------------
    def check_study(self, study: StudySection, privacy: PrivacySection, secagg: SecAggSection) -> None:
        """A training or evaluation request's sections against the policy; raises PolicyRefusal."""
        if study.study_id not in self.studies:
            raise PolicyRefusal("study-id", study.study_id, f"only the studies {list(self.studies)}")
        if study.model not in self.models:
            raise PolicyRefusal("model", study.model, f"only {list(self.models)}")
        if study.augmentations > self.max_augmentations:  # compute: K gradients per sampled image, every step
            raise PolicyRefusal("augmentations", study.augmentations, f"at most {self.max_augmentations}")
        self.check_privacy(privacy)
        self.check_secagg(secagg)

    def check_privacy(self, privacy: PrivacySection) -> None:
        if not privacy.dp:
            if self.dp_required:
                raise PolicyRefusal("dp", False, "only DP-SGD training (dp-required = true)")
            return
        if PRIVACY_UNITS.index(privacy.privacy_unit) < PRIVACY_UNITS.index(self.min_privacy_unit):
            raise PolicyRefusal("privacy-unit", privacy.privacy_unit, f"at least '{self.min_privacy_unit}'")
        if not privacy.target_epsilon <= self.max_epsilon_per_study:
            raise PolicyRefusal("target-epsilon", privacy.target_epsilon,
                                f"at most {self.max_epsilon_per_study:g} per study")
        if not privacy.target_delta <= self.max_delta:
            raise PolicyRefusal("target-delta", privacy.target_delta, f"at most {self.max_delta:g}")

    def check_secagg(self, secagg: SecAggSection) -> None:
        if not secagg.secagg:
            if self.secagg_required:
                raise PolicyRefusal("secagg", False, "only secure aggregation (secagg-required = true)")
            return
        if secagg.dropout_rate > self.max_dropout_rate:
            raise PolicyRefusal("secagg-dropout-rate", secagg.dropout_rate, f"at most {self.max_dropout_rate:g}")
        if secagg.min_cohort < self.min_cohort:
            raise PolicyRefusal("secagg-min-cohort", secagg.min_cohort, f"at least {self.min_cohort}")
        if 0 < secagg.graph_degree < self.min_neighbours:
            raise PolicyRefusal("secagg-graph-degree", secagg.graph_degree,
                                f"0 (complete graph) or at least {self.min_neighbours} neighbours")

    def check_cohort(self, cohort: int, graph_degree: int) -> None:
        """At key sharing, when the cohort is known: its size and each site's number of neighbours."""
        if cohort < self.min_cohort:
            raise PolicyRefusal("cohort", cohort, f"at least {self.min_cohort} sites")
        if cohort > self.max_cohort:
            raise PolicyRefusal("cohort", cohort, f"at most {self.max_cohort} sites")
        neighbours = cohort - 1 if graph_degree == 0 else min(graph_degree, cohort - 1)
        if neighbours < self.min_neighbours:
            raise PolicyRefusal("neighbours", neighbours, f"at least {self.min_neighbours}")

    def check_evaluation(self) -> None:
        if not self.send_evaluation_metrics:
            raise PolicyRefusal("evaluate", True, "no local evaluation metrics (send-evaluation-metrics = false)")


def _coerce(where: str, key: str, value: Any, default: Any) -> Any:
    if isinstance(default, tuple):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif isinstance(value, type(default)) and not isinstance(value, bool):
        return value
    raise PolicyError(f"{where}: '{key}' = {value!r} has the wrong type (expected {type(default).__name__})")


def load_policy(path: Path, site: int | None = None) -> SitePolicy:
    """Read a policy file. A simulation's file may hold `[sites.<id>]` tables that override it for one site;
    a deployed site's file describes that site alone, so such tables are refused there (site=None)."""
    try:
        with Path(path).expanduser().open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError as err:
        raise PolicyError(f"no site policy at {path}; write one with `carefed site policy init`") from err
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise PolicyError(f"{path} is not a readable TOML policy ({err})") from err
    per_site = doc.pop("sites", {})
    if per_site and site is None:
        raise PolicyError(f"{path}: [sites.*] tables are for simulated federations; a site's policy is its own")
    if not isinstance(per_site, dict) or any(not isinstance(v, dict) for v in per_site.values()):
        raise PolicyError(f"{path}: [sites] must hold one table per site id, e.g. [sites.3]")
    if site is not None:
        doc.update(per_site.get(str(site), {}))
    return SitePolicy.from_mapping(doc, where=str(path))


POLICY_TEMPLATE = """\
# CareFed site policy: the ceiling on everything a study coordinator may ask of this site.
# Written by `carefed site policy init`; check it with `carefed site check --policy {path}`.
# The SuperNode reads it from its node config (policy="{path}"); nothing a coordinator sends can raise these limits.
# A request beyond any of them is refused by name, recorded in this site's ledger, and nothing is trained.

# Studies this site joins (their study-id). A request for any other study is refused.
studies = {studies}

# Differential privacy (DP-SGD) on every update this site releases. false only for a site whose data is public.
dp-required = {dp_required}
# The unit of privacy: "image" (record-level) or "patient" (all of one patient's images together; stronger).
min-privacy-unit = "{min_privacy_unit}"
# The largest epsilon one study may spend on this site's data (composed over every run of that study).
max-epsilon-per-study = {max_epsilon_per_study}
# The dataset's lifetime budget: epsilon composed over every study it ever joins (one accountant, not a sum).
lifetime-epsilon = {lifetime_epsilon}
# The largest delta (well below 1 / number of images, or patients).
max-delta = {max_delta}

# Secure aggregation: the coordinator only ever sees the sum of at least min-cohort sites' updates.
secagg-required = {secagg_required}
# Every peer in secure aggregation must be a site enrolled by the study CA (identity certificate in the SuperNode's
# node config identity="..."), so the coordinator cannot invent sites. Turn off only for a trusted coordinator.
require-signatures = {require_signatures}
min-cohort = {min_cohort}
# With a sparse (SecAgg+) neighbour graph, the fewest neighbours this site's masks may be shared with.
min-neighbours = {min_neighbours}
# The largest tolerated dropout rate (it lowers the threshold t of surviving sites).
max-dropout-rate = {max_dropout_rate}
# The largest cohort (key sharing costs grow with its square).
max-cohort = {max_cohort}

# Model architectures this site trains.
models = {models}
# The most augmented copies of each sampled image a study may ask this site to compute gradients on (each copy
# costs a forward and backward pass; privacy is unchanged). 1: none.
max-augmentations = {max_augmentations}
# Send local test loss and accuracy (computed without DP on the local test split) to the coordinator.
send-evaluation-metrics = {send_evaluation_metrics}
"""


def policy_text(policy: SitePolicy, path: Path) -> str:
    """The commented policy file for `policy` (what `carefed site policy init` writes)."""
    values = {f.name: getattr(policy, f.name) for f in fields(policy)}
    rendered = {k: (_toml_list(v) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else v)
                for k, v in values.items()}
    return POLICY_TEMPLATE.format(path=path, **rendered)


def _toml_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"
