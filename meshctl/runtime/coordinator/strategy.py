"""Aggregation strategies: how the coordinator turns one round's updates into new weights.

`Strategy` is the base a training round needs; each strategy is a thin class over the
pure kernels (meshctl.runtime.kernels: `fedavg`, robust.py) and registers itself in
`STRATEGIES` under its plan name by declaring `name`. `make_strategy(agg)` makes one per
job from the plan's `aggregation`; the instance keeps whatever state crosses rounds
(FedAdam's and FedYogi's moments, FedAvgM's velocity, centered clipping's last global
update, the robust rules' server momentum). FedProx changes local training (the daemon
adds the proximal term) and aggregates as FedAvg.

The compiler's strategy names (plan.STRATEGY_SETTINGS, the spec's Literal) and this
registry agree; tests/runtime/rooms/test_strategy_registry.py checks both ways.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from meshctl.compiler.plan import PlanAggregation
from meshctl.runtime.kernels import fedavg
from meshctl.runtime.kernels.robust import (
    ServerMomentum,
    ServerOptimizer,
    bucket_means,
    bulyan,
    centered_clip,
    coordinate_median,
    krum,
    multi_krum,
    trimmed_mean,
)
from meshctl.runtime.kernels.scaffold import server_step

Weights = Sequence[torch.Tensor]
Updates = Sequence[Sequence[torch.Tensor]]

STRATEGIES: dict[str, type[Strategy]] = {}
"""Every strategy class by its plan name, filled as the subclasses below are defined."""


class Strategy(ABC):
    """One job's aggregation rule over full-weight updates, made once per job."""

    name: ClassVar[str]
    """The plan's `aggregation.strategy`; a subclass that declares it is registered."""
    needs_every_update: ClassVar[bool] = False
    """A robust rule looks at each update, so it cannot run on secure aggregation's mean."""
    controls: ClassVar[bool] = False
    """SCAFFOLD: the rule takes each domain's control variate change with its update."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in STRATEGIES:
                raise TypeError(f"strategy {cls.name!r} registered twice")
            STRATEGIES[cls.name] = cls

    def __init__(self, agg: PlanAggregation):
        self.agg = agg
        self.settings = agg.settings()

    def aggregate(self, weights: Weights, domains: Sequence[str], updates: Updates,
                  examples: Sequence[int]) -> tuple[list[torch.Tensor], str]:
        """(new weights, a note on what the rule did, or "") from the round's updates."""
        if len(updates) < self.agg.min_updates():
            raise ValueError(f"{self.name} needs at least {self.agg.min_updates()} updates per round, "
                             f"got {len(updates)}")
        return self.rule(weights, domains, updates, examples)

    @abstractmethod
    def rule(self, weights: Weights, domains: Sequence[str], updates: Updates,
             examples: Sequence[int]) -> tuple[list[torch.Tensor], str]:
        """The strategy's rule alone: (its weights, a note)."""

    def from_mean(self, weights: Weights, mean: list[torch.Tensor]) -> list[torch.Tensor]:
        """New weights from the example-weighted mean of the updates (what secure aggregation yields)."""
        raise ValueError(f"{self.name} needs every single update, so it cannot run with secure aggregation")

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What the rule carries across rounds, for a checkpoint: (tensors by name, JSON-able scalars);
        ({}, {}) for a rule without state."""
        return {}, {}

    def restore(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
        """Take up `state()` as a checkpoint kept it (a resumed run goes on as if it never stopped)."""

    @property
    def stateful(self) -> bool:
        """Whether the rule has state that crosses rounds (a resumed run needs it back)."""
        return type(self).state is not Strategy.state


def _pack(prefix: str, tensors: Sequence[torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """`prefix/0`, `prefix/1`, ... for a list of tensors ({} for None: not set yet)."""
    return {f"{prefix}/{i}": t.detach().contiguous() for i, t in enumerate(tensors or [])}


def _unpack(tensors: dict[str, torch.Tensor], prefix: str) -> list[torch.Tensor] | None:
    """The list `_pack` made, else None."""
    out = []
    while (t := tensors.get(f"{prefix}/{len(out)}")) is not None:
        out.append(t)
    return out or None


def make_strategy(agg: PlanAggregation) -> Strategy:
    """The registered strategy for the plan's `aggregation`, with fresh per-job state."""
    cls = STRATEGIES.get(agg.strategy)
    if cls is None:
        raise ValueError(f"unknown aggregation strategy {agg.strategy!r}")
    return cls(agg)


# The weighted mean and the server optimizers on it: these also run on secure aggregation.

class FedAvg(Strategy):
    """The example-weighted mean of the updates (McMahan et al. 2017)."""

    name = "fedavg"

    def rule(self, weights: Weights, domains: Sequence[str], updates: Updates,
             examples: Sequence[int]) -> tuple[list[torch.Tensor], str]:
        return self.from_mean(weights, fedavg(updates, examples)), ""

    def from_mean(self, weights: Weights, mean: list[torch.Tensor]) -> list[torch.Tensor]:
        return mean


class FedProx(FedAvg):
    """FedAvg on the server; the proximal term (`mu`) is the daemons' local training."""

    name = "fedprox"


