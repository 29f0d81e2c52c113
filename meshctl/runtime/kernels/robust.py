"""Aggregation beyond the weighted mean: robust rules and adaptive server optimizers.

Every function takes `updates[i][k]`, client i's k-th tensor (full weights, as
daemons send them), and returns new float32 tensors; arithmetic is in float64.

- `coordinate_median`: per coordinate, the median (the mean of the two middle
  values for an even count). Tolerates fewer than half Byzantine updates.
- `trimmed_mean`: per coordinate, drop the `floor(trim * n)` lowest and highest
  values and average the rest (Yin et al. 2018).
- `krum`: the update whose summed squared distance to its `n - f - 2` nearest
  neighbours is smallest (Blanchard et al. 2017); needs `n >= 2f + 3`.
- `ServerOptimizer`: FedAdam / FedYogi (Reddi et al. 2021): the mean update minus
  the global weights is a pseudo-gradient that an Adam or Yogi step applies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _stacked(updates: Sequence[Sequence[torch.Tensor]], k: int) -> torch.Tensor:
    return torch.stack([u[k].to(torch.float64) for u in updates])


def _check(updates: Sequence[Sequence[torch.Tensor]]) -> None:
    if not updates:
        raise ValueError("aggregation needs at least one update")


def coordinate_median(updates: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Coordinate-wise median; for an even count, the mean of the two middle values."""
    _check(updates)
    n = len(updates)
    out = []
    for k in range(len(updates[0])):
        ordered = _stacked(updates, k).sort(dim=0).values
        mid = ordered[(n - 1) // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
        out.append(mid.to(updates[0][k].dtype))
    return out


def trimmed_mean(updates: Sequence[Sequence[torch.Tensor]], trim: float) -> list[torch.Tensor]:
    """Coordinate-wise mean after dropping `floor(trim * n)` values from each end."""
    _check(updates)
    if not 0 <= trim < 0.5:
        raise ValueError("trim must be in [0, 0.5)")
    n = len(updates)
    cut = int(trim * n)
    out = []
    for k in range(len(updates[0])):
        ordered = _stacked(updates, k).sort(dim=0).values
        out.append(ordered[cut:n - cut].mean(dim=0).to(updates[0][k].dtype))
    return out


def krum_scores(updates: Sequence[Sequence[torch.Tensor]], byzantine: int) -> list[float]:
    """Each update's summed squared distance to its `n - f - 2` nearest other updates."""
    _check(updates)
    n = len(updates)
    if n < 2 * byzantine + 3:
        raise ValueError(f"krum tolerating {byzantine} Byzantine update(s) needs at least "
                         f"{2 * byzantine + 3} updates, got {n}")
    flat = torch.stack([torch.cat([t.to(torch.float64).reshape(-1) for t in u]) for u in updates])
    dist = torch.cdist(flat, flat).pow(2)
    nearest = n - byzantine - 2
    scores = []
    for i in range(n):
        others = torch.cat([dist[i, :i], dist[i, i + 1:]])
        scores.append(float(others.sort().values[:nearest].sum()))
    return scores


def krum(updates: Sequence[Sequence[torch.Tensor]], byzantine: int) -> tuple[list[torch.Tensor], int]:
    """The update with the lowest Krum score (ties: the first), and its index."""
    scores = krum_scores(updates, byzantine)
    best = min(range(len(scores)), key=scores.__getitem__)
    return [t.clone() for t in updates[best]], best


class ServerOptimizer:
    """FedAdam or FedYogi over the pseudo-gradient `mean update - global weights`.

    m and v start at zero; each round
    `m = b1 m + (1 - b1) d`, Adam: `v = b2 v + (1 - b2) d²`,
    Yogi: `v = v - (1 - b2) d² sign(v - d²)`, and `w = w + lr m / (sqrt(v) + tau)`.
    """

    def __init__(self, kind: str, lr: float, beta_1: float, beta_2: float, tau: float):
        if kind not in ("fedadam", "fedyogi"):
            raise ValueError(f"unknown server optimizer {kind!r}")
        self.kind, self.lr, self.b1, self.b2, self.tau = kind, lr, beta_1, beta_2, tau
        self.m: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None

    def step(self, weights: Sequence[torch.Tensor], mean: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """New global weights from the current ones and the (weighted) mean of the updates."""
        delta = [a.to(torch.float64) - w.to(torch.float64) for a, w in zip(mean, weights)]
        if self.m is None or self.v is None:
            self.m = [torch.zeros_like(d) for d in delta]
            self.v = [torch.zeros_like(d) for d in delta]
        out = []
        for i, (w, d) in enumerate(zip(weights, delta)):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * d
            sq = d * d
            if self.kind == "fedadam":
                self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * sq
            else:
                self.v[i] = self.v[i] - (1 - self.b2) * sq * torch.sign(self.v[i] - sq)
            new = w.to(torch.float64) + self.lr * self.m[i] / (self.v[i].sqrt() + self.tau)
            out.append(new.to(w.dtype))
        return out
