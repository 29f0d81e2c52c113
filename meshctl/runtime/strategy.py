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
        self.server = (ServerOptimizer(agg.strategy, agg.server_lr or 0.01, agg.beta_1 or 0.9,
                                       agg.beta_2 or 0.99, agg.tau or 1e-3)
                       if agg.strategy in ("fedadam", "fedyogi") else None)

    def aggregate(self, weights: Sequence[torch.Tensor], domains: Sequence[str],
                  updates: Sequence[Sequence[torch.Tensor]], examples: Sequence[int]) -> tuple[list[torch.Tensor], str]:
        """(new weights, a note on what the rule did, or "") from the round's updates."""
        kind = self.agg.strategy
        if len(updates) < self.agg.min_updates():
            raise ValueError(f"{kind} needs at least {self.agg.min_updates()} updates per round, got {len(updates)}")
        if kind in ("fedavg", "fedprox"):
            return fedavg(updates, examples), ""
        if self.server is not None:
            return self.server.step(weights, fedavg(updates, examples)), ""
        if kind == "median":
            return coordinate_median(updates), ""
        if kind == "trimmed_mean":
            cut = int((self.agg.trim or 0.0) * len(updates))
            return trimmed_mean(updates, self.agg.trim or 0.0), f"trimmed {cut} from each end per coordinate"
        if kind == "krum":
            chosen, i = krum(updates, self.agg.byzantine or 0)
            return chosen, f"krum chose {domains[i]}'s update"
        raise ValueError(f"unknown aggregation strategy {kind!r}")
