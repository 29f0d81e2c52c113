"""Cross-references: unique names, and every name a spec uses resolves.

Each reference that does not resolve is an error at the referencing value with
a did-you-mean hint. A model resolves to its contract, its participants in
declared domain order, one product per participant, and its features with
globs expanded; PII columns can never be features or targets. Analyses
(analyses.py) and grants (grants.py) resolve through the same Resolver, which they
see as a resolved.References (so they never import this module).
Lookups are indexed by name, so resolving stays linear in the size of the spec.
"""

from __future__ import annotations

import fnmatch
import math

from meshctl.compiler import evalproduct
from meshctl.compiler.analyses import resolve_analysis
from meshctl.compiler.diagnostics import Reporter, YamlPath, did_you_mean, quoted
from meshctl.compiler.grants import resolve_grants
from meshctl.compiler.parse import ItemMemo, Parsed
from meshctl.compiler.plan import PlanFeature
from meshctl.compiler.resolved import Resolution, ResolvedAnalysis, ResolvedModel
from meshctl.compiler.spec import Analysis, Column, Contract, Model, Product

__all__ = ["Resolution", "ResolvedAnalysis", "ResolvedModel", "Resolver", "declared", "resolve"]

NUMERIC = ("int", "float", "bool")
"""Column types that feed a model as one slot each."""
CATEGORICAL = ("category", "string")
"""Column types that feed a model one-hot (see meshctl/runtime/features.py)."""
MAX_CATEGORIES = 10_000
"""Most values one categorical feature may one-hot (each is a slot of every row's input)."""


