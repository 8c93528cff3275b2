"""What the site's policy gate costs per message, next to one training round at the same site.

    python -m simulations.benchmarks.policy

A deployed-style site (its own image files, state folder and policy file; the real ClientApp code) admits the
default study's training request many times (parse the three sections, read the policy file, check), then trains
one round of that request (DP-SGD with CSPRNG noise, ledger entry). Printed side by side, with the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, MessageType, RecordDict

from client.policy_gate import admit
from client.site import train_site
from common.config import resolve
from common.data.site import global_model
from common.deploy.demo_data import write_site_folders
from common.logs import tidy_logging
from common.policy import SitePolicy, policy_text
from server.training import request_content


def site_context(root: Path) -> Context:
    write_site_folders(resolve(), root / "data", ["site-0"])
    policy = root / "policy.toml"
    policy.write_text(policy_text(SitePolicy(studies=("carefed-demo",)), policy))
    node = {"site-id": 0, "data": str(root / "data" / "site-0"), "state-dir": str(root / "state"),
            "policy": str(policy)}
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=500, help="admissions to time")
    args = parser.parse_args()
    tidy_logging()
    config = resolve(overrides={"run-name": "policy-benchmark", "num-sites": 10})
    with tempfile.TemporaryDirectory() as tmp:
        context = site_context(Path(tmp))
        content = request_content(config.site_request(num_classes=10, channels=1, image_size=28), 1,
                                  ArrayRecord(global_model(config).state_dict()))
        seconds = []
        for _ in range(args.checks):
            started = time.perf_counter()
            admit(MessageType.TRAIN, content, context)
            seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        reply = train_site(content, context)
        round_seconds = time.perf_counter() - started
    check = statistics.median(seconds)
    print(f"policy check per message: median {check * 1e3:.3f} ms over {args.checks} (p95 "
          f"{sorted(seconds)[int(0.95 * len(seconds))] * 1e3:.3f} ms)")
    print(f"one training round at the site ({reply['status']['state']}, first round incl. noise calibration): "
          f"{round_seconds:.2f} s")
    print(f"ratio: {check / round_seconds:.2e} of a round per message; a round is 5 messages -> "
          f"{5 * check / round_seconds:.2e}")


if __name__ == "__main__":
    main()
