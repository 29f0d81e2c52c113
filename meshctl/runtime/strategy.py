"""Aggregation strategies: how the coordinator turns one round's updates into new weights.

A `Strategy` is made once per job from the plan's `aggregation` and keeps whatever
state crosses rounds (FedAdam's and FedYogi's moments, FedAvgM's velocity, centered
clipping's last global update). FedProx changes local
training (the daemon adds the proximal term) and aggregates as FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshctl.compiler.plan import PlanAggregation
from meshctl.runtime.kernels import fedavg
from meshctl.runtime.kernels.robust import (
    ServerMomentum,
    ServerOptimizer,
    bulyan,
    centered_clip,
    coordinate_median,
    krum,
    multi_krum,
    trimmed_mean,
)

ROBUST_WITH_MOMENTUM = ("multi_krum", "bulyan", "centered_clip")
"""Robust rules whose step server momentum may smooth (setting `server_momentum`)."""


class Strategy:
    """One job's aggregation rule over full-weight updates."""

    def __init__(self, agg: PlanAggregation):
        self.agg = agg
        self.settings = agg.settings()
        s = self.settings
        self.server: ServerOptimizer | ServerMomentum | None = (
            ServerOptimizer(agg.strategy, s["server_lr"], s["beta_1"], s["beta_2"], s["tau"])
            if agg.strategy in ("fedadam", "fedyogi")
            else ServerMomentum(s["server_lr"], s["server_momentum"]) if agg.strategy == "fedavgm" else None)
        self.momentum = (ServerMomentum(1.0, s["server_momentum"])
                         if agg.strategy in ROBUST_WITH_MOMENTUM and s["server_momentum"] > 0 else None)
        """multi_krum, bulyan, centered_clip: server momentum on the robust rule's step (off at 0)."""
        self.last_step: list[torch.Tensor] | None = None
        """centered_clip: the last round's global update, new weights minus old (its centre's offset)."""

    def aggregate(self, weights: Sequence[torch.Tensor], domains: Sequence[str],
                  updates: Sequence[Sequence[torch.Tensor]], examples: Sequence[int]) -> tuple[list[torch.Tensor], str]:
        """(new weights, a note on what the rule did, or "") from the round's updates."""
        new, note = self.rule(weights, domains, updates, examples)
        if self.momentum is not None:
            new = self.momentum.step(weights, new)
        return new, note

    def rule(self, weights: Sequence[torch.Tensor], domains: Sequence[str],
             updates: Sequence[Sequence[torch.Tensor]], examples: Sequence[int]) -> tuple[list[torch.Tensor], str]:
        """The strategy's rule alone: (its weights, a note)."""
        kind = self.agg.strategy
        if len(updates) < self.agg.min_updates():
            raise ValueError(f"{kind} needs at least {self.agg.min_updates()} updates per round, got {len(updates)}")
        if kind in ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm"):
            return self.from_mean(weights, fedavg(updates, examples)), ""
        if kind == "median":
            return coordinate_median(updates), ""
        if kind == "trimmed_mean":
            trim = self.settings["trim"]
            return trimmed_mean(updates, trim), f"trimmed {int(trim * len(updates))} from each end per coordinate"
        if kind == "krum":
            chosen, i = krum(updates, self.settings["byzantine"])
            return chosen, f"krum chose {domains[i]}'s update"
        if kind == "multi_krum":
            f = int(self.settings["byzantine"])
            select = int(self.settings["select"]) or len(updates) - f
            if select > len(updates):  # a short round (quorum): n - f, never every update
                select = len(updates) - f
            mean, picked = multi_krum(updates, examples, f, select)
            left = sorted(set(domains) - {domains[i] for i in picked})
            return mean, f"multi_krum averaged {len(picked)} of {len(updates)}; left out {', '.join(left) or 'none'}"
        if kind == "bulyan":
            out, picked = bulyan(updates, int(self.settings["byzantine"]))
            left = sorted(set(domains) - {domains[i] for i in picked})
            return out, f"bulyan selected {len(picked)} of {len(updates)}; left out {', '.join(left) or 'none'}"
        if kind == "centered_clip":
            return self.centered(weights, updates, examples)
        raise ValueError(f"unknown aggregation strategy {kind!r}")

    def centered(self, weights: Sequence[torch.Tensor], updates: Sequence[Sequence[torch.Tensor]],
                 examples: Sequence[int]) -> tuple[list[torch.Tensor], str]:
        """Centered clipping from the weights plus the last round's global update (zero at first)."""
        step = self.last_step or [torch.zeros_like(w, dtype=torch.float64) for w in weights]
        centre = [w.to(torch.float64) + d for w, d in zip(weights, step)]
        new, radius, far = centered_clip(updates, examples, centre, float(self.settings["radius"]),
                                         int(self.settings["iterations"]))
        self.last_step = [n.to(torch.float64) - w.to(torch.float64) for n, w in zip(new, weights)]
        return new, f"centered_clip radius {radius:.4g}: {far} of {len(updates)} updates clipped at first"

    def from_mean(self, weights: Sequence[torch.Tensor], mean: list[torch.Tensor]) -> list[torch.Tensor]:
        """New weights from the example-weighted mean of the updates: the mean itself, or a
        FedAdam/FedYogi/FedAvgM step toward it (also what secure aggregation, which yields only the mean, uses)."""
        return mean if self.server is None else self.server.step(weights, mean)
