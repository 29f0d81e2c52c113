"""A few readable lines about a Plan, for `meshctl plan` and `meshctl up`."""

from __future__ import annotations

from meshctl.compiler.entrypoint import label
from meshctl.compiler.plan import Plan
from meshctl.compiler.spec import MeshSpec


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


LISTED = 20
"""`decisions="auto"` lists every decision of a plan with at most this many, else summarises."""


def render_plan_summary(plan: Plan, decisions: str = "auto") -> str:
    """Jobs, analyses, grants, policies and policy decisions with positions.

    `decisions`: `all` lists every decision; `summary` counts them per policy and effect and
    lists only the denies and warns (100,000 decisions at full size: one line per policy
    instead); `auto` is `all` up to LISTED decisions, else `summary`."""
    head = plan.plan
    counts = [_count(len(plan.domains), "domain", "domains"),
              _count(len(plan.products), "product", "products"),
              _count(len(plan.jobs), "job", "jobs")]
    counts += [_count(n, one, many) for n, one, many in
               [(len(plan.analyses), "analysis", "analyses"),
                (len(plan.grants), "grant", "grants"),
                (len(plan.split_models), "split model", "split models")] if n]
    title = (f"plan {head.mesh} {head.hash[:19]}… (meshctl {head.meshctl_version}, "
             f"protocol {head.protocol_version}): {', '.join(counts)}")
    lines = [title]
    lines += _jobs(plan) + _splits(plan) + _analyses(plan) + _grants(plan) + _policies(plan)
    if plan.decisions and (decisions == "all" or decisions == "auto" and len(plan.decisions) <= LISTED):
        lines.append("  policy decisions:")
        width = max(len(d.policy) for d in plan.decisions)
        for d in plan.decisions:
            lines.append(f"    {d.effect:<5} {d.policy:<{width}}  {d.subject}: {d.reason} "
                         f"({d.at})")
    elif plan.decisions:
        lines += _decision_summary(plan)
    return "\n".join(lines)


EFFECTS = ("allow", "warn", "deny")


def _decision_summary(plan: Plan) -> list[str]:
    """`policy decisions: N (a allow, w warn, d deny)`, one line per policy with its counts and
    position, then every warn and deny decision (as `--decisions all` writes it)."""
    counts: dict[str, dict[str, int]] = {}
    at: dict[str, str] = {}
    for d in plan.decisions:
        per = counts.setdefault(d.policy, dict.fromkeys(EFFECTS, 0))
        per[d.effect] += 1
        at.setdefault(d.policy, d.at)
    total = {e: sum(c[e] for c in counts.values()) for e in EFFECTS}
    lines = [f"  policy decisions: {len(plan.decisions):,} ("
             + ", ".join(f"{total[e]:,} {e}" for e in EFFECTS if total[e]) + "); "
             "`--decisions all` lists each"]
    width = max(len(p) for p in counts)
    for policy, per in sorted(counts.items()):
        tally = ", ".join(f"{per[e]:,} {e}" for e in EFFECTS if per[e])
        lines.append(f"    {policy:<{width}}  {tally}" + (f" ({at[policy]})" if at[policy] else ""))
    flagged = [d for d in plan.decisions if d.effect != "allow"]
    if flagged:
        width = max(len(d.policy) for d in flagged)
        lines += [f"    {d.effect:<5} {d.policy:<{width}}  {d.subject}: {d.reason} ({d.at})" for d in flagged]
    return lines


