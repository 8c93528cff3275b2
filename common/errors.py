"""Errors a person can act on: each names the offending value and what to do about it."""

from __future__ import annotations


class CareFedError(Exception):
    """Base class for every error CareFed raises on purpose (bad input, refused work)."""

    exit_code = 2


class ConfigError(CareFedError):
    """A run-config value, scenario file or CLI flag is invalid."""

    def __init__(self, key: str, value: object, problem: str, fix: str) -> None:
        self.key, self.value = key, value
        super().__init__(f"config '{key}' = {value!r}: {problem}. {fix}")


class DataError(CareFedError):
    """A data file or partition is missing, corrupt or malformed."""


class BudgetExhaustedError(CareFedError):
    """A site's next round would spend more privacy than its budget allows."""

    exit_code = 1
