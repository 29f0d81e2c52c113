"""Pairwise masking: masks cancel in the sum, each masked update alone looks random,
and fixed-point encoding loses nothing a float32 model would notice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meshctl.runtime.kernels import secagg


def _parties(n: int):
    keys = {f"d{i}": secagg.new_key() for i in range(n)}
    return keys, {d: secagg.public_bytes(k) for d, k in keys.items()}


def test_masks_cancel_in_the_sum_and_only_there():
    g = torch.Generator().manual_seed(0)
    keys, pubs = _parties(4)
    updates = {d: [torch.randn(3, 5, generator=g), torch.randn(5, generator=g)] for d in keys}
    examples = {"d0": 10, "d1": 7, "d2": 30, "d3": 1}
    encoded = {d: secagg.encode(updates[d], examples[d]) for d in keys}
    masked = {d: secagg.mask(encoded[d], d, keys[d], pubs, b"run|job", 3) for d in keys}
    total = secagg.add(list(masked.values()))
    assert np.array_equal(total, secagg.add(list(encoded.values())))
    mean = secagg.decode(total, [[3, 5], [5]], float(sum(examples.values())))
    expect = [sum(updates[d][k] * examples[d] for d in keys) / sum(examples.values()) for k in range(2)]
    for a, b in zip(mean, expect):
        assert torch.allclose(a, b, atol=1e-6)
    # one masked update alone: words spread over the whole 64-bit range, nothing like the encoding
    alone = masked["d1"].view(np.int64).astype(np.float64)
    assert np.abs(alone).mean() > 2.0**60 and not np.array_equal(masked["d1"], encoded["d1"])
    # three of four do not cancel
    assert not np.array_equal(secagg.add([masked[d] for d in ("d0", "d1", "d2")]),
                              secagg.add([encoded[d] for d in ("d0", "d1", "d2")]))


def test_masks_are_fresh_per_round_and_per_context():
    keys, pubs = _parties(3)
    zero = np.zeros(8, dtype=np.uint64)
    a = secagg.mask(zero, "d0", keys["d0"], pubs, b"run|job", 1)
    assert not np.array_equal(a, secagg.mask(zero, "d0", keys["d0"], pubs, b"run|job", 2))
    assert not np.array_equal(a, secagg.mask(zero, "d0", keys["d0"], pubs, b"run2|job", 1))
    assert np.array_equal(a, secagg.mask(zero, "d0", keys["d0"], pubs, b"run|job", 1))


def test_an_update_too_large_to_encode_is_refused():
    with pytest.raises(secagg.EncodeError):
        secagg.encode([torch.tensor([1e9])], 1e6)
    with pytest.raises(secagg.EncodeError):
        secagg.encode([torch.tensor([float("nan")])], 1.0)
