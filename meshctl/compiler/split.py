"""Split models (`split_models:`): checks (MESH560-569, 576, 578-579, warnings 577, 580; a numeric
label's task: MESH514, 528, 529 as for a model), their plan section and the `model` variable
model-scope policies see of them (`split_activation`). An `access: request` product is read under
a grant for `model:<name>`, as a federated model's (MESH405 without one).

A split model joins products of different domains that hold different columns of the same
entities: each part names its product, its key column (PII allowed: it is blinded for the
private set intersection, never sent) and the numeric features its bottom model reads; the
label is a category column of one part's product, whose domain runs the top model (or the
coordinator does, `top: {at: coordinator}`, and the label owner's part may then hold only the label). Pure:
reads only the checked spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshctl.compiler.diagnostics import Reporter, YamlPath, did_you_mean
from meshctl.compiler.entrypoint import architecture_facts, builtin_hash, custom_network
from meshctl.compiler.grants import grant_id
from meshctl.compiler.plan import (
    PlanArchitecture,
    PlanFeature,
    PlanSplit,
    PlanSplitPart,
    PlanTensor,
    mlp_tensors,
    parameter_count,
)
from meshctl.compiler.resolved import Resolution
from meshctl.compiler.spec import TASK_LOSSES, TASK_METRICS, Column, MeshSpec, Product, SplitModel

NUMERIC = ("int", "float", "bool")
"""Column types a bottom model reads (one input slot each)."""
TOP_AT = ("label_owner", "coordinator")
"""Who may run a split model's top model (`top.at`)."""
REGRESSION_LABEL = ("int", "float")
"""Label types of a regression (one output, loss mse, mae or huber), as a federated model's target."""
SPLIT_METRICS = ("loss", "accuracy", "mae", "rmse", "r2")
"""The metrics a split model reports (of its task's: spec.TASK_METRICS)."""


def check_split_models(spec: MeshSpec, resolution: Resolution, report: Reporter, root: Path | None = None,
                       cache: Path | None = None) -> list[PlanSplit]:
    """The plan section of every split model that checks, after reporting what is wrong with the others.
    `root` (the mesh.yaml's directory) and `cache` serve `entrypoint:` bottom and top models
    (compiler.entrypoint: the code is pinned, the module introspected in a subprocess)."""
    products = {f"{p.domain}.{p.name}": p for p in spec.products} if spec.split_models else {}  # (10,000 names)
    taken = {m.name: m.path for m in spec.models}
    out: list[PlanSplit] = []
    for model in spec.split_models:
        if model.name in taken:
            line = report.locate((*taken[model.name], "name"))[0]
            report.error("MESH301", f"duplicate model '{model.name}'", (*model.path, "name"),
                         hint=f"first declared at line {line}; models and split models share names")
            continue
        taken[model.name] = model.path
        built = _check(model, products, resolution, report, root or Path.cwd(), cache)
        if built is not None:
            out.append(built)
    return out


def _columns(product: Product, resolution: Resolution) -> dict[str, Column]:
    """The product's columns by name (its own, else its contract's)."""
    columns = product.columns
    if not columns and id(product) in resolution.contracts:
        columns = resolution.contracts[id(product)].columns
    return {c.name: c for c in columns}