class Resolver:
    """Checks the references of a parsed spec, reporting into `report` (a resolved.References)."""

    def __init__(self, parsed: Parsed, report: Reporter, kept: ItemMemo | None = None) -> None:
        self.spec = parsed.spec
        self.kept = kept
        """A compile server's memo: a model resolved from the very objects of a previous compile is
        that compile's resolution again (see `_model`)."""
        self.broken = parsed.broken
        self.invalid = parsed.invalid
        self.report = report
        self.domains = [d.name for d in self.spec.domains]
        self.domain_set = set(self.domains)
        self._order: dict[str, list[int]] = {}
        """Where each domain name is declared (a list: a duplicate, MESH301, is listed twice)."""
        for i, name in enumerate(self.domains):
            self._order.setdefault(name, []).append(i)
        self.result = Resolution(kept=kept)
        self.incomplete = bool(parsed.broken.get("products") or parsed.broken.get("domains"))
        """Some products or domains are invalid: do not report them as absent."""
        self._versions: dict[str, list[Contract]] = {}
        for c in sorted(self.spec.contracts, key=lambda c: _semver(c.version)):
            self._versions.setdefault(c.name, []).append(c)
        self._by_major: dict[tuple[str, int], dict[str, list[Product]]] | None = None
        self._found: dict[str, Contract] = {}
        """Contracts by a reference that resolved without a diagnostic (10,000 products, few references)."""
        self._token: tuple | None = None
        self._columns: dict[int, dict[str, Column]] = {}
        self._pii: dict[int, dict[str, str]] = {}
        self._product_columns: dict[int, set[str]] = {}

    def run(self) -> Resolution:
        """Check everything; returns what resolved."""
        self._unique()
        for product in self.spec.products:
            self._product(product)
        for model in self.spec.models:
            resolved = self._model(model)
            if resolved is not None:
                self.result.models.append(resolved)
        for analysis in self.spec.analyses:
            found = resolve_analysis(self, analysis)
            if found is not None:
                self.result.analyses.append(found)
        resolve_grants(self)
        for resolved in self.result.models:
            resolved.evaluation = evalproduct.check(self, resolved)
            if resolved.evaluation is not None:
                resolved.evaluation_contract = self.result.contracts.get(id(resolved.evaluation))
        return self.result

    # -- names -------------------------------------------------------------------
    def _unique(self) -> None:
        spec = self.spec
        self._no_duplicates("domain", [(d.name, d.path) for d in spec.domains])
        names = [f"{p.domain}.{p.name}" for p in spec.products]
        if len(set(names)) < len(names):  # (the paths only when some name repeats: 10,000 products)
            self._no_duplicates("product", [(name, p.path) for name, p in zip(names, spec.products, strict=True)])
        self._no_duplicates("contract", [(f"{c.name}@{c.version}", c.path)
                                         for c in spec.contracts])
        self._no_duplicates("policy", [(p.name, p.path) for p in spec.policies])
        for d in spec.domains:
            self._no_duplicates(f"policy of domain '{d.name}'",
                                [(p.name, p.path) for p in d.policies])
        self._no_duplicates("model", [(m.name, m.path) for m in spec.models])
        self._no_duplicates("analysis", [(a.name, a.path) for a in spec.analyses])

    def _no_duplicates(self, kind: str, items: list[tuple[str, YamlPath]]) -> None:
        first: dict[str, YamlPath] = {}
        for name, path in items:
            if name in first:
                there = (*first[name], "name")
                line = self.report.locate(there)[0]
                other = self.report.file_of(there) != self.report.file_of(path)
                self.report.error("MESH301", f"duplicate {kind} '{name}'", (*path, "name"),
                                  hint=f"first declared at {self.report.where(there)}" if other
                                  else f"first declared at line {line}")
            else:
                first[name] = path

    def _domain(self, name: str, path: YamlPath, what: str) -> bool:
        if name in self.domain_set:
            return True
        if name not in self.broken.get("domains", set()):
            self.report.error("MESH302", f"{what} names unknown domain '{name}'", path,
                              hint=did_you_mean(name, self.domains)
                              or declared("domains", self.domains))
        return False

    def contract(self, ref: str, path: YamlPath, what: str) -> Contract | None:
        """The contract `name`, `name@major` or `name@x.y.z` refers to (highest match)."""
        found = self._found.get(ref)
        if found is not None:
            return found
        name, _, version = ref.partition("@")
        versions = self._versions.get(name, [])
        if not versions:
            if name not in self.broken.get("contracts", set()):
                names = [c.name for c in self.spec.contracts]
                self.report.error("MESH303", f"{what} names unknown contract '{name}'", path,
                                  hint=did_you_mean(name, names) or declared("contracts", names))
            return None
        matching = [c for c in versions if _version_matches(c.version, version)]
        if not matching:
            have = ", ".join(c.version for c in versions)
            self.report.error("MESH304", f"{what} wants contract '{ref}', but '{name}' is "
                              f"declared only as version {have}", path,
                              hint=f"write '{name}@{versions[-1].major}'")
            return None
        self._found[ref] = matching[-1]
        return matching[-1]

    # -- products ----------------------------------------------------------------
    def _product(self, product: Product) -> None:
        if product.domain not in self.domain_set:
            self._domain(product.domain, (*product.path, "domain"), f"product '{product.name}'")
        if product.contract is not None:
            contract = self._found.get(product.contract) or \
                self.contract(product.contract, (*product.path, "contract"), f"product '{product.name}'")
            if contract is not None:
                self.result.contracts[id(product)] = contract

    # -- models ------------------------------------------------------------------
    def _model(self, model: Model) -> ResolvedModel | None:
        path = model.path
        inputs = (*path, "inputs")
        reported = len(self.report.diagnostics)
        contract = self.contract(model.inputs.contract, (*inputs, "contract"),
                                 f"model '{model.name}'")
        if contract is None:
            return None
        publishers = evalproduct.without(self, model, self.publishers(contract))
        made_of = None
        if self.kept is not None and model.evaluation.product is None and reported == len(self.report.diagnostics):
            # what a model resolves to is made of itself, its contract, the products published under
            # it (in their order) and the domains (names, order, broken ones): the same objects, the
            # same resolution (kept only when it reported nothing)
            made_of = (model, contract, self._domain_token(), *[p for found in publishers.values() for p in found])
            found = self.kept.kept("resolved model", *made_of)
            if found is not None:
                return ResolvedModel(model, contract, list(found.participants), list(found.products),
                                     list(found.features), found.target, task=found.task,
                                     inputs=None if found.inputs is None else list(found.inputs),
                                     input_shape=None if found.input_shape is None else list(found.input_shape))
        resolved = self._resolve_model(model, contract, publishers)
        if made_of is not None and resolved is not None and reported == len(self.report.diagnostics):
            self.kept.keep("resolved model", made_of, resolved)
        return resolved

    def _domain_token(self) -> tuple:
        """The domains' names in order, the broken ones and whether some are: one object for equal
        values across the compiles of a server (so a kept resolution can name it)."""
        if self._token is None:
            value = (tuple(self.domains), frozenset(self.broken.get("domains", ())), self.incomplete)
            self._token = self.kept.same("domains", value) if self.kept is not None else value
        return self._token

    def _resolve_model(self, model: Model, contract: Contract,
                       publishers: dict[str, list[Product]]) -> ResolvedModel | None:
        participants = self.participants(model, "model", model.inputs.contract, publishers)
        products = [publishers[d][0] for d in participants if len(publishers.get(d, [])) == 1]
        pool = [p for found in publishers.values() for p in found]
        before = len(self.report.diagnostics)
        target = self._target(model, contract)
        features = self._features(model, contract, pool)
        if len(self.report.diagnostics) > before or target is None or not participants \
                or len(products) != len(participants):
            return None
        used = [*features, target.name]
        if model.evaluation.holdout_column:
            used.append(model.evaluation.holdout_column)
        if not self.products_have(products, contract, used, f"model '{model.name}'",
                                  model.path):
            return None
        inputs, input_shape = self._inputs(model, contract, features, participants)
        if len(self.report.diagnostics) > before:
            return None
        return ResolvedModel(model, contract, participants, products, features, target,
                             task=model_task(model, target), inputs=inputs, input_shape=input_shape)

    def _inputs(self, model: Model, contract: Contract, features: list[str],
                participants: list[str]) -> tuple[list[PlanFeature] | None, list[int] | None]:
        """Each feature's kind and slots, and the model's input shape; (None, None) when all are numeric."""
        at = (*model.path, "inputs")
        caps = model.inputs.categories
        columns = {name: self.column(contract, name) for name in features}
        for name in caps:
            column = columns.get(name)
            if column is None or column.type not in CATEGORICAL:
                what = f"a feature of type {column.type}" if column is not None else "not a feature of the model"
                self.report.error("MESH521", f"inputs.categories names '{name}', which is {what}",
                                  (*at, "categories", name), key=True,
                                  hint="list category or string features only")
            elif not 1 <= caps[name] <= MAX_CATEGORIES:
                self.report.error("MESH521", f"inputs.categories caps '{name}' at {caps[name]} values",
                                  (*at, "categories", name), hint=f"a cap is 1 to {MAX_CATEGORIES}")
        if all(c is not None and c.type in NUMERIC for c in columns.values()):
            return None, None
        out = []
        for name, column in columns.items():
            if column is None or column.type in NUMERIC:
                out.append(PlanFeature(name=name))
            elif column.type == "tensor":
                shape = list(column.shape or [1])
                out.append(PlanFeature(name=name, kind="tensor", width=math.prod(shape), shape=shape))
            elif column.type == "string" and name not in caps:
                listed = model.inputs.features
                where = (*at, "features", listed.index(name)) if name in listed else (*at, "features")
                self.report.error("MESH503", f"feature '{name}' is a string column with no cap on its "
                                  "one-hot width", where,
                                  hint=f"add `categories: {{{name}: 20}}` to the model's inputs (20 values "
                                       "and \"other\"), or declare it `type: category` with `values`")
            else:
                declared = list(column.values)
                cap = min(caps.get(name, len(declared)), len(declared)) if declared else caps[name]
                out.append(PlanFeature(name=name, kind="categorical", width=max(cap, 1) + 1,
                                       vocabulary=declared or None, min_count=model.inputs.min_category_count))
        if (model.privacy.dp or model.privacy.client_dp) is not None and any(f.kind == "categorical" for f in out):
            self.report.error("MESH523", f"model '{model.name}' trains with DP, but the domains agree the vocabulary "
                              "of its category and string features from exact value counts, which DP does not "
                              "cover", (*at, "features"),
                              hint="one-hot the column in the product (int columns), or drop dp")
        held = (model.evaluation.product or "").split(".")[0]
        if held and held not in participants and any(f.kind == "categorical" for f in out):
            self.report.error("MESH523", f"model '{model.name}' has category or string features, whose vocabulary "
                              f"only training domains receive, but its evaluation product is in domain '{held}', "
                              "which does not train", (*model.path, "evaluation", "product"),
                              hint=f"add '{held}' to the participants, or evaluate on the holdout")
        shape = [sum(f.width for f in out)]
        if len(out) == 1 and out[0].kind == "tensor":
            shape = [1, *out[0].shape] if len(out[0].shape) == 2 else list(out[0].shape)
        return out, shape

    def publishers(self, contract: Contract) -> dict[str, list[Product]]:
        """Products under (the major version of) `contract`, by domain."""
        if self._by_major is None:
            self._by_major = {}
            keys: dict[int, tuple[str, int]] = {}  # (a contract's major, once per contract)
            for product in self.spec.products:
                c = self.result.contracts.get(id(product))
                if c is not None:
                    key = keys.get(id(c))
                    if key is None:
                        key = keys[id(c)] = (c.name, c.major)
                    by_domain = self._by_major.setdefault(key, {})
                    by_domain.setdefault(product.domain, []).append(product)
        return self._by_major.get((contract.name, contract.major), {})

    def column(self, contract: Contract, name: str) -> Column | None:
        """Column `name` of `contract`, or None."""
        index = self._columns.get(id(contract))
        if index is None:
            index = self._columns[id(contract)] = {}
            for c in contract.columns:
                index.setdefault(c.name, c)
        return index.get(name)

    def pii(self, name: str, contract: Contract) -> str | None:
        """`direct`/`indirect` (and where) if the contract or a publisher declares `name` PII."""
        index = self._pii.get(id(contract))
        if index is None:
            index = self._pii[id(contract)] = {}
            for c in contract.columns:
                if c.pii != "none":
                    index.setdefault(c.name, f"{c.pii}, in contract '{contract.name}'")
            for found in self.publishers(contract).values():
                for p in found:
                    for c in p.columns:
                        if c.pii != "none":
                            index.setdefault(c.name, f"{c.pii}, in {p.domain}.{p.name}")
        return index.get(name)

    def products_have(self, products: list[Product], contract: Contract, columns: list[str],
                      what: str, path: YamlPath) -> bool:
        """Whether every product has each of `columns` that the contract marks optional.

        (A missing required column is the contract check's MESH321.)
        """
        optional = [n for n in dict.fromkeys(columns)
                    if (c := self.column(contract, n)) is not None and not c.required]
        if not optional:
            return True
        ok = True
        for product in products:
            have = self._product_columns.get(id(product))
            if have is None:
                have = self._product_columns[id(product)] = {c.name for c in product.columns}
            lacking = [c for c in optional if c not in have]
            if lacking:
                ok = False
                self.report.error("MESH325", f"{what} uses column{'s' if len(lacking) > 1 else ''}"
                                  f" {quoted(lacking)}, which product '{product.domain}."
                                  f"{product.name}' does not have", path,
                                  hint="the contract marks it `required: false`; add it to "
                                       "the product or list participants without it")
        return ok

    def participants(self, item: Model | Analysis, kind: str, ref: str,
                     publishers: dict[str, list[Product]]) -> list[str]:
        """The domains a model or analysis runs in, in declared domain order."""
        path = (*item.path, "participants")
        if item.participants == "all":
            names = self._in_order(publishers)
            if not names and not self.incomplete:
                self.report.error("MESH506", f"no domain publishes a product under contract "
                                  f"'{ref}', so {kind} '{item.name}' has no participants", path)
            return [d for d in names if self._one_product(d, publishers, path, ref, kind)]
        seen: list[str] = []
        seen_set: set[str] = set()
        for j, name in enumerate(item.participants):
            at = (*path, j)
            if name in seen_set:
                self.report.error("MESH309", f"participant '{name}' is listed twice", at)
            elif self._domain(name, at, f"{kind} '{item.name}'"):
                seen.append(name)
                seen_set.add(name)
                if name not in publishers and not self.incomplete:
                    self.report.error("MESH308", f"domain '{name}' publishes no product under "
                                      f"contract '{ref}'", at,
                                      hint=declared("publishers", sorted(publishers)))
                elif name in publishers:
                    self._one_product(name, publishers, at, ref, kind)
        if not item.participants:
            self.report.error("MESH506", f"{kind} '{item.name}' has no participants", path,
                              hint="write `participants: all` or list domains")
        return self._in_order(seen_set)

    def _in_order(self, names: dict[str, list[Product]] | set[str]) -> list[str]:
        """`[d for d in self.domains if d in names]`, without a pass over every domain per model."""
        order = self._order
        return [self.domains[i] for i in sorted(i for name in names for i in order.get(name, ()))]

    def _one_product(self, domain: str, publishers: dict[str, list[Product]],
                     at: YamlPath, ref: str, kind: str) -> bool:
        found = publishers.get(domain, [])
        if len(found) > 1:
            names = [f"{p.domain}.{p.name}" for p in found]
            self.report.error("MESH308", f"domain '{domain}' publishes {len(found)} products "
                              f"under contract '{ref}' ({quoted(names)}); a {kind} reads one",
                              at)
        return len(found) == 1

    def _target(self, model: Model, contract: Contract) -> Column | None:
        at = (*model.path, "inputs", "target")
        name = model.inputs.target
        pii = self.pii(name, contract)
        if pii:
            self.report.error("MESH402", f"target '{name}' is a PII column ({pii})", at,
                              hint="PII can never be a target; choose another column")
            return None
        column = self.column(contract, name)
        if column is None:
            self.unknown_column(name, contract, at, "target")
        elif column.type not in ("category", *NUMERIC_TARGET) or (column.type == "category" and not column.values):
            what = "a category without values" if column.type == "category" else f"a {column.type} column"
            self.report.error("MESH502", f"target '{name}' is {what}; it fits no task: a target is a "
                              "category with values (classification, binary) or an int or float (regression)",
                              at, hint="declare it as `type: category, values: [...]`, or as a number")
            return None
        elif model.task is not None and model.task != model_task(model, column):
            fits = {"regression": "an int or float", "binary": "a category of exactly 2 values",
                    "classification": "a category"}[model.task]
            self.report.error("MESH527", f"model '{model.name}' declares task {model.task}, but target "
                              f"'{name}' is {_described(column)}; task {model.task} needs {fits} target",
                              (*model.path, "task"), hint=f"use task: {model_task(model, column, declared=False)}"
                              " or choose another target")
            return None
        return column

    def _features(self, model: Model, contract: Contract, products: list[Product]) -> list[str]:
        base = (*model.path, "inputs", "features")
        excluded = {model.inputs.target: "target"}
        if model.evaluation.holdout_column:
            excluded[model.evaluation.holdout_column] = "holdout column"
        self._holdout(model, contract)
        out: list[str] = []
        for j, pattern in enumerate(model.inputs.features):
            at = (*base, j)
            if any(ch in pattern for ch in "*?["):
                names = self._glob(pattern, contract, products, excluded, at)
            else:
                names = self._feature(pattern, contract, at, excluded)
            for name in names:
                if name in out:
                    self.report.error("MESH309", f"feature '{name}' is listed twice", at)
                else:
                    out.append(name)
        return out

    def _feature(self, name: str, contract: Contract, at: YamlPath,
                 excluded: dict[str, str]) -> list[str]:
        pii = self.pii(name, contract)
        if pii:
            self.report.error("MESH401", f"feature '{name}' is a PII column ({pii})", at,
                              hint="PII can never be a feature; remove it")
            return []
        column = self.column(contract, name)
        if column is None:
            self.unknown_column(name, contract, at, "feature")
            return []
        if name in excluded:
            self.report.error("MESH309", f"feature '{name}' is also the model's {excluded[name]}",
                              at)
            return []
        if column.type not in (*NUMERIC, *CATEGORICAL, "tensor"):
            self.report.error("MESH503", f"feature '{name}' is a {column.type} column, which cannot feed "
                              "a model", at, hint="use numbers (e.g. days since a date as an int column), "
                              "categories, strings or tensors")
            return []
        return [name]

    def _glob(self, pattern: str, contract: Contract, products: list[Product],
              excluded: dict[str, str], at: YamlPath) -> list[str]:
        every = [c.name for c in contract.columns] + [c.name for p in products for c in p.columns]
        hits = [n for n in dict.fromkeys(every) if fnmatch.fnmatchcase(n, pattern)]
        bad = [f"{n} ({self.pii(n, contract)})" for n in hits if self.pii(n, contract)]
        if bad:
            self.report.error("MESH401", f"feature pattern '{pattern}' matches PII "
                              f"column{'s' if len(bad) > 1 else ''} {', '.join(bad)}", at,
                              hint="narrow the pattern so it matches no PII column")
            return []
        names = [n for n in hits if self.column(contract, n) is not None and n not in excluded]
        if not names:
            self.report.error("MESH306", f"feature pattern '{pattern}' matches no column of "
                              f"contract '{contract.name}'", at,
                              hint=declared("columns", [c.name for c in contract.columns]))
        out = []
        for name in names:
            out += self._feature(name, contract, at, excluded)
        return out

    def _holdout(self, model: Model, contract: Contract) -> None:
        column = model.evaluation.holdout_column
        if column is not None and self.column(contract, column) is None:
            self.report.error("MESH310", f"holdout_column '{column}' is not a column of "
                              f"contract '{contract.name}'",
                              (*model.path, "evaluation", "holdout_column"),
                              hint=did_you_mean(column, [c.name for c in contract.columns]))

    def unknown_column(self, name: str, contract: Contract, at: YamlPath, what: str,
                       code: str = "MESH305") -> None:
        """Report that `name` is not a column of `contract`, with a did-you-mean."""
        names = [c.name for c in contract.columns]
        self.report.error(code, f"{what} '{name}' is not a column of contract "
                          f"'{contract.name}@{contract.version}'", at,
                          hint=did_you_mean(name, names) or declared("columns", names))


