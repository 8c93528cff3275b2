"""`carefed simulate` stopped from outside, as a scheduler's timeout (SIGTERM to the job's process group) or Ctrl-C
(SIGINT to the foreground group) stops it, or with its study's process killed outright (as the kernel's OOM killer
would): the run folder ends `failed` with the reason, the CLI exits non-zero, Ray and its workers are gone, and every
ledger entry written before it stopped is kept and verifies. Real CLI, real Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
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


def _start_and_wait_for_a_round(tmp_path: Path, mark: str) -> tuple[subprocess.Popen, Path]:
    cli = Path(sys.executable).parent / "carefed"
    command = [str(cli), "simulate", "--sites", "6", "--rounds", "40", "--output", str(tmp_path / "runs"),
               "--run-name", "interrupted"]
    process = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, MARK: mark}, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "runs" / "interrupted"

    def trained_a_round() -> bool:
        metrics = run_dir / "metrics.json"
        assert process.poll() is None, process.stdout.read()[-3000:]
        return metrics.exists() and len(json.loads(metrics.read_text())["rounds"]) >= 2

    try:
        _wait_for(trained_a_round, "the first round", 240)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return process, run_dir


def _stop(process: subprocess.Popen, stop) -> str:
    try:
        stop()
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return output


def _assert_failed_with_ledger_kept(run_dir: Path, reason: str, mark: str) -> None:
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["reason"] == reason
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


@pytest.mark.parametrize("signum", [pytest.param(signal.SIGTERM, id="sigterm"),
                                    pytest.param(signal.SIGINT, id="ctrl-c", marks=pytest.mark.long)])
def test_an_interrupted_simulation_ends_failed_with_its_ledger_kept(tmp_path: Path, signum: int):
    mark = uuid.uuid4().hex
    process, run_dir = _start_and_wait_for_a_round(tmp_path, mark)
    # the whole group, as `timeout`, Slurm or a terminal's Ctrl-C would
    output = _stop(process, lambda: os.killpg(process.pid, signum))
    name = signal.Signals(signum).name
    assert process.returncode == 1, output[-3000:]
    assert f"interrupted by {name}" in output, output[-3000:]
    _assert_failed_with_ledger_kept(run_dir, f"interrupted by {name}", mark)


@pytest.mark.long
def test_a_killed_study_process_is_recorded_failed_by_the_cli_that_started_it(tmp_path: Path):
    """The process that runs the study (Ray's driver) is killed outright, as the OOM killer would: nothing in it
    runs, so the `carefed` process that started it says so in the run folder, and Ray's processes die with it."""
    mark = uuid.uuid4().hex
    process, run_dir = _start_and_wait_for_a_round(tmp_path, mark)
    study = [c for c in psutil.Process(process.pid).children() if c.pid != process.pid]
    assert len(study) == 1 and os.getsid(study[0].pid) == study[0].pid  # it leads a session of its own
    output = _stop(process, lambda: study[0].kill())
    assert process.returncode == 128 + signal.SIGKILL, output[-3000:]
    reason = "the simulation process ended (killed by SIGKILL) before it closed the run"
    assert reason in output, output[-3000:]
    _assert_failed_with_ledger_kept(run_dir, reason, mark)
