"""Contract checks in the domain: a product's ODCS quality rules, run with DuckDB.

`check_product` runs the rules of the product's contract over its raw source
inside the domain (the checks see every column, PII included) and returns only
observed numbers: a count, a percentage, an age in seconds. Besides the
contract's own rules it checks the declared column ranges and category values
(as invalidValues rules), that every declared column is in the data with values
of its type (`type(column)`), and the SLA's freshness (the source file's age).
A rule that cannot run (a bad SQL query, a column the data lacks) is a failed
check with a one-line detail; only an unreadable source raises a UserError.
A detail names the rule, its columns and the kind of error, never the library's
text (which can quote a cell): that goes to `log`, for the domain's local log.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshctl.compiler.plan import Plan, PlanContract, PlanProduct, PlanQualityRule
from meshctl.errors import UserError
from meshctl.runtime.data import (
    READ_TYPES,
    error_kind,
    ident,
    literal,
    register_source,
    source_path,
)

if TYPE_CHECKING:
    import duckdb

OPERATORS = ("mustBe", "mustNotBe", "mustBeGreaterThan", "mustBeGreaterOrEqualTo",
             "mustBeLessThan", "mustBeLessOrEqualTo", "mustBeBetween", "mustNotBeBetween")
"""The ODCS v3 comparison operators."""

DEFAULT_OPERATOR = {"rowCount": ("mustBeGreaterThan", 0.0)}
"""Operator and threshold of a library rule that names none (others: mustBe 0)."""

_TOLERANCE = 1e-9


@dataclass(frozen=True)
class CheckResult:
    """One checked rule: what was observed, against what, and the verdict.

    The fields match the `ContractChecked` event's, so a daemon turns each into an event.
    """

    rule: str
    observed: float | None
    operator: str
    threshold: float | list[float] | None
    passed: bool
    severity: str
    detail: str = ""
    skipped: bool = False
    """A text or custom rule that no machine can check (passed, severity info)."""
    log: str = ""
    """The library's own text of a rule that could not run: for the domain's local log only."""
    author_query: bool = False
    """A SQL rule: `observed` is whatever its author's query returns, which may be a data value
    (`max(age)`), so only the verdict leaves the domain (`shared`)."""

    def shared(self) -> CheckResult:
        """What of this result may leave the domain: all of it, but a SQL rule's observed value."""
        return replace(self, observed=None) if self.author_query else self

    @property
    def blocking(self) -> bool:
        """A failed error-severity check: the product must not join a job."""
        return not self.passed and self.severity == "error"

    def event_fields(self) -> dict[str, Any]:
        """The `ContractChecked` fields of this result."""
        out = asdict(self)
        out.pop("skipped")
        out.pop("log")
        out.pop("author_query")
        return out


def compare(observed: float, operator: str, threshold: float | list[float] | None) -> bool:
    """Whether `observed` satisfies the ODCS `operator` with `threshold`."""
    if operator in ("mustBeBetween", "mustNotBeBetween"):
        if not isinstance(threshold, list) or len(threshold) != 2:
            raise ValueError(f"{operator} needs [low, high]")
        inside = threshold[0] - _TOLERANCE <= observed <= threshold[1] + _TOLERANCE
        return inside if operator == "mustBeBetween" else not inside
    if not isinstance(threshold, (int, float)):
        raise ValueError(f"{operator} needs a number")  # noqa: TRY004 - a bad rule, reported
    t = float(threshold)
    tests = {"mustBe": abs(observed - t) <= _TOLERANCE, "mustNotBe": abs(observed - t) > _TOLERANCE,
             "mustBeGreaterThan": observed > t, "mustBeGreaterOrEqualTo": observed >= t - _TOLERANCE,
             "mustBeLessThan": observed < t, "mustBeLessOrEqualTo": observed <= t + _TOLERANCE}
    if operator not in tests:
        raise ValueError(f"unknown operator {operator!r}")
    return tests[operator]


def check_product(con: duckdb.DuckDBPyConnection | None, product: PlanProduct,
                  contract: PlanContract | None, base_dir: Path,
                  now: float | None = None) -> list[CheckResult]:
    """Run `product`'s contract rules, implicit column rules and freshness in DuckDB.

    `con` is the domain's connection (None opens a private in-memory one). Raises a
    UserError when the source cannot be read at all; every other problem is a failed check.
    """
    if con is None:
        import duckdb

        with duckdb.connect() as own:
            return check_product(own, product, contract, base_dir, now)
    view = register_source(con, product, base_dir)
    rules = [*(contract.quality if contract else []), *implicit_rules(product, contract)]
    results = [_run(con, view, rule) for rule in rules] + column_checks(con, view, product, contract)
    fresh = _freshness(product, contract, base_dir, time.time() if now is None else now)
    return results + ([fresh] if fresh else [])


