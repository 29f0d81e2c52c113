"""Aggregation beyond the weighted mean: robust rules and adaptive server optimizers.

Every function takes `updates[i][k]`, client i's k-th tensor (full weights, as
daemons send them), and returns new float32 tensors; arithmetic is in float64.

- `coordinate_median`: per coordinate, the median (the mean of the two middle
  values for an even count). Tolerates fewer than half Byzantine updates.
- `trimmed_mean`: per coordinate, drop the `floor(trim * n)` lowest and highest
  values and average the rest (Yin et al. 2018).
- `krum`: the update whose summed squared distance to its `n - f - 2` nearest
  neighbours is smallest (Blanchard et al. 2017); needs `n >= 2f + 3`.
- `multi_krum`: the example-weighted mean of the `m` updates with the lowest Krum
  scores (Blanchard et al. 2017); `m = 1` is Krum.
- `bulyan`: Krum, applied again and again, selects `n - 2f` updates; per coordinate,
  the mean of the `n - 4f` of them closest to their median (El Mhamdi et al. 2018);
  needs `n >= 4f + 3`.
- `centered_clip`: from a centre `v` (the caller's: the weights plus the last global
  step), `L` times
  `v = v + sum_i p_i clip(x_i - v, radius)` (Karimireddy, He and Jaggi 2021).
- `bucket_means`: bucketing (Karimireddy, He and Jaggi 2022): a seeded random
  partition of the updates into buckets of `s`, each replaced by its example-weighted
  mean, so that a robust rule sees `ceil(n / s)` less heterogeneous inputs.
- `ServerOptimizer`: FedAdam / FedYogi (Reddi et al. 2021): the mean update minus
  the global weights is a pseudo-gradient that an Adam or Yogi step applies.
- `ServerMomentum`: FedAvgM (Hsu et al. 2019): `v = beta v + delta`, `w = w + lr v`.
"""

from __future__ import annotations

import random
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


def _weighted_mean(updates: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]) -> list[torch.Tensor]:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the weights of the chosen updates sum to zero")
    return [sum((u[k].to(torch.float64) * (w / total) for u, w in zip(updates, weights)),
                torch.zeros(updates[0][k].shape, dtype=torch.float64)).to(updates[0][k].dtype)
            for k in range(len(updates[0]))]


def multi_krum(updates: Sequence[Sequence[torch.Tensor]], examples: Sequence[float], byzantine: int,
               select: int) -> tuple[list[torch.Tensor], list[int]]:
    """The example-weighted mean of the `select` updates with the lowest Krum scores, and their
    indices (ascending score; ties: the first). Scores are computed once, over all `n` updates."""
    scores = krum_scores(updates, byzantine)
    if not 1 <= select <= len(updates):
        raise ValueError(f"multi_krum selects between 1 and {len(updates)} updates, not {select}")
    chosen = sorted(range(len(scores)), key=lambda i: (scores[i], i))[:select]
    return _weighted_mean([updates[i] for i in chosen], [examples[i] for i in chosen]), chosen


