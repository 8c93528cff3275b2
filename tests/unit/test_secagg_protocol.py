"""The protocol: masks cancel exactly, dropouts at every stage, hostile servers refused, nothing leaks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.secagg.client import Advertisement, ClientSession, Stage
from common.secagg.encoding import FixedPoint
from common.secagg.errors import AbortReason, SecAggAbort
from common.secagg.protocol import (
    COMPLETE_GRAPH_UP_TO,
    ProtocolConfig,
    graph_for_cohort,
    neighbours,
    threshold,
)
from common.secagg.server import ServerSession
from tests.secagg_harness import MODEL_HASH, plain_sum, run_round

# -- correctness under dropouts (property-based) ---------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(2, 30), length=st.integers(1, 40), dropout_rate=st.sampled_from([0.0, 0.1, 0.3]))
def test_decoded_sum_is_the_survivors_sum_or_the_round_aborts(data, n: int, length: int, dropout_rate: float):
    config = ProtocolConfig(server_round=7, vector_length=length, dropout_rate=dropout_rate, min_cohort=2)
    ids = data.draw(st.lists(st.integers(1, 2**64 - 1), min_size=n, max_size=n, unique=True))
    bound = 2.5
    codec = FixedPoint.for_cohort(bound, n)
    values = {u: data.draw(st.lists(st.sampled_from([0.0, bound, -bound, 1.0, -0.37]), min_size=length,
                                    max_size=length)) for u in ids}
    inputs = {u: codec.encode(np.array(v)) for u, v in values.items()}
    stages = [data.draw(st.sets(st.sampled_from(ids), max_size=n), label=f"drop at stage {i}") for i in range(4)]

    # the oracle, computed independently of the server: who is left, and could every secret be recovered?
    u1 = set(ids) - stages[0]
    t = threshold(len(u1), dropout_rate, 0) if len(u1) >= 2 else None
    u2 = u1 - stages[1]
    u3 = u2 - stages[2]
    u4 = u3 - stages[3]
    feasible = t is not None and all(len(s) >= max(t, 2) for s in (u1, u2, u3, u4))
    try:
        total, _, _ = run_round(config, inputs, drop_before_advertise=stages[0], drop_before_shares=stages[1],
                                drop_before_masking=stages[2], drop_before_unmask=stages[3])
    except SecAggAbort as err:
        assert not feasible, f"aborted although every stage kept >= t clients: {err}"
        assert err.reason in {AbortReason.NOT_ENOUGH_SURVIVORS, AbortReason.TOO_FEW_CLIENTS}
        return
    assert feasible
    assert np.array_equal(total, plain_sum(inputs, u3))  # bit-exact in Z_2^32
    decoded = codec.decode_sum(total)
    expected = np.sum([values[u] for u in u3], axis=0)
    assert np.all(np.abs(decoded - expected) <= len(u3) * codec.resolution + 1e-9)


@pytest.mark.parametrize(("n", "degree", "drops"), [(20, 8, 0), (40, 10, 3), (60, 12, 4)])
def test_sparse_secagg_plus_graph_also_cancels(n: int, degree: int, drops: int):
    config = ProtocolConfig(server_round=1, vector_length=16, graph_degree=degree, dropout_rate=0.34)
    # The graph is drawn from the session's random id, so all `drops` may land in one neighbourhood: the round is
    # only guaranteed to finish while that still leaves t holders there (more is the abort tested elsewhere).
    assert drops <= degree + 1 - threshold(degree + 1, config.dropout_rate, config.colluding)
    inputs = {u: np.full(16, u, np.uint32) for u in range(1, n + 1)}
    dropped = list(range(1, n + 1, n // max(drops, 1)))[:drops]
    total, trace, clients = run_round(config, inputs, drop_before_masking=dropped)
    assert np.array_equal(total, plain_sum(inputs, trace.survivors))
    assert all(len(c.holders) == degree + 1 for c in clients.values())


def test_harary_graph_is_regular_and_symmetric():
    graph = neighbours(list(range(1, 51)), 6, b"session")
    assert all(len(peers) == 6 for peers in graph.values())
    assert all(u in graph[v] for u, peers in graph.items() for v in peers)


def test_threshold_rule_matches_the_design():
    assert threshold(100, 0.1, 10) == 90
    assert threshold(10, 0.1, 0) == 9
    assert threshold(10, 0.0, 0) == 10
    assert threshold(4, 0.5, 0) == 3  # majority wins over the dropout term
    with pytest.raises(SecAggAbort):
        threshold(4, 0.1, 5)


def test_small_cohorts_get_the_complete_graph_and_a_fixed_degree_is_kept():
    assert graph_for_cohort(COMPLETE_GRAPH_UP_TO, 0, 0.1) == (0, 0.1)
    assert graph_for_cohort(500, 8, 0.1) == (8, 0.1)
    assert graph_for_cohort(500, 0, 0.4) == (0, 0.4)  # no sparse graph tolerates that many dropouts cheaply


@pytest.mark.parametrize(("n", "dropout_rate"), [(60, 0.1), (100, 0.1), (100, 0.05), (400, 0.1)])
def test_the_default_sparse_graph_survives_the_studys_dropout_rate(n: int, dropout_rate: float):
    """Liveness of the chosen graph, checked against the protocol's own neighbour and threshold rules: with the
    study's rate of random dropouts, a round must almost never lose t holders in any neighbourhood."""
    degree, rate = graph_for_cohort(n, 0, dropout_rate)
    assert 2 * math.ceil(math.log2(n)) <= degree < n - 1 and degree % 2 == 0
    rng = np.random.default_rng(n)
    failures = 0
    for trial in range(300):
        graph = neighbours(list(range(1, n + 1)), degree, trial.to_bytes(32, "big"))
        alive = set(range(1, n + 1)) - set(rng.choice(np.arange(1, n + 1), math.ceil(dropout_rate * n), False))
        t = threshold(degree + 1, rate, 0)
        assert t > (degree + 1) // 2  # a majority of every neighbourhood
        failures += any(len((graph[u] | {u}) & alive) < t for u in graph)
    assert failures <= 3  # the chooser promises <= 1e-3 a round; 3 of 300 would be a 10x miss


