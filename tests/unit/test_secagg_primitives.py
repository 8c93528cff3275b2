"""Known answers and invariants for the primitives under the protocol."""

import hashlib

import numpy as np
import pytest
from Crypto.Cipher import AES
from flwr.app import Array  # PyCryptodome: an independent AES implementation
from hypothesis import given, settings
from hypothesis import strategies as st

from common.secagg import keys, shamir
from common.secagg.encoding import FixedPoint
from common.secagg.errors import SecAggAbort
from common.secagg.prg import MaskStream, apply_masks, counter_at, keystream_words
from common.wire import array_view, npy_array

# NIST SP 800-38A, F.5.5 CTR-AES256.Encrypt, block #1
NIST_KEY = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
NIST_COUNTER = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
NIST_PLAINTEXT = bytes.fromhex("6bc1bee22e409f96e93d7e117393172a")
NIST_CIPHERTEXT = bytes.fromhex("601ec313775789a5b7a7f504bbf3d228")


def test_prg_is_aes256_ctr_nist_vector():
    keystream = MaskStream(4).keystream(NIST_KEY, counter=NIST_COUNTER).tobytes()
    assert bytes(a ^ b for a, b in zip(keystream, NIST_PLAINTEXT, strict=True)) == NIST_CIPHERTEXT


def test_prg_words_match_an_independent_aes_ctr():
    seed = bytes(range(32))
    expected = AES.new(seed, AES.MODE_CTR, nonce=b"", initial_value=bytes(16)).encrypt(bytes(4 * 1000))
    assert keystream_words(seed, 1000).tobytes() == expected
    # little-endian words: a fixed regression value for the first word of this seed
    assert int(keystream_words(seed, 1)[0]) == int.from_bytes(expected[:4], "little")


def test_masks_add_and_subtract_to_zero():
    stream = MaskStream(257)
    acc = np.arange(257, dtype=np.uint32)
    stream.add(acc, b"\x01" * 32)
    assert not np.array_equal(acc, np.arange(257, dtype=np.uint32))
    stream.subtract(acc, b"\x01" * 32)
    assert np.array_equal(acc, np.arange(257, dtype=np.uint32))


def _aes128_mask(seed: bytes, length: int) -> np.ndarray:
    """The mask of a 32-byte seed by an independent AES (PyCryptodome): AES-128-CTR under SHA-256 of the seed."""
    key = hashlib.sha256(b"carefed/secagg/mask-key/v1" + seed).digest()[:16]
    stream = AES.new(key, AES.MODE_CTR, nonce=b"", initial_value=bytes(16)).encrypt(bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_masks_applied_in_slices_by_threads_are_aes128_ctr_streams(workers: int):
    length = 3 * 65_536 + 6  # slices end mid-vector and the last one is short
    seeds = [bytes([k]) * 16 + bytes([255 - k]) * 16 for k in range(5)]
    expected = np.arange(length, dtype=np.uint32)
    for seed in seeds[:3]:
        expected += _aes128_mask(seed, length)
    for seed in seeds[3:]:
        expected -= _aes128_mask(seed, length)
    acc = np.arange(length, dtype=np.uint32)
    apply_masks(acc, seeds[:3], seeds[3:], workers)
    assert np.array_equal(acc, expected)


def test_a_mask_seed_changed_in_its_last_byte_gives_an_unrelated_mask():
    seed = bytes(range(32))
    near = seed[:-1] + bytes([seed[-1] ^ 1])  # e.g. a reconstruction off by a small amount
    a, b = np.zeros(1000, np.uint32), np.zeros(1000, np.uint32)
    apply_masks(a, [seed], [])
    apply_masks(b, [near], [])
    assert np.mean(a == b) < 0.01


def test_a_stream_resumes_only_at_a_block_boundary():
    assert counter_at(8) == (2).to_bytes(16, "big")
    with pytest.raises(ValueError, match="block boundary"):
        counter_at(6)


def test_prg_refuses_short_seeds():
    with pytest.raises(ValueError, match="32 bytes"):
        MaskStream(4).keystream(b"\x00" * 16)


def test_shamir_known_answer():
    # f(x) = 7 + 3x + 2x^2 over GF(2^521 - 1): f(1) = 12, f(2) = 21, f(3) = 34
    secret = (7).to_bytes(32, "big")
    shares = shamir.split(secret, 3, [1, 2, 3], coefficients=[3, 2])
    assert shares == {1: 12, 2: 21, 3: 34}
    assert shamir.combine({2: 21, 3: 34, 1: 12}, 3) == secret


@settings(max_examples=40, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(2, 12), data=st.data())
def test_any_t_shares_recover_the_secret(secret: bytes, n: int, data: st.DataObject):
    t = data.draw(st.integers(1, n))
    xs = data.draw(st.lists(st.integers(1, 2**64 - 1), min_size=n, max_size=n, unique=True))
    shares = shamir.split(secret, t, xs)
    subset = data.draw(st.permutations(xs)).__getitem__(slice(0, t))
    assert shamir.combine({x: shares[x] for x in subset}, t) == secret


def test_fewer_than_t_shares_are_refused_and_wrong_shares_do_not_give_the_secret():
    secret = b"\x42" * 32
    shares = shamir.split(secret, 3, [10, 20, 30, 40])
    with pytest.raises(ValueError, match="need 3"):
        shamir.combine({10: shares[10], 20: shares[20]}, 3)
    forged = {**shares, 10: (shares[10] + 1) % shamir.PRIME}
    # a tampered share never yields the secret (the server checks reconstructed keys against their public keys)
    try:
        assert shamir.combine(forged, 3) != secret
    except ValueError as err:
        assert "inconsistent shares" in str(err)


def test_x25519_refuses_low_order_points():
    private, _ = keys.new_key_pair()
    with pytest.raises(SecAggAbort, match="public key"):
        keys.agree(private, bytes(32))  # the all-zero point gives an all-zero shared secret


def test_key_derivation_is_bound_to_session_and_purpose():
    a, a_pub = keys.new_key_pair()
    b, b_pub = keys.new_key_pair()
    assert keys.pairwise_mask_seed(a, b_pub, b"s1", 1, 2) == keys.pairwise_mask_seed(b, a_pub, b"s1", 2, 1)
    assert keys.pairwise_mask_seed(a, b_pub, b"s1", 1, 2) != keys.pairwise_mask_seed(a, b_pub, b"s2", 1, 2)
    assert keys.share_encryption_key(a, b_pub, b"s1", 1, 2) == keys.share_encryption_key(b, a_pub, b"s1", 1, 2)
    assert keys.share_encryption_key(a, b_pub, b"s1", 1, 2) != keys.share_encryption_key(a, b_pub, b"s1", 2, 1)
    assert keys.share_encryption_key(a, b_pub, b"s1", 1, 2) != keys.pairwise_mask_seed(a, b_pub, b"s1", 1, 2)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 1000), bound=st.floats(1e-3, 1e4), data=st.data())
