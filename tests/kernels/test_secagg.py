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


def test_a_re_run_round_masks_afresh_so_two_attempts_reveal_no_difference():
    """The daemon's mask context for attempt 2+ of a round (a re-run after a loss) differs from
    attempt 1's: the coordinator, holding a survivor's masked update of both attempts, must not
    be able to subtract them and learn the difference of the two updates."""
    from types import SimpleNamespace

    from meshctl.compiler.plan import PlanTensor
    from meshctl.runtime import wire
    from meshctl.runtime.daemon import Daemon

    keys, pubs = _parties(3)
    peer_keys = {d: __import__("base64").b64encode(p).decode() for d, p in pubs.items()}
    job = SimpleNamespace(name="digits", tensors=[PlanTensor(name="w", shape=[4], dtype="float32")])
    g = torch.Generator().manual_seed(1)
    updates = {d: {"w": torch.randn(4, generator=g)} for d in keys}

    def masked(d: str, attempt: int) -> np.ndarray:
        me = SimpleNamespace(cfg=SimpleNamespace(domain=d, run="20261206-1"), secagg={"digits": keys[d]},
                             secagg_rounds={("digits", 2, attempt): {"seed": seeds[(d, attempt)]}})
        ins = wire.TrainIns(sender="coordinator", job="digits", round=2, version=1, participants=sorted(keys),
                            peer_keys=peer_keys, attempt=attempt)
        out = Daemon._masked(me, SimpleNamespace(job=job), ins, updates[d], 10)
        assert isinstance(out, torch.Tensor), out
        return out.numpy().view(np.uint64)

    seeds = {(d, a): secagg.new_seed() for d in keys for a in (1, 2)}
    for attempt in (1, 2):  # each attempt's pairwise masks cancel among its own replies
        total = secagg.unmask(secagg.add([masked(d, attempt) for d in keys]), sorted(keys),
                              {d: seeds[(d, attempt)] for d in keys}, {}, pubs, b"", 2)
        assert np.array_equal(total, secagg.add([secagg.encode([updates[d]["w"]], 10.0) for d in keys]))
    # the same survivor, same update, two attempts: different masks, so subtracting reveals nothing
    diff = (masked("d0", 1) - masked("d0", 2)).view(np.int64).astype(np.float64)
    assert np.abs(diff).mean() > 2.0**58
    assert np.array_equal(masked("d0", 1), masked("d0", 1))  # attempt 1 unchanged: deterministic