# -- hostile servers: one refusal each -----------------------------------------------------------------------


def _clients_at_unmask(n: int = 5, drop: int | None = None):
    """A round run honestly up to the unmasking request; returns clients, the server and its honest request."""
    config = ProtocolConfig(server_round=3, vector_length=8, dropout_rate=0.4)
    ids = list(range(11, 11 + n))
    clients = {u: ClientSession(u, config) for u in ids}
    server = ServerSession(config, MODEL_HASH)
    relay = server.receive_advertisements({u: c.advertise_keys() for u, c in clients.items()})
    requests = server.receive_shares({u: c.share_keys(relay, MODEL_HASH) for u, c in clients.items()})
    masked = {u: clients[u].masked_input(r.ciphertexts, r.alive, np.zeros(8, np.uint32))
              for u, r in requests.items() if u != drop}
    request = server.receive_masked_inputs(masked)
    return clients, server, request


def _abort_reason(call) -> AbortReason:
    with pytest.raises(SecAggAbort) as info:
        call()
    return info.value.reason


def test_unmask_request_listing_a_client_as_alive_and_dropped_is_refused():
    """The attack that works on Flower 1.42: ask for both shares of one client and unmask its update."""
    clients, _, request = _clients_at_unmask(drop=15)
    victim = 12
    assert _abort_reason(lambda: clients[11].unmask(request.alive, [*request.dropped, victim])) \
        is AbortReason.ALIVE_AND_DROPPED
    assert clients[11].stage is Stage.ABORTED  # and it stays dead
    assert _abort_reason(lambda: clients[11].unmask(request.alive, request.dropped)) is AbortReason.WRONG_STAGE


