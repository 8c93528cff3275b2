"""What a site receives: the study, privacy and secure-aggregation sections of a request (one schema each).

The coordinator's run config has more (simulation faults, Ray resources, output paths); none of that is sent
to a deployed site. Each section travels as one Flower ConfigRecord with exactly these kebab-case keys, is parsed
here into a frozen dataclass, and anything else (a missing or unknown key, a wrong type, a value out of range, a
path in a name) is a `RequestError` naming the key. Both sides use these classes: the server to build a request,
the site to read one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from common.errors import CareFedError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # study and run ids: never a path
MODELS = ("cnn", "cnn-ws", "scatternet", "resnet18")
PRIVACY_UNITS = ("image", "patient")
MAX_AUGMENTATIONS = 16  # augmentation multiplicity: a site computes this many gradients per sampled image


class RequestError(CareFedError):
    """A request does not follow the protocol's schema (named key, no values from the site)."""


def check_name(key: str, value: str) -> str:
    """Ids that name folders or ledger entries: letters, digits, '.', '_' and '-', no separators, no '..'."""
    if not isinstance(value, str) or not NAME.match(value) or ".." in value:
        raise RequestError(f"'{key}' = {value!r} is not a valid id (letters, digits, '.', '_', '-'; no path)")
    return value


class Section:
    """A typed ConfigRecord: `record()` to send, `parse()` to receive. Field `foo_bar` is key `foo-bar`."""

    record_name: ClassVar[str]

    def record(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def parse(cls, record: Mapping[str, Any] | None) -> Any:
        if record is None:
            raise RequestError(f"the request has no '{cls.record_name}' section")
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}  # type: ignore[arg-type]
        if set(record.keys()) != set(by_key):
            odd = sorted(set(record.keys()) ^ set(by_key))
            raise RequestError(f"section '{cls.record_name}': unexpected or missing key '{odd[0]}'")
        values = {f.name: _typed(cls.record_name, key, record[key], str(f.type)) for key, f in by_key.items()}
        section = cls(**values)
        section.validate()
        return section

    def validate(self) -> None:  # pragma: no cover - every section overrides it
        raise NotImplementedError


@dataclass(frozen=True)
class StudySection(Section):
    """What is trained and how: the study, this run, the model and its images, the local recipe."""

    record_name: ClassVar[str] = "study"
    study_id: str
    run_name: str
    model: str
    num_classes: int
    channels: int
    image_size: int
    num_server_rounds: int
    local_epochs: int
    batch_size: int
    augmentations: int
    learning_rate: float
    no_dp_learning_rate: float
    momentum: float
    update_clip_norm: float
    local_test_fraction: float

    def validate(self) -> None:
        check_name("study-id", self.study_id)
        check_name("run-name", self.run_name)
        _require(self, "model", self.model in MODELS, f"one of {MODELS}")
        _require(self, "num-classes", 2 <= self.num_classes <= 10_000, "2 to 10000")
        _require(self, "channels", self.channels in (1, 3), "1 or 3")
        _require(self, "image-size", 8 <= self.image_size <= 512, "8 to 512 pixels")
        _require(self, "num-server-rounds", 1 <= self.num_server_rounds <= 100_000, "1 to 100000")
        _require(self, "local-epochs", 1 <= self.local_epochs <= 1000, "1 to 1000")
        _require(self, "batch-size", 1 <= self.batch_size <= 1_000_000, "1 to 1000000")
        _require(self, "augmentations", 1 <= self.augmentations <= MAX_AUGMENTATIONS, f"1 to {MAX_AUGMENTATIONS}")
        for key in ("learning-rate", "no-dp-learning-rate", "update-clip-norm"):
            value = getattr(self, key.replace("-", "_"))
            _require(self, key, math.isfinite(value) and value > 0, "a positive number")
        _require(self, "momentum", 0 <= self.momentum < 1, "in [0, 1)")
        _require(self, "local-test-fraction", 0 < self.local_test_fraction < 1, "in (0, 1)")


@dataclass(frozen=True)
class PrivacySection(Section):
    """The DP-SGD the coordinator proposes; the site's policy is its ceiling."""

    record_name: ClassVar[str] = "privacy"
    dp: bool
    privacy_unit: str
    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    planned_rounds: int

    def validate(self) -> None:
        _require(self, "privacy-unit", self.privacy_unit in PRIVACY_UNITS, f"one of {PRIVACY_UNITS}")
        _require(self, "target-epsilon", math.isfinite(self.target_epsilon) and self.target_epsilon > 0,
                 "a positive, finite epsilon")
        _require(self, "target-delta", 0 < self.target_delta < 1, "in (0, 1)")
        _require(self, "max-grad-norm", math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0,
                 "a positive clipping bound")
        _require(self, "planned-rounds", 1 <= self.planned_rounds <= 100_000, "1 to 100000")


@dataclass(frozen=True)
class SecAggSection(Section):
    """Secure aggregation as the coordinator proposes it; the site's policy bounds every value."""

    record_name: ClassVar[str] = "secure-aggregation"
    secagg: bool
    dropout_rate: float
    colluding: int
    min_cohort: int
    graph_degree: int
    max_weight: int

    def validate(self) -> None:
        _require(self, "dropout-rate", 0 <= self.dropout_rate < 1, "in [0, 1)")
        _require(self, "colluding", self.colluding >= 0, "0 or more")
        _require(self, "min-cohort", self.min_cohort >= 2, "at least 2")
        _require(self, "graph-degree", self.graph_degree >= 0 and self.graph_degree % 2 == 0, "0 or even")
        _require(self, "max-weight", 1 <= self.max_weight <= 2**31 - 1, "1 to 2^31 - 1")


@dataclass(frozen=True)
class SiteRequest:
    """The three sections of one request, parsed."""

    study: StudySection
    privacy: PrivacySection
    secagg: SecAggSection

    @classmethod
    def parse(cls, content: Mapping[str, Any]) -> SiteRequest:
        return cls(StudySection.parse(content.get(StudySection.record_name)),
                   PrivacySection.parse(content.get(PrivacySection.record_name)),
                   SecAggSection.parse(content.get(SecAggSection.record_name)))

    def records(self) -> dict[str, dict[str, Any]]:
        return {s.record_name: s.record() for s in (self.study, self.privacy, self.secagg)}


def _require(section: Section, key: str, ok: bool, expected: str) -> None:
    if not ok:
        value = getattr(section, key.replace("-", "_"))
        raise RequestError(f"section '{section.record_name}': '{key}' = {value!r} must be {expected}")


def _typed(section: str, key: str, value: Any, type_name: str) -> Any:
    kind = {"str": str, "int": int, "float": float, "bool": bool}[type_name]
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise RequestError(f"section '{section}': '{key}' must be {kind.__name__}, got {type(value).__name__}")
