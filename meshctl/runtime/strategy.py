"""Aggregation strategies: how the coordinator turns one round's updates into new weights.

A `Strategy` is made once per job from the plan's `aggregation` and keeps whatever
state crosses rounds (FedAdam's and FedYogi's moments). FedProx changes local
training (the daemon adds the proximal term) and aggregates as FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshctl.compiler.plan import PlanAggregation
from meshctl.runtime.kernels import fedavg
from meshctl.runtime.kernels.robust import ServerOptimizer, coordinate_median, krum, trimmed_mean


class Strategy:
    """One job's aggregation rule over full-weight updates."""

    def __init__(self, agg: PlanAggregation):
        self.agg = agg
        self.settings = agg.settings()
        s = self.settings
        self.server = (ServerOptimizer(agg.strategy, s["server_lr"], s["beta_1"], s["beta_2"], s["tau"])
                       if agg.strategy in ("fedadam", "fedyogi") else None)

    def aggregate(self, weights: Sequence[torch.Tensor], domains: Sequence[str],
                  updates: Sequence[Sequence[torch.Tensor]], examples: Sequence[int]) -> tuple[list[torch.Tensor], str]:
        """(new weights, a note on what the rule did, or "") from the round's updates."""
        kind = self.agg.strategy
        if len(updates) < self.agg.min_updates():
            raise ValueError(f"{kind} needs at least {self.agg.min_updates()} updates per round, got {len(updates)}")
        if kind in ("fedavg", "fedprox", "fedadam", "fedyogi"):
            return self.from_mean(weights, fedavg(updates, examples)), ""
        if kind == "median":
            return coordinate_median(updates), ""
        if kind == "trimmed_mean":
            trim = self.settings["trim"]
            return trimmed_mean(updates, trim), f"trimmed {int(trim * len(updates))} from each end per coordinate"
        if kind == "krum":
            chosen, i = krum(updates, self.settings["byzantine"])
            return chosen, f"krum chose {domains[i]}'s update"
        raise ValueError(f"unknown aggregation strategy {kind!r}")

    def from_mean(self, weights: Sequence[torch.Tensor], mean: list[torch.Tensor]) -> list[torch.Tensor]:
        """New weights from the example-weighted mean of the updates: the mean itself, or a
        FedAdam/FedYogi step toward it (also what secure aggregation, which yields only the mean, uses)."""
        return mean if self.server is None else self.server.step(weights, mean)
