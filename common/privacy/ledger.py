"""An append-only, hash-chained privacy ledger in SQLite.

Each site keeps one in its state folder and commits a round's entry before that round's update leaves the site;
the server keeps the run ledger built from the sites' reports. Entry i stores SHA-256(entry i's fields, hash of
entry i-1), so editing, deleting or reordering any entry breaks the chain at a place `verify` names exactly.
Triggers refuse UPDATE and DELETE; the chain catches what is done around them (another tool, a copied file).
Each entry also carries the accountant's full history, so a restarted site continues its chain and its
accountant from disk.

The ledger belongs to the site's dataset, not to one run: every run of every study the site joins appends to it,
so the lifetime spend is composed over all of them (common.privacy.budget). A refused request is an entry too
(kind "refusal", with its reason and no spend), so the privacy officer sees what was asked and turned down.
Schema 2 added study, dataset, kind, reason and the lifetime columns; a schema-1 file gains them on open with
their defaults, which the hash leaves out, so its chain still verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
SCHEMA_VERSION = 2
KIND_ROUND, KIND_REFUSAL = "round", "refusal"
# What every epsilon in this ledger treats as public (stored in the file, beside the entries it qualifies).
PUBLIC = ("The (epsilon, delta) guarantees are conditional on the site's size (training images, or patients) "
          "being public: the sampling rate and noise are calibrated from it. Also released without DP: sampling "
          "rate, noise multiplier, clip norm, steps, max images per patient, and local test size, loss and "
          "accuracy where the site's policy allows evaluation.")

_COLUMNS = """
    seq INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL, round INTEGER NOT NULL, site INTEGER NOT NULL, unit TEXT NOT NULL,
    sample_rate REAL NOT NULL, noise_multiplier REAL NOT NULL, clip_norm REAL NOT NULL,
    steps_round INTEGER NOT NULL, steps_total INTEGER NOT NULL, planned_rounds INTEGER NOT NULL,
    delta REAL NOT NULL, epsilon REAL NOT NULL, epsilon_independent REAL NOT NULL, budget REAL NOT NULL,
    max_images_per_patient INTEGER NOT NULL, history TEXT NOT NULL, recorded_at TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL
