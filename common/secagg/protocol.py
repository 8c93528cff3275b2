"""What both sides must agree on: the protocol config, the threshold rule, the neighbour graph, the session id."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from common.secagg.errors import AbortReason, SecAggAbort

_CANONICAL: dict[str, bytes] = {}


@dataclass(frozen=True)
class ProtocolConfig:
    """Fixed for one round; part of the session id, so every client must hold the same one."""

    server_round: int
    vector_length: int  # uint32 words in a masked input (model parameters + 1 for the example count)
    dropout_rate: float = 0.1  # tolerated fraction of a neighbourhood that may drop after advertising keys
    colluding: int = 0  # clients that may collude with the server (raises the threshold)
    min_cohort: int = 3  # never aggregate fewer clients than this
    graph_degree: int = 0  # 0: complete graph; k: random k-regular (Harary) graph, SecAgg+
    require_signatures: bool = False  # key advertisements must be signed by enrolled site identities

    def canonical(self) -> bytes:
        """Built once per config: each site hashes it into every peer's signed payload. Keyed by repr, which tells
        0 from 0.0 and True from 1 (equal as fields, not as JSON)."""
        key = repr(self)
        found = _CANONICAL.get(key)
        if found is None:
            found = json.dumps(asdict(self), sort_keys=True).encode()
            if len(_CANONICAL) < 256:
                _CANONICAL[key] = found
        return found

    def validate(self) -> None:
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"dropout rate {self.dropout_rate} must be in [0, 1)")
        if self.colluding < 0 or self.min_cohort < 2 or self.vector_length < 1:
            raise ValueError("colluding >= 0, min_cohort >= 2 and vector_length >= 1 are required")
        if self.graph_degree < 0 or self.graph_degree % 2:
            raise ValueError(f"graph degree {self.graph_degree} must be 0 (complete) or a positive even number")


def threshold(neighbourhood: int, dropout_rate: float, colluding: int) -> int:
    """t = max(ceil((1 - d) n), floor((n + c) / 2) + 1), for a neighbourhood of n (self included).

    The first term tolerates a fraction d of dropouts; the second makes t a majority even with c colluders, so an
    active server cannot split the cohort into two groups that each reach t (Bell et al. 2020).
    """
    t = max(math.ceil((1 - dropout_rate) * neighbourhood - 1e-9), (neighbourhood + colluding) // 2 + 1)
    if t > neighbourhood:
        raise SecAggAbort(AbortReason.TOO_FEW_CLIENTS,
                          f"{neighbourhood} clients cannot meet threshold {t} with {colluding} colluders")
    return t


# The graph a study gets by default (secagg-graph-degree = 0), chosen per round from the cohort size n. Up to
# COMPLETE_GRAPH_UP_TO sites every pair shares a mask (Bonawitz et al. 2017). Beyond, each site has k neighbours
# (SecAgg+, Bell et al. 2020), with a two-thirds threshold in every neighbourhood (tolerated rate 1/3, still a
# majority, the malicious-server setting), and k the smallest even number >= 2 log2 n for which a round in which
# the study's dropout rate d of the cohort drops at random aborts with probability <= GRAPH_FAILURE_PROBABILITY
# (hypergeometric tail, union bound over the n neighbourhoods). Abort probability is liveness, not privacy: an
# unlucky round aborts and reveals nothing.
COMPLETE_GRAPH_UP_TO = 50
SPARSE_NEIGHBOURHOOD_DROPOUT = 1 / 3
GRAPH_FAILURE_PROBABILITY = 1e-3


def graph_for_cohort(cohort: int, degree: int, dropout_rate: float, colluding: int = 0) -> tuple[int, float]:
    """(graph degree, neighbourhood dropout rate) for a round of `cohort` sites. A fixed degree (> 0) is kept
    with the study's rate; degree 0 chooses from the cohort size, as described above."""
    if degree > 0 or cohort <= COMPLETE_GRAPH_UP_TO or dropout_rate >= SPARSE_NEIGHBOURHOOD_DROPOUT:
        return degree, dropout_rate
    dropped = math.ceil(dropout_rate * cohort)
    k = 2 * math.ceil(math.log2(cohort))
    while k < cohort - 1:
        holders = k + 1
        try:
            tolerated = holders - threshold(holders, SPARSE_NEIGHBOURHOOD_DROPOUT, colluding)
        except SecAggAbort:  # too many colluders for this neighbourhood: try a larger one
            k += 2
            continue
        if cohort * _more_than(tolerated, cohort, dropped, holders) <= GRAPH_FAILURE_PROBABILITY:
            return k, SPARSE_NEIGHBOURHOOD_DROPOUT
        k += 2
    return 0, dropout_rate


def _more_than(limit: int, population: int, marked: int, draws: int) -> float:
    """P(X > limit) for X ~ Hypergeometric(population, marked, draws)."""
    top = min(marked, draws)
    favourable = sum(math.comb(marked, x) * math.comb(population - marked, draws - x)
                     for x in range(limit + 1, top + 1))
    return favourable / math.comb(population, draws)


def session_id(config: ProtocolConfig, keys: Mapping[int, tuple[bytes, bytes]], model_hash: bytes) -> bytes:
    """SHA-256 over the round, every advertised (id, c_pk, s_pk) in id order, the model hash and the config."""
    digest = hashlib.sha256(b"carefed/secagg/session/v1")
    digest.update(struct.pack(">Q", config.server_round))
    for node in sorted(keys):
        c_pk, s_pk = keys[node]
        digest.update(struct.pack(">Q", node) + c_pk + s_pk)
    digest.update(model_hash)
    digest.update(config.canonical())
    return digest.digest()


def neighbours(nodes: Sequence[int], degree: int, session: bytes) -> dict[int, frozenset[int]]:
    """Each node's neighbours: everyone (complete graph), or a Harary graph H(k, n) over a session-derived order.

    The order comes from the session id, which hashes every client's fresh keys, so the server cannot choose who
    neighbours whom without knowing the keys in advance.
    """
    nodes = sorted(nodes)
    n = len(nodes)
    if degree == 0 or degree >= n - 1:
        everyone = frozenset(nodes)
        return {u: everyone - {u} for u in nodes}
    order = sorted(nodes, key=lambda u: hashlib.sha256(session + struct.pack(">Q", u)).digest())
    position = {u: i for i, u in enumerate(order)}
    half = degree // 2
    return {
        u: frozenset(order[(position[u] + step) % n] for step in range(-half, half + 1) if step)
        for u in nodes
    }


def mask_sign(owner: int, peer: int) -> int:
    """Pairwise masks enter with + at the smaller id and - at the larger, so each pair cancels."""
    return 1 if owner < peer else -1


def model_digest(model_bytes: Sequence[bytes]) -> bytes:
    digest = hashlib.sha256(b"carefed/model/v1")
    for chunk in model_bytes:
        digest.update(struct.pack(">Q", len(chunk)) + chunk)
    return digest.digest()
