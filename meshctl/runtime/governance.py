"""Run-time governance: the decisions a domain makes before it accepts a job, and round gates.

This module reads only the Plan, never the spec: a remote domain holds nothing
else. `evaluate_job` is what a daemon runs for every job it is asked to take part
in; it evaluates the global and the domain's own `scope: model` policies against
the same `model` activation the compiler builds (meshctl/compiler/policy.py), and
on top of them the invariants a domain enforces whatever the policies say:

- ``invariant:no-pii-features``: no feature, target or holdout column is a PII column
  (direct or indirect) of the domain's product;
- ``invariant:grant-required``: an ``access: request`` product is read only under a
  grant for ``model:<job>`` with the job's purpose that has not expired;
- ``invariant:epsilon-budget``: the job's DP ε does not exceed the product's cap;
- ``invariant:participant``: the domain is a declared participant of the job.

`RoundGate` evaluates `scope: round` policies in the coordinator before each
aggregation; those with `effect: exclude` once per update (`update` bound, see
`update_facts`), each exclusion leaving that update out of the round. CEL programs are compiled once per process (cached by source) and
a policy that fails to compile or evaluate denies: governance fails closed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

from meshctl.compiler.entrypoint import architecture_facts
from meshctl.compiler.plan import Plan, PlanJob, PlanPolicy, PlanProduct, PlanSplit
from meshctl.compiler.split import split_activation
from meshctl.runtime.wire import Decision

if TYPE_CHECKING:
    import torch

RUNTIME = "runtime"
"""The `stage` of every decision made here."""


class PolicyError(Exception):
    """A policy that does not compile, fails to evaluate or gives no bool (it then denies)."""


# -- CEL -----------------------------------------------------------------------------

@functools.cache
def _environment() -> Any:
    """The compiler's CEL (compiled to Python closures, celpy as the fallback), over plain data."""
    from meshctl.compiler import cel  # imports celpy, ~0.5 s: only processes with policies pay it

    return cel.Environment()


@functools.cache
def _program(source: str) -> Any:
    """The compiled CEL program of `source`; raises PolicyError with the parser's first line."""
    env = _environment()
    try:
        return env.program(env.compile(source))
    except Exception as err:  # noqa: BLE001 - celpy raises CELParseError, rarely lark errors
        first = str(err).strip().splitlines()
        raise PolicyError(f"CEL syntax error: {first[0] if first else type(err).__name__}") from None


def precompile(policies: list[PlanPolicy]) -> None:
    """Compile the policies' expressions into the cache now; one that does not compile is denied with its
    reason when decided (decide_policy)."""
    for p in policies:
        for source in (p.when, p.require):
            if source:
                try:
                    _program(source)
                except PolicyError:
                    pass


def _evaluate(source: str, variables: dict[str, Any]) -> bool:
    """Evaluate a boolean CEL expression; raises PolicyError on any failure."""
    from celpy import celtypes

    program = _program(source)
    try:
        value = program.evaluate(variables)
    except Exception as err:  # noqa: BLE001 - CELEvalError, and anything celpy lets escape
        value = err
    if isinstance(value, Exception):
        raise PolicyError(f"failed to evaluate: {value.args[0] if value.args else type(value).__name__}")
    if not isinstance(value, celtypes.BoolType):
        raise PolicyError(f"gave {type(value).__name__.removesuffix('Type').lower()} {value!s}, not a bool")
    return bool(value)


def policy_label(policy: PlanPolicy) -> str:
    """`name`, or `domain.name` for a domain-local policy (as the compiler labels it)."""
    return f"{policy.domain}.{policy.name}" if policy.domain else policy.name


def decide_policy(policy: PlanPolicy, var: str, data: dict[str, Any], subject: str,
                  domain: str = "", variables: dict[str, Any] | None = None) -> Decision:
    """One policy's decision on `data`, bound to the CEL variable `var`."""
    reason = policy.message or f"requires {policy.require}"

    def made(effect: str, why: str) -> Decision:
        return Decision(policy=policy_label(policy), scope=policy.scope, subject=subject, effect=effect,
                        reason=why, at=policy.at, domain=domain, stage=RUNTIME)

    try:
        variables = variables if variables is not None else {var: data}
        if policy.when and not _evaluate(policy.when, variables):
            return made("allow", f"does not apply: {policy.when}")
        holds = _evaluate(policy.require, variables)
    except PolicyError as err:
        return made("deny", f"{err} (fails closed)")
    if holds:
        return made("allow", reason)
    return made(policy.effect if policy.effect in ("warn", "exclude") else "deny", reason)


