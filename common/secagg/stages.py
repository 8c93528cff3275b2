"""The wire format of every secure-aggregation stage, defined once: one typed request and one typed reply each.

Requests travel from the server to the sites and replies back, each as one flat record (a Flower ConfigRecord is a
Mapping) with exactly the keys of its `Key` members. `parse_*` turns a record into a frozen dataclass or raises
`MalformedMessage` naming the key (never a value: a site's reason must not carry data); `record()` builds one.
The site's mod, the egress guard and the server round all use these, so the two sides cannot drift apart. Node
ids travel as 8-byte big-endian strings (Flower's ConfigRecord ints are signed 64-bit; node ids are unsigned), and
node id 0 (Flower's SuperLink) is never a site. Nothing here knows Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from common.secagg.errors import AbortReason, SecAggAbort
from common.secagg.protocol import ProtocolConfig
from common.secagg.shamir import SHARE_BYTES

KEY_BYTES, DIGEST_BYTES, NODE_ID_BYTES = 32, 32, 8
SIGNATURE_BYTES = (0, 64)  # none, or Ed25519
NONCE_BYTES, TAG_BYTES = 12, 16
CIPHERTEXT_BYTES = NONCE_BYTES + 2 * NODE_ID_BYTES + 2 * SHARE_BYTES + TAG_BYTES
MAX_COHORT = 100_000  # no list in a message is longer (a site's policy bounds the cohort far lower)
MAX_CERT_BYTES = 8192  # an identity certificate (DER) is ~500 bytes


class Stage(StrEnum):
    ADVERTISE = "advertise-keys"
    SHARE_KEYS = "share-keys"
    MASKED_INPUT = "masked-input"
    CONSISTENCY = "consistency-check"
    UNMASK = "unmask"


class Key(StrEnum):
    STAGE = "stage"
    ROUND = "round"
    MODEL_HASH = "model-hash"
    SESSION = "session"
    IDS = "ids"
    C_PKS = "c-pks"
    S_PKS = "s-pks"
    SIGNATURES = "signatures"
    CERTIFICATES = "certificates"
    CERTIFICATE = "certificate"
    SENDERS = "senders"
    CIPHERTEXTS = "ciphertexts"
    ALIVE = "alive"
    DROPPED = "dropped"
    UPDATE_BOUND = "update-bound"
    MAX_WEIGHT = "max-weight"
    COHORT_SIZE = "cohort-size"
    C_PK = "c-pk"
    S_PK = "s-pk"
    SIGNATURE = "signature"
    RECEIVERS = "receivers"
    B_OWNERS = "b-owners"
    B_SHARES = "b-shares"
    S_OWNERS = "s-owners"
    S_SHARES = "s-shares"
    SURVIVORS = "survivors"
    SIGNERS = "signers"


PROTOCOL_PREFIX = "protocol-"


class MalformedMessage(SecAggAbort):
    """A stage message or reply that does not follow its schema (named key; no values)."""

    def __init__(self, reason: AbortReason, detail: str) -> None:
        super().__init__(reason, detail)


# -- field readers: each raises MalformedMessage naming the key ------------------------------------------------
class _Reader:
    def __init__(self, record: Mapping[str, Any], expected: set[str], reason: AbortReason, what: str) -> None:
        if not isinstance(record, Mapping):
            raise MalformedMessage(reason, f"{what}: not a record")
        keys = set(record.keys())
        if keys != expected:
            odd = sorted(keys ^ expected)[0]
            raise MalformedMessage(reason, f"{what}: unexpected or missing key '{odd}'")
        self.record, self.reason, self.what = record, reason, what

    def fail(self, key: str, problem: str) -> MalformedMessage:
        return MalformedMessage(self.reason, f"{self.what}: '{key}' {problem}")

    def bytes_of(self, key: str, *sizes: int) -> bytes:
        value = self.record[key]
        if not isinstance(value, bytes) or len(value) not in sizes:
            raise self.fail(key, f"must be {' or '.join(map(str, sizes))} bytes")
        return value

    def bytes_upto(self, key: str, most: int) -> bytes:
        value = self.record[key]
        if not isinstance(value, bytes) or len(value) > most:
            raise self.fail(key, f"must be at most {most} bytes")
        return value

    def bytes_list_upto(self, key: str, most: int) -> list[bytes]:
        value = self.record[key]
        if not isinstance(value, list) or len(value) > MAX_COHORT \
                or not all(isinstance(b, bytes) and len(b) <= most for b in value):
            raise self.fail(key, f"must be a list of strings of at most {most} bytes")
        return value

    def bytes_list(self, key: str, *sizes: int) -> list[bytes]:
        value = self.record[key]
        if not isinstance(value, list) or len(value) > MAX_COHORT \
                or not all(isinstance(b, bytes) and len(b) in sizes for b in value):
            raise self.fail(key, f"must be a list of {' or '.join(map(str, sizes))}-byte strings")
        return value

    def ids(self, key: str) -> list[int]:
        ids = [int.from_bytes(b, "big") for b in self.bytes_list(key, NODE_ID_BYTES)]
        if 0 in ids:
            raise self.fail(key, "names node 0, which is never a site")
        if len(set(ids)) != len(ids):
            raise self.fail(key, "names a node twice")
        return ids

    def integer(self, key: str, low: int, high: int) -> int:
        value = self.record[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self.fail(key, f"must be an integer in [{low}, {high}]")
        return value

    def number(self, key: str, low: float, high: float) -> float:
        value = self.record[key]
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) \
                or not low <= value <= high:
            raise self.fail(key, f"must be a finite number in [{low}, {high}]")
        return float(value)

    def paired(self, ids_key: str, values_key: str, *sizes: int, most: int = 0) -> dict[int, bytes]:
        ids = self.ids(ids_key)
        values = self.bytes_list_upto(values_key, most) if most else self.bytes_list(values_key, *sizes)
        if len(ids) != len(values):
            raise self.fail(values_key, f"must have one entry per '{ids_key}'")
        return dict(zip(ids, values, strict=True))


def ids_to_wire(ids: Sequence[int]) -> list[bytes]:
    return [int(u).to_bytes(NODE_ID_BYTES, "big") for u in ids]


def protocol_record(config: ProtocolConfig) -> dict[str, Any]:
    return {f"{PROTOCOL_PREFIX}{f.name}": getattr(config, f.name) for f in fields(ProtocolConfig)}


def _protocol(reader: _Reader) -> ProtocolConfig:
    r = reader
    config = ProtocolConfig(
        server_round=r.integer(f"{PROTOCOL_PREFIX}server_round", 0, 2**62),
        vector_length=r.integer(f"{PROTOCOL_PREFIX}vector_length", 1, 2**31),
        dropout_rate=r.number(f"{PROTOCOL_PREFIX}dropout_rate", 0.0, 0.999),
        colluding=r.integer(f"{PROTOCOL_PREFIX}colluding", 0, MAX_COHORT),
        min_cohort=r.integer(f"{PROTOCOL_PREFIX}min_cohort", 2, MAX_COHORT),
        graph_degree=r.integer(f"{PROTOCOL_PREFIX}graph_degree", 0, MAX_COHORT),
        require_signatures=_boolean(r, f"{PROTOCOL_PREFIX}require_signatures"))
    try:
        config.validate()
    except ValueError:
        raise r.fail(f"{PROTOCOL_PREFIX}graph_degree", "must be 0 or even") from None
    return config


def _boolean(reader: _Reader, key: str) -> bool:
    value = reader.record[key]
    if not isinstance(value, bool):
        raise reader.fail(key, "must be a boolean")
    return value


_PROTOCOL_KEYS = {f"{PROTOCOL_PREFIX}{f.name}" for f in fields(ProtocolConfig)}
_COMMON = {Key.STAGE, Key.ROUND, Key.MODEL_HASH}


# -- requests (server -> site) ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdvertiseRequest:
    """Fresh keys for the round `protocol` describes. No model: the session binds it at key sharing, so this
    request can ride on the previous round's unmask request, before the round's model exists."""

    round: int
    protocol: ProtocolConfig

    def record(self) -> dict[str, Any]:
        return {Key.STAGE: Stage.ADVERTISE, Key.ROUND: self.round, **protocol_record(self.protocol)}


@dataclass(frozen=True)
class ShareKeysRequest:
    round: int
    model_hash: bytes
    c_pks: dict[int, bytes]  # node -> key (ids in the order they were sent)
    s_pks: dict[int, bytes]
    signatures: dict[int, bytes]
    certificates: dict[int, bytes]

    def record(self) -> dict[str, Any]:
        ids = list(self.c_pks)
        return {Key.STAGE: Stage.SHARE_KEYS, Key.ROUND: self.round, Key.MODEL_HASH: self.model_hash,
                Key.IDS: ids_to_wire(ids), Key.C_PKS: [self.c_pks[u] for u in ids],
                Key.S_PKS: [self.s_pks[u] for u in ids], Key.SIGNATURES: [self.signatures[u] for u in ids],
                Key.CERTIFICATES: [self.certificates[u] for u in ids]}


@dataclass(frozen=True)
class MaskedInputRequest:
    round: int
    model_hash: bytes
    session: bytes
    ciphertexts: dict[int, bytes]  # sender -> ciphertext addressed to this site
    alive: list[int]
    update_bound: float
    max_weight: float
    cohort_size: int

    def record(self) -> dict[str, Any]:
        return {Key.STAGE: Stage.MASKED_INPUT, Key.ROUND: self.round, Key.MODEL_HASH: self.model_hash,
                Key.SESSION: self.session, Key.SENDERS: ids_to_wire(list(self.ciphertexts)),
                Key.CIPHERTEXTS: list(self.ciphertexts.values()), Key.ALIVE: ids_to_wire(self.alive),
                Key.UPDATE_BOUND: self.update_bound, Key.MAX_WEIGHT: self.max_weight,
                Key.COHORT_SIZE: self.cohort_size}


@dataclass(frozen=True)
class ConsistencyRequest:
    """Enrolled sites: sign the survivor set before any share is revealed."""

    round: int
    model_hash: bytes
    session: bytes
    survivors: list[int]

    def record(self) -> dict[str, Any]:
        return {Key.STAGE: Stage.CONSISTENCY, Key.ROUND: self.round, Key.MODEL_HASH: self.model_hash,
                Key.SESSION: self.session, Key.SURVIVORS: ids_to_wire(self.survivors)}


@dataclass(frozen=True)
class UnmaskRequest:
    round: int
    model_hash: bytes
    session: bytes
    alive: list[int]
    dropped: list[int]
    signatures: dict[int, bytes]  # signer -> its signature on the survivor set (empty without identities)

    def record(self) -> dict[str, Any]:
        return {Key.STAGE: Stage.UNMASK, Key.ROUND: self.round, Key.MODEL_HASH: self.model_hash,
                Key.SESSION: self.session, Key.ALIVE: ids_to_wire(self.alive), Key.DROPPED: ids_to_wire(self.dropped),
                Key.SIGNERS: ids_to_wire(list(self.signatures)), Key.SIGNATURES: list(self.signatures.values())}


Request = AdvertiseRequest | ShareKeysRequest | MaskedInputRequest | ConsistencyRequest | UnmaskRequest
_REQUEST_KEYS = {
    Stage.ADVERTISE: {Key.STAGE, Key.ROUND} | _PROTOCOL_KEYS,
    Stage.SHARE_KEYS: _COMMON | {Key.IDS, Key.C_PKS, Key.S_PKS, Key.SIGNATURES, Key.CERTIFICATES},
    Stage.MASKED_INPUT: _COMMON | {Key.SESSION, Key.SENDERS, Key.CIPHERTEXTS, Key.ALIVE, Key.UPDATE_BOUND,
                                   Key.MAX_WEIGHT, Key.COHORT_SIZE},
    Stage.CONSISTENCY: _COMMON | {Key.SESSION, Key.SURVIVORS},
    Stage.UNMASK: _COMMON | {Key.SESSION, Key.ALIVE, Key.DROPPED, Key.SIGNERS, Key.SIGNATURES},
}


def request_stage(record: Mapping[str, Any]) -> Stage:
    stage = record.get(Key.STAGE) if isinstance(record, Mapping) else None
    if not isinstance(stage, str) or stage not in set(Stage):
        raise MalformedMessage(AbortReason.WRONG_STAGE, "the request names no known stage")
    return Stage(stage)


def parse_request(record: Mapping[str, Any]) -> Request:
    """A stage request from the server, checked field by field (AbortReason.BAD_REQUEST otherwise)."""
    stage = request_stage(record)
    r = _Reader(record, {str(k) for k in _REQUEST_KEYS[stage]}, AbortReason.BAD_REQUEST, f"{stage} request")
    server_round = r.integer(Key.ROUND, 0, 2**62)
    if stage == Stage.ADVERTISE:
        protocol = _protocol(r)
        if protocol.server_round != server_round:  # the session and signature bind the protocol's round
            raise r.fail(f"{PROTOCOL_PREFIX}server_round", "must be the request's round")
        return AdvertiseRequest(server_round, protocol)
    model_hash = r.bytes_of(Key.MODEL_HASH, DIGEST_BYTES)
    if stage == Stage.SHARE_KEYS:
        return ShareKeysRequest(server_round, model_hash, r.paired(Key.IDS, Key.C_PKS, KEY_BYTES),
                                r.paired(Key.IDS, Key.S_PKS, KEY_BYTES),
                                r.paired(Key.IDS, Key.SIGNATURES, *SIGNATURE_BYTES),
                                r.paired(Key.IDS, Key.CERTIFICATES, most=MAX_CERT_BYTES))
    session = r.bytes_of(Key.SESSION, DIGEST_BYTES)
    if stage == Stage.MASKED_INPUT:
        return MaskedInputRequest(server_round, model_hash, session,
                                  r.paired(Key.SENDERS, Key.CIPHERTEXTS, CIPHERTEXT_BYTES), r.ids(Key.ALIVE),
                                  r.number(Key.UPDATE_BOUND, 1e-12, 1e12), r.number(Key.MAX_WEIGHT, 1, 2**31 - 1),
                                  r.integer(Key.COHORT_SIZE, 1, MAX_COHORT))
    if stage == Stage.CONSISTENCY:
        return ConsistencyRequest(server_round, model_hash, session, r.ids(Key.SURVIVORS))
    return UnmaskRequest(server_round, model_hash, session, r.ids(Key.ALIVE), r.ids(Key.DROPPED),
                         r.paired(Key.SIGNERS, Key.SIGNATURES, SIGNATURE_BYTES[1]))


# -- replies (site -> server) -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdvertiseReply:
    c_pk: bytes
    s_pk: bytes
    signature: bytes
    certificate: bytes  # the site's identity certificate (DER); empty where the site is not enrolled

    def record(self) -> dict[str, Any]:
        return {Key.C_PK: self.c_pk, Key.S_PK: self.s_pk, Key.SIGNATURE: self.signature,
                Key.CERTIFICATE: self.certificate}


@dataclass(frozen=True)
class ShareKeysReply:
    session: bytes
    ciphertexts: dict[int, bytes]  # receiver -> ciphertext

    def record(self) -> dict[str, Any]:
        return {Key.SESSION: self.session, Key.RECEIVERS: ids_to_wire(list(self.ciphertexts)),
                Key.CIPHERTEXTS: list(self.ciphertexts.values())}


@dataclass(frozen=True)
class UnmaskReply:
    b_shares: dict[int, bytes]  # owner -> share of its self-mask seed
    s_shares: dict[int, bytes]  # owner -> share of its masking key

    def record(self) -> dict[str, Any]:
        return {Key.B_OWNERS: ids_to_wire(list(self.b_shares)), Key.B_SHARES: list(self.b_shares.values()),
                Key.S_OWNERS: ids_to_wire(list(self.s_shares)), Key.S_SHARES: list(self.s_shares.values())}


@dataclass(frozen=True)
class ConsistencyReply:
    signature: bytes  # Ed25519 over common.secagg.identity.consistency_payload

    def record(self) -> dict[str, Any]:
        return {Key.SIGNATURE: self.signature}


Reply = AdvertiseReply | ShareKeysReply | ConsistencyReply | UnmaskReply
_REPLY_KEYS = {
    Stage.ADVERTISE: {Key.C_PK, Key.S_PK, Key.SIGNATURE, Key.CERTIFICATE},
    Stage.SHARE_KEYS: {Key.SESSION, Key.RECEIVERS, Key.CIPHERTEXTS},
    Stage.CONSISTENCY: {Key.SIGNATURE},
    Stage.UNMASK: {Key.B_OWNERS, Key.B_SHARES, Key.S_OWNERS, Key.S_SHARES},
}


def parse_reply(stage: Stage, record: Mapping[str, Any], max_items: int = MAX_COHORT) -> Reply:
    """A site's reply to a key stage (AbortReason.BAD_RESPONSE otherwise); lists no longer than the cohort."""
    r = _Reader(record, {str(k) for k in _REPLY_KEYS[stage]}, AbortReason.BAD_RESPONSE, f"{stage} reply")
    for key in record:
        if isinstance(record[key], list) and len(record[key]) > max_items:
            raise r.fail(key, "is longer than the cohort")
    if stage == Stage.ADVERTISE:
        return AdvertiseReply(r.bytes_of(Key.C_PK, KEY_BYTES), r.bytes_of(Key.S_PK, KEY_BYTES),
                              r.bytes_of(Key.SIGNATURE, *SIGNATURE_BYTES),
                              r.bytes_upto(Key.CERTIFICATE, MAX_CERT_BYTES))
    if stage == Stage.SHARE_KEYS:
        return ShareKeysReply(r.bytes_of(Key.SESSION, DIGEST_BYTES),
                              r.paired(Key.RECEIVERS, Key.CIPHERTEXTS, CIPHERTEXT_BYTES))
    if stage == Stage.CONSISTENCY:
        return ConsistencyReply(r.bytes_of(Key.SIGNATURE, SIGNATURE_BYTES[1]))
    if stage == Stage.UNMASK:
        return UnmaskReply(r.paired(Key.B_OWNERS, Key.B_SHARES, SHARE_BYTES),
                           r.paired(Key.S_OWNERS, Key.S_SHARES, SHARE_BYTES))
    raise MalformedMessage(AbortReason.BAD_RESPONSE, f"{stage}: its reply is a training reply, not a key stage's")
