"""Shamir t-of-n secret sharing over the prime field GF(p), p = 2^521 - 1 (a Mersenne prime).

A 32-byte secret (a mask seed or an X25519 private key) fits in one field element, so one polynomial per
secret. Share x-coordinates are the receivers' node ids (non-zero 64-bit integers).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: bytes, threshold: int, xs: Sequence[int],
          coefficients: Sequence[int] | None = None) -> dict[int, int]:
    """Shares of `secret` for each x in `xs`; any `threshold` of them recover it, fewer reveal nothing."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and the number of shares {len(xs)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share x-coordinates must be distinct and non-zero")
    value = int.from_bytes(secret, "big")
    if value >= PRIME:
        raise ValueError("secret too large for the field")
    if coefficients is None:
        coefficients = [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    elif len(coefficients) != threshold - 1:
        raise ValueError("need threshold - 1 coefficients")
    poly = [value, *coefficients]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(poly):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Coefficients l_j with f(0) = sum_j l_j f(x_j) for any polynomial of degree < len(xs)."""
    return lagrange_at(xs, 0)


def lagrange_at(xs: Sequence[int], point: int) -> list[int]:
    """Coefficients l_j with f(point) = sum_j l_j f(x_j) for any polynomial of degree < len(xs).

    Numerators from prefix and suffix products, one modular inversion for all j (Montgomery's batch trick): the
    server reconstructs a secret per site, so this runs hundreds of times a round."""
    shifted = [(x - point) % PRIME for x in xs]
    prefix, suffix = [1], [1]
    for a, b in zip(shifted, reversed(shifted), strict=True):
        prefix.append(prefix[-1] * a % PRIME)
        suffix.append(suffix[-1] * b % PRIME)
    t = len(xs)
    numerators = [prefix[j] * suffix[t - 1 - j] % PRIME for j in range(t)]  # product of the others' (x_m - point)
    denominators = []
    for j, xj in enumerate(xs):  # x-coordinates are 64-bit ids: the exact product is small, reduce it once
        den = 1
        for m, xm in enumerate(xs):
            if m != j:
                den *= xm - xj
        denominators.append(den % PRIME)
    return [n * inv % PRIME for n, inv in zip(numerators, _inverses(denominators), strict=True)]


def _inverses(values: Sequence[int]) -> list[int]:
    """Every value's inverse mod PRIME with a single pow(): prefix products, one inverse, then back."""
    prefix = [1]
    for v in values:
        prefix.append(prefix[-1] * v % PRIME)
    running = pow(prefix[-1], -1, PRIME)
    inverses = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        inverses[i] = running * prefix[i] % PRIME
        running = running * values[i] % PRIME
    return inverses


def check_spare(shares: Mapping[int, int], threshold: int,
                weights_cache: dict[tuple[int, ...], list[int]] | None = None) -> None:
    """With more than `threshold` shares, the first spare one must lie on the polynomial through the first
    `threshold`: a holder that lies about its share is caught instead of corrupting the secret. (With exactly
    `threshold` shares nothing can be checked; the caller's own checks on the result must do.)"""
    ordered = sorted(shares)
    if len(ordered) <= threshold:
        return
    xs, spare = tuple(ordered[:threshold]), ordered[threshold]
    key = (*xs, -spare)  # cached apart from the weights at zero
    weights = weights_cache.get(key) if weights_cache is not None else None
    if weights is None:
        weights = lagrange_at(xs, spare)
        if weights_cache is not None:
            weights_cache[key] = weights
    if sum(w * shares[x] for w, x in zip(weights, xs, strict=True)) % PRIME != shares[spare]:
        raise ValueError("the shares do not lie on one polynomial: a holder sent a wrong share")


def combine(shares: Mapping[int, int], threshold: int, secret_bytes: int = 32,
            weights_cache: dict[tuple[int, ...], list[int]] | None = None) -> bytes:
    """Recover the secret from at least `threshold` shares (the first `threshold` by x are used)."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares, need {threshold}")
    xs = tuple(sorted(shares)[:threshold])
    weights = weights_cache.get(xs) if weights_cache is not None else None
    if weights is None:
        weights = lagrange_at_zero(xs)
        if weights_cache is not None:
            weights_cache[xs] = weights
    value = sum(w * shares[x] for w, x in zip(weights, xs, strict=True)) % PRIME
    if value >= 2 ** (8 * secret_bytes):
        raise ValueError("reconstructed value does not fit the secret size: inconsistent shares")
    return value.to_bytes(secret_bytes, "big")


def share_to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(raw: bytes) -> int:
    if len(raw) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(raw)}")
    y = int.from_bytes(raw, "big")
    if y >= PRIME:
        raise ValueError("share outside the field")
    return y
