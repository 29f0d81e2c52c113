"""Round policies over a split job's activations and gradients (docs/governance.md, "Round policies of split jobs").

A `scope: round` policy judges a split job's batches when its `when` or `require` reads `round.kind` (a
policy written for federated rounds, which never tested the kind, keeps its meaning and does not judge
split epochs; the compiler says so, MESH573). Its `round` variable:

    {kind: "split", job, number (the epoch), rounds (epochs), batch (1-based; 0: the holdout's evaluation),
     participants, activations: [{domain, rows, norm, max_row_norm}], gradients: [...], updates: [],
     epsilon_spent: 0.0}

`norm` is the L2 norm of the whole tensor a domain sends or receives, `max_row_norm` the largest L2 norm of
one row (one entity's activations or gradient). The coordinator decides the global policies on every
relay before it forwards it: the members' activations (gradients []), then with the label owner's
gradients; each part's domain decides the global and its own local policies on what it sends and
receives (a member: its activations before they leave and its gradient before it applies it; the label
owner: the activations it receives and the gradients it returns). The label owner's own activations
never cross and are in no view. Numbers only: no tensor reaches a policy.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from meshctl.compiler.plan import Plan, PlanPolicy, PlanSplit
from meshctl.runtime.governance import (
    _coordinator,
    decide_policy,
    policy_label,
    precompile,
)
from meshctl.runtime.wire import Decision

KIND = re.compile(r"\bround\s*\.\s*kind\b")
"""A round policy that reads `round.kind` judges split jobs' rounds too."""


def judges_split(policy: PlanPolicy) -> bool:
    """Whether a round policy judges split jobs' batches (it reads `round.kind`; `effect: exclude` never: MESH574)."""
    return policy.scope == "round" and policy.effect != "exclude" and bool(KIND.search(f"{policy.when or ''} "
                                                                                        f"{policy.require}"))


def facts(domain: str, t: torch.Tensor) -> dict[str, Any]:
    """What a policy sees of one relayed tensor: its rows, its L2 norm and its largest row's (float64)."""
    x = t.detach().to(torch.float64).reshape(len(t), -1) if t.dim() else t.detach().to(torch.float64).reshape(1, 1)
    rows = x.norm(dim=1) if len(x) else torch.zeros(0, dtype=torch.float64)
    return {"domain": domain, "rows": len(x), "norm": float(x.norm()),
            "max_row_norm": float(rows.max()) if len(rows) else 0.0}


class SplitRoundGate:
    """The round policies that judge one split job's batches, compiled once: the coordinator's (global ones)
    or, with `domain`, that part's domain's (global and its own local ones)."""

    def __init__(self, plan: Plan, split: PlanSplit, domain: str = ""):
        self.split = split
        self.domain = domain
        self.policies = [p for p in plan.policies if judges_split(p) and (
            p.domain in ("", domain) if domain else not p.domain)]
        self.coordinator = _coordinator(plan) if self.policies else None
        self.warned: set[tuple[str, int]] = set()
        """(policy, epoch) already warned about: a warn is one event per policy and epoch, not per batch."""
        precompile(self.policies)  # now, not in the first batch

    def __bool__(self) -> bool:
        return bool(self.policies)

    def round(self, epoch: int, batch: int, acts: dict[str, torch.Tensor],
              grads: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The `round` variable of batch `batch` (0: the holdout) of `epoch` (both 1-based)."""
        return {"kind": "split", "job": self.split.name, "number": epoch, "rounds": self.split.epochs,
                "batch": batch, "participants": list(self.split.participants),
                "activations": [facts(d, t) for d, t in acts.items()],
                "gradients": [facts(d, t) for d, t in grads.items()], "updates": [], "epsilon_spent": 0.0}

    def decide(self, epoch: int, batch: int, acts: dict[str, torch.Tensor],
               grads: dict[str, torch.Tensor]) -> list[tuple[Decision, str]]:
        """(decision, one line) for each deny, and each first warn of a policy in an epoch; allows are not
        returned. The line names the policy, the epoch, the batch and, where one domain's tensor alone is
        denied, that domain and its norms."""
        if not self.policies:
            return []
        data = self.round(epoch, batch, acts, grads)
        out = []
        for p in self.policies:
            d = self._decide(p, data, epoch)
            if d.effect == "allow" or (d.effect == "warn" and (d.policy, epoch) in self.warned):
                continue
            if d.effect == "warn":
                self.warned.add((d.policy, epoch))
            where = "the holdout's evaluation" if batch == 0 else f"batch {batch}"
            culprit = self._culprit(p, data, epoch) if d.effect == "deny" else ""
            line = (f"round policy {d.policy} {'denies' if d.effect == 'deny' else 'warns on'} epoch {epoch} "
                    f"{where}{': ' + culprit if culprit else ''}: {d.reason}")
            out.append((d, line))
        return out

    def _decide(self, p: PlanPolicy, data: dict[str, Any], epoch: int) -> Decision:
        variables = {"round": data, "coordinator": self.coordinator}
        return decide_policy(p, "round", data, f"round.{self.split.name}.{epoch}", self.domain, variables)

    def _culprit(self, p: PlanPolicy, data: dict[str, Any], epoch: int) -> str:
        """The first domain whose activations or gradient alone the policy denies, with its numbers; "" if none."""
        for d in self.split.participants:
            for kind in ("activations", "gradients"):
                mine = [f for f in data[kind] if f["domain"] == d]
                if not mine:
                    continue
                alone = {**data, "activations": mine if kind == "activations" else [],
                         "gradients": mine if kind == "gradients" else []}
                if self._decide(p, alone, epoch).effect == "deny":
                    f = mine[0]
                    what = "activations" if kind == "activations" else "gradient"
                    return (f"the {what} of {d} ({f['rows']} rows, norm {f['norm']:.6g}, "
                            f"max row norm {f['max_row_norm']:.6g})")
        return ""


__all__ = ["SplitRoundGate", "facts", "judges_split", "policy_label"]
