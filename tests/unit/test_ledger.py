"""The privacy ledger: append-only, hash-chained, and every kind of tampering is found at its entry."""

import sqlite3
from pathlib import Path

import pytest

from common.privacy.ledger import GENESIS, LedgerEntry, LedgerError, PrivacyLedger


def _entry(round_: int, site: int = 0, epsilon: float = 1.0) -> LedgerEntry:
    return LedgerEntry(run_id="run-1", round=round_, site=site, unit="image", sample_rate=0.1,
                       noise_multiplier=1.2, clip_norm=1.0, steps_round=10, steps_total=10 * round_,
                       planned_rounds=5, delta=1e-5, epsilon=epsilon * round_, epsilon_independent=epsilon * round_,
                       budget=8.0, max_images_per_patient=4, history=((1.2, 0.1, 10 * round_),))


def _ledger(tmp_path: Path, rounds: int = 4) -> PrivacyLedger:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    for r in range(1, rounds + 1):
        ledger.append(_entry(r))
    return ledger


def _raw(ledger: PrivacyLedger, *sql: str) -> None:
    """What someone with the file and the sqlite3 tool could do: drop the guards, then edit."""
    with sqlite3.connect(ledger.path) as db:
        db.execute("DROP TRIGGER entries_no_update")
        db.execute("DROP TRIGGER entries_no_delete")
        for statement in sql:
            db.execute(statement)


def test_entries_chain_from_genesis_and_verify(tmp_path: Path):
    ledger = _ledger(tmp_path)
    entries = ledger.entries()
    assert [e.seq for e in entries] == [1, 2, 3, 4]
    assert entries[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(entries, entries[1:], strict=False))
    assert entries[2].history == ((1.2, 0.1, 30),)
    assert ledger.verify().ok


def test_a_reopened_ledger_continues_its_chain(tmp_path: Path):
    _ledger(tmp_path, rounds=2)
    again = PrivacyLedger(tmp_path / "ledger.sqlite")
    third = again.append(_entry(3))
    assert third.seq == 3 and third.prev_hash == again.entries()[1].hash
    assert again.last("run-1", 0).round == 3
    assert again.verify().ok


def test_updates_and_deletes_are_refused(tmp_path: Path):
    ledger = _ledger(tmp_path)
    with sqlite3.connect(ledger.path) as db, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE entries SET epsilon = 0.1 WHERE seq = 2")
    with sqlite3.connect(ledger.path) as db, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM entries WHERE seq = 2")


def test_tampering_is_reported_at_the_exact_entry(tmp_path: Path):
    ledger = _ledger(tmp_path)
    _raw(ledger, "UPDATE entries SET epsilon = 0.5 WHERE seq = 3")
    problems = ledger.verify().problems
    assert [(p.seq, p.problem.split(":")[0]) for p in problems] == [(3, "tampered")]


def test_a_removed_entry_is_reported_as_a_gap(tmp_path: Path):
    ledger = _ledger(tmp_path)
    _raw(ledger, "DELETE FROM entries WHERE seq = 2")
    problems = ledger.verify().problems
    assert {p.seq for p in problems} == {3}
    assert any("gap: expected entry 2" in p.problem for p in problems)
    assert any("chain broken" in p.problem for p in problems)


def test_reordered_entries_are_reported(tmp_path: Path):
    ledger = _ledger(tmp_path)
    _raw(ledger, "UPDATE entries SET seq = 100 WHERE seq = 2", "UPDATE entries SET seq = 2 WHERE seq = 3",
         "UPDATE entries SET seq = 3 WHERE seq = 100")
    problems = ledger.verify().problems
    assert {p.seq for p in problems} >= {2, 3}
    assert any("chain broken" in p.problem for p in problems)
    assert any("out of order" in p.problem for p in problems)


def test_a_file_that_is_not_a_ledger_is_a_clear_error(tmp_path: Path):
    bogus = tmp_path / "notes.sqlite"
    bogus.write_bytes(b"this is a text file, not a database" * 20)
    with pytest.raises(LedgerError, match="not a CareFed privacy ledger"):
        PrivacyLedger(bogus)
    with pytest.raises(LedgerError, match="no ledger at"):
        PrivacyLedger(tmp_path / "missing.sqlite", create=False)


def test_the_ledger_states_what_its_epsilons_treat_as_public(tmp_path):
    import sqlite3

    from common.privacy.ledger import PUBLIC, PrivacyLedger

    PrivacyLedger(tmp_path / "l.sqlite")
    with sqlite3.connect(tmp_path / "l.sqlite") as db:
        [(stored,)] = db.execute("SELECT value FROM meta WHERE key = 'public'").fetchall()
    assert stored == PUBLIC and "size" in stored and "public" in stored


WRITER = """
import sys
from tests.unit.test_ledger import _entry
from common.privacy.ledger import PrivacyLedger
ledger = PrivacyLedger(sys.argv[1])
start = len(ledger.entries())
for k in range(start + 1, start + 100_000):
    entry = ledger.append(_entry(k))
    print(entry.seq, flush=True)  # "released": only after the commit returned
"""


def test_a_process_killed_while_it_writes_leaves_a_valid_ledger_with_every_released_entry(tmp_path: Path):
    """A real writer process SIGKILLed at random moments, 6 times, reopening the same file each time: the chain
    always verifies, no entry is half-written, and every entry the writer released (after its commit returned)
    is there, so the accounted spend is never below what left."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "ledger.sqlite"
    rng = random.Random(7)
    released = 0
    for _ in range(6):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                                  cwd=Path(__file__).resolve().parents[2])
        first = writer.stdout.readline()  # it is writing
        time.sleep(rng.random() * 0.3)
        os.kill(writer.pid, signal.SIGKILL)
        out, _ = writer.communicate()
        printed = [int(line) for line in (first + out).split()]
        ledger = PrivacyLedger(path, create=False)
        seqs = [e.seq for e in ledger.entries()]
        assert ledger.verify().ok and seqs == list(range(1, len(seqs) + 1))
        assert max(printed, default=released) <= len(seqs)  # nothing released is missing
        released = max(printed, default=released)
    assert released > 6  # it was killed mid-stream, not before it began
