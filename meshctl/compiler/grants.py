"""Grants: who may read an `access: request` product, for which purpose.

A grant names one product (`<domain>.<name>`), one model or analysis, and a
purpose that must be that subject's purpose. Every `access: request` product a
model or analysis reads needs a grant; merging the grant into main is its
approval. `until` is carried into the plan and checked by the runtime (the
compiler has no clock).
"""

from __future__ import annotations

from meshctl.compiler.diagnostics import did_you_mean
from meshctl.compiler.resolved import References
from meshctl.compiler.spec import Analysis, Grant, Model, Product, SplitModel


def grant_id(product: str, subject: str) -> str:
    """`charite.biopsies->model:malignancy`."""
    return f"{product}->{subject}"


def resolve_grants(r: References) -> None:
    """Check every grant's references and purpose; then every read of a request product."""
    spec = r.spec
    products = {f"{p.domain}.{p.name}": p for p in spec.products} if spec.grants else {}  # (10,000 names)
    subjects: dict[str, Model | Analysis | SplitModel] = {f"model:{m.name}": m for m in spec.models}
    subjects.update({f"analysis:{a.name}": a for a in spec.analyses})
    for split in spec.split_models:  # a split model's reads are checked with it (meshctl.compiler.split)
        subjects.setdefault(f"model:{split.name}", split)
    complete = not r.invalid.get("grants")
    for grant in spec.grants:
        product_ok = _product(r, grant, products)
        subject = subjects.get(grant.subject)
        complete = complete and product_ok and subject is not None
        if subject is None:
            _unknown_subject(r, grant, [*spec.models, *spec.split_models], spec.analyses)
        elif subject.purpose != grant.purpose:
            r.report.error("MESH404", f"grant for {grant.subject} has purpose "
                           f"'{grant.purpose}', but {grant.subject.replace(':', ' ')!s} serves "
                           f"'{subject.purpose}'", (*grant.path, "purpose"),
                           hint=f"write `purpose: {subject.purpose}`" if subject.purpose
                           else f"declare `purpose: {grant.purpose}` on the {grant.subject}")
        if product_ok and subject is not None:
            key = (grant.product, grant.subject)
            if key in r.result.grants:
                line = r.report.locate(r.result.grants[key].path)[0]
                r.report.error("MESH301", f"duplicate grant '{grant_id(*key)}'", grant.path,
                               hint=f"first declared at line {line}")
            else:
                r.result.grants[key] = grant
    if not complete:  # a grant that did not resolve may be the one a read needs
        return
    for model in r.result.models:
        _reads(r, f"model:{model.model.name}", model.model, model.products)
    for analysis in r.result.analyses:
        _reads(r, f"analysis:{analysis.analysis.name}", analysis.analysis, analysis.products)


def _product(r: References, grant: Grant, products: dict[str, Product]) -> bool:
    if grant.product in products:
        return True
    if not r.incomplete:
        r.report.error("MESH311", f"grant names unknown product '{grant.product}'",
                       (*grant.path, "product"),
                       hint=did_you_mean(grant.product, products)
                       or "a product is addressed as <domain>.<name>")
    return False


def _unknown_subject(r: References, grant: Grant, models: list[Model | SplitModel],
                     analyses: list[Analysis]) -> None:
    kind = "model" if grant.model is not None else "analysis"
    name = grant.model if grant.model is not None else grant.analysis
    section = "models" if kind == "model" else "analyses"
    if name in r.broken.get(section, set()):
        return
    names = [m.name for m in models] if kind == "model" else [a.name for a in analyses]
    r.report.error("MESH312", f"grant names unknown {kind} '{name}'", (*grant.path, kind),
                   hint=did_you_mean(name, names) or f"declared {section}: "
                   + (", ".join(f"'{n}'" for n in names[:8]) or "none"))


def _reads(r: References, subject: str, item: Model | Analysis, products: list[Product]) -> None:
    used: list[str] = []
    for product in products:
        if product.access != "request":
            continue
        pid = f"{product.domain}.{product.name}"
        if (pid, subject) in r.result.grants:
            used.append(grant_id(pid, subject))
            continue
        kind, name = subject.split(":", 1)
        purpose = item.purpose or "PURPOSE"
        r.report.error("MESH405", f"{kind} '{name}' reads '{pid}', which is `access: request`, "
                       "without a grant", item.path,
                       hint=f"ask for one: meshctl access request {pid} --for {name} "
                            f"--purpose {purpose}")
    r.result.used_grants[subject] = used