def resolve(parsed: Parsed, report: Reporter, kept: ItemMemo | None = None) -> Resolution:
    """Check every reference of `parsed`; returns the resolved products and models.

    With `kept` (a compile server's ItemMemo), a model made of the very objects a previous compile
    resolved without a diagnostic is not resolved again."""
    return Resolver(parsed, report, kept).run()


def _version_matches(version: str, wanted: str) -> bool:
    if not wanted:
        return True
    parts = wanted.split(".")
    return version.split(".")[: len(parts)] == parts


def _semver(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


def declared(what: str, names: list[str]) -> str:
    """`declared WHATs: 'a', 'b'` or `no WHATs are declared`."""
    return f"declared {what}: {quoted(names)}" if names else f"no {what} are declared"


NUMERIC_TARGET = ("int", "float")
"""Target types of a regression."""


def model_task(model: Model, target: Column, *, declared: bool = True) -> str:
    """The model's task: declared (with `declared`), else derived from the target column's type.

    A category target is classification (binary only when declared: a 2-valued target trained
    with cross-entropy before binary existed keeps its plan); an int or float target is regression.
    A declared task that does not fit the target gives what the target fits (MESH527 reports it).
    """
    derived = "regression" if target.type in NUMERIC_TARGET else "classification"
    if not declared or model.task is None:
        return derived
    if model.task == "binary":
        return "binary" if target.type == "category" and len(target.values) == 2 else derived
    return model.task if model.task == derived else derived


def _described(column: Column) -> str:
    if column.type == "category":
        return f"a category of {len(column.values)} values"
    return f"a {column.type} column"
