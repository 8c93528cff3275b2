"""Secure aggregation (Bonawitz et al. 2017 double masking; SecAgg+ sparse graphs as an option).

Pure protocol code: no Flower, no network, no files. `client.ClientSession` and `server.ServerSession` are
state machines, one state per stage, that refuse anything off-protocol with a named `AbortReason`. Only this
package touches cryptographic primitives (X25519, HKDF-SHA256, AES-GCM, AES-CTR, Shamir over GF(2^521 - 1)).
"""

from common.secagg.errors import AbortReason, SecAggAbort

__all__ = ["AbortReason", "SecAggAbort"]
