"""The next round's keys ride on this round's unmask request: one exchange fewer a round, and nothing a dishonest
coordinator can use to get a request past a site's gate or protocol checks.

Deployed-style sites (tests.deployed_grid: the real ClientApp with every mod, its own files, state folder and
policy) behind a coordinator that runs the real SecAggRound for two rounds and may rewrite what it sends.
"""

from __future__ import annotations

import pytest
from flwr.app import Message

from common import messages
from common.models import build_model, count_parameters
from server.secagg_round import NextRound, SecAggRound, protocol_config
from server.training import request_content
from tests.deployed_grid import FIRST_NODE
from tests.integration.test_gate_attacks import (
    STRICT,
    EvilGrid,
    _config,
    _copy,
    _ledger,
    _model_arrays,
    _refusals,
    _sites,
    _stage,
)

pytestmark = pytest.mark.usefixtures("flower_task_identity")
NUM_PARAMETERS = count_parameters(build_model("cnn", in_channels=1, num_classes=10, image_size=28))


def _two_rounds(data_root, tmp_path, tamper=lambda msg: [msg], *, sites=None, cohorts=None, second=None):
    """Two rounds of the real SecAggRound (identities off, as in the gate attacks), the second using the
    advertisements sent with the first round's unmask exchange. `cohorts`: each round's cohort (every site by
    default). Returns the grid, the sites, both outcomes and every (round, stage) the coordinator sent to the
    first site."""
    sites = sites or _sites(data_root, tmp_path, STRICT)
    cohorts = cohorts or (list(sites), list(sites))
    sent = []

    def watch(msg: Message) -> list[Message]:
        if msg.metadata.dst_node_id == FIRST_NODE:
            sent.append((msg.metadata.group_id, _stage(msg)))
        return tamper(msg)

    grid, config = EvilGrid(sites, watch), _config(tmp_path, **{"num-sites": len(sites)})
    configs = (config, _config(tmp_path, **{"num-sites": len(sites), **(second or {})}))
    plan = NextRound(cohorts[1], protocol_config(configs[1], 2, NUM_PARAMETERS))
    outcomes, advertised = [], None
    for server_round, cohort, round_config in zip((1, 2), cohorts, configs, strict=True):
        content = request_content(round_config.site_request(num_classes=10, channels=1, image_size=28),
                                  server_round, _model_arrays())
        outcome = SecAggRound(grid, round_config, server_round, content, NUM_PARAMETERS, lambda node, reply: None,
                              advertised=advertised,
                              next_round=(lambda refused: plan) if server_round == 1 else None).run(cohort)
        outcomes.append(outcome)
        advertised = outcome.advertised
    return grid, sites, outcomes, sent


def _first_sites_unmask_reply(grid: EvilGrid) -> Message:
    [reply] = [r for r in grid.replies if r.metadata.src_node_id == FIRST_NODE and r.metadata.group_id == "1"
               and messages.SECAGG in r.content and "b-owners" in r.content[messages.SECAGG]]
    return reply


def test_the_second_round_starts_at_key_sharing_with_the_keys_sent_at_the_first_rounds_unmask(data_root, tmp_path):
    _, sites, (first, second), sent = _two_rounds(data_root, tmp_path)
    assert first.total.contributors == second.total.contributors == len(sites), (first.dropped, second.dropped)
    assert set(first.advertised.ads) == set(sites)
    assert (first.exchanges, second.exchanges) == (4, 3)
    assert sent == [("1", "advertise-keys"), ("1", "share-keys"), ("1", "masked-input"), ("1", "unmask"),
                    ("2", "share-keys"), ("2", "masked-input"), ("2", "unmask")]
    assert [e.round for e in _ledger(sites).spends()] == [1, 2]


def test_a_site_sampled_for_the_next_round_only_is_asked_for_its_keys_in_this_rounds_unmask_exchange(data_root,
                                                                                                       tmp_path):
    """Sampled cohorts: round 2 drops the first site and adds a fourth. The fourth gets round 2's advertise
    request on its own, in round 1's unmask exchange; the sites in both rounds get it riding on their unmask
    request; the first site gets none. Round 2 then starts at key sharing."""
    sites = _sites(data_root, tmp_path, STRICT)
    fourth = FIRST_NODE + 3
    sites[fourth] = {**sites[FIRST_NODE + 2], "site-id": 3, "state-dir": str(tmp_path / "state" / "site-3")}
    cohorts = ([FIRST_NODE, FIRST_NODE + 1, FIRST_NODE + 2], [FIRST_NODE + 1, FIRST_NODE + 2, fourth])
    grid, _, (first, second), sent = _two_rounds(data_root, tmp_path, sites=sites, cohorts=cohorts)
    assert first.total.contributors == second.total.contributors == 3, (first.dropped, second.dropped)
    assert set(first.advertised.ads) == set(cohorts[1]) and first.advertised.cohort == cohorts[1]
    assert (first.exchanges, second.exchanges) == (4, 3)
    assert sent == [("1", "advertise-keys"), ("1", "share-keys"), ("1", "masked-input"), ("1", "unmask")]
    asked_ahead = [r for r in grid.replies if r.metadata.src_node_id == fourth]
    assert [r.metadata.group_id for r in asked_ahead][:1] == ["2"]  # its first request: round 2's keys
    riding = [r for r in grid.replies if r.metadata.group_id == "1" and messages.SECAGG_NEXT in r.content]
    assert sorted(r.metadata.src_node_id for r in riding) == cohorts[1][:2]
    assert messages.SECAGG_NEXT not in _first_sites_unmask_reply(grid).content
    spends = {node - FIRST_NODE: [e.round for e in _ledger(sites, node).spends()] for node in sites}
    assert spends == {0: [1], 1: [1, 2], 2: [1, 2], 3: [2]}