def bulyan(updates: Sequence[Sequence[torch.Tensor]], byzantine: int) -> tuple[list[torch.Tensor], list[int]]:
    """Bulyan over Krum (El Mhamdi, Guerraoui and Rouault 2018), and the indices Krum selected.

    Selection: Krum (tolerating f) picks one update from those left, `n - 2f` times, the
    scores recomputed over what is left each time. Aggregation: per coordinate, the mean
    of the `beta = n - 4f` selected values closest to the selected values' median.
    """
    _check(updates)
    n, f = len(updates), byzantine
    if n < 4 * f + 3:
        raise ValueError(f"bulyan tolerating {f} Byzantine update(s) needs at least {4 * f + 3} "
                         f"updates, got {n}")
    flat = torch.stack([torch.cat([t.to(torch.float64).reshape(-1) for t in u]) for u in updates])
    full = torch.cdist(flat, flat).pow(2)
    left, chosen = list(range(n)), []
    while len(chosen) < n - 2 * f:
        # Krum over the k updates left, n - f - 2 nearest clamped to what is left (as Flower does)
        dist = full[left][:, left]
        k = len(left)
        nearest = max(1, min(k - 1, k - f - 2))
        scores = [float(torch.cat([dist[j, :j], dist[j, j + 1:]]).sort().values[:nearest].sum())
                  if k > 1 else 0.0 for j in range(k)]
        j = min(range(k), key=scores.__getitem__)
        chosen.append(left.pop(j))
    beta = n - 4 * f
    out = []
    for k in range(len(updates[0])):
        sel = torch.stack([updates[i][k].to(torch.float64) for i in chosen])
        med = sel.median(dim=0).values if len(chosen) % 2 else sel.sort(dim=0).values[
            len(chosen) // 2 - 1:len(chosen) // 2 + 1].mean(dim=0)
        closest = (sel - med).abs().argsort(dim=0, stable=True)[:beta]
        out.append(sel.gather(0, closest).mean(dim=0).to(updates[0][k].dtype))
    return out, chosen


def centered_clip(updates: Sequence[Sequence[torch.Tensor]], examples: Sequence[float],
                  centre: Sequence[torch.Tensor], radius: float,
                  iterations: int) -> tuple[list[torch.Tensor], float, int]:
    """Centered clipping (Karimireddy, He and Jaggi 2021), the radius it used, and how many
    updates the first iteration clipped (those farther than the radius from the centre).

    From `v = centre`, `iterations` times: `v = v + sum_i p_i clip(x_i - v, radius)`, where
    `clip(z, r) = z min(1, r / ||z||)` over all of an update's tensors at once and `p_i` is
    update i's share of the examples. `radius = 0` takes the median of `||x_i - centre||`.
    """
    _check(updates)
    if iterations < 1 or radius < 0:
        raise ValueError("centered clipping needs iterations >= 1 and radius >= 0")
    total = float(sum(examples))
    if total <= 0:
        raise ValueError("centered clipping: the examples sum to zero")
    flat = torch.stack([torch.cat([t.to(torch.float64).reshape(-1) for t in u]) for u in updates])
    v = torch.cat([t.to(torch.float64).reshape(-1) for t in centre])
    if radius == 0:
        radius = float((flat - v).norm(dim=1).median())  # torch: the lower middle for an even count
    p = torch.tensor([e / total for e in examples], dtype=torch.float64)
    far = -1
    for _ in range(iterations):
        diff = flat - v
        norms = diff.norm(dim=1)
        far = int((norms > radius).sum()) if far < 0 else far
        scale = torch.where(norms > radius, radius / norms.clamp_min(1e-300), torch.ones_like(norms))
        v = v + (p * scale) @ diff
    out, at = [], 0
    for t in updates[0]:
        out.append(v[at:at + t.numel()].reshape(t.shape).to(t.dtype))
        at += t.numel()
    return out, radius, far


def buckets(n: int, size: int, seed: int | str) -> list[list[int]]:
    """A seeded random partition of `range(n)` into `ceil(n / size)` buckets of `size`
    (the last one holds the rest): `random.Random(seed)` shuffles, consecutive runs are buckets."""
    if size < 1:
        raise ValueError(f"bucketing needs buckets of at least 1 update, not {size}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i:i + size] for i in range(0, n, size)]


def bucket_means(updates: Sequence[Sequence[torch.Tensor]], examples: Sequence[float], size: int,
                 seed: int | str) -> tuple[list[list[torch.Tensor]], list[float], list[list[int]]]:
    """Bucketing (Karimireddy, He and Jaggi 2022, Algorithm 1): (bucket means, bucket examples,
    buckets). Each bucket (see `buckets`) becomes the example-weighted mean of its updates (the
    plain mean if their examples sum to 0) and counts the sum of their examples; a robust rule
    then runs over the bucket means."""
    _check(updates)
    if len(examples) != len(updates):
        raise ValueError(f"bucketing: {len(updates)} updates but {len(examples)} example counts")
    parts = buckets(len(updates), size, seed)
    # a bucket whose examples sum to zero takes the plain mean of its updates
    means = [_weighted_mean([updates[i] for i in b], [examples[i] for i in b]
                            if sum(examples[i] for i in b) > 0 else [1.0] * len(b)) for b in parts]
    return means, [float(sum(examples[i] for i in b)) for b in parts], parts


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


class ServerMomentum:
    """FedAvgM (Hsu, Qi and Brown 2019): server momentum on the mean update.

    `delta = mean update - global weights`; v starts at zero; each round
    `v = momentum v + delta` and `w = w + lr v`. `momentum = 0, lr = 1` is FedAvg.
    """

    def __init__(self, lr: float, momentum: float):
        self.lr, self.momentum = lr, momentum
        self.v: list[torch.Tensor] | None = None

    def step(self, weights: Sequence[torch.Tensor], mean: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """New global weights from the current ones and the (weighted) mean of the updates."""
        delta = [a.to(torch.float64) - w.to(torch.float64) for a, w in zip(mean, weights)]
        self.v = delta if self.v is None else [self.momentum * v + d for v, d in zip(self.v, delta)]
        return [(w.to(torch.float64) + self.lr * v).to(w.dtype) for w, v in zip(weights, self.v)]