"""
# Added in schema 2 (defaults keep schema-1 entries' hashes unchanged: see LedgerEntry.content).
_V2_COLUMNS = {"study": "TEXT NOT NULL DEFAULT ''", "dataset": "TEXT NOT NULL DEFAULT ''",
               "kind": "TEXT NOT NULL DEFAULT 'round'", "reason": "TEXT NOT NULL DEFAULT ''",
               "lifetime_epsilon": "REAL NOT NULL DEFAULT 0", "lifetime_budget": "REAL NOT NULL DEFAULT 0",
               "lifetime_delta": "REAL NOT NULL DEFAULT 0"}


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
    study: str = ""
    dataset: str = ""  # fingerprint of the site's files (SHA-256)
    kind: str = KIND_ROUND  # or KIND_REFUSAL: a request the site refused (no spend)
    reason: str = ""  # a refusal's named reason
    lifetime_epsilon: float = 0.0  # PRV epsilon over every run of every study in this ledger, this entry included
    lifetime_budget: float = 0.0  # the site policy's lifetime-epsilon
    lifetime_delta: float = 0.0  # the delta of the lifetime epsilon (the policy's max-delta)
    recorded_at: str = ""
    seq: int = 0
    prev_hash: str = ""
    hash: str = ""

    def content(self) -> dict[str, Any]:
        """The hashed fields (everything but the chain bookkeeping)."""
        data = asdict(self)
        for key in ("seq", "prev_hash", "hash"):
            data.pop(key)
        for key, default in _V2_DEFAULTS.items():  # schema-1 entries hash as they always did
            if data[key] == default:
                data.pop(key)
        data["history"] = [list(h) for h in self.history]
        return data


_V2_DEFAULTS = {"study": "", "dataset": "", "kind": KIND_ROUND, "reason": "", "lifetime_epsilon": 0.0,
                "lifetime_budget": 0.0, "lifetime_delta": 0.0}


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
        self.read_only = False
        if not create and not self.path.is_file():
            raise LedgerError(f"no ledger at {self.path}")
        if not create and not os.access(self.path.parent, os.W_OK):
            self._open_read_only()  # a ledger on read-only media (a site's folder that turned read-only, a backup)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as db:
                db.executescript(f"""
                    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                    CREATE TABLE IF NOT EXISTS entries ({_COLUMNS});
                    CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
                        BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
                    CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
                        BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
                """)
                version = self._migrate(db)
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"{self.path} is not a CareFed privacy ledger ({err})") from err
        if version is None or version[0] != str(SCHEMA_VERSION):
            raise LedgerError(f"{self.path} has ledger schema {version}, expected {SCHEMA_VERSION}")

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> tuple[str] | None:
        """Stamp a new file with the schema; bring a schema-1 file (or a new table) to 2 by adding columns."""
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', '1')")
        db.execute("INSERT OR IGNORE INTO meta VALUES ('public', ?)", (PUBLIC,))
        version = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if version is not None and version[0] == "1":
            db.execute("BEGIN IMMEDIATE")
            present = {row[1] for row in db.execute("PRAGMA table_info(entries)")}
            for column, kind in _V2_COLUMNS.items():
                if column not in present:
                    db.execute(f"ALTER TABLE entries ADD COLUMN {column} {kind}")
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
            db.execute("COMMIT")
            version = (str(SCHEMA_VERSION),)
        return version

    def _open_read_only(self) -> None:
        """Readable, never written: SQLite opens it as immutable (nothing can change a read-only file system)."""
        self.read_only = True
        wal = self.path.with_name(self.path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:  # immutable mode would not read it: entries would be missed
            raise LedgerError(f"{self.path} has a write-ahead log that was never merged into it and its folder is "
                              "read-only; copy the folder to writable storage to read the whole ledger")
        try:
            with self._connect() as db:
                version = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"{self.path} is not a CareFed privacy ledger ({err})") from err
        if version is None or version[0] != str(SCHEMA_VERSION):
            raise LedgerError(f"{self.path} has ledger schema {version}, expected {SCHEMA_VERSION}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            uri = f"{self.path.resolve().as_uri()}?immutable=1"
            with closing(sqlite3.connect(uri, uri=True, isolation_level=None)) as db:
                yield db
            return
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

    def refusal(self, *, run_id: str, study: str, round: int, site: int, reason: str,
                dataset: str = "") -> LedgerEntry:
        """Record a refused request: what was asked and why not; no spend (every spend field is zero)."""
        return self.append(LedgerEntry(
            run_id=run_id, round=round, site=site, unit="", sample_rate=0.0, noise_multiplier=0.0, clip_norm=0.0,
            steps_round=0, steps_total=0, planned_rounds=0, delta=0.0, epsilon=0.0, epsilon_independent=0.0,
            budget=0.0, max_images_per_patient=0, history=(), study=study, dataset=dataset, kind=KIND_REFUSAL,
            reason=reason))

    def spends(self) -> list[LedgerEntry]:
        """Every round entry (what was released), in order; refusals left out."""
        return [e for e in self.entries() if e.kind == KIND_ROUND]

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
        """The latest round entry of this run and site (refusals spend nothing and are skipped)."""
        found = [e for e in self.entries(run_id, site) if e.kind == KIND_ROUND]
        return found[-1] if found else None

    def verify(self) -> Verification:
        """Recompute the chain: every tampered, missing or reordered entry is reported by its seq."""
        entries = self.entries()
        result = Verification(len(entries))
        prev_hash, expected_seq = GENESIS, 1
        last_round: dict[tuple[str, int], int] = {}
        for entry in entries:
            if entry.kind not in (KIND_ROUND, KIND_REFUSAL):
                result.problems.append(ChainProblem(entry.seq, f"unknown entry kind {entry.kind!r}"))
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
            if entry.kind == KIND_ROUND and key in last_round and entry.round <= last_round[key]:
                result.problems.append(ChainProblem(entry.seq, f"round {entry.round} of site {entry.site} follows "
                                                               f"round {last_round[key]} (rounds out of order)"))
            if entry.kind == KIND_ROUND:
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