def test_a_next_round_whose_protocol_this_rounds_sections_do_not_describe_advertises_in_its_own_exchange(
        data_root, tmp_path):
    """A next cohort of another size can get another graph and threshold (secagg_for_cohort): its advertise
    request, carrying this round's sections, would be refused by every site. It is not sent: no site refuses
    anything, and the next round asks for keys in an exchange of its own."""
    grid, sites, (first, second), sent = _two_rounds(data_root, tmp_path, second={"secagg-dropout-rate": 0.2})
    assert first.total.contributors == second.total.contributors == len(sites), (first.dropped, second.dropped)
    assert first.advertised.cohort == list(sites) and not first.advertised.ads and not first.advertised.declined
    assert (first.exchanges, second.exchanges) == (4, 4)
    assert sent[3:5] == [("1", "unmask"), ("2", "advertise-keys")]
    assert not any(messages.SECAGG_NEXT in r.content or messages.STATUS_NEXT in r.content for r in grid.replies)
    assert not any(_refusals(sites, node) for node in sites)
    assert [e.round for e in _ledger(sites).spends()] == [1, 2]


def _at_first_sites_unmask(change):
    def tamper(msg: Message) -> list[Message]:
        if _stage(msg) == messages.STAGE_UNMASK and msg.metadata.dst_node_id == FIRST_NODE \
                and messages.SECAGG_NEXT in msg.content:
            return [_copy(msg, **{messages.SECAGG_NEXT: change(dict(msg.content[messages.SECAGG_NEXT]))})]
        return [msg]

    return tamper


NEXT_ROUND_DEFECTS = {
    "this round again (a replayed advertise request)": (
        lambda r: {**r, "round": 1}, "not an advertise request for the round after this one"),
    "a round far ahead": (lambda r: {**r, "round": 7}, "not an advertise request for the round after this one"),
    "the round after this one, over this round's protocol (keys signed for this round)": (
        lambda r: {**r, "protocol-server_round": 1}, "'protocol-server_round' differs from the request's round"),
    "a share-keys request instead": (
        lambda r: {**r, "stage": messages.STAGE_SHARE_KEYS}, "not an advertise request for the round after this one"),
    "a protocol its section does not describe": (
        lambda r: {**r, "protocol-dropout_rate": 0.5}, "'protocol-dropout_rate' differs from the request's"),
    "a cohort below the site's minimum": (
        lambda r: {**r, "protocol-min_cohort": 2}, "'protocol-min_cohort' differs from the request's"),
}


@pytest.mark.parametrize("defect", list(NEXT_ROUND_DEFECTS))
def test_a_bad_next_round_request_is_refused_by_name_and_this_rounds_unmask_still_answered(defect, data_root,
                                                                                           tmp_path):
    change, reason = NEXT_ROUND_DEFECTS[defect]
    grid, sites, (first, second), _ = _two_rounds(data_root, tmp_path, _at_first_sites_unmask(change))
    reply = _first_sites_unmask_reply(grid)
    assert messages.SECAGG_NEXT not in reply.content  # no keys made for it
    status = dict(reply.content[messages.STATUS_NEXT])
    assert status["state"] == messages.STATE_REFUSED and reason in status["reason"], status
    assert first.total.contributors == len(sites) and not first.aborted  # this round's shares were revealed
    assert reason in _refusals(sites)[-1].reason  # on the site's own record
    # the coordinator may not use the refused site in the next round, and does not ask it again
    assert FIRST_NODE not in first.advertised.ads and FIRST_NODE in second.refused
    assert second.dropped["advertise-keys-refused"] == [FIRST_NODE]
    assert [e.round for e in _ledger(sites).spends()] == [1]


@pytest.mark.parametrize("stage", [messages.STAGE_SHARE_KEYS, messages.STAGE_MASKED_INPUT])
def test_a_next_round_request_on_any_other_stage_is_refused_whole(stage, data_root, tmp_path):
    """Riding on share keys or masked input, it would make the site answer two stages at once: refused, by name,
    before anything of that stage is computed (at masked input: nothing trained, nothing spent)."""
    def tamper(msg: Message) -> list[Message]:
        if _stage(msg) == stage and msg.metadata.dst_node_id == FIRST_NODE:
            return [_copy(msg, **{messages.SECAGG_NEXT: {"stage": messages.STAGE_ADVERTISE, "round": 2}})]
        return [msg]

    grid, sites, (first, _), _ = _two_rounds(data_root, tmp_path, tamper)
    [reply] = [r for r in grid.replies if r.metadata.src_node_id == FIRST_NODE and r.metadata.group_id == "1"
               and messages.STATUS in r.content and r.content[messages.STATUS]["state"] == messages.STATE_REFUSED]
    assert "rides only on an unmask request" in reply.content[messages.STATUS]["reason"]
    assert set(reply.content.keys()) == {messages.STATUS}
    assert "rides only on an unmask request" in _refusals(sites)[-1].reason  # on the site's own record
    # the first site refused before training: nothing spent for round 1, and (at masked input) no masked update
    # the same ledger holds the refusal (asserted above): a round-1 spend, had the site trained, would be here
    assert 1 not in [e.round for e in _ledger(sites).spends()]
    if stage == messages.STAGE_MASKED_INPUT:
        sent = [r for r in grid.replies if r.metadata.src_node_id == FIRST_NODE and not r.has_error()]
        assert sent and not any(messages.MASKED_UPDATE in r.content for r in sent)
    assert first.advertised is None or FIRST_NODE not in first.advertised.ads
