"""The client's side of one round, one state per stage (advertise, share keys, masked input, unmask).

Every method checks it is called in its stage and refuses anything off-protocol with a named AbortReason; after
an abort the session is dead. Nothing here knows about Flower.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, auto

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.secagg import keys, shamir
from common.secagg.errors import AbortReason, SecAggAbort
from common.secagg.identity import (
    IdentityVerifier,
    SiteIdentity,
    advertisement_payload,
    consistency_payload,
    signature_valid,
)
from common.secagg.prg import SEED_BYTES, apply_masks
from common.secagg.protocol import ProtocolConfig, mask_sign, neighbours, session_id, threshold

NONCE_BYTES = 12
SHARE_PLAINTEXT_BYTES = 16 + 2 * shamir.SHARE_BYTES


@dataclass(frozen=True)
class Advertisement:
    node_id: int
    c_pk: bytes  # X25519 key for encrypting shares
    s_pk: bytes  # X25519 key for pairwise masks
    signature: bytes = b""  # Ed25519 by the site's enrolled identity over common.secagg.identity's payload
    certificate: bytes = b""  # the site's identity certificate (DER), issued by the study CA


@dataclass(frozen=True)
class Enrolment:
    """A site's place in a study's PKI: its identity (to sign its advertisement), the verifier of its peers' (the
    study CA it holds), and the study and run every signature is bound to. Which of these a site uses is its own
    policy's decision, never the coordinator's."""

    identity: SiteIdentity | None
    verifier: IdentityVerifier | None
    study_id: str
    run_id: str

    def payload(self, config: ProtocolConfig, node_id: int, c_pk: bytes, s_pk: bytes) -> bytes:
        config_hash = hashlib.sha256(config.canonical()).digest()
        return advertisement_payload(self.study_id, self.run_id, config.server_round, node_id, c_pk, s_pk,
                                     config_hash)


@dataclass(frozen=True)
class UnmaskResponse:
    b_shares: dict[int, bytes]  # owner -> share of owner's self-mask seed (owners that survived)
    s_shares: dict[int, bytes]  # owner -> share of owner's masking private key (owners that dropped)


class Stage(Enum):
    ADVERTISE = auto()
    SHARE_KEYS = auto()
    MASKED_INPUT = auto()
    CONSISTENCY = auto()  # enrolled sites only: sign the survivor set before revealing any share
    UNMASK = auto()
    DONE = auto()
    ABORTED = auto()


def share_aad(session: bytes, sender: int, receiver: int) -> bytes:
    return session + keys.node_bytes(sender) + keys.node_bytes(receiver)


class ClientSession:
    def __init__(self, node_id: int, config: ProtocolConfig, enrolment: Enrolment | None = None) -> None:
        config.validate()
        self.node_id = node_id
        self.config = config
        self.enrolment = enrolment
        self.stage = Stage.ADVERTISE
        self._c_sk, self.c_pk = keys.new_key_pair()
        self._s_sk, self.s_pk = keys.new_key_pair()
        self._b_seed = b""
        self.session = b""
        self.model_hash = b""  # bound into the session at key sharing; the model trained on must hash to it
        self.threshold = 0
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._neighbours: frozenset[int] = frozenset()
        self._own_shares: tuple[int, int] = (0, 0)
        self._received: dict[int, tuple[int, int]] = {}  # sender -> (b_share, s_share) addressed to us
        self._alive_at_masking: frozenset[int] = frozenset()
        self._peer_keys: dict[int, bytes] = {}  # enrolled peers' identity keys, verified at key sharing
        self._signed_survivors: frozenset[int] = frozenset()  # the survivor set this site signed

    # -- helpers -------------------------------------------------------------------------------------------
    def _expect(self, stage: Stage) -> None:
        if self.stage is not stage:
            self._abort(AbortReason.WRONG_STAGE, f"in {self.stage.name}, asked for {stage.name}")

    def _abort(self, reason: AbortReason, detail: str = "") -> None:
        self.stage = Stage.ABORTED
        raise SecAggAbort(reason, detail)

    def _guard(self, reason: AbortReason, ok: bool, detail: str = "") -> None:
        if not ok:
            self._abort(reason, detail)

    def expect_session(self, server_round: int, session: bytes | None = None) -> None:
        """Every message names this session's round; after key sharing, also its session id (required)."""
        self._guard(AbortReason.WRONG_SESSION, server_round == self.config.server_round, "another round")
        if self.stage is not Stage.SHARE_KEYS:
            self._guard(AbortReason.WRONG_SESSION, bool(self.session) and session == self.session,
                        "missing or another session id")

    def expect_masking(self) -> None:
        """Before any training for this round: the session must be at its masked-input stage (so a replayed
        masked-input request cannot make the site train, and spend, twice)."""
        self._expect(Stage.MASKED_INPUT)

    def expect_model(self, digest: bytes) -> None:
        """The model received for training must be the one bound into the session at key sharing."""
        self._guard(AbortReason.MODEL_MISMATCH, bool(self.model_hash) and digest == self.model_hash,
                    "the model differs from the one bound at key sharing")

    @property
    def enrolled(self) -> bool:
        """This site checks its peers' identities (its policy's choice); then it also runs the consistency check."""
        return self.enrolment is not None and self.enrolment.verifier is not None

    @property
    def holders(self) -> frozenset[int]:
        """Who holds shares of this client's secrets: its neighbours and itself."""
        return self._neighbours | {self.node_id}

    # -- stage 0 -------------------------------------------------------------------------------------------
    def advertise_keys(self) -> Advertisement:
        self._expect(Stage.ADVERTISE)
        signature, certificate = b"", b""
        if self.enrolment is not None and self.enrolment.identity is not None:
            identity = self.enrolment.identity
            signature = identity.sign(self.enrolment.payload(self.config, self.node_id, self.c_pk, self.s_pk))
            certificate = identity.certificate
        self.stage = Stage.SHARE_KEYS
        return Advertisement(self.node_id, self.c_pk, self.s_pk, signature, certificate)

    # -- stage 1 -------------------------------------------------------------------------------------------
    def share_keys(self, advertisements: Sequence[Advertisement], model_hash: bytes) -> dict[int, bytes]:
        """Check the advertised keys, then send each neighbour its encrypted shares of our two secrets."""
        self._expect(Stage.SHARE_KEYS)
        try:
            self._check_advertisements(advertisements)
            self._keys = {ad.node_id: (ad.c_pk, ad.s_pk) for ad in advertisements}
            self.model_hash = model_hash
            self.session = session_id(self.config, self._keys, model_hash)
            self._neighbours = neighbours(list(self._keys), self.config.graph_degree, self.session)[self.node_id]
            self.threshold = threshold(len(self.holders), self.config.dropout_rate, self.config.colluding)
            return self._encrypt_shares()
        except SecAggAbort as err:
            self._abort(err.reason, err.detail)
            raise  # unreachable: _abort raises

    def _encrypt_shares(self) -> dict[int, bytes]:
        self._b_seed = os.urandom(SEED_BYTES)
        holder_ids = sorted(self.holders)
        b_shares = shamir.split(self._b_seed, self.threshold, holder_ids)
        s_shares = shamir.split(keys.private_bytes(self._s_sk), self.threshold, holder_ids)
        self._own_shares = (b_shares[self.node_id], s_shares[self.node_id])
        ciphertexts = {}
        for peer in sorted(self._neighbours):
            key = keys.share_encryption_key(self._c_sk, self._keys[peer][0], self.session, self.node_id, peer)
            plaintext = (keys.node_bytes(self.node_id) + keys.node_bytes(peer)
                         + shamir.share_to_bytes(b_shares[peer]) + shamir.share_to_bytes(s_shares[peer]))
            nonce = os.urandom(NONCE_BYTES)
            ciphertexts[peer] = nonce + AESGCM(key).encrypt(nonce, plaintext, share_aad(self.session, self.node_id,
                                                                                        peer))
        self.stage = Stage.MASKED_INPUT
        return ciphertexts

    def _check_advertisements(self, advertisements: Sequence[Advertisement]) -> None:
        ids = [ad.node_id for ad in advertisements]
        if len(set(ids)) != len(ids):
            raise SecAggAbort(AbortReason.DUPLICATE_ID, "in the advertised keys")
        if len(ids) < self.config.min_cohort:
            raise SecAggAbort(AbortReason.COHORT_TOO_SMALL, f"{len(ids)} < {self.config.min_cohort}")
        own = [ad for ad in advertisements if ad.node_id == self.node_id]
        if not own or (own[0].c_pk, own[0].s_pk) != (self.c_pk, self.s_pk):
            raise SecAggAbort(AbortReason.SELF_MISSING)
        all_keys = [k for ad in advertisements for k in (ad.c_pk, ad.s_pk)]
        for raw in all_keys:
            try:
                keys.check_public_key(raw)
            except ValueError as err:
                raise SecAggAbort(AbortReason.BAD_KEY, str(err)) from err
        if len(set(all_keys)) != len(all_keys):
            raise SecAggAbort(AbortReason.DUPLICATE_KEY)
        if self.enrolled:
            # every peer must be a distinct site enrolled by the study CA this site holds (no invented sites)
            peers = self.enrolment.verifier.verify_cohort({  # type: ignore[union-attr]
                ad.node_id: (ad.certificate, ad.signature,
                             self.enrolment.payload(self.config, ad.node_id, ad.c_pk, ad.s_pk))  # type: ignore[union-attr]
                for ad in advertisements})
            self._peer_keys = {node: peer.public_key_bytes for node, peer in peers.items()}

    # -- stage 2 -------------------------------------------------------------------------------------------
    def masked_input(self, ciphertexts: Mapping[int, bytes], alive: Sequence[int],
                     encoded_input: np.ndarray) -> np.ndarray:
        """y = x + PRG(b) + sum over alive neighbours v of sign(u, v) PRG(s_uv), in Z_2^32."""
        self._expect(Stage.MASKED_INPUT)
        alive_set = frozenset(alive)
        self._guard(AbortReason.DUPLICATE_ID, len(alive_set) == len(alive), "in the alive list")
        self._guard(AbortReason.UNKNOWN_ID, alive_set <= set(self._keys), "alive list names unknown clients")
        self._guard(AbortReason.SELF_MISSING, self.node_id in alive_set, "not in the alive list")
        alive_holders = alive_set & self.holders
        self._guard(AbortReason.TOO_FEW_CLIENTS, len(alive_holders) >= self.threshold,
                    f"{len(alive_holders)} alive holders < t={self.threshold}")
        alive_neighbours = alive_set & self._neighbours
        self._guard(AbortReason.BAD_CIPHERTEXT, set(ciphertexts) == alive_neighbours,
                    "ciphertexts must come from exactly the alive neighbours")
        for sender, blob in ciphertexts.items():
            self._received[sender] = self._decrypt_share(sender, blob)
        self._guard(AbortReason.BAD_INPUT, encoded_input.dtype == np.uint32
                    and encoded_input.shape == (self.config.vector_length,),
                    f"input must be uint32[{self.config.vector_length}]")

        plus, minus = [self._b_seed], []
        for peer in sorted(alive_neighbours):
            seed = keys.pairwise_mask_seed(self._s_sk, self._keys[peer][1], self.session, self.node_id, peer)
            (plus if mask_sign(self.node_id, peer) > 0 else minus).append(seed)
        masked = encoded_input.copy()
        apply_masks(masked, plus, minus, workers=1)  # a site's masks are few (its neighbours); keep to one core
        self._alive_at_masking = alive_set
        self.stage = Stage.CONSISTENCY if self._peer_keys else Stage.UNMASK  # enrolled at key sharing
        return masked

    # -- stage 2b (enrolled sites) ---------------------------------------------------------------------------
    def consistency_check(self, survivors: Sequence[int]) -> bytes:
        """Sign the survivor set the server announced (Bonawitz et al. 2017, section 4). Shares are revealed only
        against t signatures of this same set, so the server cannot show different sites different sets."""
        self._expect(Stage.CONSISTENCY)
        survivor_set = frozenset(survivors)
        self._guard(AbortReason.DUPLICATE_ID, len(survivor_set) == len(survivors), "in the survivor list")
        self._guard(AbortReason.SELF_MISSING, self.node_id in survivor_set, "not in the survivor list")
        self._guard(AbortReason.UNKNOWN_ID, survivor_set <= self._alive_at_masking,
                    "survivors that were not alive when we masked")
        self._guard(AbortReason.TOO_FEW_CLIENTS, len(survivor_set & self.holders) >= self.threshold,
                    "fewer surviving holders than t")
        self._signed_survivors = survivor_set
        self.stage = Stage.UNMASK
        identity = self.enrolment.identity  # type: ignore[union-attr]
        self._guard(AbortReason.NO_IDENTITY, identity is not None, "no identity to sign with")
        return identity.sign(consistency_payload(self.session, self.config.server_round, sorted(survivor_set)))

    def _check_consistency(self, alive: frozenset[int], signatures: Mapping[int, bytes]) -> None:
        self._guard(AbortReason.INCONSISTENT_VIEW, alive == self._signed_survivors,
                    "the unmask request names another survivor set than the one this site signed")
        payload = consistency_payload(self.session, self.config.server_round, sorted(alive))
        valid = {u for u, sig in signatures.items()
                 if u in alive and u in self._peer_keys and signature_valid(self._peer_keys[u], sig, payload)}
        self._guard(AbortReason.INCONSISTENT_VIEW, len(valid) >= self.threshold,
                    f"{len(valid)} valid signatures on the survivor set < t={self.threshold}")

    def _decrypt_share(self, sender: int, blob: bytes) -> tuple[int, int]:
        try:
            key = keys.share_encryption_key(self._c_sk, self._keys[sender][0], self.session, sender, self.node_id)
            plaintext = AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                            share_aad(self.session, sender, self.node_id))
        except (InvalidTag, ValueError, KeyError) as err:
            self._abort(AbortReason.BAD_CIPHERTEXT, f"from node {sender}: {type(err).__name__}")
        self._guard(AbortReason.BAD_CIPHERTEXT, len(plaintext) == SHARE_PLAINTEXT_BYTES
                    and plaintext[:16] == keys.node_bytes(sender) + keys.node_bytes(self.node_id),
                    f"share from node {sender} is addressed wrongly")
        b_raw = plaintext[16 : 16 + shamir.SHARE_BYTES]
        s_raw = plaintext[16 + shamir.SHARE_BYTES :]
        return shamir.share_from_bytes(b_raw), shamir.share_from_bytes(s_raw)

    # -- stage 3 -------------------------------------------------------------------------------------------
    def unmask(self, alive: Sequence[int], dropped: Sequence[int],
               signatures: Mapping[int, bytes] | None = None) -> UnmaskResponse:
        """Reveal b-shares of survivors and s-shares of dropped clients: never both for one client. An enrolled
        site first needs t valid signatures of other sites on exactly this survivor set."""
        self._expect(Stage.UNMASK)
        alive_set, dropped_set = frozenset(alive), frozenset(dropped)
        if self._peer_keys:  # this site verified its peers' identities: it also insists on their consistency
            self._check_consistency(alive_set, signatures or {})
        self._guard(AbortReason.DUPLICATE_ID, len(alive_set) == len(alive) and len(dropped_set) == len(dropped))
        self._guard(AbortReason.ALIVE_AND_DROPPED, not alive_set & dropped_set,
                    f"nodes {sorted(alive_set & dropped_set)[:5]}")
        self._guard(AbortReason.SELF_DROPPED, self.node_id not in dropped_set)
        self._guard(AbortReason.SELF_MISSING, self.node_id in alive_set, "not in the survivor list")
        self._guard(AbortReason.UNKNOWN_ID, (alive_set | dropped_set) <= self._alive_at_masking,
                    "ids that were not alive when we masked")
        alive_holders = alive_set & self.holders
        self._guard(AbortReason.TOO_FEW_CLIENTS, len(alive_holders) >= self.threshold,
                    f"{len(alive_holders)} surviving holders < t={self.threshold}")
        b_shares = {owner: shamir.share_to_bytes(self._share_of(owner)[0]) for owner in sorted(alive_holders)}
        s_shares = {owner: shamir.share_to_bytes(self._share_of(owner)[1])
                    for owner in sorted(dropped_set & self._neighbours)}
        self.stage = Stage.DONE
        return UnmaskResponse(b_shares, s_shares)

    def _share_of(self, owner: int) -> tuple[int, int]:
        return self._own_shares if owner == self.node_id else self._received[owner]

    # -- persistence between messages -------------------------------------------------------------------------
    def to_state(self) -> dict[str, bytes | int | str | list[bytes]]:
        """Flat state for Flower's Context.state (the ClientApp is re-created for every message)."""
        ids = sorted(self._keys)
        received = sorted(self._received)
        return {
            "node": keys.node_bytes(self.node_id), "config": self.config.canonical().decode(),
            "stage": self.stage.name, "c-sk": keys.private_bytes(self._c_sk), "s-sk": keys.private_bytes(self._s_sk),
            "b-seed": self._b_seed, "session": self.session, "model-hash": self.model_hash,
            "threshold": self.threshold,
            "key-ids": [keys.node_bytes(u) for u in ids], "key-c": [self._keys[u][0] for u in ids],
            "key-s": [self._keys[u][1] for u in ids],
            "neighbours": [keys.node_bytes(u) for u in sorted(self._neighbours)],
            "own-shares": [shamir.share_to_bytes(y) for y in self._own_shares],
            "received-from": [keys.node_bytes(u) for u in received],
            "received-b": [shamir.share_to_bytes(self._received[u][0]) for u in received],
            "received-s": [shamir.share_to_bytes(self._received[u][1]) for u in received],
            "alive-at-masking": [keys.node_bytes(u) for u in sorted(self._alive_at_masking)],
            "peer-ids": [keys.node_bytes(u) for u in sorted(self._peer_keys)],
            "peer-keys": [self._peer_keys[u] for u in sorted(self._peer_keys)],
            "signed-survivors": [keys.node_bytes(u) for u in sorted(self._signed_survivors)],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, object], enrolment: Enrolment | None = None) -> ClientSession:
        def ids(key: str) -> list[int]:
            return [int.from_bytes(b, "big") for b in state[key]]  # type: ignore[union-attr]

        config = ProtocolConfig(**json.loads(str(state["config"])))
        session = cls(int.from_bytes(state["node"], "big"), config, enrolment)  # type: ignore[arg-type]
        session.stage = Stage[str(state["stage"])]
        session._c_sk = keys.private_from_bytes(state["c-sk"])  # type: ignore[arg-type]
        session._s_sk = keys.private_from_bytes(state["s-sk"])  # type: ignore[arg-type]
        session.c_pk, session.s_pk = keys.public_bytes(session._c_sk), keys.public_bytes(session._s_sk)
        session._b_seed = bytes(state["b-seed"])  # type: ignore[arg-type]
        session.session = bytes(state["session"])  # type: ignore[arg-type]
        session.model_hash = bytes(state["model-hash"])  # type: ignore[arg-type]
        session.threshold = int(state["threshold"])  # type: ignore[arg-type]
        session._keys = dict(zip(ids("key-ids"), zip(state["key-c"], state["key-s"], strict=True), strict=True))  # type: ignore[arg-type]
        session._neighbours = frozenset(ids("neighbours"))
        own = [shamir.share_from_bytes(b) for b in state["own-shares"]]  # type: ignore[union-attr]
        session._own_shares = (own[0], own[1])
        session._received = {
            u: (shamir.share_from_bytes(b), shamir.share_from_bytes(s))
            for u, b, s in zip(ids("received-from"), state["received-b"], state["received-s"], strict=True)  # type: ignore[arg-type]
        }
        session._alive_at_masking = frozenset(ids("alive-at-masking"))
        session._peer_keys = dict(zip(ids("peer-ids"), (bytes(k) for k in state["peer-keys"]), strict=True))  # type: ignore[union-attr]
        session._signed_survivors = frozenset(ids("signed-survivors"))
        return session
