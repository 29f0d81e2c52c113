"""Model builders. Each returns an nn.Module whose state_dict names are stable."""

from __future__ import annotations

import importlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from meshctl.compiler.plan import PlanJob


def mlp(input_dim: int, hidden: Sequence[int], output_dim: int, *, seed: int | None = 0) -> nn.Sequential:
    """Linear/ReLU stack, PyTorch default init after `torch.manual_seed(seed)`.

    Layers are numbered 0, 2, 4, ... for the Linear modules, so state names are
    `0.weight`, `0.bias`, `2.weight`, ...
    """
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = input_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, output_dim))
    return nn.Sequential(*layers)


FLOAT_ONLY_HINT = ("e.g. BatchNorm's num_batches_tracked: use nn.BatchNorm2d(..., track_running_stats=False), "
                   "or GroupNorm/LayerNorm")
"""Why a model with non-float32 state is refused, and what to use instead."""


def cnn(input_shape: Sequence[int], output_dim: int, *, channels: Sequence[int] = (16, 32), kernel: int = 3,
        hidden: Sequence[int] = (64, 32)) -> nn.Sequential:
    """Conv2d/ReLU (then MaxPool2d(2) while H and W are at least 2) per channel width, then
    Flatten and a Linear/ReLU head; `compiler.plan.cnn_tensors` lists the same state."""
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for ch in channels:
        layers += [nn.Conv2d(c, ch, kernel, padding=kernel // 2), nn.ReLU()]
        if h >= 2 and w >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = ch
    layers.append(nn.Flatten())
    d = c * h * w
    for width in hidden:
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, output_dim))
    return nn.Sequential(*layers)


def load_factory(entrypoint: str, root: str | None) -> Callable[..., Any]:
    """The callable `pkg.module:factory` names, imported with `root` first on sys.path.
    Raises LookupError (one line) when the module has no such callable; import errors propagate."""
    module_name, _, attr = entrypoint.partition(":")
    if root is not None and (not sys.path or sys.path[0] != root):
        if root in sys.path:
            sys.path.remove(root)
        sys.path.insert(0, root)
    module = importlib.import_module(module_name)
    factory = getattr(module, attr, None)
    if factory is None:
        raise LookupError(f"module {module_name} has no attribute {attr!r}")
    if not callable(factory):
        raise LookupError(f"{entrypoint} is a {type(factory).__name__}, not a callable")  # noqa: TRY004 - one kind of refusal
    return factory


def _shape_inputs(module: nn.Module, shape: list[int]) -> None:
    """Give `module` its inputs as [n, *shape] (data arrives flat, [n, prod(shape)])."""
    size = math.prod(shape)

    def view(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        if isinstance(x, torch.Tensor) and x.shape[-1:] == (size,) and x.dim() in (1, 2):
            return (x.reshape(*x.shape[:-1], *shape), *args[1:])
        return None

    module.register_forward_pre_hook(view)


def build_model(job: PlanJob, *, root: str | Path | None = None, seed: int | None = None) -> nn.Module:
    """The job's model as the plan describes it: `torch.manual_seed(seed)` (if given), then the
    built-in or the entrypoint factory, called as `factory(input_shape, output_dim, **args)`.

    Models that take a shaped input (cnn, entrypoint) see x as [n, *input_shape]. The caller
    checks an entrypoint's code against the plan first (`compiler.entrypoint.check_code`).
    """
    arch = job.architecture
    shape = list(getattr(job, "input_shape", None) or [arch.input_dim])
    if arch.kind in ("mlp", "logistic"):
        return mlp(arch.input_dim, arch.hidden, arch.output_dim, seed=seed)
    if seed is not None:
        torch.manual_seed(seed)
    if arch.kind == "cnn":
        model: nn.Module = cnn(shape, arch.output_dim, channels=arch.channels or [], kernel=arch.kernel or 3,
                               hidden=arch.hidden)
    else:
        factory = load_factory(arch.entrypoint or "", str(root) if root is not None else None)
        model = factory(shape, arch.output_dim, **json.loads(arch.args or "{}"))
        if not isinstance(model, nn.Module):
            raise TypeError(f"{arch.entrypoint} returned {type(model).__name__}, not a torch.nn.Module")
    if len(shape) > 1:
        _shape_inputs(model, shape)
    return model
