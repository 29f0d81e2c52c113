"""A model's held-out evaluation product (`evaluation.product`): what it is, and that it may be read.

The product `<domain>.<name>` is read by the domain that holds it, every row as test data; it never
trains. It must exist, carry the model's features and target with the same types (the target with
the same values, in the same order: they are the class indices), hold none of them as PII, and be
read under a grant when it is `access: request` (a read like any training read: the grant's id goes
into the job's `grants`, and the model's policies see it among `model.reads`). Under
`participants: all` a domain whose only product under the model's contract is the evaluation
product does not train; listing it as a participant is an error (MESH535).
"""

from __future__ import annotations

from meshctl.compiler.diagnostics import did_you_mean
from meshctl.compiler.grants import grant_id
from meshctl.compiler.resolved import References, ResolvedModel
from meshctl.compiler.spec import Model, Product

CODE = "MESH535"


def find(r: References, model: Model) -> Product | None:
    """The product `model.evaluation.product` names, or None (reported, unless the spec is incomplete)."""
    pid = model.evaluation.product
    if pid is None:
        return None
    products = {f"{p.domain}.{p.name}": p for p in r.spec.products}
    found = products.get(pid)
    if found is None and not r.incomplete:
        r.report.error(CODE, f"evaluation product '{pid}' of model '{model.name}' is not a product",
                       (*model.path, "evaluation", "product"),
                       hint=did_you_mean(pid, products) or "a product is addressed as <domain>.<name>")
    return found


def without(r: References, model: Model, publishers: dict[str, list[Product]]) -> dict[str, list[Product]]:
    """`publishers` less the evaluation product: it never trains. A listed participant whose only
    product under the contract is the evaluation product is reported (MESH535)."""
    product = find(r, model)
    if product is None or product not in publishers.get(product.domain, []):
        return publishers
    rest = [p for p in publishers[product.domain] if p is not product]
    if not rest and model.participants != "all" and product.domain in model.participants:
        at = (*model.path, "participants", model.participants.index(product.domain))
        r.report.error(CODE, f"domain '{product.domain}' would train model '{model.name}' on "
                       f"'{model.evaluation.product}', which is the model's evaluation product", at,
                       hint="an evaluation product never trains: remove the domain from participants")
        return publishers  # (so the participant is not also reported as publishing nothing)
    out = dict(publishers)
    if rest:
        out[product.domain] = rest
    else:
        del out[product.domain]
    return out


def check(r: References, resolved: ResolvedModel) -> Product | None:
    """The evaluation product of a resolved model, if it is one it can be scored on (else reported)."""
    model = resolved.model
    product = find(r, model)
    if product is None:
        return None
    at = (*model.path, "evaluation", "product")
    pid = f"{product.domain}.{product.name}"
    if product in resolved.products:
        r.report.error(CODE, f"evaluation product '{pid}' is also a training product of model '{model.name}'",
                       at, hint="an evaluation product never trains: use a product no participant trains on")
        return None
    have = {c.name: c for c in product.columns}
    bad: list[str] = []
    for name in [*resolved.features, resolved.target.name]:
        mine, theirs = r.column(resolved.contract, name), have.get(name)
        if theirs is None:
            bad.append(f"{name} (missing)")
        elif theirs.pii != "none":
            bad.append(f"{name} (PII: {theirs.pii})")
        elif mine is not None and theirs.type != mine.type:
            bad.append(f"{name} ({theirs.type}, the model's is {mine.type})")
        elif name == resolved.target.name and theirs.values and list(theirs.values) != list(mine.values):
            bad.append(f"{name} (values {theirs.values}, the model's classes are {mine.values})")
    if bad:
        r.report.error(CODE, f"evaluation product '{pid}' cannot score model '{model.name}': column"
                       f"{'s' if len(bad) > 1 else ''} {', '.join(bad)}", at,
                       hint="it needs the model's features and target, with the same types and classes")
        return None
    if product.access == "request":
        subject = f"model:{model.name}"
        if (pid, subject) not in r.result.grants:
            r.report.error("MESH405", f"model '{model.name}' reads '{pid}' (its evaluation product), which is "
                           "`access: request`, without a grant", at,
                           hint=f"ask for one: meshctl access request {pid} --for {model.name} "
                                f"--purpose {model.purpose or 'PURPOSE'}")
            return None
        used = r.result.used_grants.setdefault(subject, [])
        if grant_id(pid, subject) not in used:
            used.append(grant_id(pid, subject))
    return product

