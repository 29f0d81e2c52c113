"""Federated averaging (McMahan et al. 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def fedavg(updates: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]) -> list[torch.Tensor]:
    """Weighted mean of each tensor position across `updates`, accumulated in float64.

    `updates[i][k]` is client i's k-th tensor; `weights[i]` its weight (usually its
    number of training examples). Returns new float32 tensors.
    """
    if not updates or len(updates) != len(weights):
        raise ValueError("fedavg needs one weight per update and at least one update")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("fedavg weights sum to zero")
    out: list[torch.Tensor] = []
    for k in range(len(updates[0])):
        acc = torch.zeros(updates[0][k].shape, dtype=torch.float64)
        for upd, w in zip(updates, weights):
            acc.add_(upd[k].to(torch.float64), alpha=w / total)
        out.append(acc.to(updates[0][k].dtype))
    return out