# -- the `model` activation ------------------------------------------------------------

def job_activation(plan: Plan, job: PlanJob) -> dict[str, Any]:
    """The `model` variable a policy sees, built from the plan alone (mirrors the compiler's)."""
    domains = {d.name: d for d in plan.domains}
    contracts = {c.id: c for c in plan.contracts}
    reads = []
    held_out = [job.evaluation.product] if job.evaluation.product else []  # a read too (of its domain)
    for pid in [r.product for r in job.reads] + held_out:
        p = plan.product(pid)
        name, _, version = p.contract.partition("@")
        contract = contracts.get(p.contract)
        reads.append({
            "id": p.id, "domain": p.domain, "classification": p.classification,
            "access": p.access, "tags": list(p.tags), "contract": name, "contract_version": contract.version if contract else version,
            "purposes": list(contract.purposes) if contract else [],
            "jurisdiction": domains[p.domain].jurisdiction if p.domain in domains else "",
        })
    dp = job.privacy.dp
    arch = job.architecture
    return {
        "kind": "federated", "name": job.name, "purpose": job.purpose, "participants": list(job.participants),
        "domains": [{"name": n, "jurisdiction": domains[n].jurisdiction if n in domains else ""}
                    for n in job.participants],
        "reads": reads,
        "features": list(job.features), "target": job.target,
        "architecture": architecture_facts(arch),
        "training": job.training.model_dump(mode="json"),
        "aggregation": job.aggregation.model_dump(mode="json", exclude_none=True),
        "privacy": {
            "secure_aggregation": job.privacy.secure_aggregation,
            "dp": {"epsilon": dp.epsilon if dp else 0.0, "delta": dp.delta if dp else 0.0,
                   "clip": dp.clip if dp else 0.0},
            "client_dp": {k: getattr(job.privacy.client_dp, k, 0.0) for k in ("epsilon", "delta", "clip")},
        },
        "parameters": job.parameters,
    }


def _coordinator(plan: Plan) -> Any:
    """The `coordinator` variable every policy sees."""
    return {"jurisdiction": plan.coordinator.jurisdiction, "address": plan.coordinator.address}


# -- what a domain decides before it accepts a job ------------------------------------------

def _model_policies(plan: Plan, domain: str, subject: str, model: Callable[[], dict[str, Any]]) -> list[Decision]:
    """The decisions of the global and `domain`'s own model-scope policies on `subject`, whose
    `model` variable is built (by `model()`) only when there is a policy to read it."""
    policies = [p for p in plan.policies if p.scope == "model" and p.domain in ("", domain)]
    if not policies:
        return []
    variables = {"model": model(), "coordinator": _coordinator(plan)}
    return [decide_policy(p, "model", {}, subject, domain, variables) for p in policies]


def evaluate_job(plan: Plan, job: PlanJob, domain: str, today: date,
                 spent: dict[str, float] | None = None) -> list[Decision]:
    """Every decision `domain` makes on `job`: its policies, then the domain's invariants.

    `spent` is the ε each product has already spent in earlier runs, or that other live runs
    have reserved (the privacy ledger).
    """
    subject = f"model.{job.name}"
    out = _model_policies(plan, domain, subject, lambda: job_activation(plan, job))
    products = [plan.product(r.product) for r in job.reads if r.domain == domain]
    held_out = [p for p in map(plan.product, filter(None, [job.evaluation.product])) if p.domain == domain]
    checks = [
        ("participant", _participant(job, domain, products, held_out)),
        ("no-pii-features", _pii(job, products + held_out)),
        ("grant-required", _grants(plan, job, products + held_out, today)),
        ("epsilon-budget", _epsilon(job, products, spent or {})),
    ]
    for name, (effect, reason) in checks:
        out.append(Decision(policy=f"invariant:{name}", scope="model", subject=subject, effect=effect,
                            reason=reason, domain=domain, stage=RUNTIME))
    return out


