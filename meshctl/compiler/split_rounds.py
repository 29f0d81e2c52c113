"""Compile-time checks of round policies in a mesh with split models (docs/governance.md, "Round policies of
split jobs"; run time: meshctl.runtime.split_rounds).

A round policy judges a split job's batches when it reads `round.kind`; one that does not keeps its
federated meaning. MESH572: a policy reads a split round's facts (`round.activations`, `round.gradients`,
`round.batch`) without testing `round.kind`, so it would judge only federated rounds, where they are
empty. MESH573 (warning): a mesh with a split model has a round policy that does not test `round.kind`,
so the split model's batches are not judged by it. MESH574: `effect: exclude` would judge split batches
(there is no single update to leave out: the top model needs every part's activations). MESH575:
`round.kind` compared with a value it never has.
"""

from __future__ import annotations

import re

from meshctl.compiler.diagnostics import Reporter
from meshctl.compiler.spec import MeshSpec

KIND = re.compile(r"\bround\s*\.\s*kind\b")
SPLIT_FACTS = re.compile(r"\bround\s*\.\s*(activations|gradients|batch)\b")
COMPARED = re.compile(r"""\bround\s*\.\s*kind\s*[!=]=\s*(["'])(.*?)\1|(["'])(.*?)\3\s*[!=]=\s*round\s*\.\s*kind\b""")
FEDERATED_ONLY = re.compile(r"""\bround\s*\.\s*kind\s*==\s*["']federated["']|["']federated["']\s*==\s*round\s*\.\s*kind\b"""
                            r"""|\bround\s*\.\s*kind\s*!=\s*["']split["']|["']split["']\s*!=\s*round\s*\.\s*kind\b""")
KINDS = ("federated", "split")


def check_round_policies(spec: MeshSpec, report: Reporter) -> None:
    """MESH572-575 on every `scope: round` policy (global and domain-local)."""
    parts = {p.product.split(".", 1)[0] for m in spec.split_models for p in m.parts}
    local = [(f"{d.name}.{p.name}", p, d.name) for d in spec.domains for p in d.policies]
    for label, policy, domain in [(p.name, p, "") for p in spec.policies] + local:
        if policy.scope != "round":
            continue
        text = f"{policy.when or ''} {policy.require}"
        where = (*policy.path, "when" if policy.when and KIND.search(policy.when) else "require")
        for m in COMPARED.finditer(text):
            value = m.group(2) if m.group(1) else m.group(4)
            if value not in KINDS:
                report.error("MESH575", f"round policy '{label}' compares round.kind with {value!r}, which it never "
                             f"is", where, hint='round.kind is "federated" or "split"')
                break
        reads_kind = bool(KIND.search(text))
        facts = SPLIT_FACTS.search(text)
        if facts and not reads_kind:
            report.error("MESH572", f"round policy '{label}' reads round.{facts.group(1)}, which only a split job's "
                         "batches have, but does not test round.kind: it would judge federated rounds only",
                         (*policy.path, "require"), hint='add `when: round.kind == "split"`')
            continue
        if policy.effect == "exclude":
            if reads_kind and not FEDERATED_ONLY.search(policy.when or "") and spec.split_models:
                report.error("MESH574", f"round policy '{label}' has effect: exclude and tests round.kind, so it would "
                             "judge split jobs' batches, where no single update can be left out (the top model "
                             "needs every part's activations)", (*policy.path, "effect"),
                             hint='use effect: deny or warn, or guard it with `when: round.kind == "federated"`')
            continue
        if not reads_kind and spec.split_models and (not domain or domain in parts):
            names = ", ".join(m.name for m in spec.split_models
                              if not domain or domain in {p.product.split(".", 1)[0] for p in m.parts})
            report.warning("MESH573", f"round policy '{label}' does not test round.kind: it judges federated rounds "
                           f"only, not the batches of split model {names}", (*policy.path, "require"),
                           hint='say so with `when: round.kind == "federated"`, or test `round.kind == "split"` '
                                'to judge the activations and gradients too')

