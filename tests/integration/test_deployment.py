"""A real deployment on 127.0.0.1: `flower-superlink` with TLS and node authentication, three `carefed-supernode`
processes (Flower's SuperNode with CareFed's SuperExec) with their own image folders, keys and state, the app
started with `flwr run`. No mocks.

The SuperNodes run under tests/capture_supernode.py, which records every request each one sends to the SuperLink
(protobuf bytes before TLS), so the tests can show what left each site.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from flwr.proto.message_pb2 import PushObjectRequest
from flwr.supercore.inflatable.inflatable_object import (
    _get_object_body,
    get_object_type_from_object_content,
)
from PIL import Image

from common.config import resolve
from common.data.site import global_model
from common.deploy.certs import StudyPaths, make_study
from common.models import count_parameters
from common.privacy import pld_epsilon
from common.privacy.ledger import KIND_REFUSAL, PrivacyLedger
from simulations.loopback import LoopbackDeployment
from tests.capture_supernode import read_capture
from tests.conftest import carefed

pytestmark = pytest.mark.slow
SITES = ["site-0", "site-1", "site-2"]
ROUNDS = 2
FLEET_PATHS = {"/v1/fleet/register-node", "/v1/fleet/activate-node", "/v1/fleet/deactivate-node",
               "/v1/fleet/send-node-heartbeat", "/v1/fleet/pull-messages", "/v1/fleet/push-messages",
               "/v1/fleet/get-run", "/v1/fleet/get-fab", "/v1/fleet/push-object", "/v1/fleet/pull-object",
               "/v1/fleet/confirm-message-received", "/v1/fleet/unregister-node"}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    work = tmp_path_factory.mktemp("loopback")
    deployment = LoopbackDeployment(work, SITES, capture=True)
    try:
        deployment.write_policies(studies=("carefed-demo", "carefed-demo-2"))  # each hospital's own file
        deployment.start_federation()
        run_id, status = deployment.run({"num-sites": len(SITES), "num-server-rounds": ROUNDS,
                                         "output-dir": str(work / "runs"), "run-name": "deployed",
                                         "identity-ca": str(deployment.study.ca_cert)})
        yield deployment, status
    finally:
        deployment.stop()


def test_three_hospitals_train_over_tls_with_node_authentication(deployed):
    deployment, status = deployed
    assert status == "finished:completed", deployment.log("superlink")[-3000:]
    run_dir = deployment.work / "runs" / "deployed"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "complete"
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    assert all(r["updates-aggregated"] == len(SITES) and r["secure-aggregation"] for r in rounds[1:])
    # five exchanges in round 1; then the keys come with the previous round's unmask reply
    assert [r["exchanges"] for r in rounds[1:]] == [5] + [4] * (ROUNDS - 1)
    assert rounds[-1]["global-accuracy"] > 0.3
    for index, site in enumerate(SITES):
        state = deployment.work / "state" / site  # the site's own folder, not the coordinator's
        ledger = PrivacyLedger(state / "ledger.sqlite", create=False)
        entries = ledger.entries(site=index)
        assert [e.round for e in entries] == list(range(1, ROUNDS + 1)) and ledger.verify().ok
        assert entries[-1].epsilon <= entries[-1].budget
        egress = [json.loads(line) for line in (state / "egress.jsonl").read_text().splitlines()]
        assert egress and all(line["verdict"] == "sent" for line in egress)
        assert {line["stage"] for line in egress if line["message-type"] == "train"} == {
            "advertise-keys", "share-keys", "masked-input", "consistency-check", "unmask"}  # identities are on


def _sent(deployment: LoopbackDeployment, site: str) -> list[tuple[str, bytes]]:
    return read_capture(str(deployment.work / "capture" / f"{site}.bin"))


def _image_windows(folder: Path, width: int = 24) -> set[bytes]:
    """High-entropy windows of every image's raw pixel bytes and of its float32 [-1, 1] tensor."""
    windows = set()
    for path in sorted(folder.rglob("*.png")):
        pixels = np.asarray(Image.open(path).convert("L"), dtype=np.uint8).ravel()
        for raw in (pixels.tobytes(), ((pixels.astype(np.float32) / 255.0 - 0.5) / 0.5).tobytes()):
            for start in range(0, len(raw) - width, width // 2):
                window = raw[start:start + width]
                if len(set(window)) >= width // 2:
                    windows.add(window)
    return windows


def test_raw_images_never_leave_a_site(deployed):
    deployment, _ = deployed
    model_size = count_parameters(global_model(resolve()))  # the default study's model, which the run trains
    for site in SITES:
        requests = _sent(deployment, site)
        assert {path for path, _ in requests} <= FLEET_PATHS
        arrays = []
        for path, body in requests:
            if path != "/v1/fleet/push-object":
                continue
            content = PushObjectRequest.FromString(body).object_content
            if get_object_type_from_object_content(content) == "Array":
                arrays.append(json.loads(_get_object_body(content).decode()))
        # Only the masked update leaves, once per round: uint32, the model's size + 2 (count, clip flag).
        assert [(a["dtype"], tuple(a["shape"])) for a in arrays] == [("uint32", (model_size + 2,))] * ROUNDS
        payload = b"".join(body for _, body in requests)
        windows = _image_windows(deployment.work / "data" / site)
        assert len(windows) > 1000  # the search is meaningful: many distinct fragments of the site's images
        leaked = [w for w in windows if w in payload]
        assert not leaked, f"{len(leaked)} image fragments of {site} found in what it sent"


def test_an_unknown_key_and_a_plaintext_client_are_refused(deployed, tmp_path: Path):
    deployment, _ = deployed
    make_study(deployment.study.root, sites=[*SITES, "rogue"], hosts=["localhost"])  # a key nobody registered
    deployment.start_supernode("rogue", 9)
    deployment.start_supernode(SITES[0], 8, insecure=True, name="plaintext")
    deployment.wait_until(lambda: "Failed to activate SuperNode" in deployment.log("supernode-rogue")
                          and "could not establish a connection" in deployment.log("supernode-plaintext"),
                          "both SuperNodes to be refused", 60, interval=0.2)
    assert "Failed to activate SuperNode" in deployment.log("supernode-rogue")
    assert "Attempted to register SuperNode with public key" in deployment.log("superlink")
    assert "could not establish a connection to the SuperLink" in deployment.log("supernode-plaintext")
    assert deployment.online_nodes() == len(SITES)
    assert not (deployment.work / "state" / "rogue").exists()


def _site_audits(deployment: LoopbackDeployment) -> dict[str, tuple[int, dict]]:
    """`carefed audit --site` of every hospital's state folder, side by side (each is a process of its own)."""
    def audit(site: str) -> tuple[int, dict]:
        done = carefed("audit", str(deployment.work / "state" / site), "--site", "--json", cwd=deployment.work)
        return done.returncode, json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}

    with ThreadPoolExecutor(len(SITES)) as pool:
        return dict(zip(SITES, pool.map(audit, SITES), strict=True))