def _splits(plan: Plan) -> list[str]:
    """One line per split model: its parts (domain: features -> activation width), its top and label owner."""
    lines = []
    for s in plan.split_models:
        parts = ", ".join((f"{p.domain} {p.input_width}→{p.out}" if p.features else f"{p.domain} label only")
                          + (f" [{label(p.architecture)}]" if p.architecture is not None else "") for p in s.parts)
        top = "→".join(str(d) for d in [sum(p.out for p in s.parts), *s.top_hidden, len(s.classes) or 1])
        if s.top_architecture is not None:
            top += f" [{label(s.top_architecture)}]"
        shield = [f"{k} {v:g}" for k, v in (("clip", s.clip), ("noise", s.noise)) if v is not None]
        task = f", regression ({s.loss or 'mse'})" if s.task == "regression" else ""
        at = f"at {s.label_domain}" if s.top_at is None else "at the coordinator"
        task += f", loss at {s.label_domain}" if s.top_at is not None else ""
        lines.append(f"  split model {s.name}: parts {parts}; top {top} {at} "
                     f"(label {s.label_column}{task}); activations {', '.join(shield) or 'in clear'}; {s.epochs} epochs")
    return lines


def _jobs(plan: Plan) -> list[str]:
    lines = []
    for job in plan.jobs:
        arch = job.architecture
        shape = "→".join(str(d) for d in [arch.input_dim, *arch.hidden, arch.output_dim])
        model = f"{arch.kind} {shape}" if arch.kind != "custom" else label(arch).replace("->", "→")
        if job.task is not None or job.loss is not None:  # a classification with cross-entropy says nothing
            model += f" {job.task_name} ({job.loss_name})"
        lines.append(f"  job {job.name}: {model}, {job.parameters:,} parameters, "
                     f"{job.training.rounds} rounds, {job.aggregation.strategy}, "
                     f"quorum {job.quorum}/{len(job.participants)}"
                     + (f", sampling {job.sampling.per_round} per round" if job.sampling is not None else ""))
        lines.append(f"    reads {', '.join(r.product for r in job.reads)}")
        if job.evaluation.product or job.evaluation.cross_site:
            held = f"scored on {job.evaluation.product} (held out, never trains)" if job.evaluation.product else ""
            cross = "cross-site: every local model scored by every participant" if job.evaluation.cross_site else ""
            lines.append(f"    evaluation: {'; '.join(x for x in (held, cross) if x)}")
    return lines


def _analyses(plan: Plan) -> list[str]:
    lines = []
    for a in plan.analyses:
        by = f" by {', '.join(a.group_by)}" if a.group_by else ""
        dp = f", dp ε={a.dp.epsilon:g}" if a.dp else ""
        lines.append(f"  analysis {a.name}: {', '.join(m.label for m in a.metrics)}{by}, "
                     f"groups of at least {a.min_group_size}{dp}")
        lines.append(f"    reads {', '.join(r.product for r in a.reads)}")
    return lines


def _grants(plan: Plan) -> list[str]:
    if not plan.grants:
        return []
    lines = ["  grants:"]
    for g in plan.grants:
        until = f", until {g.until}" if g.until else ""
        lines.append(f"    {g.id} for {g.purpose}{until}")
    return lines


def _policies(plan: Plan) -> list[str]:
    if not plan.policies:
        return []
    runtime = sum(p.scope == "round" for p in plan.policies)
    tail = f" ({runtime} round-scope, decided at run time)" if runtime else ""
    return [f"  {_count(len(plan.policies), 'policy', 'policies')} carried into the plan{tail}"]


def describe_counts(spec: MeshSpec) -> str:
    """`3 domains, 3 products, 1 contract, 3 policies, 1 model` (then analyses and
    grants, when there are any)."""
    policies = len(spec.policies) + sum(len(d.policies) for d in spec.domains)
    counts = [(len(spec.domains), "domain", "domains"), (len(spec.products), "product", "products"),
              (len(spec.contracts), "contract", "contracts"), (policies, "policy", "policies"),
              (len(spec.models), "model", "models")]
    counts += [(n, one, many) for n, one, many in
               [(len(spec.analyses), "analysis", "analyses"),
                (len(spec.grants), "grant", "grants"),
                (len(spec.split_models), "split model", "split models")] if n]
    return ", ".join(_count(n, one, many) for n, one, many in counts)