def _check(model: SplitModel, products: dict[str, Product], resolution: Resolution,
           report: Reporter, root: Path, cache: Path | None) -> PlanSplit | None:
    before = len(report.diagnostics)
    label = f"split model '{model.name}'"
    parts: list[tuple[Product, str, list[str]]] = []
    domains: dict[str, int] = {}
    grants: list[str] = []
    categorical: dict[str, dict[str, list[str]]] = {}
    """Each part product's categorical features and their declared values (the one-hot vocabulary)."""
    key_types: list[tuple[str, str, str]] = []
    """(product, key column, its type) of the parts read so far: MESH568 when a part's key type differs."""
    for i, part in enumerate(model.parts):
        at: YamlPath = (*model.path, "parts", i)
        product = _product(part.product, products, (*at, "product"), label, report)
        if product is None:
            continue
        if product.domain in domains:
            report.error("MESH567", f"{label} has two parts in domain '{product.domain}'", (*at, "product"),
                         hint=f"part {domains[product.domain] + 1} ({model.parts[domains[product.domain]].product}) "
                              f"already reads from {product.domain}; "
                              "give each domain one part with all its features")
            continue
        domains[product.domain] = i
        if product.access == "request":
            subject = f"model:{model.name}"
            if (part.product, subject) in resolution.grants:
                grants.append(grant_id(part.product, subject))
            else:
                report.error("MESH405", f"model '{model.name}' reads '{part.product}', which is `access: request`, "
                             "without a grant", (*at, "product"),
                             hint=f"ask for one: meshctl access request {part.product} --for {model.name} "
                                  f"--purpose {model.purpose or 'PURPOSE'}")
        columns = _columns(product, resolution)
        key = part.key or model.key
        if key is None:
            report.error("MESH561", f"{label}: part {part.product} has no key column", at,
                         hint="give the split model a `key:` (or the part its own `key:`)")
        elif key not in columns:
            report.error("MESH561", f"{label}: key column '{key}' is not a column of {part.product}",
                         (*at, "key") if part.key else (*model.path, "key"),
                         hint=did_you_mean(key, list(columns)) or "declare it in the product's columns")
        elif key_types and columns[key].type != key_types[0][2]:
            first, first_key, first_type = key_types[0]
            report.error("MESH568", f"{label}: key column '{key}' of {part.product} is {columns[key].type}, but "
                         f"'{first_key}' of {first} is {first_type}",
                         (*at, "key") if part.key else (*at, "product"),
                         hint="every part's key column has one type (123 and \"00123\" never match); "
                              "declare them alike")
        else:
            key_types.append((part.product, key, columns[key].type))
        features: list[str] = []
        seen: dict[str, YamlPath] = {}
        for j, name in enumerate(part.features):
            fat: YamlPath = (*at, "features", j)
            if name in seen:
                report.error("MESH563", f"feature '{name}' is read twice in {label}", fat,
                             hint=f"first at {report.where(seen[name])}; list each column once")
                continue
            seen[name] = fat
            column = columns.get(name)
            if column is None:
                other = next((p.product for p in model.parts if p.product != part.product and p.product in products
                              and name in _columns(products[p.product], resolution)), None)
                hint = (f"{name} is a column of {other}, another part: list it under that part's features"
                        if other else did_you_mean(name, list(columns)) or "each part reads its own product's columns")
                report.error("MESH562", f"feature '{name}' is not a column of {part.product}", fat, hint=hint)
            elif name == key or name == model.label.column:
                what = "the key" if name == key else "the label"
                report.error("MESH563", f"feature '{name}' of {label} is {what}", fat,
                             hint="the key and the label never feed a bottom model")
            elif column.pii != "none":
                report.error("MESH564", f"feature '{name}' of {part.product} is a PII column ({column.pii})", fat,
                             hint="PII never feeds a model; only the key may be PII, and it is blinded")
            elif column.type == "string":
                report.error("MESH569", f"feature '{name}' of {part.product} is a string column without "
                             "declared values; a bottom model one-hot encodes a categorical feature over them", fat,
                             hint=f"declare it a category with its values: `{{name: {name}, type: category, "
                                  "values: [...]}`")
            elif column.type == "category":
                categorical.setdefault(part.product, {})[name] = list(column.values)
                features.append(name)
            elif column.type not in NUMERIC:
                report.error("MESH564", f"feature '{name}' of {part.product} is a {column.type} column; "
                             "a bottom model reads int, float, bool or categorical columns", fat)
            else:
                features.append(name)
        if not part.features and not _label_only(model, part.product, at, report, "bottom" in part.model_fields_set):
            report.error("MESH562", f"{label}: part {part.product} reads no features", (*at, "features"))
        parts.append((product, key or "", features))
    classes = _label(model, products, resolution, [p for p, _, _ in parts], report)
    if model.top.at not in TOP_AT:
        report.error("MESH578", f"{label}: top.at '{model.top.at}' is neither label_owner nor coordinator",
                     (*model.path, "top", "at"),
                     hint=did_you_mean(model.top.at, TOP_AT) or "label_owner (the default) or coordinator")
    task = "regression" if classes == [] else "classification"
    if classes is not None:
        _check_task(model, task, report)
    if len(report.diagnostics) > before or classes is None:
        return None
    seed, plan_parts = model.training.seed, []
    for i, (product, key, features) in enumerate(parts):
        spec = model.parts[i]
        contract = resolution.contracts.get(id(product))
        bottom = spec.bottom
        at = (*model.path, "parts", i, "bottom")
        if not features:  # the label owner's label-only part (_label_only): no bottom model, no activations
            plan_parts.append(PlanSplitPart(
                domain=product.domain, product=f"{product.domain}.{product.name}",
                contract=f"{contract.name}@{contract.version}" if contract else "", key=key, features=[],
                hidden=[], out=0, tensors=[]))
            continue
        if bottom.entrypoint is None and bottom.args:
            _args_without_entrypoint(at, report)
            continue
        arch, hidden, out = None, list(bottom.hidden), bottom.out
        inputs = _inputs(features, categorical.get(spec.product, {}))
        n_in = sum(f.width for f in inputs) if inputs else len(features)
        tensors = mlp_tensors(n_in, bottom.hidden, bottom.out)
        if bottom.entrypoint is not None:  # its width is what the module gives; `out`, if given, must agree
            net = custom_network(bottom, at, report, root, cache, [n_in], None, {"kind", "hidden"})
            if net is None:
                continue
            if "out" in bottom.model_fields_set and net.architecture.output_dim != bottom.out:
                report.error("MESH576", f"the bottom model {bottom.entrypoint} of part {spec.product} gives "
                             f"{net.architecture.output_dim} activations per row, `out` says {bottom.out}",
                             (*at, "out"), hint="remove `out` (it is learned from the module) or make them agree")
                continue
            arch, hidden, out, tensors = net.architecture, [], net.architecture.output_dim, net.tensors
        plan_parts.append(PlanSplitPart(
            domain=product.domain, product=f"{product.domain}.{product.name}",
            contract=f"{contract.name}@{contract.version}" if contract else "", key=key, features=features,
            hidden=hidden, out=out, tensors=tensors, architecture=arch, inputs=inputs))
    if len(plan_parts) < len(parts):
        return None
    width = sum(p.out for p in plan_parts)
    owner = _product(model.label.product, products, (), label, None)
    assert owner is not None
    t, e = model.training, model.evaluation
    top_arch = None
    outputs = len(classes) or 1  # a regression: one
    top: list[PlanTensor] = mlp_tensors(width, model.top.hidden, outputs)
    if model.top.entrypoint is None and model.top.args:
        _args_without_entrypoint((*model.path, "top"), report)
        return None
    if model.top.entrypoint is not None:  # on the concatenated activations; one output per class
        net = custom_network(model.top, (*model.path, "top"), report, root, cache, [width], outputs,
                             {"kind", "hidden"})
        if net is None:
            return None
        top_arch, top = net.architecture, net.tensors
    clip, noise = model.activations.clip or None, model.activations.noise or None  # 0 is off, as not declared
    _noise_bound(model, clip, noise, max(p.out for p in plan_parts), report)
    if model.top.at == "coordinator":  # said at every compile: the coordinator learns the labels
        report.warning("MESH580", f"the coordinator runs the top model of split model '{model.name}': it learns "
                       f"the {model.label.column} of every shared row (the label owner returns d loss / d logits, "
                       "softmax - onehot for cross entropy)", (*model.path, "top", "at"),
                       hint="keep the top at the label owner (remove `at`), or let a policy decide: "
                            "model.top.at is \"coordinator\"")
    return PlanSplit(
        name=model.name, purpose=model.purpose, participants=[p.domain for p in plan_parts], parts=plan_parts,
        label_domain=owner.domain, label_product=model.label.product, label_column=model.label.column,
        classes=classes, top_hidden=list(model.top.hidden), top_tensors=top,
        task="regression" if task == "regression" else None,
        loss=model.loss if task == "regression" and model.loss != "mse" else None,
        huber_delta=model.huber_delta if model.huber_delta not in (None, 1.0) else None,
        clip=clip, noise=noise, min_intersection=model.min_intersection,
        epochs=t.epochs, batch_size=t.batch_size, optimizer=t.optimizer, lr=t.lr, seed=seed,
        standardize=t.standardize, holdout=e.holdout,
        metrics=list(e.metrics or (["loss", "mae", "rmse", "r2"] if task == "regression" else ["loss", "accuracy"])),
        round_timeout_s=model.round_timeout_s, grants=grants or None, top_architecture=top_arch,
        top_at="coordinator" if model.top.at == "coordinator" else None)