def split_model_activation(plan: Plan, split: PlanSplit) -> dict[str, Any]:
    """The `model` variable a policy sees of a split model, from the plan alone (mirrors the compiler's)."""
    contracts = {c.id: c for c in plan.contracts}
    reads = []
    for part in split.parts:
        p = plan.product(part.product)
        name, _, version = p.contract.partition("@")
        contract = contracts.get(p.contract)
        reads.append({
            "id": p.id, "domain": p.domain, "classification": p.classification, "access": p.access,
            "tags": list(p.tags), "contract": name, "contract_version": contract.version if contract else version,
            "purposes": list(contract.purposes) if contract else [],
            "jurisdiction": next((d.jurisdiction for d in plan.domains if d.name == p.domain), ""),
        })
    return split_activation(split, reads, {d.name: d.jurisdiction for d in plan.domains})


def evaluate_split(plan: Plan, split: PlanSplit, domain: str, today: date | None = None) -> list[Decision]:
    """Every decision `domain` makes on a split model: the global and its own model-scope policies
    on the split model's `model` variable, then the invariants that apply to a split part
    (participant, no-pii-features: the key alone may be PII, it is blinded; grant-required: an
    `access: request` product needs a live grant for `model:<name>` with the model's purpose)."""
    subject = f"model.{split.name}"
    out = _model_policies(plan, domain, subject, lambda: split_model_activation(plan, split))
    part = next((p for p in split.parts if p.domain == domain), None)
    product = plan.product(part.product) if part is not None else None
    checks = [("participant", ("allow", f"{domain} is a part reading {part.product}") if part is not None
               else ("deny", f"{domain} is not among the split model's parts ({', '.join(split.participants)})"))]
    if product is not None and part is not None:
        used = {*part.features, *([split.label_column] if domain == split.label_domain else [])}
        bad = sorted(f"{product.id}.{c.name} (pii {c.pii})" for c in product.columns
                     if c.name in used and c.pii != "none")
        pii = ("allow", "no feature or label column is PII (the key is blinded)")
        if bad:
            pii = ("deny", f"the split model reads PII column{'s' if len(bad) > 1 else ''} {', '.join(bad)}")
        grant = _grants(plan, split, [product], today or date.today())
        checks += [("no-pii-features", pii), ("grant-required", grant)]
    for name, (effect, reason) in checks:
        out.append(Decision(policy=f"invariant:{name}", scope="model", subject=subject, effect=effect,
                            reason=reason, domain=domain, stage=RUNTIME))
    return out


def plan_integrity(plan: Plan, domain: str) -> Decision:
    """Whether the plan's recorded hash is the hash of its content (a hand edit that did not re-hash)."""
    actual = plan.content_hash()
    ok = actual == plan.plan.hash
    reason = "the plan's hash matches its content" if ok else (
        f"the plan records {plan.plan.hash[:19]} but its content hashes to {actual[:19]}: it was edited")
    return Decision(policy="invariant:plan-hash", scope="model", subject=f"plan.{plan.plan.mesh}",
                    effect="allow" if ok else "deny", reason=reason, domain=domain, stage=RUNTIME)


def refusal(decisions: list[Decision]) -> str:
    """One line naming every denying policy and its reason; "" when nothing denies."""
    return "; ".join(f"{d.policy}: {d.reason}" for d in decisions if d.effect == "deny")


def _participant(job: PlanJob, domain: str, products: list[PlanProduct],
                 held_out: list[PlanProduct] | None = None) -> tuple[str, str]:
    if held_out and domain not in job.participants:  # it only scores the model on its evaluation product
        return "allow", f"{domain} scores the job's model on its evaluation product {held_out[0].id}"
    if domain not in job.participants:
        return "deny", f"{domain} is not among the job's participants ({', '.join(job.participants)})"
    if not products:
        return "deny", f"the job reads no product of {domain}"
    return "allow", f"{domain} is a participant reading {', '.join(p.id for p in products)}"


def _pii(job: PlanJob, products: list[PlanProduct]) -> tuple[str, str]:
    used = {*job.features, job.target}
    if job.evaluation.holdout_column:
        used.add(job.evaluation.holdout_column)
    bad = [f"{p.id}.{c.name} (pii {c.pii})" for p in products for c in p.columns
           if c.name in used and c.pii != "none"]
    if bad:
        return "deny", f"the job reads PII column{'s' if len(bad) > 1 else ''} {', '.join(sorted(bad))}"
    return "allow", "no feature, target or holdout column is PII"