def test_unmask_request_listing_this_client_as_dropped_is_refused():
    clients, _, request = _clients_at_unmask()
    alive = [u for u in request.alive if u != 11]
    assert _abort_reason(lambda: clients[11].unmask(alive, [11])) is AbortReason.SELF_DROPPED


def test_unmask_request_with_unknown_ids_is_refused():
    clients, _, request = _clients_at_unmask(drop=15)
    assert _abort_reason(lambda: clients[11].unmask(request.alive, [999])) is AbortReason.UNKNOWN_ID


def test_unmask_request_with_duplicate_ids_is_refused():
    clients, _, request = _clients_at_unmask()
    assert _abort_reason(lambda: clients[11].unmask([*request.alive, 12], [])) is AbortReason.DUPLICATE_ID


def test_unmask_request_naming_clients_not_alive_at_masking_is_refused():
    """Node 15 never took part in masking (it dropped before shares): it cannot be 'dropped' now."""
    config = ProtocolConfig(server_round=3, vector_length=8, dropout_rate=0.4)
    ids = [11, 12, 13, 14, 15]
    clients = {u: ClientSession(u, config) for u in ids}
    server = ServerSession(config, MODEL_HASH)
    relay = server.receive_advertisements({u: c.advertise_keys() for u, c in clients.items()})
    shares = {u: c.share_keys(relay, MODEL_HASH) for u, c in clients.items() if u != 15}
    requests = server.receive_shares(shares)
    for u, r in requests.items():
        clients[u].masked_input(r.ciphertexts, r.alive, np.zeros(8, np.uint32))
    assert _abort_reason(lambda: clients[11].unmask([11, 12, 13, 14], [15])) is AbortReason.UNKNOWN_ID


def test_unmask_request_with_fewer_than_t_alive_is_refused():
    clients, _, request = _clients_at_unmask(n=5)
    t = clients[11].threshold
    assert _abort_reason(lambda: clients[11].unmask(request.alive[: t - 1] if 11 in request.alive[: t - 1]
                                                    else [11, *request.alive[1 : t - 1]], [])) \
        is AbortReason.TOO_FEW_CLIENTS


def test_masked_input_request_with_fewer_than_t_alive_is_refused():
    config = ProtocolConfig(server_round=3, vector_length=8, dropout_rate=0.1)
    clients = {u: ClientSession(u, config) for u in (1, 2, 3, 4, 5)}
    relay = [c.advertise_keys() for c in clients.values()]
    cts = {u: c.share_keys(relay, MODEL_HASH) for u, c in clients.items()}
    to_one = {s: cts[s][1] for s in (2, 3)}
    assert _abort_reason(lambda: clients[1].masked_input(to_one, [1, 2, 3], np.zeros(8, np.uint32))) \
        is AbortReason.TOO_FEW_CLIENTS


def _advertised(n: int = 4, **config):
    config = ProtocolConfig(server_round=2, vector_length=4, **config)
    clients = {u: ClientSession(u, config) for u in range(1, n + 1)}
    return clients, [c.advertise_keys() for c in clients.values()]


def test_wrong_size_keys_are_refused():
    clients, ads = _advertised()
    ads[1] = Advertisement(ads[1].node_id, ads[1].c_pk[:31], ads[1].s_pk)
    assert _abort_reason(lambda: clients[1].share_keys(ads, MODEL_HASH)) is AbortReason.BAD_KEY


def test_duplicate_keys_are_refused():
    """Key substitution: the server gives client 3 client 2's key, hoping to read shares meant for 2."""
    clients, ads = _advertised()
    ads[2] = Advertisement(ads[2].node_id, ads[1].c_pk, ads[2].s_pk)
    assert _abort_reason(lambda: clients[1].share_keys(ads, MODEL_HASH)) is AbortReason.DUPLICATE_KEY


def test_duplicate_ids_in_advertisements_are_refused():
    clients, ads = _advertised()
    assert _abort_reason(lambda: clients[1].share_keys([*ads, ads[3]], MODEL_HASH)) is AbortReason.DUPLICATE_ID