def _inputs(features: list[str], categorical: dict[str, list[str]]) -> list[PlanFeature] | None:
    """Every feature's input slots when one is categorical (one per declared value: no "other" slot, an
    undeclared value is refused at run time); None when all are numeric (one slot each: the plan as before)."""
    if not any(f in categorical for f in features):
        return None
    return [PlanFeature(name=f, kind="categorical", width=len(categorical[f]), vocabulary=categorical[f])
            if f in categorical else PlanFeature(name=f) for f in features]


def _noise_bound(model: SplitModel, clip: float | None, noise: float | None, out: int, report: Reporter) -> None:
    """MESH577: noise that drowns the activations. A row's noise has L2 norm about noise * sqrt(out);
    above `clip` (the largest a row's activations may be) every row is more noise than signal. Without
    a clip, activations of standardized inputs are about 1 each, so noise above 1 is the bound."""
    if noise is None:
        return
    bound = clip if clip is not None else out ** 0.5
    if noise * out ** 0.5 <= bound:
        return
    at = (*model.path, "activations", "noise")
    if clip is not None:
        report.warning("MESH577", f"activation noise {noise:g} of split model '{model.name}' drowns its activations: "
                       f"about {noise * out ** 0.5:.3g} per row ({out} activations), clip is {clip:g}", at,
                       hint=f"the model learns little above noise {clip / out ** 0.5:.3g}; lower noise or raise clip")
    else:
        report.warning("MESH577", f"activation noise {noise:g} of split model '{model.name}' drowns its activations "
                       "(about 1 each without a clip)", at,
                       hint="lower noise below 1, or declare activations.clip to bound the activations")


