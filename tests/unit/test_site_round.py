"""A site's round through the real ClientApp handler with a real Flower Context (no engine)."""

import dataclasses

import pytest
from flwr.app import ArrayRecord, Context, MessageType, RecordDict

from client.policy_gate import admit
from client.site import PRIVACY_STATE, load_privacy, save_privacy, site_ledger, train_site
from common import messages
from common.models import build_model
from server.training import request_content


def _content(config, server_round: int = 1) -> RecordDict:
    """A plain training request: these tests exercise the train handler, so the study runs without secure
    aggregation (a site whose policy requires it refuses such a request: see test_evil_coordinator)."""
    config = config.replace(secagg=False)
    request = config.site_request(num_classes=10, channels=1, image_size=28)
    model = ArrayRecord(build_model(config.model, in_channels=1, num_classes=10, image_size=28).state_dict())
    return request_content(request, server_round, model, simulation=config)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 4}, state=RecordDict(),
                   run_config={})


def test_a_site_over_its_budget_refuses_and_sends_no_update(make_config):
    config = make_config(num_sites=4, num_server_rounds=3, privacy_planned_rounds=1)
    context = _context()
    first = train_site(_content(config, 1), context)
    assert first[messages.STATUS]["state"] == messages.STATE_TRAINED
    assert first[messages.PRIVACY_REPORT]["next-round-affordable"] == 0
    spent = first[messages.PRIVACY_REPORT]["epsilon"]

    second = train_site(_content(config, 2), context)
    assert second[messages.STATUS]["state"] == messages.STATE_REFUSED
    assert "PolicyRefusal: policy refuses num-server-rounds" in second[messages.STATUS]["reason"]
    assert messages.UPDATE not in second
    assert second[messages.PRIVACY_REPORT]["epsilon"] == spent  # nothing more was spent
    ledger = site_ledger(admit(MessageType.TRAIN, _content(config, 2), context))
    assert load_privacy(context, ledger, "carefed-demo/test-run", 1, "test-run").steps_total == \
        first[messages.PRIVACY_REPORT]["steps-total"]


def test_the_ledger_not_the_flower_context_holds_a_runs_privacy_state(make_config):
    config = make_config(num_sites=4, num_server_rounds=2)
    context = _context()
    train_site(_content(config, 1), context)
    assert PRIVACY_STATE in context.state  # the calibration is cached for this run only
    ledger = site_ledger(admit(MessageType.TRAIN, _content(config, 2), context))
    privacy = load_privacy(context, ledger, "carefed-demo/test-run", 1, "test-run")
    stale = dataclasses.replace(privacy, history=[])  # a context from before the first round, or another run
    save_privacy(context, stale, "carefed-demo/test-run")
    assert load_privacy(context, ledger, "carefed-demo/test-run", 1, "test-run") == privacy  # the ledger wins
    report = train_site(_content(config, 2), context)[messages.PRIVACY_REPORT]
    assert report["steps-total"] == 2 * report["steps-round"]


def test_a_replayed_round_and_a_changed_recipe_are_refused_by_name_and_recorded(make_config):
    config = make_config(num_sites=4, num_server_rounds=3)
    context = _context()
    train_site(_content(config, 1), context)
    again = train_site(_content(config, 1), context)[messages.STATUS]
    assert again["state"] == messages.STATE_REFUSED and "policy refuses round: asked 1" in again["reason"]
    changed = train_site(_content(config.replace(batch_size=16), 2), context)[messages.STATUS]
    assert changed["state"] == messages.STATE_REFUSED and "policy refuses batch-size" in changed["reason"]
    ledger = site_ledger(admit(MessageType.TRAIN, _content(config, 2), context))
    assert [e.kind for e in ledger.entries()] == ["round", "refusal", "refusal"] and ledger.verify().ok


def test_updates_are_clipped_to_the_declared_bound_and_flagged(make_config):
    config = make_config(num_sites=4, num_server_rounds=1, update_clip_norm=0.5, dp=False)
    reply = train_site(_content(config), _context())
    delta = reply[messages.UPDATE]
    norm = sum(float((arr.numpy().astype("float64") ** 2).sum()) for arr in delta.values()) ** 0.5
    assert abs(norm - 0.5) < 1e-4
    assert reply[messages.TRAIN_METRICS]["update-clipped"] == 1
    assert "train-loss" not in reply[messages.TRAIN_METRICS]