def test_a_coordinator_asking_beyond_a_sites_policy_is_refused_and_it_is_on_record(deployed):
    deployment, _ = deployed
    _, status = deployment.run({"num-sites": len(SITES), "num-server-rounds": 1, "target-epsilon": 12.0,
                                "output-dir": str(deployment.work / "runs"), "run-name": "greedy"})
    assert status == "finished:completed", deployment.log("superlink")[-3000:]
    rounds = json.loads((deployment.work / "runs" / "greedy" / "metrics.json").read_text())["rounds"]
    assert rounds[1]["updates-aggregated"] == 0 and len(rounds[1]["sites-refused"]) == len(SITES)
    audits = _site_audits(deployment)
    for site in SITES:
        state = deployment.work / "state" / site
        ledger = PrivacyLedger(state / "ledger.sqlite", create=False)
        assert [e.run_id for e in ledger.spends()] == ["deployed"] * ROUNDS  # nothing spent for the greedy run
        refusal = [e for e in ledger.entries() if e.kind == KIND_REFUSAL and e.run_id == "greedy"]
        assert refusal and "policy refuses target-epsilon: asked 12.0" in refusal[0].reason
        egress = [json.loads(line) for line in (state / "egress.jsonl").read_text().splitlines()]
        assert any(line["status"] and "policy refuses target-epsilon" in line["status"]["reason"] for line in egress)
        code, report = audits[site]
        assert code == 0 and any(r["run_id"] == "greedy" for r in report["refusals"])


FOREIGN_APP = Path(__file__).parents[1] / "apps" / "foreign_app"