def _grants(plan: Plan, job: PlanJob | PlanSplit, products: list[PlanProduct], today: date) -> tuple[str, str]:
    gated = [p for p in products if p.access == "request"]
    if not gated:
        return "allow", "no product read needs a grant"
    problems = []
    for p in gated:
        grants = [g for g in plan.grants if g.product == p.id and g.subject == f"model:{job.name}"]
        if not grants:
            problems.append(f"{p.id} is access: request and has no grant for model:{job.name}")
            continue
        fitting = [g for g in grants if g.purpose == job.purpose]
        if not fitting:
            problems.append(f"the grant on {p.id} is for purpose {grants[0].purpose!r}, "
                            f"the job's is {job.purpose!r}")
            continue
        if all(g.until and g.until < today.isoformat() for g in fitting):
            problems.append(f"the grant on {p.id} for model:{job.name} expired on "
                            f"{max(g.until for g in fitting)}")
    if problems:
        return "deny", "; ".join(problems)
    return "allow", f"granted: {', '.join(p.id for p in gated)} for purpose {job.purpose!r}"


def _epsilon(job: PlanJob, products: list[PlanProduct], spent: dict[str, float]) -> tuple[str, str]:
    capped = [p for p in products if p.epsilon_budget is not None]
    if not capped:
        return "allow", "no product read has an ε budget"
    dp = job.privacy.dp or job.privacy.client_dp
    if dp is None:
        return "warn", (f"{', '.join(p.id for p in capped)} ha{'s' if len(capped) == 1 else 've'} an ε budget "
                        f"but the job declares no differential privacy")
    over = [p for p in capped if spent.get(p.id, 0.0) + dp.epsilon > p.epsilon_budget]  # type: ignore[operator]
    if over:
        return "deny", "; ".join(
            f"the job's ε {dp.epsilon:g} exceeds {p.id}'s budget {p.epsilon_budget:g}"
            + (f" with {spent[p.id]:g} already spent or reserved" if spent.get(p.id) else "") for p in over)
    return "allow", f"ε {dp.epsilon:g} is within every product's budget"


# -- round gates (coordinator) -------------------------------------------------------------

@dataclass(frozen=True)
class RoundUpdate:
    """What the coordinator knows of one domain's update in a round: numbers, never tensors."""

    domain: str
    examples: int
    loss: float
    update_norm: float
    cosine: float = 1.0
    """Cosine similarity of the update (new weights - global) to the coordinate-wise median update
    of the round (robust to a minority of attackers); 1.0 unless an `exclude` policy reads it."""


