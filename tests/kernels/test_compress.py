"""Issue 13: update compression kernels (fp16, int8 with a per-tensor scale, top-k with error feedback),
with hand-computed cases and round-trip error bounds."""

from __future__ import annotations

import math

import pytest
import torch

from meshctl.runtime import wire
from meshctl.runtime.kernels import compress as c

SHAPES = [("w", [3, 4]), ("b", [4])]


def _delta(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in SHAPES}


def test_int8_scale_by_hand():
    q, scale = c.quantize_int8(torch.tensor([0.5, -1.27, 0.004, 0.0]))
    assert float(scale) == pytest.approx(0.01)  # max |x| / 127 = 1.27 / 127
    assert q.tolist() == [50, -127, 0, 0]
    assert q.dtype == torch.int8
    zero_q, zero_scale = c.quantize_int8(torch.zeros(3))
    assert zero_q.tolist() == [0, 0, 0] and float(zero_scale) == 0.0


@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_round_trip_error_bounds(kind):
    delta = _delta()
    sent, residual = c.compress(kind, None, delta)
    assert residual == {}
    back = c.restore(kind, None, SHAPES, sent)
    for name, x in delta.items():
        err = (back[name] - x).abs().max().item()
        if kind == "int8":  # round to nearest: half a step of s = max|x| / 127
            assert err <= x.abs().max().item() / 127 / 2 * (1 + 1e-6)
        else:  # fp16 keeps 11 significant bits: relative error at most 2^-11
            assert err <= x.abs().max().item() * 2**-11
        assert back[name].dtype == torch.float32


def test_fp16_saturates_instead_of_overflowing():
    sent, _ = c.compress("fp16", None, {"b": torch.tensor([1e6, -1e6, 1.0, 2.0])})
    back = c.restore("fp16", None, [("b", [4])], sent)["b"]
    assert back.tolist() == [65504.0, -65504.0, 1.0, 2.0]


def test_topk_keeps_largest_by_hand():
    delta = {"b": torch.tensor([0.1, -3.0, 0.2, 2.0, -0.05])}
    sent, residual = c.compress("topk", 0.4, delta)  # ceil(0.4 * 5) = 2 values
    assert sent["b#idx"].tolist() == [1, 3] and sent["b#idx"].dtype == torch.int32
    assert sent["b#val"].tolist() == [-3.0, 2.0]
    assert residual["b"].tolist() == pytest.approx([0.1, 0.0, 0.2, 0.0, -0.05])
    assert c.restore("topk", 0.4, [("b", [5])], sent)["b"].tolist() == pytest.approx([0.0, -3.0, 0.0, 2.0, 0.0])


def test_topk_error_feedback_sends_what_was_held_back():
    """A value too small to be sent in one round is sent once it has accumulated; over the rounds the sum
    of what was sent plus the residual is exactly the sum of the deltas."""
    step = torch.tensor([1.0, 0.4, 0.0, 0.0])
    residual: dict[str, torch.Tensor] = {}
    sent_total = torch.zeros(4)
    rounds = 3
    for _ in range(rounds):
        sent, residual = c.compress("topk", 0.25, {"b": step}, residual)  # one value a round
        sent_total += c.restore("topk", 0.25, [("b", [4])], sent)["b"]
    # round 1 sends 1.0 (keeps 0.4); round 2: [1.0, 0.8] sends 1.0 (keeps 0.8); round 3: [1.0, 1.2] sends 1.2
    assert sent_total.tolist() == pytest.approx([2.0, 1.2, 0.0, 0.0])
    assert (sent_total + residual["b"]).tolist() == pytest.approx((rounds * step).tolist())


def test_topk_sizes_from_the_plan_alone():
    assert c.kept(1000, 0.1) == 100 and c.kept(5, 0.01) == 1 and c.kept(5, 1.0) == 5 and c.kept(0, 0.5) == 0
    assert c.layout("topk", 0.1, [("w", [10, 10])]) == [("w#idx", [10], "int32"), ("w#val", [10], "float32")]
    assert c.layout("int8", None, [("w", [2, 3])]) == [("w", [2, 3], "int8"), ("w#scale", [1], "float32")]


@pytest.mark.parametrize("kind,k", [("fp16", None), ("int8", None), ("topk", 0.3)])
def test_compressed_update_crosses_the_wire(kind, k):
    sent, _ = c.compress(kind, k, _delta(1))
    frames = wire.encode(wire.TrainRes(job="j", round=1, examples=3, loss=0.1, seconds=0.0), sent)
    msg, tensors = wire.decode(frames)
    assert [(s.name, s.shape, s.dtype) for s in msg.tensors] == c.layout(kind, k, SHAPES)
    back = c.restore(kind, k, SHAPES, tensors)
    assert torch.equal(back["w"], c.restore(kind, k, SHAPES, sent)["w"])
    numel = [math.prod(shape) for _, shape in SHAPES]  # 12 and 4 values: 64 bytes as float32
    want = {"fp16": 2 * sum(numel), "int8": sum(numel) + 4 * len(numel),  # one float32 scale per tensor
            "topk": sum(8 * c.kept(n, 0.3) for n in numel)}[kind]  # an int32 index and a float32 value each
    assert wire.frames_size(frames[1:]) == want


def test_restore_refuses_what_does_not_fit():
    sent, _ = c.compress("topk", 0.5, {"b": torch.tensor([1.0, -2.0, 3.0, 0.5])})
    shapes = [("b", [4])]
    with pytest.raises(c.CompressError, match="strictly increasing"):
        c.restore("topk", 0.5, shapes, {"b#idx": torch.tensor([2, 1], dtype=torch.int32), "b#val": sent["b#val"]})
    with pytest.raises(c.CompressError, match="out of range"):
        c.restore("topk", 0.5, shapes, {"b#idx": torch.tensor([1, 4], dtype=torch.int32), "b#val": sent["b#val"]})
    with pytest.raises(c.CompressError, match="layout"):
        c.restore("topk", 0.5, shapes, {"b#idx": sent["b#idx"].long(), "b#val": sent["b#val"]})
    q, _ = c.compress("int8", None, {"b": torch.ones(4)})
    with pytest.raises(c.CompressError, match="scale"):
        c.restore("int8", None, shapes, {"b": q["b"], "b#scale": torch.tensor([math.inf])})
    with pytest.raises(c.CompressError, match="non-finite"):
        c.restore("fp16", None, shapes, {"b": torch.tensor([1.0, math.nan, 0.0, 0.0], dtype=torch.float16)})
