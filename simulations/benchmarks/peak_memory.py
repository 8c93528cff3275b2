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
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    started = time.perf_counter()
    child = subprocess.Popen(command)
    root = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss(root))
        time.sleep(args.interval)
    wall = time.perf_counter() - started
    result = {"command": " ".join(command), "exit_code": child.returncode, "wall_seconds": round(wall, 1),
              "peak_rss_mib_process_tree": round(peak / 2**20)}
    print(json.dumps(result), file=sys.stderr)
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