class _ServerStep(FedAvg):
    """A server step from the weights toward the mean, with its state across rounds."""

    server: ServerOptimizer | ServerMomentum

    def from_mean(self, weights: Weights, mean: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.server.step(weights, mean)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {**_pack("m", getattr(self.server, "m", None)), **_pack("v", self.server.v)}, {}

    def restore(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
        if isinstance(self.server, ServerOptimizer):
            self.server.m = _unpack(tensors, "m")
        self.server.v = _unpack(tensors, "v")


class FedAdam(_ServerStep):
    """An Adam step on the pseudo-gradient mean - weights (Reddi et al. 2021)."""

    name = "fedadam"

    def __init__(self, agg: PlanAggregation):
        super().__init__(agg)
        s = self.settings
        self.server = ServerOptimizer(self.name, s["server_lr"], s["beta_1"], s["beta_2"], s["tau"])


class FedYogi(FedAdam):
    """A Yogi step on the pseudo-gradient mean - weights (Reddi et al. 2021)."""

    name = "fedyogi"


class FedAvgM(_ServerStep):
    """Server momentum on the mean update (Hsu et al. 2019)."""

    name = "fedavgm"

    def __init__(self, agg: PlanAggregation):
        super().__init__(agg)
        self.server = ServerMomentum(self.settings["server_lr"], self.settings["server_momentum"])


# Robust rules: each looks at every single update.

class _Robust(Strategy):
    """A robust rule; with `bucketing: s` (s > 1) it runs over bucket means (kernels/robust.py
    `bucket_means`): round r's buckets are a `random.Random(f"bucketing:{r}")` partition of the
    updates in domain-name order, r counting this job's aggregations from 1."""

    needs_every_update = True

    def __init__(self, agg: PlanAggregation):
        super().__init__(agg)
        self.round = 0
        """Aggregations made so far (seeds the buckets)."""

    def aggregate(self, weights: Weights, domains: Sequence[str], updates: Updates,
                  examples: Sequence[int]) -> tuple[list[torch.Tensor], str]:
        self.round += 1
        size = int(self.settings.get("bucketing") or 1)
        if size <= 1:
            return super().aggregate(weights, domains, updates, examples)
        if len(updates) < self.agg.min_updates():
            raise ValueError(f"{self.name} over buckets of {size} needs at least {self.agg.min_inputs()} buckets "
                             f"({self.agg.min_updates()} updates) per round, got {len(updates)} updates")
        order = sorted(range(len(domains)), key=domains.__getitem__)
        means, counts, parts = bucket_means([updates[i] for i in order], [examples[i] for i in order],
                                            size, f"bucketing:{self.round}")
        names = ["+".join(domains[order[i]] for i in b) for b in parts]
        new, note = self.rule(weights, names, means, [int(c) for c in counts])
        return new, f"{len(parts)} buckets of {size}" + (f"; {note}" if note else "")

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"round": self.round}

    def restore(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
        self.round = int(scalars.get("round", 0))


class _RobustWithMomentum(_Robust):
    """A robust rule whose step server momentum may smooth (`server_momentum`, off at 0)."""

    def __init__(self, agg: PlanAggregation):
        super().__init__(agg)
        m = self.settings["server_momentum"]
        self.momentum = ServerMomentum(1.0, m) if m > 0 else None

    def aggregate(self, weights: Weights, domains: Sequence[str], updates: Updates,
                  examples: Sequence[int]) -> tuple[list[torch.Tensor], str]:
        new, note = super().aggregate(weights, domains, updates, examples)
        if self.momentum is not None:
            new = self.momentum.step(weights, new)
        return new, note

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, scalars = super().state()
        return {**tensors, **_pack("momentum", self.momentum and self.momentum.v)}, scalars

    def restore(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
        super().restore(tensors, scalars)
        if self.momentum is not None:
            self.momentum.v = _unpack(tensors, "momentum")


class Median(_RobustWithMomentum):
    """The coordinate-wise median."""

    name = "median"

    def rule(self, weights: Weights, domains: Sequence[str], updates: Updates,
             examples: Sequence[int]) -> tuple[list[torch.Tensor], str]:
        return coordinate_median(updates), ""


class TrimmedMean(_RobustWithMomentum):
    """The coordinate-wise mean without the `trim` share from each end."""

    name = "trimmed_mean"

    def rule(self, weights: Weights, domains: Sequence[str], updates: Updates,
             examples: Sequence[int]) -> tuple[list[torch.Tensor], str]:
        trim = self.settings["trim"]
        return trimmed_mean(updates, trim), f"trimmed {int(trim * len(updates))} from each end per coordinate"


class Krum(_RobustWithMomentum):
    """The update closest to its neighbours."""

    name = "krum"

    def rule(self, weights: Weights, domains: Sequence[str], updates: Updates,
             examples: Sequence[int]) -> tuple[list[torch.Tensor], str]:
        chosen, i = krum(updates, self.settings["byzantine"])
        return chosen, f"krum chose {domains[i]}'s update"


class MultiKrum(_RobustWithMomentum):
    """The example-weighted mean of the `select` updates with the lowest Krum scores."""

    name = "multi_krum"

    def rule(self, weights: Weights, domains: Sequence[str], updates: Updates,
             examples: Sequence[int]) -> tuple[list[torch.Tensor], str]:
        f = int(self.settings["byzantine"])
        select = int(self.settings["select"]) or len(updates) - f
        if select > len(updates):  # a short round (quorum): n - f, never every update
            select = len(updates) - f
        mean, picked = multi_krum(updates, examples, f, select)
        left = sorted(set(domains) - {domains[i] for i in picked})
        return mean, f"multi_krum averaged {len(picked)} of {len(updates)}; left out {', '.join(left) or 'none'}"


class Bulyan(_RobustWithMomentum):
    """Krum selection, then a trimmed mean around the median."""

    name = "bulyan"

    def rule(self, weights: Weights, domains: Sequence[str], updates: Updates,
             examples: Sequence[int]) -> tuple[list[torch.Tensor], str]:
        out, picked = bulyan(updates, int(self.settings["byzantine"]))
        left = sorted(set(domains) - {domains[i] for i in picked})
        return out, f"bulyan selected {len(picked)} of {len(updates)}; left out {', '.join(left) or 'none'}"


class CenteredClip(_RobustWithMomentum):
    """Updates clipped around the weights plus the last round's global update."""

    name = "centered_clip"

    def __init__(self, agg: PlanAggregation):
        super().__init__(agg)
        self.last_step: list[torch.Tensor] | None = None
        """The last round's global update, new weights minus old (the centre's offset); zero at first."""

    def rule(self, weights: Weights, domains: Sequence[str], updates: Updates,
             examples: Sequence[int]) -> tuple[list[torch.Tensor], str]:
        step = self.last_step or [torch.zeros_like(w, dtype=torch.float64) for w in weights]
        centre = [w.to(torch.float64) + d for w, d in zip(weights, step)]
        new, radius, far = centered_clip(updates, examples, centre, float(self.settings["radius"]),
                                         int(self.settings["iterations"]))
        self.last_step = [n.to(torch.float64) - w.to(torch.float64) for n, w in zip(new, weights)]
        return new, f"centered_clip radius {radius:.4g}: {far} of {len(updates)} updates clipped at first"

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, scalars = super().state()
        return {**tensors, **_pack("last_step", self.last_step)}, scalars

    def restore(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
        super().restore(tensors, scalars)
        self.last_step = _unpack(tensors, "last_step")


# SCAFFOLD: the server keeps a control variate c beside the weights; each domain keeps its own.

class Scaffold(Strategy):
    """Control variates against client drift (Karimireddy et al. 2020, option II; kernels/scaffold.py).

    `control` is the server's c, sent with the weights; `aggregate_controlled` takes the round's
    updates with each domain's delta c_i. Plain `aggregate` and `from_mean` (no deltas) step the
    weights alone and leave c as it is.
    """

    name = "scaffold"
    controls: ClassVar[bool] = True

    def __init__(self, agg: PlanAggregation):
        super().__init__(agg)
        self.control: list[torch.Tensor] | None = None
        """The server control variate c, one tensor per weight tensor; None until set (zero)."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return _pack("control", self.control), {}

    def restore(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
        self.control = _unpack(tensors, "control")

    def controls_for(self, weights: Weights) -> list[torch.Tensor]:
        """c, zero (in the weights' shapes) before the first round."""
        if self.control is None:
            self.control = [torch.zeros_like(w) for w in weights]
        return self.control

    def aggregate_controlled(self, weights: Weights, domains: Sequence[str], updates: Updates,
                             deltas: Updates, examples: Sequence[int], population: int) -> tuple[list[torch.Tensor], str]:
        """(new weights, note) from the updates y_i and their delta c_i; c moves by |S|/N of their mean."""
        if len(updates) < self.agg.min_updates():
            raise ValueError(f"scaffold needs at least {self.agg.min_updates()} updates per round, got {len(updates)}")
        new, self.control = server_step(weights, self.controls_for(weights), updates, deltas, examples,
                                        float(self.settings["server_lr"]), population)
        return new, f"scaffold: c moved by {len(updates)}/{max(population, len(updates))} of the mean control change"

    def rule(self, weights: Weights, domains: Sequence[str], updates: Updates,
             examples: Sequence[int]) -> tuple[list[torch.Tensor], str]:
        c = self.controls_for(weights)
        zero = [[torch.zeros_like(t) for t in c] for _ in updates]
        new, _ = server_step(weights, c, updates, zero, examples, float(self.settings["server_lr"]), len(updates))
        return new, ""

    def from_mean(self, weights: Weights, mean: list[torch.Tensor]) -> list[torch.Tensor]:
        """The weights' step alone, c unchanged (the compiler refuses scaffold with secure aggregation,
        MESH549, so no control variate change ever arrives masked)."""
        lr = float(self.settings["server_lr"])
        return [(w.to(torch.float64) + lr * (m.to(torch.float64) - w.to(torch.float64))).to(w.dtype)
                for w, m in zip(weights, mean)]
