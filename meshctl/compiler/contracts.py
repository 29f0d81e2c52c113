"""Products against their contracts, and the contracts' own quality rules.

A product satisfies its contract when it has every contract column with the same
type, and its category values are among the contract's. Quality rules use the
ODCS v3 vocabulary; they are executed at run time, but checked for sense here.
"""

from __future__ import annotations

from meshctl.compiler.diagnostics import Reporter, YamlPath, did_you_mean, quoted
from meshctl.compiler.resolve import Resolution
from meshctl.compiler.spec import Column, Contract, MeshSpec, Product

COLUMN_METRICS = ("nullValues", "missingValues", "invalidValues")
"""ODCS metrics that need a column."""


def check_contracts(spec: MeshSpec, resolution: Resolution, report: Reporter) -> None:
    """Report products that break their contract, and ill-formed contracts."""
    for contract in spec.contracts:
        _unique_columns(contract.columns, (*contract.path, "columns"), report)
        for i in range(len(contract.quality)):
            _quality(contract, i, report)
    for product in spec.products:
        _unique_columns(product.columns, (*product.path, "columns"), report)
        contract = resolution.contracts.get(id(product))
        if contract is not None:
            check_product(product, contract, report)


def check_product(product: Product, contract: Contract, report: Reporter) -> None:
    """Report every way `product` does not satisfy `contract`."""
    have = {c.name: (i, c) for i, c in enumerate(product.columns)}
    missing = [c.name for c in contract.columns if c.name not in have]
    label = f"{product.domain}.{product.name}"
    if missing:
        report.error("MESH321", f"product '{label}' lacks column{'s' if len(missing) > 1 else ''} "
                     f"{quoted(missing)} required by contract '{contract.name}@"
                     f"{contract.version}'", (*product.path, "columns"),
                     hint=_renamed(missing, [n for n in have if n not in
                                             {c.name for c in contract.columns}]))
    for wanted in contract.columns:
        if wanted.name not in have:
            continue
        i, column = have[wanted.name]
        at = (*product.path, "columns", i)
        if column.type != wanted.type:
            report.error("MESH322", f"column '{column.name}' of product '{label}' is "
                         f"{column.type}, but contract '{contract.name}' says {wanted.type}",
                         (*at, "type"))
        elif wanted.type == "category":
            _values(column, wanted, at, label, report)


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


def _unique_columns(columns: list[Column], path: YamlPath, report: Reporter) -> None:
    seen: set[str] = set()
    for i, column in enumerate(columns):
        if column.name in seen:
            report.error("MESH309", f"column '{column.name}' is declared twice",
                         (*path, i, "name"))
        seen.add(column.name)
        if column.type == "category" and not column.values:
            report.error("MESH204", f"category column '{column.name}' needs `values`",
                         (*path, i), hint="e.g. `values: [benign, malignant]`")
        elif column.type != "category" and column.values:
            report.error("MESH204", f"column '{column.name}' has values but is {column.type}",
                         (*path, i, "values"), hint="only a category column has `values`")


def _quality(contract: Contract, i: int, report: Reporter) -> None:
    rule = contract.quality[i]
    at = (*contract.path, "quality", i)
    names = [c.name for c in contract.columns]
    if rule.column is not None and rule.column not in names:
        report.error("MESH310", f"quality rule names unknown column '{rule.column}'",
                     (*at, "column"), hint=did_you_mean(rule.column, names))
    if rule.type == "library" and rule.metric is None:
        report.error("MESH203", "a library quality rule needs a `metric`", at,
                     hint="one of nullValues, missingValues, invalidValues, duplicateValues, "
                          "rowCount")
    if rule.type == "sql" and not rule.query:
        report.error("MESH203", "a sql quality rule needs a `query`", at)
    if rule.metric in COLUMN_METRICS and rule.column is None:
        report.error("MESH203", f"metric {rule.metric} needs a `column`", at)
    if rule.type in ("library", "sql") and len(rule.operators()) != 1:
        found = rule.operators()
        report.error("MESH204", "a quality rule needs exactly one operator"
                     + (f", found {', '.join(found)}" if found else ""), at,
                     hint="e.g. `mustBeLessThan: 1`")
