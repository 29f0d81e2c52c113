"""Model builders. Each returns an nn.Module whose state_dict names are stable."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


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
