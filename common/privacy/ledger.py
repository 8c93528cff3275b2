"""An append-only, hash-chained privacy ledger in SQLite.

Each site keeps one in its state folder and commits a round's entry before that round's update leaves the site;
the server keeps the run ledger built from the sites' reports. Entry i stores SHA-256(entry i's fields, hash of
entry i-1), so editing, deleting or reordering any entry breaks the chain at a place `verify` names exactly.
Triggers refuse UPDATE and DELETE; the chain catches what is done around them (another tool, a copied file).
Each entry also carries the accountant's full history, so a restarted site continues its chain and its
accountant from disk.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
SCHEMA_VERSION = 1

_COLUMNS = """
    seq INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL, round INTEGER NOT NULL, site INTEGER NOT NULL, unit TEXT NOT NULL,
    sample_rate REAL NOT NULL, noise_multiplier REAL NOT NULL, clip_norm REAL NOT NULL,
    steps_round INTEGER NOT NULL, steps_total INTEGER NOT NULL, planned_rounds INTEGER NOT NULL,
    delta REAL NOT NULL, epsilon REAL NOT NULL, epsilon_independent REAL NOT NULL, budget REAL NOT NULL,
    max_images_per_patient INTEGER NOT NULL, history TEXT NOT NULL, recorded_at TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL
"""


class LedgerError(Exception):
    """The ledger file cannot be used (not a ledger, unreadable, wrong schema)."""


@dataclass(frozen=True)
class LedgerEntry:
    """One round of one site: the DP-SGD parameters and the privacy spent over the whole run so far."""

    run_id: str
    round: int
    site: int
    unit: str  # "image" or "patient"
    sample_rate: float
    noise_multiplier: float
    clip_norm: float
    steps_round: int
    steps_total: int
    planned_rounds: int
    delta: float
    epsilon: float  # Opacus PRV, composed over every step of the run
    epsilon_independent: float  # dp-accounting PLD over the same history
    budget: float
    max_images_per_patient: int
    history: tuple[tuple[float, float, int], ...]  # the accountant's (noise, sample rate, steps) entries
    recorded_at: str = ""
    seq: int = 0
    prev_hash: str = ""
    hash: str = ""

    def content(self) -> dict[str, Any]:
        """The hashed fields (everything but the chain bookkeeping)."""
        data = asdict(self)
        for key in ("seq", "prev_hash", "hash"):
            data.pop(key)
        data["history"] = [list(h) for h in self.history]
        return data


def entry_hash(entry: LedgerEntry, prev_hash: str) -> str:
    canonical = json.dumps(entry.content(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


@dataclass(frozen=True)
class ChainProblem:
    seq: int
    problem: str


@dataclass
class Verification:
    entries: int
    problems: list[ChainProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class PrivacyLedger:
    """One SQLite file. Safe for one writer per file; readers may open it at any time."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise LedgerError(f"no ledger at {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as db:
                db.executescript(f"""
                    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                    INSERT OR IGNORE INTO meta VALUES ('schema', '{SCHEMA_VERSION}');
                    CREATE TABLE IF NOT EXISTS entries ({_COLUMNS});
                    CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
                        BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
                    CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
                        BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
                """)
                version = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"{self.path} is not a CareFed privacy ledger ({err})") from err
        if version is None or version[0] != str(SCHEMA_VERSION):
            raise LedgerError(f"{self.path} has ledger schema {version}, expected {SCHEMA_VERSION}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            yield db

    def append(self, entry: LedgerEntry) -> LedgerEntry:
        """Chain and commit one entry durably; returns it with seq and hashes filled in."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                last = db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
                seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
                stamped = _replace(entry, recorded_at=entry.recorded_at
                                   or datetime.now(UTC).isoformat(timespec="microseconds"), seq=seq, prev_hash=prev)
                stamped = _replace(stamped, hash=entry_hash(stamped, prev))
                row = _row(stamped)
                db.execute(f"INSERT INTO entries ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                           list(row.values()))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return stamped

    def entries(self, run_id: str | None = None, site: int | None = None) -> list[LedgerEntry]:
        query, args = "SELECT * FROM entries", []
        conditions = []
        if run_id is not None:
            conditions.append("run_id = ?")
            args.append(run_id)
        if site is not None:
            conditions.append("site = ?")
            args.append(site)
        if conditions:
            query += " WHERE " + " AND ".join(conditions)
        try:
            with self._connect() as db:
                db.row_factory = sqlite3.Row
                rows = db.execute(query + " ORDER BY seq", args).fetchall()
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"cannot read {self.path}: {err}") from err
        return [_from_row(dict(r)) for r in rows]

    def last(self, run_id: str, site: int) -> LedgerEntry | None:
        found = self.entries(run_id, site)
        return found[-1] if found else None

    def verify(self) -> Verification:
        """Recompute the chain: every tampered, missing or reordered entry is reported by its seq."""
        entries = self.entries()
        result = Verification(len(entries))
        prev_hash, expected_seq = GENESIS, 1
        last_round: dict[tuple[str, int], int] = {}
        for entry in entries:
            if entry.seq != expected_seq:
                result.problems.append(ChainProblem(entry.seq, f"gap: expected entry {expected_seq}, found "
                                                               f"{entry.seq} (entries missing)"))
            if entry.prev_hash != prev_hash:
                result.problems.append(ChainProblem(entry.seq, "chain broken: prev_hash does not match the hash of "
                                                               "the entry before it (removed or reordered entries)"))
            if entry_hash(entry, entry.prev_hash) != entry.hash:
                result.problems.append(ChainProblem(entry.seq, "tampered: the entry's content does not match its "
                                                               "hash"))
            key = (entry.run_id, entry.site)
            if key in last_round and entry.round <= last_round[key]:
                result.problems.append(ChainProblem(entry.seq, f"round {entry.round} of site {entry.site} follows "
                                                               f"round {last_round[key]} (rounds out of order)"))
            last_round[key] = entry.round
            prev_hash, expected_seq = entry.hash, entry.seq + 1
        return result


def _replace(entry: LedgerEntry, **changes: Any) -> LedgerEntry:
    return LedgerEntry(**{**{f.name: getattr(entry, f.name) for f in fields(entry)}, **changes})


def _row(entry: LedgerEntry) -> dict[str, Any]:
    row = {f.name: getattr(entry, f.name) for f in fields(entry)}
    row["history"] = json.dumps([list(h) for h in entry.history])
    return row


def _from_row(row: dict[str, Any]) -> LedgerEntry:
    row["history"] = tuple((float(s), float(q), int(n)) for s, q, n in json.loads(row["history"]))
    return LedgerEntry(**row)


def history_tuple(history: Sequence[tuple[float, float, int]]) -> tuple[tuple[float, float, int], ...]:
    return tuple((float(s), float(q), int(n)) for s, q, n in history)