def _label_only(model: SplitModel, product: str, at: YamlPath, report: Reporter, bottom: bool) -> bool:
    """Whether a part without features is the label owner's label-only part, which `top: {at: coordinator}`
    allows (it joins the intersection and holds the label; it runs no bottom model). MESH579 when it is the
    label owner's part but the top is at the label owner, or it declares a bottom model."""
    if product != model.label.product:
        return False
    where = f"split model '{model.name}': the label owner's part {product}"
    if model.top.at != "coordinator":
        report.error("MESH579", f"{where} reads no features, and the label owner runs the top model",
                     (*at, "features"), hint="give it features, or declare `top: {at: coordinator}` (it then holds "
                                             "only the label; the coordinator learns the labels, MESH580)")
    elif bottom:
        report.error("MESH579", f"{where} reads no features but declares a bottom model", (*at, "bottom"),
                     hint="a label-only part has no bottom model: remove `bottom:`, or give it features")
    return True


def _args_without_entrypoint(at: YamlPath, report: Reporter) -> None:
    report.error("MESH518", "`args` is for an entrypoint factory; a built-in takes its own keys",
                 (*at, "args"), hint="add `entrypoint: pkg.module:factory`, or remove `args`")


def _product(ref: str, products: dict[str, Product], at: YamlPath, label: str,
             report: Reporter | None) -> Product | None:
    product = products.get(ref)
    if product is None and report is not None:
        report.error("MESH560", f"{label} names unknown product '{ref}'", at,
                     hint=did_you_mean(ref, list(products)) or "write `<domain>.<product>`")
    return product


def _label(model: SplitModel, products: dict[str, Product], resolution: Resolution,
           parts: list[Product], report: Reporter) -> list[str] | None:
    """The label's classes, after checking it is a category column of one part's product."""
    at: YamlPath = (*model.path, "label")
    label = f"split model '{model.name}'"
    product = _product(model.label.product, products, (*at, "product"), label, report)
    if product is None:
        return None
    if product not in parts:
        report.error("MESH565", f"the label of {label} is in {model.label.product}, which is not one of its parts",
                     (*at, "product"), hint="the label owner is a participant: label one of the parts' products")
        return None
    column = _columns(product, resolution).get(model.label.column)
    if column is None:
        report.error("MESH566", f"label column '{model.label.column}' is not a column of {model.label.product}",
                     (*at, "column"), hint=did_you_mean(model.label.column, list(_columns(product, resolution))))
        return None
    if column.pii == "none" and column.type in REGRESSION_LABEL:
        return []  # a regression: one output
    if column.pii != "none" or column.type != "category" or len(column.values) < 2:
        why = (f"a PII column ({column.pii})" if column.pii != "none"
               else f"a {column.type} column" if column.type != "category" else "a category of fewer than 2 values")
        report.error("MESH566", f"label column '{model.label.column}' of {model.label.product} is {why}",
                     (*at, "column"), hint="a split model's label is a category column with its values declared "
                                           "(a classification) or an int or float column (a regression)")
        return None
    return list(column.values)


