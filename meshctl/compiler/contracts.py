"""Products against their contracts, and the contracts' own quality rules.

A product satisfies its contract when it has every required contract column
with the same type, and its category values are among the contract's. Columns
declare ranges, masking and generalization, checked here for sense. Quality
rules use the ODCS v3 vocabulary; they are executed at run time, but checked
for sense here.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from meshctl.compiler.diagnostics import Reporter, YamlPath, did_you_mean, quoted
from meshctl.compiler.resolve import Resolution
from meshctl.compiler.sources import check_sla
from meshctl.compiler.spec import Column, Contract, MeshSpec, Product, QualityRule

if TYPE_CHECKING:
    from meshctl.compiler.parse import ItemMemo

COLUMN_METRICS = ("nullValues", "missingValues", "invalidValues")
"""ODCS metrics that need a column."""

NUMBERS = ("int", "float")
"""Column types that take a `range`."""

PLACEHOLDERS = ("object", "property")
"""Placeholders a sql quality rule's query may use."""

_PLACEHOLDER = re.compile(r"\{(\w*)\}")
_GENERALIZE = {"date": r"year|month", "timestamp": r"year|month", "string": r"prefix:[1-9]\d*",
               "int": r"bucket:[1-9]\d*", "float": r"bucket:(\d+\.?\d*|\.\d+)"}
"""The `generalize` forms each column type accepts."""


def check_contracts(spec: MeshSpec, resolution: Resolution, report: Reporter, kept: ItemMemo | None = None) -> None:
    """Report products that break their contract, and ill-formed contracts.

    With `kept` (a compile server's), a product and contract that are the very objects a previous
    compile checked without a diagnostic are not checked again (the checks read only them)."""
    for contract in spec.contracts:
        if kept is not None and kept.kept("contract ok", contract):
            continue
        reported = len(report.diagnostics)
        check_columns(contract.columns, (*contract.path, "columns"), report)
        check_sla(contract.sla, (*contract.path, "sla"), report)
        for i in range(len(contract.quality)):
            _quality(contract, i, report)
        if kept is not None and len(report.diagnostics) == reported:
            kept.keep("contract ok", (contract,), True)
    for product in spec.products:
        contract = resolution.contracts.get(id(product))
        if kept is not None and kept.kept("product ok", product, contract):
            continue
        reported = len(report.diagnostics)
        check_columns(product.columns, (*product.path, "columns"), report)
        check_sla(product.sla, (*product.path, "sla"), report)
        if contract is not None:
            check_product(product, contract, report)
        if kept is not None and len(report.diagnostics) == reported:
            kept.keep("product ok", (product, contract), True)


def check_product(product: Product, contract: Contract, report: Reporter) -> None:
    """Report every way `product` does not satisfy `contract`."""
    columns = product.columns
    have = {c.name: i for i, c in enumerate(columns)}
    missing = [c.name for c in contract.columns if c.required and c.name not in have]
    label = f"{product.domain}.{product.name}"
    if missing:
        report.error("MESH321", f"product '{label}' lacks column{'s' if len(missing) > 1 else ''} "
                     f"{quoted(missing)} required by contract '{contract.name}@"
                     f"{contract.version}'", (*product.path, "columns"),
                     hint=_renamed(missing, [n for n in have if n not in
                                             {c.name for c in contract.columns}]))
    for wanted in contract.columns:  # (paths are made only for a diagnostic: 87,000 columns)
        i = have.get(wanted.name)
        if i is None:
            continue
        column = columns[i]
        if column.type != wanted.type:
            report.error("MESH322", f"column '{column.name}' of product '{label}' is "
                         f"{column.type}, but contract '{contract.name}' says {wanted.type}",
                         (*product.path, "columns", i, "type"))
        elif wanted.type == "category":
            if wanted.values and column.values != wanted.values:
                _values(column, wanted, (*product.path, "columns", i), label, report)
        elif wanted.type == "tensor" and wanted.shape and column.shape and column.shape != wanted.shape:
            report.error("MESH522", f"tensor column '{column.name}' of product '{label}' has shape "
                         f"{column.shape}, but contract '{contract.name}' says {wanted.shape}",
                         (*product.path, "columns", i, "shape"), hint=f"declare `shape: {wanted.shape}`")


