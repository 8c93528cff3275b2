"""Before a round, the coordinator waits (a bounded time) for sites that are offline: the bookkeeping of that wait,
on a stand-in for the grid's list of online nodes (the deployed fault study, test_deployment_faults.py, runs the
real wait between a crash and the next round)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.secagg.client import Advertisement
from common.secagg.protocol import ProtocolConfig
from server import training
from server.secagg_round import Advertised
from server.training import FederatedTraining


class _Grid:
    """Online nodes as the SuperLink would list them, one list per call (the last one repeats)."""

    def __init__(self, *answers: set[int]) -> None:
        self.answers, self.calls = list(answers), 0

    def get_node_ids(self) -> set[int]:
        self.calls += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


@pytest.fixture
def clock(monkeypatch):
    """Time passes only by the wait's own sleeps."""
    now = [0.0]
    monkeypatch.setattr(training.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(training.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    return now


def _run(grid: _Grid, advertised: Advertised | None = None) -> SimpleNamespace:
    return SimpleNamespace(grid=grid, gone=set(), advertised=advertised)


def test_a_restarting_site_is_waited_for_until_it_is_back(clock):
    run = _run(_Grid({1, 2}, {1, 2}, {1, 2, 3}))
    FederatedTraining._wait_for_rejoin(run, [1, 2, 3])
    assert clock[0] == 0.5 and run.gone == set()  # one half-second poll, then site 3 was back


def test_a_site_gone_for_good_costs_one_wait_not_one_a_round(clock):
    run = _run(_Grid({1, 2}))
    FederatedTraining._wait_for_rejoin(run, [1, 2, 3])
    assert clock[0] > training.REJOIN_SECONDS and run.gone == {3}
    waited = clock[0]
    FederatedTraining._wait_for_rejoin(run, [1, 2, 3])  # the next round starts at once
    assert clock[0] == waited and run.gone == {3}
    run.grid = _Grid({1, 2, 3})  # seen online again: forgiven, and waited for after its next outage
    FederatedTraining._wait_for_rejoin(run, [1, 2, 3])
    assert run.gone == set()


def test_a_site_seen_offline_loses_the_advertisement_it_sent_with_the_last_unmask_reply(clock):
    advertised = Advertised(ProtocolConfig(server_round=2, vector_length=4))
    for node in (1, 2):
        advertised.ads[node] = Advertisement(node, b"c", b"s", b"", b"")
    advertised.declined[3] = ("refused", "budget")
    run = _run(_Grid({1}, {1, 2, 3}), advertised)
    FederatedTraining._wait_for_rejoin(run, [1, 2, 3])
    assert set(advertised.ads) == {1} and not advertised.declined  # 2 and 3 restarted: their keys are gone
