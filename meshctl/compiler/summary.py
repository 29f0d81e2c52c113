"""A few readable lines about a Plan, for `meshctl plan` and `meshctl up`."""

from __future__ import annotations

from meshctl.compiler.plan import Plan
from meshctl.compiler.spec import MeshSpec


def render_plan_summary(plan: Plan) -> str:
    """Jobs, participants, rounds, parameter counts and policy decisions with positions."""
    head = plan.plan
    lines = [f"plan {head.mesh} {head.hash[:19]}… (meshctl {head.meshctl_version}, "
             f"protocol {head.protocol_version}): {len(plan.domains)} domains, "
             f"{len(plan.products)} products, {len(plan.jobs)} "
             f"job{'s' if len(plan.jobs) != 1 else ''}"]
    for job in plan.jobs:
        arch = job.architecture
        shape = "→".join(str(d) for d in [arch.input_dim, *arch.hidden, arch.output_dim])
        lines.append(f"  job {job.name}: {arch.kind} {shape}, {job.parameters:,} parameters, "
                     f"{job.training.rounds} rounds, {job.aggregation.strategy}, "
                     f"quorum {job.quorum}/{len(job.participants)}")
        reads = ", ".join(r.product for r in job.reads)
        lines.append(f"    reads {reads}")
    if plan.decisions:
        lines.append("  policy decisions:")
        width = max(len(d.policy) for d in plan.decisions)
        for d in plan.decisions:
            lines.append(f"    {d.effect:<5} {d.policy:<{width}}  {d.subject}: {d.reason} "
                         f"({d.at})")
    return "\n".join(lines)


def describe_counts(spec: MeshSpec) -> str:
    """`3 domains, 3 products, 1 contract, 3 policies, 1 model`."""
    policies = len(spec.policies) + sum(len(d.policies) for d in spec.domains)
    counts = [(len(spec.domains), "domain", "domains"), (len(spec.products), "product", "products"),
              (len(spec.contracts), "contract", "contracts"), (policies, "policy", "policies"),
              (len(spec.models), "model", "models")]
    return ", ".join(f"{n} {one if n == 1 else many}" for n, one, many in counts)
