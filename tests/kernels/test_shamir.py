"""Shamir t-of-n sharing (hand-computed over GF(17)) and SecAgg+ mask removal with dropped domains."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from meshctl.runtime.kernels import secagg, shamir


def _coefficients(*values: int):
    it = iter(values)
    return lambda _p: next(it)


def test_a_hand_computed_two_of_three_split_and_its_reconstruction():
    # f(x) = 5 + 3x (mod 17): f(1) = 8, f(2) = 11, f(3) = 14
    shares = shamir.split(bytes([5]), 3, 2, prime=17, randbelow=_coefficients(3))
    assert shares == [(1, 8), (2, 11), (3, 14)]
    # s = 8 * 3/(3-1) + 14 * 1/(1-3) = 8*3*9 + 14*8 = 12 + 10 = 5 (mod 17)
    assert shamir.reconstruct([(1, 8), (3, 14)], 2, size=1, prime=17) == bytes([5])
    for pair in itertools.combinations(shares, 2):
        assert shamir.reconstruct(list(pair), 2, size=1, prime=17) == bytes([5])


def test_three_of_four_at_the_threshold_and_below_it():
    # f(x) = 7 + 2x + x^2 (mod 17): 10, 15, 22 = 5, 31 = 14
    shares = shamir.split(bytes([7]), 4, 3, prime=17, randbelow=_coefficients(2, 1))
    assert shares == [(1, 10), (2, 15), (3, 5), (4, 14)]
    assert shamir.reconstruct(shares[1:], 3, size=1, prime=17) == bytes([7])
    with pytest.raises(shamir.ShamirError, match="2 share"):
        shamir.reconstruct(shares[:2], 3, size=1, prime=17)
    with pytest.raises(shamir.ShamirError, match="repeat"):
        shamir.reconstruct([shares[0], shares[0], shares[1]], 3, size=1, prime=17)
    with pytest.raises(shamir.ShamirError, match="threshold"):
        shamir.split(bytes([7]), 2, 3, prime=17)


def test_32_byte_secrets_round_trip_and_t_minus_one_shares_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, 16, 11)
    assert shamir.reconstruct(shares[5:], 11) == secret
    assert shamir.reconstruct(shares[::-1][:11], 11) == secret
    # ten shares, padded with a wrong one, give a field element, not the secret
    with pytest.raises(shamir.ShamirError):
        shamir.reconstruct(shares[:10] + [(16, 1)], 11)


def test_the_sum_of_survivors_is_recovered_exactly_when_two_drop():
    """Six domains mask with self masks and pairwise masks; d1 and d4 drop before sending their
    masked update. From the shares of the survivors, the coordinator removes the survivors' self
    masks and the dropped domains' pairwise masks: the sum equals the plain sum of the survivors."""
    g = torch.Generator().manual_seed(0)
    names = [f"d{i}" for i in range(6)]
    keys = {d: secagg.new_key() for d in names}
    pubs = {d: secagg.public_bytes(k) for d, k in keys.items()}
    seeds = {d: secagg.new_seed() for d in names}
    updates = {d: [torch.randn(7, generator=g)] for d in names}
    t = secagg.threshold(len(names))
    assert t == 4
    encoded = {d: secagg.encode(updates[d], 3.0) for d in names}
    masked = {d: secagg.mask(encoded[d], d, keys[d], pubs, b"run|job", 2, self_seed=seeds[d]) for d in names}
    b_shares = {d: shamir.split(seeds[d], 6, t) for d in names}
    s_shares = {d: shamir.split(secagg.private_bytes(keys[d]), 6, t) for d in names}
    survivors, dropped = ["d0", "d2", "d3", "d5"], ["d1", "d4"]
    total = secagg.add([masked[d] for d in survivors])
    assert not np.array_equal(total, secagg.add([encoded[d] for d in survivors]))
    at = [names.index(v) for v in survivors]  # each survivor reveals its share (x = its index + 1)
    rebuilt_b = {u: shamir.reconstruct([b_shares[u][i] for i in at], t) for u in survivors}
    rebuilt_s = {d: shamir.reconstruct([s_shares[d][i] for i in at], t) for d in dropped}
    plain = secagg.unmask(total, survivors, rebuilt_b, rebuilt_s, pubs, b"run|job", 2)
    assert np.array_equal(plain, secagg.add([encoded[d] for d in survivors]))
    # without the self masks removed the words are noise; a wrong key is caught
    with pytest.raises(secagg.RecoveryError):
        secagg.unmask(total, survivors, rebuilt_b, {"d1": rebuilt_s["d4"]}, pubs, b"run|job", 2)


def test_a_sealed_share_opens_only_for_its_pair_and_label():
    a, b, c = secagg.new_key(), secagg.new_key(), secagg.new_key()
    sealed = secagg.seal(a, secagg.public_bytes(b), b"ctx", b"a>b|1|1", b"share")
    assert secagg.open_sealed(b, secagg.public_bytes(a), b"ctx", b"a>b|1|1", sealed) == b"share"
    with pytest.raises(secagg.RecoveryError):
        secagg.open_sealed(b, secagg.public_bytes(a), b"ctx", b"a>b|2|1", sealed)
    with pytest.raises(secagg.RecoveryError):
        secagg.open_sealed(c, secagg.public_bytes(a), b"ctx", b"a>b|1|1", sealed)
