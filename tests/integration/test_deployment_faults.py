"""Hospitals crash or restart in the middle of a deployed study: real SuperLink (TLS, node authentication) and
four real SuperNodes on 127.0.0.1, each stopped at a chosen secure-aggregation stage and started again at once with
the same state folder, key and images, and an empty Flower context.

Round 1: site 3 is SIGKILLed with every process it started (a crash) right after its masked update left (its
ledger entry was committed before that). Flower then waits for two missed heartbeats (about 60 s) before it calls
the node unavailable and lets it in again.
Round 2: site 1 is stopped with SIGTERM (a restarted service) right after its key shares left.
Each round must finish from the survivors (t = 3 of 4); the run folder must name who dropped where; the restarted
sites must continue their own accountant and ledger chain (never spending a round twice, never losing an entry)
and pass `carefed audit`.
"""

from __future__ import annotations

import json
import threading

import pytest

from common.privacy.ledger import PrivacyLedger
from simulations.loopback import LoopbackDeployment
from tests.capture_supernode import read_capture
from tests.conftest import carefed
from tests.lossy_proxy import LossyProxy

pytestmark = pytest.mark.slow
SITES = ["site-0", "site-1", "site-2", "site-3"]
# round -> (site index, the stage whose reply has just left, how it stops); each is restarted at once
CRASHES = {1: (3, "masked-input", "SIGKILL"), 2: (1, "share-keys", "SIGTERM")}


def _egress(deployment: LoopbackDeployment, site: str) -> list[dict]:
    path = deployment.work / "state" / site / "egress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _reply_has_left(deployment: LoopbackDeployment, site: str, server_round: int, stage: str) -> bool:
    """The site's reply for (round, stage) passed its egress guard and its SuperNode finished pushing it: one
    push per reply the guard sent, and the SuperNode back to polling for messages after the last push."""
    sent = [line for line in _egress(deployment, site) if line["verdict"] == "sent"]
    if not any(line["round"] == str(server_round) and line["stage"] == stage for line in sent):
        return False
    paths = [path for path, _ in read_capture(str(deployment.work / "capture" / f"{site}.bin"))]
    pushes = [k for k, path in enumerate(paths) if path == "/v1/fleet/push-messages"]
    return len(pushes) >= len(sent) and "/v1/fleet/pull-messages" in paths[pushes[-1]:]


def _restart(deployment: LoopbackDeployment, site: str, index: int, done: threading.Event) -> None:
    """Start the site's SuperNode again, and again whenever it exits, until it is active, as docker's restart
    policy would: Flower 1.42's SuperLink refuses to activate a node it still counts online (until two 30 s
    heartbeats are missed) and the SuperNode then exits (code 305)."""
    name = f"supernode-{site}"
    activations = deployment.log(name).count("SuperNode ID:")
    deployment.start_supernode(site, index)

    def active() -> bool:
        if deployment.log(name).count("SuperNode ID:") > activations or done.is_set():
            return True
        if deployment.processes[name].poll() is not None:  # refused and exited: the restart policy starts it
            deployment.start_supernode(site, index)
        return False

    deployment.wait_until(active, f"{site} to be active again", 180, interval=0.5)


def _crash_and_restart(deployment: LoopbackDeployment, done: threading.Event, crashed: list) -> None:
    for server_round, (index, stage, how) in sorted(CRASHES.items()):
        site = SITES[index]
        def left(site=site, server_round=server_round, stage=stage) -> bool:
            return done.is_set() or _reply_has_left(deployment, site, server_round, stage)

        deployment.wait_until(left, f"{site}'s {stage} reply of round {server_round}", 900, interval=0.05)
        if done.is_set():
            return
        if how == "SIGKILL":
            deployment.crash(f"supernode-{site}")
        else:  # a restarted service: Flower's SuperNode deactivates its node on the way out
            deployment.stop(f"supernode-{site}")
        _restart(deployment, site, index, done)
        crashed.append((server_round, site, stage, how))


@pytest.fixture(scope="module")
def crashed_study(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    deployment = LoopbackDeployment(work, SITES, capture=True)
    # site 0's link: every chunk delayed. (Refused or cut connections make Flower 1.42's SuperNode exit on the TLS
    # handshake error, whatever --max-retries says; a restart policy brings it back: see README, Faults.)
    proxy = LossyProxy(target_port=deployment.port, drop_rate=0.0, delay=(0.02, 0.1), lifetime=(1e6, 1e6)).start()
    done, crashed = threading.Event(), []
    try:
        deployment.start_federation(superlink_ports={SITES[0]: proxy.port})
        killer = threading.Thread(target=_crash_and_restart, args=(deployment, done, crashed))
        killer.start()
        try:
            _, status = deployment.run({"num-sites": len(SITES), "num-server-rounds": 2, "local-epochs": 1,
                                        "secagg-dropout-rate": 0.25,  # t = 3 of 4: one site may drop
                                        "output-dir": str(work / "runs"), "run-name": "crashes",
                                        "identity-ca": str(deployment.study.ca_cert)})
        finally:
            done.set()
            killer.join()
        yield deployment, status, crashed, proxy.counts
    finally:
        deployment.stop()
        proxy.stop()
        assert not deployment.leftover_processes()


def test_each_round_finishes_from_the_survivors_and_says_who_dropped_where(crashed_study):
    deployment, status, crashed, _ = crashed_study
    assert [c[0] for c in crashed] == [1, 2], "a crash was not staged"
    assert status == "finished:completed", deployment.log("superlink")[-3000:]
    run_dir = deployment.work / "runs" / "crashes"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "complete"
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    for server_round, (index, _, _) in CRASHES.items():
        row = rounds[server_round]
        assert not row["secagg-aborted"] and row["updates-aggregated"] >= len(SITES) - 1, row
        dropped = {site for sites in row["secagg-dropped"].values() for site in sites}
        assert dropped == {index}, row["secagg-dropped"]  # the crashed site, and only it
    # the restarted sites evaluate the final model like the others
    assert set(rounds[-1]["site-accuracy"]) == {str(k) for k in range(len(SITES))}


def test_a_restarted_site_continues_its_ledger_and_accountant_and_passes_its_audit(crashed_study):
    deployment, _, _, _ = crashed_study
    for index, site in enumerate(SITES):
        state = deployment.work / "state" / site
        ledger = PrivacyLedger(state / "ledger.sqlite", create=False)
        spends = ledger.spends()
        rounds = [e.round for e in spends]
        assert ledger.verify().ok and rounds == sorted(set(rounds))  # no round spent twice
        if index == 3:  # killed after its round-1 update left: that spend is on record, then round 2 after restart
            assert rounds == [1, 2]
            first, second = spends
            assert second.steps_total == first.steps_total + second.steps_round  # the accountant went on
            assert second.epsilon > first.epsilon
        if index == 1:  # killed before training in round 2: nothing spent there
            assert rounds == [1]
        done = carefed("audit", str(state), "--site", "--json", cwd=deployment.work)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_a_site_behind_a_slow_link_keeps_training(crashed_study):
    """Site 0 reached the SuperLink through a proxy that delayed every chunk by 20-100 ms: it trained every
    round."""
    deployment, _, _, link = crashed_study
    assert link["accepted"] > 0, link
    rounds = json.loads((deployment.work / "runs" / "crashes" / "metrics.json").read_text())["rounds"]
    assert all(0 in row["sites-trained"] for row in rounds[1:]), [row["sites-trained"] for row in rounds]