def test_replaced_own_keys_are_refused():
    clients, ads = _advertised()
    impostor = ClientSession(1, clients[1].config).advertise_keys()
    assert _abort_reason(lambda: clients[1].share_keys([impostor, *ads[1:]], MODEL_HASH)) \
        is AbortReason.SELF_MISSING


def test_cohort_below_the_minimum_is_refused():
    clients, ads = _advertised(n=4, min_cohort=3)
    assert _abort_reason(lambda: clients[1].share_keys(ads[:2], MODEL_HASH)) is AbortReason.COHORT_TOO_SMALL


def test_unsigned_forged_foreign_or_duplicate_advertisements_are_refused_when_sites_are_enrolled(tmp_path):
    from common.secagg.client import Enrolment
    from common.secagg.identity import IdentityVerifier, SiteIdentity, enrol_virtual_sites
    from common.secagg.keys import new_key_pair

    enrolled = enrol_virtual_sites(4, "study", tmp_path / "a")
    other_ca = enrol_virtual_sites(1, "study", tmp_path / "b")
    verifier = IdentityVerifier(enrolled.ca_cert.read_bytes(), "study")

    def enrolment(folder) -> Enrolment:
        return Enrolment(SiteIdentity.load(folder), verifier, "study", "run-1")

    config = ProtocolConfig(server_round=2, vector_length=4, require_signatures=True)
    clients = {u: ClientSession(u, config, enrolment(enrolled.site_folders[u])) for u in (1, 2, 3)}
    ads = [c.advertise_keys() for c in clients.values()]
    clients[1].share_keys(ads, MODEL_HASH)  # honest: accepted

    def refused(others: list[Advertisement]) -> AbortReason:
        fresh = ClientSession(1, config, enrolment(enrolled.site_folders[1]))
        return _abort_reason(lambda: fresh.share_keys([fresh.advertise_keys(), *others], MODEL_HASH))

    swapped = Advertisement(3, new_key_pair()[1], ads[2].s_pk, ads[2].signature, ads[2].certificate)
    assert refused([ads[1], swapped]) is AbortReason.BAD_SIGNATURE  # a substituted key under an old signature
    assert refused([ads[1], Advertisement(3, ads[2].c_pk, ads[2].s_pk)]) is AbortReason.BAD_SIGNATURE  # unsigned
    sybil = ClientSession(3, config, Enrolment(SiteIdentity.load(other_ca.site_folders[0]), None, "study", "run-1"))
    assert refused([ads[1], sybil.advertise_keys()]) is AbortReason.BAD_SIGNATURE  # another CA: an invented site
    twin = ClientSession(4, config, enrolment(enrolled.site_folders[2]))  # site 2's identity under a second node id
    assert refused([ads[1], ads[2], twin.advertise_keys()]) is AbortReason.DUPLICATE_ID
    replayed = ClientSession(3, ProtocolConfig(server_round=1, vector_length=4, require_signatures=True),
                             enrolment(enrolled.site_folders[3])).advertise_keys()  # signed for another round
    assert refused([ads[1], replayed]) is AbortReason.BAD_SIGNATURE


def test_messages_for_another_round_or_session_are_refused():
    clients, _, _ = _clients_at_unmask()
    client = clients[11]
    assert _abort_reason(lambda: client.expect_session(4, client.session)) is AbortReason.WRONG_SESSION
    clients, _, _ = _clients_at_unmask()
    assert _abort_reason(lambda: clients[11].expect_session(3, b"\x00" * 32)) is AbortReason.WRONG_SESSION


def test_model_inconsistency_breaks_the_round_instead_of_leaking():
    """A server that shows clients different models gives them different session ids: shares fail to decrypt."""
    config = ProtocolConfig(server_round=1, vector_length=4)
    clients = {u: ClientSession(u, config) for u in (1, 2, 3)}
    ads = [c.advertise_keys() for c in clients.values()]
    cts = {u: c.share_keys(ads, MODEL_HASH if u != 2 else b"\x01" * 32) for u, c in clients.items()}
    assert _abort_reason(lambda: clients[1].masked_input({2: cts[2][1], 3: cts[3][1]}, [1, 2, 3],
                                                         np.zeros(4, np.uint32))) is AbortReason.BAD_CIPHERTEXT