def column_checks(con: duckdb.DuckDBPyConnection, view: str, product: PlanProduct,
                  contract: PlanContract | None) -> list[CheckResult]:
    """`type(column)` per declared column: present in the data, every non-null value of its type.

    The product's columns must be present; a contract column the product does not declare
    (an optional one) is checked only when the data has it. The contract's type wins where
    both declare a column: the contract is the interface. `observed` counts the non-null
    values that do not convert to the type (as `meshctl up` reads them); no value is shown.
    """
    declared = {c.name: c.type for c in product.columns}
    contract_types = {c.name: c.type for c in (contract.columns if contract else [])}
    shapes = {c.name: c.shape for c in [*product.columns, *(contract.columns if contract else [])] if c.shape}
    have = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {view}").fetchall()}
    names = [*declared, *(n for n in contract_types if n not in declared and n in have)]
    out, typed = [], []
    for name in names:
        kind = contract_types.get(name, declared.get(name, "string"))
        if name not in have:
            out.append(CheckResult(f"type({name})", None, "mustBe", 0.0, False, "error",
                                   f"declared column {name} is not in the data"))
        elif kind in READ_TYPES:
            typed.append((name, kind))
        else:  # string and category: any value is one (category values: `values(column)`)
            out.append(CheckResult(f"type({name})", 0.0, "mustBe", 0.0, True, "error"))
    if typed:
        counts = con.execute("SELECT " + ", ".join(
            f"count(*) FILTER (WHERE {ident(n)} IS NOT NULL AND ({_not_of_type(n, k, shapes.get(n))}))"
            for n, k in typed) + f" FROM {view}").fetchall()[0]
        for (name, kind), bad in zip(typed, counts, strict=True):
            out.append(CheckResult(
                f"type({name})", float(bad), "mustBe", 0.0, bad == 0, "error",
                "" if bad == 0 else f"{bad} value{'s' if bad != 1 else ''} of {name} "
                f"{'are' if bad != 1 else 'is'} not {_type_text(kind, shapes.get(name))} (its declared type)"))
    order = {n: i for i, n in enumerate(names)}
    return sorted(out, key=lambda r: order[r.rule[5:-1]])


def _type_text(kind: str, shape: list[int] | None) -> str:
    """A declared type in words: a tensor with its shape and size."""
    if kind != "tensor":
        return kind
    return f"tensor {list(shape or [1])} ({math.prod(shape or [1])} finite floats)"


def _not_of_type(name: str, kind: str, shape: list[int] | None = None) -> str:
    """SQL true for a value of column `name` that is not a `kind` (an int must be whole; a tensor
    must be a list of prod(shape) finite floats)."""
    col = ident(name)
    bad = f"TRY_CAST({col} AS {READ_TYPES[kind]}) IS NULL"
    if kind == "tensor":
        values, width = f"TRY_CAST({col} AS FLOAT[])", math.prod(shape or [1])
        bad += (f" OR len({values}) <> {width} OR list_count({values}) <> {width}"
                f" OR NOT isfinite(coalesce(list_sum({values}), 0))")
    if kind == "int":  # TRY_CAST rounds 1.5 to 2: an int must be whole
        bad += (f" OR TRY_CAST({col} AS DOUBLE) IS DISTINCT FROM "
                f"CAST(TRY_CAST({col} AS BIGINT) AS DOUBLE)")
    return bad


def implicit_rules(product: PlanProduct, contract: PlanContract | None) -> list[PlanQualityRule]:
    """invalidValues rules for the declared ranges and category values of the columns."""
    rules: dict[str, PlanQualityRule] = {}
    for col in [*(contract.columns if contract else []), *product.columns]:
        if col.range is not None:
            name = f"range({col.name})"
            rules.setdefault(name, PlanQualityRule(
                name=name, column=col.name, metric="invalidValues", valid_range=list(col.range),
                operator="mustBe", threshold=0.0))
        if col.values:
            name = f"values({col.name})"
            rules.setdefault(name, PlanQualityRule(
                name=name, column=col.name, metric="invalidValues", valid_values=list(col.values),
                operator="mustBe", threshold=0.0))
    return list(rules.values())