def _check_task(model: SplitModel, task: str, report: Reporter) -> None:
    """The metrics and the loss fit the label's task, with the codes a federated model's get (MESH514,
    MESH528, MESH529: compile._check_metrics)."""
    for i, metric in enumerate(model.evaluation.metrics or []):
        if metric not in TASK_METRICS[task]:
            fits = ", ".join(m for m in TASK_METRICS[task] if m in SPLIT_METRICS)
            report.error("MESH514", f"evaluation metric '{metric}' of split model '{model.name}' does not fit "
                         f"its task ({task}: label {model.label.column})", (*model.path, "evaluation", "metrics", i),
                         hint=f"a {task} split model reports {fits}")
    if model.loss is not None and model.loss not in TASK_LOSSES[task]:
        report.error("MESH528", f"loss {model.loss} of split model '{model.name}' does not fit its task ({task}: "
                     f"label {model.label.column})", (*model.path, "loss"),
                     hint=f"a {task} split model trains with {' or '.join(TASK_LOSSES[task])}")
    if model.huber_delta is not None and model.loss != "huber":
        report.error("MESH529", f"huber_delta is a setting of `loss: huber`; split model '{model.name}' trains with "
                     f"{model.loss or 'its default loss'}", (*model.path, "huber_delta"),
                     hint="remove huber_delta, or set `loss: huber`")


def split_activation(split: PlanSplit, reads: list[dict[str, Any]], jurisdictions: dict[str, str]) -> dict[str, Any]:
    """The `model` variable a model-scope policy sees of a split model, built from its plan section
    (so the compiler and the domains build the same one). The fields a federated model also has
    mean the same; `reads` are its parts' products (as the caller reads them: spec or plan)."""
    none = {"epsilon": 0.0, "delta": 0.0, "clip": 0.0}
    parts = [{"domain": p.domain, "product": p.product, "key": p.key, "features": list(p.features),
              "bottom": _architecture(p.architecture, "mlp" if p.features else "none", p.hidden) | {"out": p.out},
              "parameters": parameter_count(p.tensors)}
             for p in split.parts]
    return {
        "kind": "split", "name": split.name, "purpose": split.purpose,
        "participants": list(split.participants),
        "domains": [{"name": d, "jurisdiction": jurisdictions.get(d, "")} for d in split.participants],
        "reads": reads, "features": [f for p in split.parts for f in p.features], "target": split.label_column,
        "label": {"domain": split.label_domain, "product": split.label_product, "column": split.label_column,
                  "classes": list(split.classes)},
        "parts": parts,
        "architecture": _architecture(split.top_architecture, "split", split.top_hidden),
        "top": {"at": split.top_at or "label_owner"},
        "training": {"epochs": split.epochs, "batch_size": split.batch_size, "optimizer": split.optimizer,
                     "lr": split.lr, "seed": split.seed, "standardize": split.standardize},
        "privacy": {"secure_aggregation": False, "dp": none, "client_dp": dict(none)},
        "activations": {"clip": split.clip or 0.0, "noise": split.noise or 0.0},
        "min_intersection": split.min_intersection,
        "parameters": sum(p["parameters"] for p in parts) + parameter_count(split.top_tensors),
    }


def _architecture(arch: PlanArchitecture | None, kind: str, hidden: list[int]) -> dict[str, Any]:
    """A bottom's or the top's `kind, hidden, activation, entrypoint, code_hash` as policies see them: an
    entrypoint model's are its (entrypoint.architecture_facts: kind `custom`, its pinned code's hash);
    a built-in's entrypoint is "" and its code_hash meshctl's version."""
    if arch is not None:
        facts = architecture_facts(arch)
        return {k: facts[k] for k in ("kind", "hidden", "activation", "entrypoint", "code_hash")}
    return {"kind": kind, "hidden": list(hidden), "activation": "relu", "entrypoint": "", "code_hash": builtin_hash()}