# -- what the server sees ------------------------------------------------------------------------------------


def test_a_masked_vector_is_uniform_and_uncorrelated_with_its_input():
    m = 200_000
    inputs = {u: np.zeros(m, np.uint32) for u in (1, 2, 3)}
    inputs[1] = np.arange(m, dtype=np.uint32) * 7919  # a structured input
    _, trace, _ = run_round(ProtocolConfig(server_round=1, vector_length=m), inputs)
    masked = trace.masked[1]
    # uniform over Z_2^32: chi-square over 256 buckets of the top byte (99.9% critical value for 255 dof ~ 330)
    counts = np.bincount((masked >> 24).astype(np.int64), minlength=256)
    chi2 = float(((counts - m / 256) ** 2 / (m / 256)).sum())
    assert chi2 < 330
    # each bit is fair, and the masked value is uncorrelated with the input
    bits = np.unpackbits(masked.view(np.uint8)).mean()
    assert abs(bits - 0.5) < 0.002
    correlation = np.corrcoef(masked.astype(np.float64), inputs[1].astype(np.float64))[0, 1]
    assert abs(correlation) < 4 / math.sqrt(m)


def test_nothing_the_server_receives_contains_an_update_or_a_seed():
    m = 4096
    rng = np.random.default_rng(0)
    inputs = {u: rng.integers(0, 2**32, m, dtype=np.uint32) for u in (1, 2, 3, 4, 5)}
    _, trace, clients = run_round(ProtocolConfig(server_round=1, vector_length=m, dropout_rate=0.4), inputs,
                                  drop_before_unmask=[5])
    received = b"".join(
        [ad.c_pk + ad.s_pk + ad.signature for ad in trace.advertisements.values()]
        + [ct for cts in trace.shares.values() for ct in cts.values()]
        + [y.tobytes() for y in trace.masked.values()]
        + [s for r in trace.unmask.values() for s in [*r.b_shares.values(), *r.s_shares.values()]]
    )
    for u, client in clients.items():
        assert inputs[u][:8].tobytes() not in received  # no 32-byte run of any raw update
        assert client._b_seed not in received  # no self-mask seed in the clear
        from common.secagg.keys import private_bytes

        assert private_bytes(client._s_sk) not in received  # no masking key in the clear
    # and the survivors' unmask responses never carry both shares for one client
    for response in trace.unmask.values():
        assert not set(response.b_shares) & set(response.s_shares)


def test_an_advertise_request_whose_protocol_names_another_round_is_refused():
    """The session and the advertisement's signature bind the protocol's round: a request for round 2 over round
    1's protocol would get keys signed for round 1."""
    from common.secagg.stages import AdvertiseRequest, MalformedMessage, parse_request

    request = AdvertiseRequest(2, ProtocolConfig(server_round=2, vector_length=4))
    assert parse_request(request.record()) == request
    with pytest.raises(MalformedMessage, match="'protocol-server_round' must be the request's round"):
        parse_request({**request.record(), "protocol-server_round": 1})


def test_the_canonical_config_is_kept_per_config_and_tells_types_apart():
    """Built once per config (each site hashes it into every peer's signed payload), but never shared between
    configs that are equal as fields and differ as JSON (0 and 0.0, True and 1)."""
    config = ProtocolConfig(server_round=2, vector_length=10, dropout_rate=0.0)
    assert config.canonical() is config.canonical()
    as_int = ProtocolConfig(server_round=2, vector_length=10, dropout_rate=0)
    assert as_int == config and as_int.canonical() != config.canonical()
    assert b'"dropout_rate": 0,' in as_int.canonical() and b'"dropout_rate": 0.0,' in config.canonical()