def update_cosines(base: list[torch.Tensor], updates: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Each domain's cosine similarity of its update (weights - base) to the round's coordinate-wise
    median update; 0.0 for a zero update or a zero median."""
    import torch

    if not updates:
        return {}
    flat = {d: torch.cat([(w.float() - b.float()).reshape(-1) for w, b in zip(ws, base)]) for d, ws in updates.items()}
    median = torch.stack(list(flat.values())).median(dim=0).values.double()  # (N x P float32 while it runs)
    m = float(median.norm())
    out = {}
    for d, u in flat.items():
        u = u.double()
        n = float(u.norm())
        out[d] = float(u @ median) / (n * m) if n > 0 and m > 0 else 0.0
    return out


def update_facts(u: RoundUpdate, norms: list[float], excluded_before: int) -> dict[str, Any]:
    """The `update` variable an `effect: exclude` policy sees for one update of a round."""
    ordered = sorted(norms)
    mid = len(ordered) // 2
    median = (ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2) if ordered else 0.0
    return {"domain": u.domain, "examples": u.examples, "loss": float(u.loss), "update_norm": float(u.update_norm),
            "norm_ratio": float(u.update_norm) / median if median > 0 else 1.0, "cosine": float(u.cosine),
            "excluded_before": excluded_before}


_UPDATES = re.compile(r"\bround\s*\.\s*updates\b")
"""Round facts only the coordinator has: domains leave policies that read them to it."""


class RoundGate:
    """The `scope: round` policies of a job, compiled once, evaluated before each aggregation."""

    def __init__(self, plan: Plan, job: PlanJob, domain: str = ""):
        """The coordinator's gate (global round policies, and local ones that read
        `round.updates`); with `domain`, that domain's own gate: the global and its local
        round policies that need no facts only the coordinator has."""
        self.job = job
        self.policies = [p for p in plan.policies
                         if p.scope == "round" and (not p.domain or p.domain in job.participants)]
        if domain:  # (`effect: exclude` policies read single updates: only the coordinator decides them)
            self.policies = [p for p in self.policies if p.domain in ("", domain) and p.effect != "exclude"
                             and not _UPDATES.search(f"{p.when or ''} {p.require}")]
        else:  # a domain decides its own local policies, except those on facts only we have
            self.policies = [p for p in self.policies if not p.domain or p.effect == "exclude"
                             or _UPDATES.search(f"{p.when or ''} {p.require}")]
        self.excluders = [p for p in self.policies if p.effect == "exclude"]
        """`effect: exclude` policies: decided once per update, before the others see the round."""
        self.policies = [p for p in self.policies if p.effect != "exclude"]
        self.counts: dict[tuple[str, str], int] = {}
        """(policy label, domain) -> how many of the domain's updates the policy excluded in this job."""
        self.coordinator = _coordinator(plan) if self.policies or self.excluders else None
        precompile([*self.policies, *self.excluders])  # now, not in the first round

    def __bool__(self) -> bool:
        return bool(self.policies or self.excluders)

    @property
    def reads_cosine(self) -> bool:
        """Whether an exclude policy reads `update.cosine` (the coordinator computes it only then)."""
        return any("cosine" in f"{p.when or ''} {p.require}" for p in self.excluders)

    def exclusions(self, number: int, participants: list[str], updates: list[RoundUpdate],
                   epsilon_spent: float = 0.0) -> list[tuple[str, Decision, int | None]]:
        """(domain, decision, suspend_after or None) for each update an exclude policy excludes (effect
        `exclude`) or fails to decide on (`deny`: it fails closed), in update order; each exclusion is
        counted, and `suspend_after` is set on the one that reaches the policy's `suspend_after`."""
        if not self.excluders:
            return []
        data = self._round(number, participants, updates, epsilon_spent)
        norms = [float(u.update_norm) for u in updates]
        out = []
        for u in updates:
            for p in self.excluders:
                key = (policy_label(p), u.domain)
                variables = {"round": data, "coordinator": self.coordinator,
                             "update": update_facts(u, norms, self.counts.get(key, 0))}
                d = decide_policy(p, "update", {}, f"update.{self.job.name}.{number}.{u.domain}", p.domain, variables)
                if d.effect == "allow":
                    continue
                suspend = None
                if d.effect == "exclude":
                    self.counts[key] = self.counts.get(key, 0) + 1
                    if p.suspend_after is not None and self.counts[key] == p.suspend_after:
                        suspend = p.suspend_after
                out.append((u.domain, d, suspend))
                break  # one exclusion (or failure) per update is enough
        return out

    def _round(self, number: int, participants: list[str], updates: list[RoundUpdate],
               epsilon_spent: float) -> dict[str, Any]:
        job = self.job
        return {  # (`kind`, `batch`, `activations`, `gradients`: as a split job's round has them, split_rounds)
            "kind": "federated", "batch": 0, "activations": [], "gradients": [],
            "job": job.name, "number": number, "rounds": job.training.rounds,
            "participants": list(participants), "epsilon_spent": float(epsilon_spent),
            "updates": [{"domain": u.domain, "examples": u.examples, "loss": float(u.loss),
                         "update_norm": float(u.update_norm)} for u in updates],
        }

    def evaluate(self, number: int, participants: list[str], updates: list[RoundUpdate],
                 epsilon_spent: float = 0.0) -> list[Decision]:
        """Decisions on round `number` (allow, warn or deny per policy)."""
        if not self.policies:
            return []
        job = self.job
        data = self._round(number, participants, updates, epsilon_spent)
        variables = {"round": data, "coordinator": self.coordinator}
        subject = f"round.{job.name}.{number}"
        return [decide_policy(p, "round", data, subject, p.domain, variables) for p in self.policies]
