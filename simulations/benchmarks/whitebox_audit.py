"""The white-box canary audit's power and tightness at one site (client.canaries), as a privacy officer would ask.

    python -m simulations.benchmarks.whitebox_audit --power --seeds 5       # verdicts of correct and broken DP-SGD
    python -m simulations.benchmarks.whitebox_audit --tightness 1 3 8       # bound / accountant at these epsilons

Power: at the audit's settings (site 0 of the default study, noise calibrated for --epsilon), the correct
implementation and each test-only breakage (noise multiplier / 10, no clipping, noise re-seeded every step, an
accountant that forgets earlier rounds) play the game with several seeds; reported: how often each is called
inconsistent (a false alarm for the correct one, a catch for the broken ones) and its bounds.
Tightness: the correct implementation at each epsilon with --tightness-canaries canaries; reported: the lower
bound and the one-run bound, the accountant's epsilon, their ratio, the ceiling (whether the game could fail
there), time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from client.canaries import Breakage, play
from common.config import resolve
from common.data.site import load_site_data

FORGETFUL_ROUNDS = 20  # an accountant that forgets earlier rounds is caught once one round's epsilon is small


def power(seeds: int, epsilon: float, canaries: int, rounds: int) -> list[dict[str, object]]:
    rows = []
    for breakage in Breakage:
        planned = FORGETFUL_ROUNDS if breakage is Breakage.ACCOUNTANT_FORGETS else rounds
        config = resolve(overrides={"target-epsilon": epsilon, "num-server-rounds": planned})
        data = load_site_data(config, 0)
        results = [play(config, data, canaries=2 * canaries if planned > rounds else canaries, breakage=breakage,
                        seed=seed) for seed in range(seeds)]
        flagged = sum(not r.consistent for r in results)
        rows.append({"implementation": breakage.value, "rounds": planned, "canaries": results[0].bound.canaries,
                     "inconsistent": f"{flagged}/{seeds}",
                     "claimed_epsilon": round(statistics.median(r.claimed_epsilon for r in results), 3),
                     "bounds": [round(r.bound.epsilon, 3) for r in results],
                     "ceiling": round(results[0].bound.ceiling, 3),
                     "seconds_each": round(statistics.median(r.seconds for r in results), 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def tightness(epsilons: list[float], canaries: int) -> list[dict[str, object]]:
    rows = []
    for epsilon in epsilons:
        config = resolve(overrides={"target-epsilon": epsilon})
        started = time.perf_counter()
        result = play(config, load_site_data(config, 0), canaries=canaries, seed=0, require_power=False)
        rows.append({"epsilon": epsilon, **result.to_json(), "can_fail": result.bound.ceiling > result.claimed_epsilon,
                     "wall_s": round(time.perf_counter() - started, 1),
                     "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--power", action="store_true")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=8.0, help="the power check's audit epsilon")
    parser.add_argument("--canaries", type=int, default=4000, help="the power check's canaries")
    parser.add_argument("--rounds", type=int, default=5, help="the power check's planned rounds")
    parser.add_argument("--tightness", type=float, nargs="*", default=[])
    parser.add_argument("--tightness-canaries", type=int, default=4000)
    parser.add_argument("--json", type=str, default="")
    args = parser.parse_args()
    result = {}
    if args.power:
        result["power"] = power(args.seeds, args.epsilon, args.canaries, args.rounds)
    if args.tightness:
        result["tightness"] = tightness(args.tightness, args.tightness_canaries)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
