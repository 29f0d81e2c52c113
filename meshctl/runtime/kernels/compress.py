"""Compression of model updates: fp16, int8 with a per-tensor scale, top-k with error feedback.

A domain compresses its update DELTA (local weights minus the round's global weights), tensor
by tensor in plan order; the coordinator restores a float32 delta and adds it back to the
global weights it sent, so every aggregation rule sees full float32 updates. What crosses the
wire per float32 tensor `name` of shape S (`layout` gives it from the plan alone, so a receiver
checks every frame's name, dtype and shape before it reads a value):

- `fp16`: `name` float16 S (values beyond ±65504 saturate);
- `int8`: `name` int8 S and `name#scale` float32 [1]: q = round(x / s) with s = max|x| / 127,
  restored as q · s, so each value is off by at most s / 2;
- `topk`: `name#idx` (int32, int64 for tensors of 2³¹ values or more) and `name#val` float32, both
  [max(1, ceil(k · numel))]: the largest magnitudes of delta + residual, indices strictly
  increasing; what was not sent stays in the domain's residual and is added to the next round's
  delta (error feedback, Stich et al. 2018; Karimireddy et al. 2019).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

KINDS = ("fp16", "int8", "topk")
INT8_MAX = 127
FP16_MAX = float(torch.finfo(torch.float16).max)

Shapes = Sequence[tuple[str, Sequence[int]]]
"""(tensor name, shape) of the plan's tensors, in plan order."""


class CompressError(ValueError):
    """A compressed update that does not restore: wrong layout, or values out of range."""


def kept(numel: int, k: float) -> int:
    """How many values top-k sends of a tensor of `numel` values: max(1, ceil(k · numel)), at most numel."""
    return min(numel, max(1, math.ceil(k * numel))) if numel else 0


def _index_dtype(numel: int) -> str:
    return "int32" if numel < 2**31 else "int64"


def layout(kind: str, k: float | None, shapes: Shapes) -> list[tuple[str, list[int], str]]:
    """(name, shape, dtype) of every tensor frame an update of `kind` carries, in order."""
    out: list[tuple[str, list[int], str]] = []
    for name, shape in shapes:
        shape = list(shape)
        if kind == "fp16":
            out.append((name, shape, "float16"))
        elif kind == "int8":
            out += [(name, shape, "int8"), (f"{name}#scale", [1], "float32")]
        elif kind == "topk":
            numel = math.prod(shape)
            n = kept(numel, float(k or 0))
            out += [(f"{name}#idx", [n], _index_dtype(numel)), (f"{name}#val", [n], "float32")]
        else:
            raise ValueError(f"unknown compression {kind!r}")
    return out


def compress(kind: str, k: float | None, delta: dict[str, torch.Tensor],
             residual: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the tensors to send, the new residual) for the float32 `delta`, tensor by tensor in its order.

    Only top-k keeps a residual (what it did not send, added to the next delta); the others return {}."""
    out: dict[str, torch.Tensor] = {}
    left: dict[str, torch.Tensor] = {}
    for name, x in delta.items():
        x = x.detach().to(torch.float32)
        if kind == "fp16":
            out[name] = x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
        elif kind == "int8":
            q, scale = quantize_int8(x)
            out[name], out[f"{name}#scale"] = q, scale.reshape(1)
        elif kind == "topk":
            acc = x + residual[name] if residual and name in residual else x.clone()
            flat = acc.reshape(-1)
            n = kept(flat.numel(), float(k or 0))
            idx = torch.topk(flat.abs(), n, sorted=False).indices.sort().values
            out[f"{name}#idx"] = idx.to(getattr(torch, _index_dtype(flat.numel())))
            out[f"{name}#val"] = flat[idx].clone()
            flat[idx] = 0.0
            left[name] = acc
        else:
            raise ValueError(f"unknown compression {kind!r}")
    return out, left


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): symmetric per-tensor int8, s = max|x| / 127 (0 for an all-zero tensor), q = round(x / s)."""
    top = x.abs().max() if x.numel() else torch.tensor(0.0)
    scale = (top / INT8_MAX).to(torch.float32)
    if not scale > 0:
        return torch.zeros(x.shape, dtype=torch.int8), torch.zeros((), dtype=torch.float32)
    q = torch.round(x / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def restore(kind: str, k: float | None, shapes: Shapes, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 delta, tensor by tensor, of an update compressed as `kind`. Raises CompressError when
    the tensors are not `layout`'s or hold values that do not restore (a non-finite value or scale, a
    top-k index out of range or not strictly increasing)."""
    expect = layout(kind, k, shapes)
    got = [(name, list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()]
    if got != expect:
        raise CompressError(f"tensors do not match the plan's {kind} layout")
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes:
        shape = list(shape)
        if kind == "fp16":
            x = tensors[name].to(torch.float32)
        elif kind == "int8":
            scale = float(tensors[f"{name}#scale"][0])
            if not (math.isfinite(scale) and scale >= 0):
                raise CompressError(f"tensor {name!r}: int8 scale {scale} is negative or not finite")
            x = tensors[name].to(torch.float32) * scale
        else:
            idx, val = tensors[f"{name}#idx"].to(torch.int64), tensors[f"{name}#val"]
            numel = math.prod(shape)
            if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= numel or bool((idx[1:] <= idx[:-1]).any())):
                raise CompressError(f"tensor {name!r}: top-k indices out of range or not strictly increasing")
            x = torch.zeros(numel, dtype=torch.float32)
            x[idx] = val
            x = x.reshape(shape)
        if not bool(torch.isfinite(x).all()):
            raise CompressError(f"tensor {name!r} holds non-finite values")
        out[name] = x
    return out