def test_fixed_point_sums_never_overflow_and_decode_within_resolution(n: int, bound: float, data: st.DataObject):
    codec = FixedPoint.for_cohort(bound, n)
    values = data.draw(st.lists(st.sampled_from([bound, -bound, 0.0, bound / 3]), min_size=n, max_size=n))
    encoded = [codec.encode(np.array([v])) for v in values]
    total = np.zeros(1, np.uint32)
    for e in encoded:
        total += e
    assert abs(codec.decode_sum(total)[0] - sum(values)) <= n * codec.resolution + 1e-9 * bound * n


def test_fixed_point_refuses_values_beyond_the_bound_instead_of_clipping():
    codec = FixedPoint.for_cohort(1.0, 10)
    with pytest.raises(SecAggAbort, match="exceeds the declared bound"):
        codec.encode(np.array([0.5, 1.0001]))
    with pytest.raises(SecAggAbort, match="NaN"):
        codec.encode(np.array([np.nan]))


def test_stochastic_rounding_is_unbiased():
    codec = FixedPoint.for_cohort(1.0, 2**20)  # coarse: resolution ~ 1/2047
    value = 0.3 * codec.resolution
    decoded = codec.decode_sum(np.sum([codec.encode(np.full(1000, value)) for _ in range(20)], axis=0,
                                      dtype=np.uint32))
    assert abs(decoded.mean() / 20 - value) < 0.1 * codec.resolution


def test_array_view_reads_npy_bytes_in_place_and_refuses_anything_else():
    vector = np.arange(10, dtype=np.uint32)
    view = array_view(Array(vector).data, np.uint32, 10)
    assert np.array_equal(view, vector) and not view.flags.writeable
    with pytest.raises(ValueError, match="expected 10 values of uint32"):
        array_view(Array(vector.astype(np.int64)).data, np.uint32, 10)
    with pytest.raises(ValueError, match="expected 11 values"):
        array_view(Array(vector).data, np.uint32, 11)
    with pytest.raises(ValueError, match="not a .npy array"):
        array_view(b"garbage" * 20, np.uint32, 10)


def test_a_spare_share_catches_a_wrong_share_and_exactly_t_shares_cannot_be_checked():
    from common.secagg import shamir

    shares = shamir.split(b"\x07" * 32, 3, [11, 12, 13, 14])
    shamir.check_spare(shares, 3)  # honest: consistent
    for liar in shares:
        bad = {**shares, liar: (shares[liar] + 1) % shamir.PRIME}
        with pytest.raises(ValueError, match="do not lie on one polynomial"):
            shamir.check_spare(bad, 3)
    shamir.check_spare({x: shares[x] for x in (11, 12, 13)}, 3)  # no spare: nothing to check


@settings(max_examples=30, deadline=None)
@given(length=st.integers(0, 5000), dtype=st.sampled_from([np.uint32, np.float32, np.int64]))
def test_npy_array_holds_the_bytes_flower_writes(length: int, dtype):
    vector = (np.arange(length) * 2654435761).astype(dtype)
    mine, flowers = npy_array(vector), Array(vector)
    assert (mine.data, mine.dtype, mine.shape, mine.stype) == (flowers.data, flowers.dtype, flowers.shape,
                                                                flowers.stype)
    assert np.array_equal(array_view(mine.data, dtype, length), vector)
