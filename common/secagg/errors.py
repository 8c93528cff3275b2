"""Every refusal in the protocol has a name, so logs and tests can say exactly why a round stopped."""

from __future__ import annotations

from enum import StrEnum


class AbortReason(StrEnum):
    # client-side refusals of what the server sent
    WRONG_STAGE = "message for a stage this session is not in"
    WRONG_SESSION = "round or session id does not match"
    TOO_FEW_CLIENTS = "fewer clients than the threshold"
    COHORT_TOO_SMALL = "cohort smaller than the configured minimum"
    SELF_MISSING = "this client's own keys are missing or were replaced"
    DUPLICATE_ID = "a client id appears twice"
    DUPLICATE_KEY = "a public key appears twice"
    BAD_KEY = "a public key has the wrong size or is invalid"
    BAD_SIGNATURE = "a key advertisement signature does not verify"
    UNKNOWN_ID = "an id is not a neighbour that was alive at the previous stage"
    SELF_DROPPED = "this client is listed as dropped"
    ALIVE_AND_DROPPED = "a client is listed as both alive and dropped"
    BAD_CIPHERTEXT = "a share ciphertext does not decrypt or is addressed wrongly"
    BAD_INPUT = "the update does not fit the protocol (size or bound)"
    MODEL_MISMATCH = "the global model is not the one the session was bound to"
    BAD_REQUEST = "a stage request does not follow its schema"
    INCONSISTENT_VIEW = "fewer than t sites signed the same survivor set (sites may have been shown different ones)"
    NO_IDENTITY = "this site's policy requires enrolled identities, and it has none for this study"
    # server-side
    NOT_ENOUGH_SURVIVORS = "fewer than the threshold survived a stage"
    BAD_RESPONSE = "a client's response is malformed"
    RECONSTRUCTION_FAILED = "a secret could not be reconstructed from its shares"
    IMPOSSIBLE_AGGREGATE = "the unmasked sum is not one the contributors could have sent"


class SecAggAbort(Exception):
    """The round stops here; nothing individual is revealed."""

    def __init__(self, reason: AbortReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"secure aggregation aborted: {reason.value}" + (f" ({detail})" if detail else ""))