def _values(column: Column, wanted: Column, at: YamlPath, label: str, report: Reporter) -> None:
    extra = [v for v in column.values if v not in wanted.values]
    if extra and wanted.values:
        report.error("MESH323", f"category values {quoted(extra)} of '{column.name}' in "
                     f"product '{label}' are not allowed by its contract", (*at, "values"),
                     hint=f"the contract allows {quoted(wanted.values)}")


def _renamed(missing: list[str], spare: list[str]) -> str | None:
    for name in missing:
        hint = did_you_mean(name, spare)
        if hint:
            return f"'{name}' is required; {hint}"
    return None


def check_columns(columns: list[Column], path: YamlPath, report: Reporter) -> None:
    """Report duplicate columns and values, ranges, masking that do not fit a column."""
    seen: set[str] = set()
    for i, column in enumerate(columns):
        if column.name in seen:
            report.error("MESH309", f"column '{column.name}' is declared twice",
                         (*path, i, "name"))
        seen.add(column.name)
        if (column.range is None and column.masking is None and column.generalize is None
                and column.shape is None and column.type != "tensor"
                and (column.type == "category") == bool(column.values)):
            continue  # nothing below can find fault with a plain column (most of 100,000)
        if column.type == "category" and not column.values:
            report.error("MESH204", f"category column '{column.name}' needs `values`",
                         (*path, i), hint="e.g. `values: [benign, malignant]`")
        elif column.type != "category" and column.values:
            report.error("MESH204", f"column '{column.name}' has values but is {column.type}",
                         (*path, i, "values"), hint="only a category column has `values`")
        _range(column, (*path, i), report)
        _masking(column, (*path, i), report)
        _shape(column, (*path, i), report)


MAX_TENSOR_VALUES = 100_000
"""Most floats one row of a tensor column may hold (what a domain's `standardize` sums may carry)."""


def _shape(column: Column, at: YamlPath, report: Reporter) -> None:
    """A tensor column has a shape of 1 to 3 positive sizes; no other column has one."""
    if column.type != "tensor":
        if column.shape is not None:
            report.error("MESH520", f"column '{column.name}' has a shape but is {column.type}",
                         (*at, "shape"), key=True, hint="only a `type: tensor` column has a shape")
        return
    shape = column.shape or []
    size = 1
    for n in shape:
        size *= max(n, 1)
    if not 1 <= len(shape) <= 3 or any(n < 1 for n in shape) or size > MAX_TENSOR_VALUES:
        why = "has no shape" if column.shape is None else f"has shape {shape}"
        report.error("MESH520", f"tensor column '{column.name}' {why}; a shape is 1 to 3 positive sizes "
                     f"of at most {MAX_TENSOR_VALUES} values in all", at if column.shape is None else (*at, "shape"),
                     hint="e.g. `shape: [64]`, `shape: [8, 8]` (an image) or `shape: [3, 32, 32]`")


def _range(column: Column, at: YamlPath, report: Reporter) -> None:
    if column.range is None:
        return
    if column.type not in NUMBERS:
        report.error("MESH209", f"column '{column.name}' is {column.type}; only int and float "
                     "columns have a range", (*at, "range"))
    elif column.range[0] > column.range[1]:
        low, high = (format(x, "g") for x in column.range)
        report.error("MESH209", f"range of column '{column.name}' has low {low} above high "
                     f"{high}", (*at, "range"), hint=f"write [{high}, {low}]")


