"""The accountants' pure results, kept on disk at a deployed site so that a fresh process need not redo them.

A deployed site runs every message in a new process (client.launcher forks one per task), so the in-memory caches
of noise calibration and of each history's epsilon are lost after every task; a round recomputed 2-3 PRV and PLD
epsilons and a run's first round its calibration (7 s of a 14 s training task with three sites on two cores,
measured with py-spy on the loopback). With `keep_in(path)` those results are kept in a small SQLite file in the
site's state folder, keyed by the function, the library that computed it and its exact arguments.

What it holds is only what this site computed itself, from accounting quantities (noise, sampling rate, steps,
delta; no image, no gradient). They still say something of the site (the sampling rate gives its dataset's size,
a composed history its other studies), so the file is private to the site's account (0600), like the ledger.
Whoever could change it could as well rewrite the ledger beside it, and `carefed audit` never reads it (it
recomputes every epsilon). A result is never a guess: a missing, unreadable or odd entry is recomputed. Its key
names the function's own source and the numerical libraries' versions, so a release that changes how a number is
computed never serves the old one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import math
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

LOG = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., float])

_store: Path | None = None


def keep_in(path: Path | None) -> None:
    """Keep results in the SQLite file at `path` from now on in this process (None: in memory only)."""
    global _store
    _store = path


def on_disk(function_id: str) -> Callable[[F], F]:
    """Look a pure float-valued function's result up on disk before computing it, and keep what it computes.
    `function_id` names the function and what its value depends on besides the arguments and its own source
    (which the key adds, with numpy's and scipy's versions): the libraries it calls, their settings."""

    def decorate(function: F) -> F:
        function_id_full = f"{function_id}/{_version_of(function)}"

        @functools.wraps(function)
        def kept(*args: object, **kwargs: object) -> float:
            store = _store
            if store is None:
                return function(*args, **kwargs)
            key = repr((args, sorted(kwargs.items())))
            found = _read(store, function_id_full, key)
            if found is not None:
                return found
            value = function(*args, **kwargs)
            _write(store, function_id_full, key, value)
            return value

        return kept  # type: ignore[return-value]

    return decorate


def _version_of(function: Callable[..., float]) -> str:
    """The function's source and the numerical libraries under every accountant, as a short digest."""
    from importlib.metadata import version

    source = inspect.getsource(function)
    libraries = f"numpy-{version('numpy')}/scipy-{version('scipy')}"
    return f"{libraries}/source-{hashlib.sha256(source.encode()).hexdigest()[:16]}"


def _connect(store: Path) -> sqlite3.Connection:
    if not store.exists():
        os.close(os.open(store, os.O_WRONLY | os.O_CREAT, 0o600))  # private to the site, like its ledger
    connection = sqlite3.connect(store, timeout=10)
    connection.execute("CREATE TABLE IF NOT EXISTS results (function TEXT NOT NULL, arguments TEXT NOT NULL, "
                       "value REAL NOT NULL, PRIMARY KEY (function, arguments))")
    return connection


def _read(store: Path, function_id: str, key: str) -> float | None:
    if not store.exists():
        return None
    try:
        with contextlib.closing(_connect(store)) as connection:
            row = connection.execute("SELECT value FROM results WHERE function = ? AND arguments = ?",
                                     (function_id, key)).fetchone()
    except (sqlite3.Error, OSError) as err:
        LOG.warning("the accountant's results file %s could not be read (%s); computing instead", store, err)
        return None
    if row is None or not isinstance(row[0], float) or math.isnan(row[0]):
        return None
    return row[0]


def _write(store: Path, function_id: str, key: str, value: float) -> None:
    try:
        with contextlib.closing(_connect(store)) as connection, connection:
            connection.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", (function_id, key, float(value)))
    except (sqlite3.Error, OSError) as err:  # e.g. a full or read-only disk: the result is still returned
        LOG.warning("the accountant's result could not be kept in %s (%s)", store, err)