def _run(con: duckdb.DuckDBPyConnection, view: str, rule: PlanQualityRule) -> CheckResult:
    import duckdb

    if rule.type in ("text", "custom"):
        return CheckResult(rule.name, None, "", None, True, "info",
                           f"skipped: a {rule.type} rule is not machine-checkable", skipped=True)
    operator, threshold = _operator(rule)
    try:
        sql = _sql_rule(rule, view) if rule.type == "sql" else _metric_sql(rule, view)
        observed = _one_number(con, sql)
        passed = compare(observed, operator, threshold)
    except duckdb.Error as err:
        return CheckResult(rule.name, None, operator, threshold, False, rule.severity,
                           _safe_detail(rule, err), log=str(err))
    except ValueError as err:  # our own words: a bad rule or a query result of the wrong shape
        return CheckResult(rule.name, None, operator, threshold, False, rule.severity, str(err))
    return CheckResult(rule.name, observed, operator, threshold, passed, rule.severity,
                       author_query=rule.type == "sql")


def _safe_detail(rule: PlanQualityRule, err: Exception) -> str:
    """The detail of a rule DuckDB could not run: the error's kind, and a missing column only
    when the rule itself names it (the library's text can quote a cell)."""
    kind = error_kind(err)
    missing = re.match(r'[\w ]+: Referenced column "([^"]+)" not found', str(err))
    if missing and (missing.group(1) == rule.column or ident(missing.group(1)) in rule.query
                    or re.search(rf"\b{re.escape(missing.group(1))}\b", rule.query)):
        return f'{kind}: Referenced column "{missing.group(1)}" not found'
    return f"{kind} in rule {rule.name}" + (" (its query)" if rule.type == "sql" else "")


def _operator(rule: PlanQualityRule) -> tuple[str, float | list[float] | None]:
    if rule.operator:
        return rule.operator, rule.threshold
    if rule.type == "sql":
        return "", None
    return DEFAULT_OPERATOR.get(rule.metric, ("mustBe", 0.0))


def _one_number(con: duckdb.DuckDBPyConnection, sql: str) -> float:
    rows = con.execute(sql).fetchmany(2)
    if len(rows) != 1 or len(rows[0]) != 1:
        shape = f"{len(rows)}{'+' if len(rows) > 1 else ''} rows of {len(rows[0]) if rows else 0} columns"
        raise ValueError(f"the query must return one number, returned {shape}")
    value = rows[0][0]
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise ValueError(f"the query must return a number, returned {type(value).__name__}")
    number = float(value)
    if math.isnan(number):
        raise ValueError("the query returned NaN")
    return number


# -- SQL of the library metrics ---------------------------------------------------


def _metric_sql(rule: PlanQualityRule, view: str) -> str:
    metric, col = rule.metric, ident(rule.column) if rule.column else ""
    if metric == "rowCount":
        return f"SELECT count(*) FROM {view}"
    if metric == "duplicateValues":
        # as ODCS and datacontract-cli count: values that occur more than once (NULL is never a
        # duplicate, as with SQL UNIQUE); without a column, whole rows that occur more than once
        groups = (f"SELECT 1 FROM {view} WHERE {col} IS NOT NULL GROUP BY {col}" if col
                  else f"SELECT * FROM {view} GROUP BY ALL")
        dup = f"(SELECT count(*) FROM ({groups} HAVING count(*) > 1))"
        return _as_unit(rule, dup, view) if rule.unit == "percent" else f"SELECT {dup}"
    if not col:
        raise ValueError(f"metric {metric} needs a column")
    conditions = {"nullValues": lambda: f"{col} IS NULL", "missingValues": lambda: _missing(rule, col),
                  "invalidValues": lambda: _invalid(rule, col)}
    if metric not in conditions:
        raise ValueError(f"unknown metric {metric!r}")
    return _as_unit(rule, f"count(*) FILTER (WHERE {conditions[metric]()})", view)


def _as_unit(rule: PlanQualityRule, count: str, view: str) -> str:
    if rule.unit == "percent":
        return f"SELECT coalesce(100.0 * ({count}) / nullif(count(*), 0), 0) FROM {view}"
    return f"SELECT {count} FROM {view}"


def _missing(rule: PlanQualityRule, col: str) -> str:
    values = [v for v in rule.missing_values if v.lower() not in ("null", "none", "~")]
    listed = ", ".join(literal(v) for v in values)
    return f"{col} IS NULL" + (f" OR CAST({col} AS VARCHAR) IN ({listed})" if values else "")


def _invalid(rule: PlanQualityRule, col: str) -> str:
    text = f"CAST({col} AS VARCHAR)"
    bad: list[str] = []
    if rule.valid_values:
        bad.append(f"{text} NOT IN ({', '.join(literal(v) for v in rule.valid_values)})")
    if rule.valid_range is not None:
        low, high = rule.valid_range
        bad.append(f"TRY_CAST({col} AS DOUBLE) IS NULL OR TRY_CAST({col} AS DOUBLE) "
                   f"NOT BETWEEN {float(low)!r} AND {float(high)!r}")
    if rule.pattern:
        bad.append(f"NOT regexp_full_match({text}, {literal(rule.pattern)})")
    if not bad:
        raise ValueError("invalidValues needs validValues, validRange or pattern")
    return f"{col} IS NOT NULL AND (" + " OR ".join(f"({b})" for b in bad) + ")"