def _masking(column: Column, at: YamlPath, report: Reporter) -> None:
    if column.masking is not None and column.pii != "indirect":
        why = ("direct identifiers are never selected, so there is nothing to mask"
               if column.pii == "direct" else "declare `pii: indirect` if it identifies a "
               "person together with other data")
        report.error("MESH210", f"column '{column.name}' has masking but is pii: {column.pii}",
                     (*at, "masking"), key=True, hint=why)
    wanted = column.masking == "generalize" and column.pii == "indirect"
    forms = _GENERALIZE.get(column.type)
    if wanted and column.generalize is None:
        report.error("MESH211", f"column '{column.name}' is masked by generalize but has no "
                     "`generalize`", at, hint=_generalize_hint(column))
    elif column.generalize is not None and column.masking != "generalize":
        report.error("MESH211", f"column '{column.name}' has `generalize` but its masking is "
                     f"{column.masking or 'not generalize'}", (*at, "generalize"), key=True,
                     hint="add `masking: generalize`, or remove `generalize`")
    elif wanted and (forms is None or not re.fullmatch(forms, column.generalize or "")):
        report.error("MESH211", f"generalize '{column.generalize}' does not fit {column.type} "
                     f"column '{column.name}'", (*at, "generalize"), hint=_generalize_hint(column))


def _generalize_hint(column: Column) -> str:
    examples = {"date": "year or month", "timestamp": "year or month", "string": "prefix:3",
                "int": "bucket:10", "float": "bucket:0.5"}
    if column.type in examples:
        return f"a {column.type} column generalizes as {examples[column.type]}"
    return f"a {column.type} column cannot be generalized; use masking: drop or hash"


def _quality(contract: Contract, i: int, report: Reporter) -> None:
    rule = contract.quality[i]
    at = (*contract.path, "quality", i)
    names = [c.name for c in contract.columns]
    if rule.column is not None and rule.column not in names:
        report.error("MESH310", f"quality rule names unknown column '{rule.column}'",
                     (*at, "column"), hint=did_you_mean(rule.column, names))
    if rule.type == "library" and rule.metric is None:
        report.error("MESH213", "a library quality rule needs a `metric`", at,
                     hint="one of nullValues, missingValues, invalidValues, duplicateValues, "
                          "rowCount")
    if rule.type == "sql":
        _sql(rule, at, report)
    if rule.type in ("library", "sql") and len(rule.operators()) != 1:
        found = rule.operators()
        report.error("MESH214", "a quality rule needs exactly one operator"
                     + (f", found {', '.join(found)}" if found else ""), at,
                     hint="e.g. `mustBeLessThan: 1`")
    if rule.type == "library" and rule.metric is not None:
        _metric_options(rule, at, report)


def _sql(rule: QualityRule, at: YamlPath, report: Reporter) -> None:
    if not rule.query:
        report.error("MESH213", "a sql quality rule needs a `query`", at,
                     hint="e.g. `query: SELECT COUNT(*) FROM {object} WHERE age < 0`")
        return
    for name in _PLACEHOLDER.findall(rule.query):
        if name not in PLACEHOLDERS:
            report.error("MESH216", f"query uses unknown placeholder {{{name}}}",
                         (*at, "query"), hint="only {object} and {property} are replaced")
        elif name == "property" and rule.column is None:
            report.error("MESH216", "query uses {property} but the rule names no `column`",
                         (*at, "query"), hint="add `column: NAME`")


def _metric_options(rule: QualityRule, at: YamlPath, report: Reporter) -> None:
    metric = rule.metric
    if metric in COLUMN_METRICS and rule.column is None:
        report.error("MESH215", f"metric {metric} needs a `column`", at)
    if metric == "rowCount" and rule.column is not None:
        report.error("MESH215", "metric rowCount counts a table's rows and takes no `column`",
                     (*at, "column"), key=True, hint="remove `column`")
    for option in ("validValues", "validRange", "pattern"):
        if getattr(rule, option) is not None and metric != "invalidValues":
            report.error("MESH215", f"`{option}` goes with metric invalidValues, not {metric}",
                         (*at, option), key=True)
    if rule.missingValues is not None and metric != "missingValues":
        report.error("MESH215", f"`missingValues` goes with metric missingValues, not {metric}",
                     (*at, "missingValues"), key=True)
