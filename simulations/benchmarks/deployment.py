"""The three-site loopback deployment against the same study in simulation, and what each site sends.

    python -m simulations.benchmarks.deployment            # 3 sites, 3 rounds (about 5 minutes)

Deployed: real `flower-superlink` (TLS, node authentication) and three `carefed-supernode` processes on 127.0.0.1
(simulations/loopback.py), each site reading its images from PNG files, with every request it sends recorded
(tests/capture_supernode.py). Simulated: `carefed simulate` with the same sites, images, rounds and settings.
Round time is the median over the training rounds after the first (the first also starts processes and
calibrates noise). Bytes sent per site per round: every request body a SuperNode sends (all message stages,
evaluation, heartbeats, polling) over the rounds, against the float32 model (4 bytes a parameter).
One machine, two cores: the three sites and the server share them in both configurations.
With --compare-identities, the same federation also runs a second study without enrolled identities (so without
the consistency check: four secure-aggregation exchanges instead of five), under policies that allow unsigned
advertisements, to price the extra exchange (bytes sent are then the mean over both studies' rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common.config import resolve
from common.data.site import global_model
from common.models import count_parameters
from common.policy import SitePolicy, policy_text
from simulations.loopback import LoopbackDeployment
from tests.capture_supernode import read_capture


def _round_seconds(run_dir: Path) -> tuple[float, float]:
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    seconds = [r["seconds"] for r in rounds if r["round"] >= 1]
    return seconds[0], statistics.median(seconds[1:] or seconds)


def _check_aggregated(run_dir: Path) -> None:
    """A timing is only worth reporting for rounds that aggregated every site's masked update."""
    for r in json.loads((run_dir / "metrics.json").read_text())["rounds"]:
        if r["round"] >= 1 and (r.get("secagg-aborted") or r.get("secagg-dropped")):
            raise SystemExit(f"{run_dir.name} round {r['round']}: {r.get('secagg-aborted') or r['secagg-dropped']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare-identities", action="store_true",
                        help="also run the study without identities and the consistency check")
    args = parser.parse_args()
    names = [f"site-{k}" for k in range(args.sites)]
    model_bytes = 4 * count_parameters(global_model(resolve()))  # the default study's model, as both runs use
    with tempfile.TemporaryDirectory(prefix="carefed-deploy-") as tmp:
        work = Path(tmp)
        study = {"num-sites": args.sites, "num-server-rounds": args.rounds, "output-dir": str(work / "runs")}
        unsigned = {}
        with LoopbackDeployment(work / "loopback", names, capture=True) as deployment:
            deployment.start_federation()
            _, status = deployment.run({**study, "run-name": "deployed",
                                        "identity-ca": str(deployment.study.ca_cert)})
            _check_aggregated(work / "runs" / "deployed")
            if args.compare_identities and status == "finished:completed":
                for site in names:  # the hospitals now allow unsigned advertisements, for a second study
                    path = deployment.policy_path(site)
                    path.write_text(policy_text(SitePolicy(studies=("carefed-demo", "carefed-unsigned"),
                                                           require_signatures=False), path))
                _, unsigned_status = deployment.run({**study, "run-name": "deployed-unsigned",
                                                     "study-id": "carefed-unsigned", "secagg-identities": False})
                if unsigned_status != "finished:completed":
                    raise SystemExit(f"the unsigned run ended {unsigned_status}")
                _check_aggregated(work / "runs" / "deployed-unsigned")
                first, median = _round_seconds(work / "runs" / "deployed-unsigned")
                unsigned = {"deployed_unsigned_round_s": round(median, 2),
                            "deployed_unsigned_first_round_s": round(first, 2)}
        if status != "finished:completed":
            raise SystemExit(f"the deployed run ended {status}:\n{deployment.log('superlink')[-3000:]}")
        deployed_first, deployed = _round_seconds(work / "runs" / "deployed")
        sent = {}
        for name in names:
            requests = read_capture(str(work / "loopback" / "capture" / f"{name}.bin"))
            sent[name] = sum(len(body) for _, body in requests) / (args.rounds * (2 if unsigned else 1))
        simulated = subprocess.run(
            [sys.executable, "-m", "simulations.cli", "simulate", "--sites", str(args.sites), "--rounds",
             str(args.rounds), "--output", str(work / "runs"), "--run-name", "simulated", "--format", "json"],
            capture_output=True, text=True)
        if simulated.returncode != 0:
            raise SystemExit(simulated.stderr[-3000:])
        simulated_first, simulated_round = _round_seconds(work / "runs" / "simulated")
    result = {"sites": args.sites, "rounds": args.rounds, "deployed_round_s": round(deployed, 2),
              "deployed_first_round_s": round(deployed_first, 2), "simulated_round_s": round(simulated_round, 2),
              "simulated_first_round_s": round(simulated_first, 2),
              "deployed_over_simulated": round(deployed / simulated_round, 2), "model_float32_bytes": model_bytes,
              "bytes_sent_per_site_per_round": {k: round(v) for k, v in sent.items()},
              "sent_over_model": {k: round(v / model_bytes, 3) for k, v in sent.items()}, **unsigned}
    if unsigned:
        result["identities_over_unsigned"] = round(deployed / unsigned["deployed_unsigned_round_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
