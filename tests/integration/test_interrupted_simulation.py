"""`carefed simulate` stopped from outside, as a scheduler's timeout (SIGTERM to the job's process group) or Ctrl-C
(SIGINT to the foreground group) stops it: the run folder ends `failed` with the reason, the CLI exits 1, Ray and
its workers are gone, and every ledger entry written before the signal is kept and verifies. Real CLI, real Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from common.privacy.ledger import PrivacyLedger

pytestmark = pytest.mark.slow
MARK = "CAREFED_TEST_PROCESS_MARK"


def _marked_processes(mark: str) -> list[str]:
    """Live processes (the CLI's Ray head, raylet, workers...) that inherited this test's environment mark."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"{MARK}={mark}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a zombie holds no resources; its parent (init) reaps it
                    found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except OSError:
            continue
    return found


def _wait_for(check, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)  # the poll interval of a condition wait, not a fixed delay


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_an_interrupted_simulation_ends_failed_with_its_ledger_kept(tmp_path: Path, signum: int):
    mark = uuid.uuid4().hex
    cli = Path(sys.executable).parent / "carefed"
    command = [str(cli), "simulate", "--sites", "6", "--rounds", "40", "--output", str(tmp_path / "runs"),
               "--run-name", "interrupted"]
    process = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, MARK: mark}, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "runs" / "interrupted"
    try:
        def trained_a_round() -> bool:
            metrics = run_dir / "metrics.json"
            assert process.poll() is None, process.stdout.read()[-3000:]
            return metrics.exists() and len(json.loads(metrics.read_text())["rounds"]) >= 2

        _wait_for(trained_a_round, "the first round", 240)
        os.killpg(process.pid, signum)  # the whole group, as `timeout`, Slurm or a terminal's Ctrl-C would
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    name = signal.Signals(signum).name
    assert process.returncode == 1, output[-3000:]
    assert f"interrupted by {name}" in output
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["reason"] == f"interrupted by {name}"
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert status["rounds"] == len(rounds) - 1 >= 1

    ledger = PrivacyLedger(run_dir / "ledger.sqlite", create=False)
    assert ledger.verify().ok
    reports = [r for f in sorted((run_dir / "privacy").glob("site-*.json"))
               for r in json.loads(f.read_text())["reports"] if r["status"] == "trained"]
    entries = ledger.entries()
    assert len(entries) == len(reports) >= 6  # every released update's entry, none lost
    assert {e.round for e in entries} >= {r["round"] for r in rounds[1:]}

    _wait_for(lambda: not _marked_processes(mark), "Ray's processes to exit", 30)