def test_a_restarted_site_continues_its_accountant_and_chain_from_its_ledger(make_config, tmp_path):
    config = make_config(num_sites=4, num_server_rounds=3, run_name="restart")
    before = _context()
    first = train_site(_content(config, 1), before)[messages.PRIVACY_REPORT]

    after_crash = _context()  # a new process: empty Context.state, same state folder on disk
    second = train_site(_content(config, 2), after_crash)[messages.PRIVACY_REPORT]
    assert second["steps-total"] == first["steps-total"] + first["steps-round"]
    assert second["epsilon"] > first["epsilon"]
    ledger = site_ledger(admit(MessageType.TRAIN, _content(config, 2), after_crash))
    entries = ledger.entries()
    assert [e.round for e in entries] == [1, 2] and ledger.verify().ok
    assert entries[1].prev_hash == entries[0].hash


def test_patient_level_dp_sgd_gives_patient_level_epsilon_directly(make_config):
    """Same budget, two units: image-level training leaves patients far less protected than patient-level."""
    from common.privacy.audit import audit_site

    reports = {}
    for unit in ("image", "patient"):
        config = make_config(num_sites=4, num_server_rounds=2, privacy_unit=unit, run_name=f"unit-{unit}",
                             target_epsilon=4.0)
        context = _context()
        for server_round in (1, 2):
            reply = train_site(_content(config, server_round), context)
            assert reply[messages.STATUS]["state"] == messages.STATE_TRAINED
        report = audit_site(site_ledger(admit(MessageType.TRAIN, _content(config, 2), context)).path)
        assert report.ok, report.problems
        reports[unit] = report.rows[-1]
    image, patient = reports["image"], reports["patient"]
    assert patient.unit == "patient" and image.unit == "image"
    assert patient.epsilon_logged <= 4.0 and patient.epsilon_patient == patient.epsilon_recomputed
    assert image.epsilon_logged <= 4.0
    assert image.epsilon_patient > 2 * patient.epsilon_patient  # record-level DP: the patient gets much less
    # batches hold as many patients as the images' batch holds patients' worth of images: same steps, same q
    assert patient.sample_rate == pytest.approx(image.sample_rate, rel=0.2)


def test_the_accountants_numbers_a_deployed_round_needs_are_ready_before_it_starts(make_config, tmp_path):
    """After a round's reply has left, a deployed site computes what its next round of the run will ask the
    accountants (client.site.warm_next_round, in a process of its own); the next round then computes nothing new:
    every number it needs is in the results file with the exact arguments it asks for."""
    import contextlib
    import sqlite3

    from client import after_reply
    from common.privacy import accountant, independent, memo

    for cached in (accountant.calibrate_noise_multiplier, accountant._prv_epsilon, independent._pld_epsilon):
        cached.cache_clear()  # a deployed task's process starts with nothing in memory (other tests ran here)
    store = tmp_path / "accountant.sqlite"
    memo.keep_in(store)
    try:
        after_reply.enable()
        config = make_config(num_sites=4, num_server_rounds=3)
        context = _context()
        assert train_site(_content(config, 1), context)[messages.STATUS]["state"] == messages.STATE_TRAINED
        worker = after_reply.run()
        assert worker is not None and _ended_well(worker)
        def count() -> int:
            with contextlib.closing(sqlite3.connect(store)) as connection:
                return connection.execute("SELECT COUNT(*) FROM results").fetchone()[0]

        warmed = count()
        second = train_site(_content(config, 2), context)
        assert second[messages.STATUS]["state"] == messages.STATE_TRAINED
        assert count() == warmed  # round 2 found every PRV and PLD epsilon it needed
        worker = after_reply.run()  # and it left its own job, for round 3
        assert worker is not None and _ended_well(worker) and count() > warmed
    finally:
        memo.keep_in(None)
        after_reply._jobs = None  # as in any process client.launcher did not fork


def _ended_well(pid: int, within: float = 120.0) -> bool:
    """The forked worker exited with code 0 within `within` seconds (it is killed otherwise: no hung suite)."""
    import os
    import signal
    import time

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False
