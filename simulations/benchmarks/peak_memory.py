"""Wall time and peak memory of a whole process tree (the command, Ray's raylet and workers, everything).

    python -m simulations.benchmarks.peak_memory -- carefed simulate --run-name demo

Samples the summed RSS of the command and all its descendants every 0.1 s; prints wall seconds and the peak
in MiB as JSON on stderr, and exits with the command's exit code. Summed RSS counts shared pages (torch's
libraries mapped by every worker) once per process, so it overstates physical use; it is the conservative number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil


def tree_rss(root: psutil.Process) -> int:
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += process.memory_info().rss
    return total


@dataclass(frozen=True)
class Measured:
    returncode: int
    wall_seconds: float
    peak_bytes: int
    stdout: str = ""
    stderr: str = ""


def measure_tree(command: list[str], *, interval: float = 0.1, capture: bool = False) -> Measured:
    """Run `command`; sample its process tree's summed RSS every `interval` s until it exits.

    With `capture`, its output goes to temporary files (not pipes, which would block a chatty child while we poll)
    and comes back in the result; otherwise it goes to this process's stdout and stderr."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=out if capture else None, stderr=err if capture else None, text=True)
        root, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            peak = max(peak, tree_rss(root))
            time.sleep(interval)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        return Measured(child.returncode, wall, peak, out.read(), err.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    measured = measure_tree(command, interval=args.interval)
    result = {"command": " ".join(command), "exit_code": measured.returncode,
              "wall_seconds": round(measured.wall_seconds, 1),
              "peak_rss_mib_process_tree": round(measured.peak_bytes / 2**20)}
    print(json.dumps(result), file=sys.stderr)
    sys.exit(measured.returncode)


if __name__ == "__main__":
    main()
