"""Analyses: a contract, participants, group_by category columns, numeric metrics.

An analysis resolves like a model (contract by name or name@major, participants
`all` or a list) and then checks that it can only ever release aggregates:
group_by columns are category columns (their values are declared, so groups are
known in advance), metric columns are int or float, and no PII column is
grouped or aggregated. Histogram and quantile metrics need a range to bin in.
"""

from __future__ import annotations

from meshctl.compiler.diagnostics import YamlPath
from meshctl.compiler.resolved import References, ResolvedAnalysis
from meshctl.compiler.spec import Analysis, AnalysisMetric, Column, Contract

NUMBERS = ("int", "float")
"""Column types a metric aggregates."""

BINNED = ("histogram", "quantile")
"""Metrics that bin values and so need a range."""


def resolve_analysis(r: References, analysis: Analysis) -> ResolvedAnalysis | None:
    """The resolved analysis, or None after reporting why it does not resolve."""
    label = f"analysis '{analysis.name}'"
    contract = r.contract(analysis.inputs.contract, (*analysis.path, "inputs", "contract"),
                          label)
    if contract is None:
        return None
    publishers = r.publishers(contract)
    participants = r.participants(analysis, "analysis", analysis.inputs.contract, publishers)
    products = [publishers[d][0] for d in participants if len(publishers.get(d, [])) == 1]
    before = len(r.report.diagnostics)
    group_by = _group_by(r, analysis, contract)
    metrics = _metrics(r, analysis, contract)
    if len(r.report.diagnostics) > before or not participants \
            or len(products) != len(participants):
        return None
    used = [c.name for c in group_by] + [c.name for _, c in metrics if c is not None]
    if not r.products_have(products, contract, used, label, analysis.path):
        return None
    return ResolvedAnalysis(analysis, contract, participants, products, group_by, metrics)


def _group_by(r: References, analysis: Analysis, contract: Contract) -> list[Column]:
    out: list[Column] = []
    for j, name in enumerate(analysis.group_by):
        at = (*analysis.path, "group_by", j)
        if name in analysis.group_by[:j]:
            r.report.error("MESH309", f"group_by column '{name}' is listed twice", at)
            continue
        column = _usable(r, name, contract, at, "group_by column")
        if column is None:
            continue
        if column.type != "category":
            r.report.error("MESH507", f"group_by column '{name}' is {_a(column.type)} column; "
                           "an analysis groups by category columns", at,
                           hint="declare it as `type: category, values: [...]` in the contract")
            continue
        out.append(column)
    return out


def _metrics(r: References, analysis: Analysis,
             contract: Contract) -> list[tuple[AnalysisMetric, Column | None]]:
    out: list[tuple[AnalysisMetric, Column | None]] = []
    labels: set[str] = set()
    for j, metric in enumerate(analysis.metrics):
        at = (*analysis.path, "metrics", j)
        if metric.label in labels:
            r.report.error("MESH309", f"metric {metric.label} is listed twice", at)
            continue
        labels.add(metric.label)
        if metric.column is None:
            out.append((metric, None))
            continue
        column = _usable(r, metric.column, contract, at, "metric column")
        if column is None:
            continue
        if column.type not in NUMBERS:
            r.report.error("MESH508", f"{metric.label} aggregates '{column.name}', "
                           f"{_a(column.type)} column; metrics need int or float columns", at,
                           hint="count groups instead: group_by a category and use `count`"
                           if column.type == "category" else None)
            continue
        if _range_ok(r, metric, column, contract, at):
            out.append((metric, column))
    return out


def _usable(r: References, name: str, contract: Contract, at: YamlPath,
            what: str) -> Column | None:
    """The contract column `name`, unless it is PII or unknown (reported)."""
    pii = r.pii(name, contract)
    if pii:
        r.report.error("MESH403", f"{what} '{name}' is a PII column ({pii})", at,
                       hint="PII is never grouped or aggregated, not even in a domain's "
                            "aggregate; choose another column")
        return None
    column = r.column(contract, name)
    if column is None:
        r.unknown_column(name, contract, at, what, code="MESH313")
    return column


def _range_ok(r: References, metric: AnalysisMetric, column: Column, contract: Contract,
              at: YamlPath) -> bool:
    if metric.range is not None and not metric.range[0] < metric.range[1]:
        low, high = (format(x, "g") for x in metric.range)
        r.report.error("MESH209", f"range [{low}, {high}] of {metric.label} is empty; it needs "
                       "low < high", at)
        return False
    if metric.fn in BINNED and metric.range is None and column.range is None:
        r.report.error("MESH509", f"{metric.label} needs a range to bin '{column.name}' in", at,
                       hint=f"write `{{fn: {metric.fn}, column: {column.name}, range: [LOW, "
                            f"HIGH]}}`, or declare `range: [LOW, HIGH]` on column "
                            f"'{column.name}' of contract '{contract.name}'")
        return False
    return True


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def metric_range(metric: AnalysisMetric, column: Column | None) -> list[float] | None:
    """The metric's own range, else its column's declared range, else None."""
    if metric.range is not None:
        return list(metric.range)
    return list(column.range) if column is not None and column.range is not None else None