# -- SQL rules ----------------------------------------------------------------------


def _sql_rule(rule: PlanQualityRule, view: str) -> str:
    """The rule's query with {object} and {property} replaced; a single SELECT only."""
    import duckdb

    if not rule.operator:
        raise ValueError("a sql rule needs an operator such as mustBe")
    query = rule.query
    for name, value in (("object", view), ("property", ident(rule.column) if rule.column else None)):
        for mark in ("${" + name + "}", "{" + name + "}"):
            if mark in query:
                if value is None:
                    raise ValueError(f"query uses {{{name}}} but the rule names no column")
                query = query.replace(mark, value)
    statements = duckdb.extract_statements(query)
    if len(statements) != 1:
        raise ValueError(f"a sql rule must be one SELECT statement, found {len(statements)} statements")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise ValueError(f"a sql rule must be a SELECT, found {statements[0].type.name}")
    return query


# -- freshness ----------------------------------------------------------------------


def _freshness(product: PlanProduct, contract: PlanContract | None, base_dir: Path,
               now: float) -> CheckResult | None:
    """The source file's age (now minus its mtime) against the declared freshness."""
    sla = product.sla if product.sla and product.sla.freshness_s else (contract.sla if contract else None)
    if sla is None or not sla.freshness_s:
        return None
    limit = float(sla.freshness_s)
    if product.format == "postgresql":
        return CheckResult("freshness", None, "mustBeLessOrEqualTo", limit, True, "info",
                           "skipped: a postgresql table has no file time", skipped=True)
    try:
        age = max(0.0, now - source_path(product, base_dir).stat().st_mtime)
    except OSError as err:
        raise UserError(f"cannot read product {product.id}: {err.strerror}",
                        where=str(source_path(product, base_dir))) from None
    passed = compare(age, "mustBeLessOrEqualTo", limit)
    detail = "" if passed else f"data is {_human(age)} old, SLA freshness is {sla.freshness or _human(limit)}"
    return CheckResult("freshness", round(age, 3), "mustBeLessOrEqualTo", limit, passed, "error", detail)


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


# -- a whole plan -------------------------------------------------------------------


def check_plan(plan: Plan, base_dir: Path, only: str | None = None) -> dict[str, list[CheckResult]]:
    """Check every product of `plan` (or only the one with id `only`), in plan order."""
    out: dict[str, list[CheckResult]] = {}
    for product in plan.products:
        if only is None or product.id == only:
            contract = next((c for c in plan.contracts if c.id == product.contract), None)
            out[product.id] = check_product(None, product, contract, base_dir)
    return out


def verdict(result: CheckResult) -> str:
    """`pass`, `FAIL` or `skip`."""
    return "skip" if result.skipped else "pass" if result.passed else "FAIL"


RESULT_HEADERS = ["product", "rule", "observed", "operator", "threshold", "result", "severity",
                  "detail"]
"""Columns of `meshctl contract test`'s table."""


def result_rows(results: dict[str, list[CheckResult]]) -> list[list[str]]:
    """Table rows: product, rule, observed, operator, threshold, result, severity, detail."""
    return [[product, r.rule, "-" if r.observed is None else f"{r.observed:g}", r.operator or "-",
             threshold_text(r.threshold), verdict(r), r.severity, r.detail]
            for product, rs in results.items() for r in rs]


def threshold_text(t: float | list[float] | None) -> str:
    """A threshold as the tables show it: `100`, `[1, 3]` or `-`."""
    if t is None:
        return "-"
    return f"[{t[0]:g}, {t[1]:g}]" if isinstance(t, list) else f"{t:g}"


def summary(results: dict[str, list[CheckResult]]) -> str:
    """One line: how many checks passed, failed (errors, warnings) and were skipped."""
    flat = [r for rs in results.values() for r in rs]
    failed = [r for r in flat if not r.passed]
    errors = sum(r.severity == "error" for r in failed)
    warnings = sum(r.severity == "warning" for r in failed)
    skipped = sum(r.skipped for r in flat)
    return (f"{len(flat)} checks on {len(results)} product{'s' if len(results) != 1 else ''}: "
            f"{len(flat) - len(failed) - skipped} passed, {len(failed)} failed ({errors} error"
            f"{'s' if errors != 1 else ''}, {warnings} warning{'s' if warnings != 1 else ''}), "
            f"{skipped} skipped")