def test_a_coordinators_own_app_never_runs_at_a_site(deployed):
    """`flwr run` ships the coordinator's app (a FAB) to every SuperNode, and Flower's would install it and run its
    ClientApp, which here would mark the site's state folder and send back its image file names. The sites run
    `carefed-supernode`: their own CareFed answers, and refuses the foreign request by name."""
    deployment, _ = deployed
    report = deployment.work / "foreign-app.json"
    _, status = deployment.run({"report": str(report)}, app=FOREIGN_APP, timeout=300)
    assert status == "finished:completed", deployment.log("superlink")[-3000:]
    outcome = json.loads(report.read_text())
    assert outcome["nodes"] == len(SITES) and len(outcome["replies"]) == len(SITES)
    for reply in outcome["replies"]:
        assert reply["error"] is None and "refused" in reply["content"] and "no 'study' section" in reply["content"]
        assert "foreign-app-ran" not in reply["content"] and ".png" not in reply["content"]
    for site in SITES:
        assert not (deployment.work / "state" / site / "foreign-app-ran").exists()
        assert not list((deployment.work / "homes" / f"supernode-{site}").rglob("foreign*"))  # nothing installed
        assert "the coordinator's app coordinator/foreign-app 1.0.0" in deployment.log(f"supernode-{site}")
        egress = [json.loads(line) for line in (deployment.work / "state" / site / "egress.jsonl").read_text()
                  .splitlines()]
        assert egress[-1]["status"]["state"] == "refused" and "no 'study' section" in egress[-1]["status"]["reason"]


@pytest.fixture(scope="module")
def second_study_enrolled(deployed):
    """The three hospitals enrolled in a second study, its identities beside the first's (one folder per id)."""
    deployment, _ = deployed
    make_study(deployment.work / "study-2", sites=SITES, hosts=["localhost"], study="carefed-demo-2")
    for site in SITES:
        (deployment.work / "study-2" / "sites" / site).rename(deployment.study.site(site) / "carefed-demo-2")
    return deployment, {"output-dir": str(deployment.work / "runs"), "study-id": "carefed-demo-2",
                        "target-epsilon": 1.0}


@pytest.fixture(scope="module")
def restarted_superlink(second_study_enrolled):
    """A three-round run of the second study; once round 1 is recorded the SuperLink is SIGKILLed (every process
    in its group) and started again at once on the same --database, as a crashed service would be. A SuperNode
    that gives up retrying is started again (a restart policy); the next runs wait until each site has reconnected
    or been readmitted (the restarted SuperLink's database may still count a node online that has given up). The
    runs in `second_study` follow."""
    deployment, study = second_study_enrolled
    run_id = deployment.start_run({**study, "num-sites": len(SITES), "num-server-rounds": 3,
                                   "run-name": "superlink-restarted",
                                   "identity-ca": str(StudyPaths(deployment.work / "study-2").ca_cert)})
    metrics = deployment.work / "runs" / "superlink-restarted" / "metrics.json"
    deployment.wait_until(lambda: metrics.exists() and len(json.loads(metrics.read_text())["rounds"]) > 1,
                          "round 1 of the run", 600, interval=0.2)
    logged = {site: len(deployment.log(f"supernode-{site}")) for site in SITES}
    deployment.crash("superlink")
    deployment.start_superlink()
    status = deployment.wait_finished(run_id, timeout=300)
    for index, site in enumerate(SITES):  # each reconnects, or gives up, exits and is started again
        deployment.restart_supernode(site, index, given_up=False, log_from=logged[site])
    deployment.wait_online(len(SITES))
    return deployment, status


@pytest.fixture(scope="module")
def second_study(second_study_enrolled, restarted_superlink):
    """An impostor with a registered node key (it passes Flower's node authentication) but an identity from
    another CA (an invented site), and two one-round runs of the second study, after the SuperLink's restart:
    the coordinator without the study CA (it relays the impostor) and with it (it drops the impostor and the
    hospitals train). One set of runs serves both tests."""
    deployment, study = second_study_enrolled
    make_study(deployment.study.root, sites=[*SITES, "impostor"], hosts=["localhost"])
    deployment.register("impostor")
    # the second study's id in its certificate, but another CA
    make_study(deployment.work / "other-ca", sites=["impostor"], hosts=["localhost"], study="carefed-demo-2")
    impostor = deployment.study.site("impostor")
    deployment.start_supernode("site-0", 7, key=impostor / "node.key", ca=impostor / "ca.crt", name="impostor",
                               identity=deployment.work / "other-ca" / "sites" / "impostor")
    deployment.wait_online(len(SITES) + 1)
    common = {**study, "num-sites": len(SITES) + 1, "num-server-rounds": 1}
    _, relayed = deployment.run({**common, "run-name": "impostor-relayed"})
    _, dropped = deployment.run({**common, "run-name": "impostor-dropped",
                                 "identity-ca": str(StudyPaths(deployment.work / "study-2").ca_cert)})
    return deployment, relayed, dropped


def _egress(deployment: LoopbackDeployment, site: str, run: str) -> list[dict]:
    lines = (deployment.work / "state" / site / "egress.jsonl").read_text().splitlines()
    return [line for line in map(json.loads, lines) if line["run"] == run]


