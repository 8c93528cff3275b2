"""The server's side of one round. It learns the sum of the survivors' inputs and nothing else.

Stages: collect advertisements (U1) -> relay keys, collect encrypted shares (U2) -> route shares, collect masked
inputs (U3) -> ask for unmasking (survivors U3, dropped U2 minus U3), collect shares (U4) -> remove masks.
Clients that never advertise simply are not in the round. If fewer than the threshold remain at any stage the
round aborts (SecAggAbort) and nothing individual has been revealed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum, auto

import numpy as np

from common.secagg import keys, shamir
from common.secagg.client import Advertisement, UnmaskResponse
from common.secagg.errors import AbortReason, SecAggAbort
from common.secagg.prg import apply_masks, in_slices
from common.secagg.protocol import ProtocolConfig, mask_sign, neighbours, session_id, threshold


class ServerStage(Enum):
    COLLECT_ADVERTISEMENTS = auto()
    COLLECT_SHARES = auto()
    COLLECT_MASKED_INPUTS = auto()
    COLLECT_UNMASKING = auto()
    DONE = auto()
    ABORTED = auto()


@dataclass(frozen=True)
class MaskedInputRequest:
    """What one client gets before masking: its shares from alive neighbours, and who is alive."""

    ciphertexts: dict[int, bytes]  # sender -> ciphertext addressed to this client
    alive: list[int]


@dataclass(frozen=True)
class UnmaskRequest:
    alive: list[int]
    dropped: list[int]


class ServerSession:
    def __init__(self, config: ProtocolConfig, model_hash: bytes, workers: int | None = None) -> None:
        config.validate()
        self.workers = workers  # threads that regenerate masks (None: every core)
        self.masks_removed = 0
        self.config = config
        self.model_hash = model_hash
        self.stage = ServerStage.COLLECT_ADVERTISEMENTS
        self.session = b""
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.graph: dict[int, frozenset[int]] = {}
        self.thresholds: dict[int, int] = {}
        self.shares_alive: list[int] = []  # U2
        self.survivors: list[int] = []  # U3
        self.dropped: list[int] = []  # U2 \ U3
        self.dropped_along_the_way: dict[str, list[int]] = {}
        self._routed: dict[int, dict[int, bytes]] = {}
        self._sum: np.ndarray | None = None

    def _expect(self, stage: ServerStage) -> None:
        if self.stage is not stage:
            raise SecAggAbort(AbortReason.WRONG_STAGE, f"server in {self.stage.name}, got {stage.name}")

    def _abort(self, reason: AbortReason, detail: str) -> None:
        self.stage = ServerStage.ABORTED
        raise SecAggAbort(reason, detail)

    def holders(self, node: int) -> frozenset[int]:
        return self.graph[node] | {node}

    # -- stage 0 -> 1 ----------------------------------------------------------------------------------------
    def receive_advertisements(self, advertisements: Mapping[int, Advertisement]) -> list[Advertisement]:
        """U1: clients with well-formed, distinct keys. Returns the list to relay to every one of them."""
        self._expect(ServerStage.COLLECT_ADVERTISEMENTS)
        valid: dict[int, Advertisement] = {}
        seen: set[bytes] = set()
        for node, ad in sorted(advertisements.items()):
            try:
                keys.check_public_key(ad.c_pk)
                keys.check_public_key(ad.s_pk)
            except (SecAggAbort, ValueError):
                continue
            if ad.node_id != node or ad.c_pk in seen or ad.s_pk in seen or ad.c_pk == ad.s_pk:
                continue
            seen.update((ad.c_pk, ad.s_pk))
            valid[node] = ad
        self._note_drops("advertise", set(advertisements) - set(valid))
        if len(valid) < self.config.min_cohort:
            self._abort(AbortReason.NOT_ENOUGH_SURVIVORS, f"{len(valid)} clients advertised keys, "
                                                          f"minimum cohort {self.config.min_cohort}")
        self.keys = {node: (ad.c_pk, ad.s_pk) for node, ad in valid.items()}
        self.session = session_id(self.config, self.keys, self.model_hash)
        self.graph = neighbours(list(self.keys), self.config.graph_degree, self.session)
        try:
            self.thresholds = {u: threshold(len(self.holders(u)), self.config.dropout_rate, self.config.colluding)
                               for u in self.keys}
        except SecAggAbort as err:
            self._abort(err.reason, err.detail)
        self.stage = ServerStage.COLLECT_SHARES
        return list(valid.values())

    # -- stage 1 -> 2 ----------------------------------------------------------------------------------------
    def receive_shares(self, responses: Mapping[int, Mapping[int, bytes]]) -> dict[int, MaskedInputRequest]:
        """U2: clients that sent a ciphertext to each of their neighbours. Route each ciphertext to its receiver."""
        self._expect(ServerStage.COLLECT_SHARES)
        alive = {u for u, cts in responses.items() if u in self.keys and set(cts) == self.graph[u]}
        # A client needs t alive holders of its secrets; drop those that cannot have them, until stable.
        while True:
            short = {u for u in alive if len(self.holders(u) & alive) < self.thresholds[u]}
            if not short:
                break
            alive -= short
        self._note_drops("share-keys", set(self.keys) - alive)
        if len(alive) < self.config.min_cohort:
            self._abort(AbortReason.NOT_ENOUGH_SURVIVORS, f"{len(alive)} clients shared keys")
        self.shares_alive = sorted(alive)
        routed: dict[int, dict[int, bytes]] = {u: {} for u in alive}
        for sender in alive:
            for receiver, blob in responses[sender].items():
                if receiver in alive:
                    routed[receiver][sender] = bytes(blob)
        self.stage = ServerStage.COLLECT_MASKED_INPUTS
        return {u: MaskedInputRequest(routed[u], self.shares_alive) for u in self.shares_alive}

    # -- stage 2 -> 3 ----------------------------------------------------------------------------------------
    def receive_masked_inputs(self, inputs: Mapping[int, np.ndarray] | Iterable[tuple[int, np.ndarray]]
                              ) -> UnmaskRequest:
        """U3: well-formed masked inputs (views into the replies), summed over the server's cores."""
        self._expect(ServerStage.COLLECT_MASKED_INPUTS)
        length = self.config.vector_length
        alive, vectors = set(self.shares_alive), {}
        pairs = inputs.items() if isinstance(inputs, Mapping) else inputs
        for u, y in pairs:
            if u in alive and u not in vectors and isinstance(y, np.ndarray) and y.dtype == np.uint32 \
                    and y.shape == (length,):
                vectors[u] = y
        received = set(vectors)
        total = np.zeros(length, dtype=np.uint32)

        def add_up(part: np.ndarray, offset: int) -> None:
            for y in vectors.values():
                np.add(part, y[offset:offset + part.size], out=part)

        in_slices(total, add_up, self.workers)
        self.survivors = sorted(received)
        self.dropped = sorted(alive - received)
        self._note_drops("masked-input", set(self.dropped))
        self._check_recoverable(set(self.survivors), "masked input")
        self._sum = total
        self.stage = ServerStage.COLLECT_UNMASKING
        return UnmaskRequest(self.survivors, self.dropped)

    def _check_recoverable(self, responders: set[int], stage: str) -> None:
        """Every survivor's self-mask and every dropped client's key needs t shares among the responders."""
        if len(responders) < self.config.min_cohort:
            self._abort(AbortReason.NOT_ENOUGH_SURVIVORS, f"{len(responders)} clients after {stage}")
        for owner in [*self.survivors, *self.dropped]:
            available = len(self.holders(owner) & responders)
            if available < self.thresholds[owner]:
                self._abort(AbortReason.NOT_ENOUGH_SURVIVORS,
                            f"after {stage}: {available} holders of node {owner}'s shares < t={self.thresholds[owner]}")

    # -- stage 3 -> done -----------------------------------------------------------------------------------
    def receive_unmasking(self, responses: Mapping[int, UnmaskResponse]) -> np.ndarray:
        """Reconstruct survivors' self-mask seeds and dropped clients' mask keys; return the unmasked sum."""
        self._expect(ServerStage.COLLECT_UNMASKING)
        assert self._sum is not None
        responders = {u for u in responses if u in self.survivors}
        self._check_recoverable(responders, "unmasking")
        b_shares: dict[int, dict[int, int]] = {u: {} for u in self.survivors}
        s_shares: dict[int, dict[int, int]] = {u: {} for u in self.dropped}
        survivors, dropped = set(self.survivors), set(self.dropped)
        for holder in sorted(responders):
            response = responses[holder]
            for owner, raw in response.b_shares.items():
                if owner in survivors and holder in self.holders(owner):
                    b_shares[owner][holder] = self._parse_share(raw, holder)
            for owner, raw in response.s_shares.items():
                if owner in dropped and holder in self.graph[owner]:
                    s_shares[owner][holder] = self._parse_share(raw, holder)

        cache: dict[tuple[int, ...], list[int]] = {}
        plus: list[bytes] = []  # seeds of masks to add back
        minus = [self._combine(shares, self.thresholds[owner], owner, cache) for owner, shares in b_shares.items()]
        for owner, shares in s_shares.items():
            private = keys.private_from_bytes(self._combine(shares, self.thresholds[owner], owner, cache))
            if keys.public_bytes(private) != self.keys[owner][1]:
                self._abort(AbortReason.RECONSTRUCTION_FAILED, f"node {owner}'s mask key does not match its s_pk")
            for peer in sorted(self.graph[owner] & survivors):
                seed = keys.pairwise_mask_seed(private, self.keys[peer][1], self.session, owner, peer)
                # the survivor `peer` added mask_sign(peer, owner) * PRG(seed); take it out again
                (minus if mask_sign(peer, owner) > 0 else plus).append(seed)
        self.masks_removed = len(plus) + len(minus)
        apply_masks(self._sum, plus, minus, self.workers)
        self.stage = ServerStage.DONE
        return self._sum

    def _parse_share(self, raw: bytes, holder: int) -> int:
        try:
            return shamir.share_from_bytes(bytes(raw))
        except ValueError as err:
            self._abort(AbortReason.BAD_RESPONSE, f"node {holder}: {err}")
            raise  # unreachable

    def _combine(self, shares: dict[int, int], t: int, owner: int, cache: dict[tuple[int, ...], list[int]]) -> bytes:
        if len(shares) < t:
            self._abort(AbortReason.RECONSTRUCTION_FAILED, f"{len(shares)} shares of node {owner}'s secret < t={t}")
        try:
            shamir.check_spare(shares, t, weights_cache=cache)  # a spare share catches a lying holder
            return shamir.combine(shares, t, weights_cache=cache)
        except ValueError as err:
            self._abort(AbortReason.RECONSTRUCTION_FAILED, f"node {owner}: {err}")
            raise  # unreachable

    def _note_drops(self, stage: str, nodes: set[int]) -> None:
        if nodes:
            self.dropped_along_the_way[stage] = sorted(nodes)