def test_a_superlink_restarted_mid_run_fails_the_run_by_name_and_the_next_runs_train(restarted_superlink,
                                                                                   second_study):
    deployment, status = restarted_superlink
    assert status == "finished:failed"
    run_dir = deployment.work / "runs" / "superlink-restarted"
    stopped = json.loads((run_dir / "status.json").read_text())
    assert stopped["state"] == "failed" and stopped["reason"].startswith("the SuperLink stopped during the run")
    recorded = [r["round"] for r in json.loads((run_dir / "metrics.json").read_text())["rounds"]]
    assert recorded[:2] == [0, 1]
    for site in SITES:
        # a site is charged for exactly the rounds whose update passed its egress guard: none lost, none extra
        ledger = PrivacyLedger(deployment.work / "state" / site / "ledger.sqlite", create=False)
        spent = [e.round for e in ledger.spends() if e.run_id == "superlink-restarted"]
        released = [int(line["round"]) for line in _egress(deployment, site, "superlink-restarted")
                    if line["stage"] == "masked-input" and line["verdict"] == "sent"
                    and (line["status"] or {}).get("state") == "trained"]
        assert ledger.verify().ok and 1 in spent and spent == released, (spent, released)
    _, _, after = second_study  # a new run trains on the restarted SuperLink
    assert after == "finished:completed", deployment.log("superlink")[-3000:]


@pytest.mark.long
def test_two_studies_at_one_site_compose_into_one_lifetime_epsilon(second_study):
    deployment, _, status = second_study
    assert status == "finished:completed", deployment.log("superlink")[-3000:]
    audits = _site_audits(deployment)
    for site in SITES:
        ledger = PrivacyLedger(deployment.work / "state" / site / "ledger.sqlite", create=False)
        spends = ledger.spends()  # the relayed run refused before any key: it spent nothing
        studies = [e.study for e in spends]
        assert studies[:ROUNDS] == ["carefed-demo"] * ROUNDS and set(studies[ROUNDS:]) == {"carefed-demo-2"}
        runs = {e.run_id: e for e in spends}  # each run's last entry carries that run's whole history
        assert list(runs) == ["deployed", "superlink-restarted", "impostor-dropped"]
        history = tuple(h for e in runs.values() for h in e.history)  # every run, composed
        independent = pld_epsilon(list(history), spends[-1].lifetime_delta)
        assert spends[-1].lifetime_epsilon == pytest.approx(independent, rel=0.01)
        epsilons = [e.epsilon for e in runs.values()]
        assert max(epsilons) < spends[-1].lifetime_epsilon < sum(epsilons)  # composed by one accountant, not summed
        code, report = audits[site]
        assert code == 0, report.get("problems")
        [lifetime] = report["lifetime"]
        assert set(lifetime["studies"]) == {"carefed-demo", "carefed-demo-2"}
        assert lifetime["lifetime_epsilon_recomputed"] == pytest.approx(independent, rel=1e-6)


def test_a_site_enrolled_by_another_ca_is_refused_by_its_peers_and_dropped_by_the_coordinator(second_study):
    """Without the study CA, the coordinator relays the impostor and every honest site refuses the round by name
    before sending a share; with the CA, the coordinator drops it and the three hospitals train."""
    deployment, _, _ = second_study
    relayed = json.loads((deployment.work / "runs" / "impostor-relayed" / "metrics.json").read_text())["rounds"][1]
    assert relayed["updates-aggregated"] == 0 and relayed["secagg-aborted"]
    assert len(relayed["secagg-dropped"]["share-keys-aborted"]) == len(SITES) + 1  # (it trusts no one either)
    for site in SITES:
        egress = [json.loads(line) for line in (deployment.work / "state" / site / "egress.jsonl").read_text()
                  .splitlines() if json.loads(line)["run"] == "impostor-relayed"]
        refusal = next(line for line in egress if line["stage"] == "share-keys")
        assert refusal["status"]["reason"].startswith("BAD_SIGNATURE")  # no share left the site
    dropped = json.loads((deployment.work / "runs" / "impostor-dropped" / "metrics.json").read_text())["rounds"][1]
    assert dropped["updates-aggregated"] == len(SITES) and not dropped["secagg-aborted"]
    assert len(dropped["secagg-dropped"]["advertise-keys-bad-identity"]) == 1


def test_every_process_is_shut_down(deployed):
    deployment, _ = deployed
    deployment.stop()
    assert deployment.leftover_processes() == []
    assert all(p.poll() is not None for p in deployment.processes.values())
