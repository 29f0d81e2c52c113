"""Federated analytics, domain side: compute one analysis' aggregates where the data is.

The daemon answers an `AnalyzeIns` with `answer()`: it reads its product through
the masked view of `data.product_view`, selecting only the analysis' columns, and
computes per group, in DuckDB, the *statistics* the declared metrics need:

    count            rows of the group (rows with a NULL in a used column are left out)
    sum(c)           for sum, mean and variance of c
    m2(c)            Σ (c - group mean)², for variance of c
    hist(c,B,lo,hi)  counts in B equal bins over [lo, hi], for histogram and quantile;
                     values outside the range are clamped into the edge bins

Groups with fewer than `min_group_size` rows are suppressed (not sent; only their
number is). With `dp` declared, every statistic gets Laplace noise first and the
suppression is decided on the noisy count (see docs/analytics.md for the
mechanism); then the privacy ledger is charged. `gate()` checks the outgoing
message against the plan: nothing but the declared statistics of declared
groups can leave.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from meshctl.compiler.plan import Plan, PlanAnalysis, PlanProduct
from meshctl.errors import UserError
from meshctl.runtime import wire
from meshctl.runtime.data import DataError, ident, product_view, read_error
from meshctl.runtime.kernels import aggregates as agg
from meshctl.runtime.ledger import BudgetExceeded, Ledger, ledger_path

if TYPE_CHECKING:
    import duckdb

LEDGER_POLICY = "privacy-ledger"
"""Name of the run-time policy a domain's ledger decisions are reported under."""
GRANT_POLICY = "grant-required"
"""Name of the run-time policy that keeps `access: request` products behind grants."""

StatKind = Literal["count", "sum", "m2", "hist"]


@dataclass(frozen=True)
class Statistic:
    """One number (or histogram) a domain releases per group."""

    kind: StatKind
    column: str = ""
    bins: int = 0
    lo: float = 0.0
    hi: float = 0.0
    """Histogram range; for sum and m2 the range values are clipped to under DP."""

    @property
    def key(self) -> str:
        """The statistic's name on the wire, e.g. `sum(age)` or `hist(age,10,0,120)`."""
        if self.kind == "count":
            return "count"
        if self.kind == "hist":
            return f"hist({self.column},{self.bins},{self.lo:g},{self.hi:g})"
        return f"{self.kind}({self.column})"


class GateError(ValueError):
    """An outgoing analysis result holds something the plan does not declare."""


# -- what an analysis releases ------------------------------------------------------


def metric_columns(analysis: PlanAnalysis) -> list[str]:
    """Columns the metrics aggregate, in first-use order."""
    return list(dict.fromkeys(m.column for m in analysis.metrics if m.fn != "count"))


def used_columns(analysis: PlanAnalysis) -> list[str]:
    """Every column the analysis reads: group_by then metric columns."""
    return list(dict.fromkeys([*analysis.group_by, *metric_columns(analysis)]))


def column_range(plan: Plan, analysis: PlanAnalysis, column: str) -> list[float] | None:
    """The range the read products declare for `column` (all must agree), else None."""
    found = set()
    for read in analysis.reads:
        col = next((c for c in plan.product(read.product).columns if c.name == column), None)
        found.add(tuple(col.range) if col is not None and col.range is not None else None)
    if len(found) > 1:
        raise UserError(f"analysis {analysis.name}: products declare different ranges for {column!r}",
                        hint="give the metric its own `range: [LOW, HIGH]`")
    rng = found.pop() if found else None
    return list(rng) if rng is not None else None


def metric_statistics(plan: Plan, analysis: PlanAnalysis) -> dict[str, list[Statistic]]:
    """The statistics each metric (by label) is computed from."""
    out: dict[str, list[Statistic]] = {}
    for m in analysis.metrics:
        if m.fn == "count":
            out[m.label] = [Statistic("count")]
        elif m.fn in ("histogram", "quantile"):
            lo, hi = _hist_range(plan, analysis, m.column, m.range, m.label)
            out[m.label] = [Statistic("count"), Statistic("hist", m.column, m.bins, lo, hi)]
        else:
            lo, hi = _clip_range(plan, analysis, m.column)
            out[m.label] = [Statistic("count"), Statistic("sum", m.column, 0, lo, hi)]
            if m.fn == "variance":
                out[m.label].append(Statistic("m2", m.column, 0, lo, hi))
    return out


def statistics(plan: Plan, analysis: PlanAnalysis) -> list[Statistic]:
    """The statistics an analysis releases per group, deduplicated, `count` first."""
    out: dict[str, Statistic] = {"count": Statistic("count")}
    for stats in metric_statistics(plan, analysis).values():
        for s in stats:
            out.setdefault(s.key, s)
    return list(out.values())


def _hist_range(plan: Plan, analysis: PlanAnalysis, column: str, declared: list[float] | None,
                label: str) -> tuple[float, float]:
    rng = declared or column_range(plan, analysis, column)
    if rng is None:
        raise UserError(f"analysis {analysis.name}: {label} needs a range to bin {column!r} in",
                        hint=f"declare `range: [LOW, HIGH]` on column {column!r} or on the metric")
    return float(rng[0]), float(rng[1])


def _clip_range(plan: Plan, analysis: PlanAnalysis, column: str) -> tuple[float, float]:
    """Range a moment's values are clipped to under DP: the column's, a metric's, else ±clip."""
    rng = column_range(plan, analysis, column)
    if rng is None:
        rng = next((m.range for m in analysis.metrics if m.column == column and m.range
                    and m.fn not in ("histogram", "quantile")), None)
    if rng is None:
        clip = analysis.dp.clip if analysis.dp else math.inf
        rng = [-clip, clip]
    return float(rng[0]), float(rng[1])


def group_values(plan: Plan, analysis: PlanAnalysis) -> list[list[str]]:
    """Declared values of each group_by column: the plan's, else the products' category values."""
    out = []
    for column in analysis.group_by:
        values = analysis.group_values.get(column)
        if not values:
            declared = {tuple(c.values) for r in analysis.reads for c in plan.product(r.product).columns
                        if c.name == column}
            values = list(declared.pop()) if len(declared) == 1 else []
        if not values:
            raise UserError(f"analysis {analysis.name}: group_by column {column!r} declares no values",
                            hint="group by a category column with `values: [...]`")
        out.append([str(v) for v in values])
    return out


def declared_groups(plan: Plan, analysis: PlanAnalysis) -> list[tuple[str, ...]]:
    """Every group the analysis may release, in declared order (one empty key without group_by)."""
    return [tuple(k) for k in itertools.product(*group_values(plan, analysis))]


# -- the output gate --------------------------------------------------------------


def gate(res: wire.AnalyzeRes, plan: Plan, analysis: PlanAnalysis, product: str | None = None) -> None:
    """Refuse (GateError) a result holding anything but the declared statistics of declared groups.

    Also: every released group has at least `min_group_size` rows (noisy under DP),
    every number is finite, and ledger charges are the analysis' ε on `product` only.
    """
    if res.analysis != analysis.name:
        raise GateError(f"result names analysis {res.analysis!r}, not {analysis.name!r}")
    if res.denied and res.groups:
        raise GateError("a refusal carries groups")
    stats = {s.key: s for s in statistics(plan, analysis)}
    allowed = set(declared_groups(plan, analysis))
    seen: set[tuple[str, ...]] = set()
    for g in res.groups:
        key = tuple(g.key)
        if key not in allowed:  # its key is no name from the plan: it is not repeated
            raise GateError(f"a group that is not a declared group of {analysis.name}")
        if key in seen:
            raise GateError(f"group {list(key)} is listed twice")
        seen.add(key)
        extra, missing = sorted(set(g.values) - set(stats)), sorted(set(stats) - set(g.values))
        if extra or missing:
            raise GateError(f"group {list(key)}: undeclared {extra} / missing {missing} statistics")
        for name, value in g.values.items():
            _check_value(stats[name], value, list(key))
        if g.values["count"] < analysis.min_group_size:  # type: ignore[operator]
            raise GateError(f"group {list(key)} has fewer than {analysis.min_group_size} rows")
    for c in res.charges:
        if analysis.dp is None or c.product != product or c.epsilon != analysis.dp.epsilon:
            raise GateError(f"charge of ε {c.epsilon:g} on {c.product} is not this analysis' release")


def _check_value(stat: Statistic, value: float | list[float], key: list[str]) -> None:
    if stat.kind == "hist":
        if not isinstance(value, list) or len(value) != stat.bins:
            raise GateError(f"group {key}: {stat.key} must be {stat.bins} bin counts")
        numbers = value
    else:
        if isinstance(value, list):
            raise GateError(f"group {key}: {stat.key} must be one number")
        numbers = [value]
    if not all(math.isfinite(x) for x in numbers):
        raise GateError(f"group {key}: {stat.key} is not finite")


# -- computing a domain's aggregates ---------------------------------------------------


@dataclass(frozen=True)
class Release:
    """What a domain would release: groups (key -> statistic key -> value) and how many it held back."""

    groups: dict[tuple[str, ...], dict[str, float | list[float]]]
    suppressed: int


def compute(plan: Plan, analysis: PlanAnalysis, product: PlanProduct, base_dir: Path,
            rng: np.random.Generator | None = None) -> Release:
    """The domain's release for `analysis` over `product`: exact, or noisy when DP is declared."""
    stats = statistics(plan, analysis)
    exact = _exact(plan, analysis, product, base_dir, stats)
    if analysis.dp is None:
        kept = {k: v for k, v in exact.items() if v["count"] >= analysis.min_group_size}  # type: ignore[operator]
        return Release(kept, len(exact) - len(kept))
    rng = rng if rng is not None else np.random.default_rng()
    eps = agg.split_epsilon(analysis.dp.epsilon, len(stats))
    groups, suppressed = {}, 0
    for key in declared_groups(plan, analysis):  # every declared group, present or not: no leak by absence
        values = exact.get(key) or _zeros(stats)
        noisy = {s.key: _noised(values[s.key], s, eps, rng) for s in stats}
        if noisy["count"] >= analysis.min_group_size:  # type: ignore[operator]
            groups[key] = noisy
        else:
            suppressed += 1
    return Release(groups, suppressed)


def _zeros(stats: Sequence[Statistic]) -> dict[str, float | list[float]]:
    return {s.key: [0.0] * s.bins if s.kind == "hist" else 0.0 for s in stats}


def _noised(value: float | list[float], stat: Statistic, eps: float, rng: np.random.Generator) -> float | list[float]:
    out = agg.laplace(np.asarray(value, dtype=np.float64), agg.sensitivity(stat.kind, stat.lo, stat.hi), eps, rng)
    return out.tolist() if stat.kind == "hist" else float(out)


def _exact(plan: Plan, analysis: PlanAnalysis, product: PlanProduct, base_dir: Path,
           stats: list[Statistic]) -> dict[tuple[str, ...], dict[str, float | list[float]]]:
    """Exact statistics of every group present in the product (values clipped under DP)."""
    import duckdb

    columns = used_columns(analysis)
    if analysis.columns and not set(columns) <= set(analysis.columns):
        raise UserError(f"analysis {analysis.name} uses columns the plan does not list: "
                        f"{sorted(set(columns) - set(analysis.columns))}")
    declared = {c.name: c for c in product.columns}
    for c in columns:
        if c not in declared:
            raise UserError(f"product {product.id} has no column {c!r} that analysis {analysis.name} needs")
        if declared[c].pii != "none":
            raise UserError(f"analysis {analysis.name} asks for PII column {product.id}.{c}; refused")
    with duckdb.connect() as con:
        view = product_view(con, product, base_dir, columns=columns)
        rows = _rows_sql(analysis, view, stats)
        try:
            out = _moments(con, analysis, rows, stats)
            for s in (s for s in stats if s.kind == "hist"):
                _histogram(con, analysis, rows, s, out)
        except duckdb.Error as err:
            raise read_error(con, product, base_dir, err, columns) from None
    _check_groups(plan, analysis, product, out)
    return out


def _rows_sql(analysis: PlanAnalysis, view: str, stats: list[Statistic]) -> str:
    """SELECT of the used columns (group keys as text, metric values as DOUBLE), NULL rows left out."""
    parts = [f"CAST({ident(g)} AS VARCHAR) AS {ident('g:' + g)}" for g in analysis.group_by]
    for c in metric_columns(analysis):
        parts.append(f"CAST({ident(c)} AS DOUBLE) AS {ident('v:' + c)}")
    for s in stats:
        if s.kind == "sum":
            value = f"CAST({ident(s.column)} AS DOUBLE)"
            if analysis.dp is not None:  # bound each row's contribution
                value = f"least(greatest({value}, {s.lo!r}), {s.hi!r})"
            parts.append(f"{value} AS {ident('m:' + s.column)}")
    used = used_columns(analysis)
    where = " AND ".join(f"{ident(c)} IS NOT NULL" for c in used) or "true"
    return f"SELECT {', '.join(parts) or '1 AS one'} FROM {view} WHERE {where}"


def _keys(analysis: PlanAnalysis) -> str:
    return ", ".join(ident("g:" + g) for g in analysis.group_by)


def _moments(con: duckdb.DuckDBPyConnection, analysis: PlanAnalysis, rows: str,
             stats: list[Statistic]) -> dict[tuple[str, ...], dict[str, float | list[float]]]:
    keys = _keys(analysis)
    sel = ["count(*)"]
    for s in stats:
        col = ident("m:" + s.column)
        if s.kind == "sum":
            sel.append(f"sum({col})")
        elif s.kind == "m2":
            sel.append(f"coalesce(var_pop({col}), 0) * count({col})")
    group = f"GROUP BY {keys}" if keys else ""
    head = f"{keys}, " if keys else ""
    result = con.execute(f"SELECT {head}{', '.join(sel)} FROM ({rows}) {group}").fetchall()
    k = len(analysis.group_by)
    moment_stats = [s for s in stats if s.kind in ("sum", "m2")]
    out: dict[tuple[str, ...], dict[str, float | list[float]]] = {}
    for row in result:
        if not k and row[0] == 0:
            continue  # no rows at all: no group
        values: dict[str, float | list[float]] = {"count": float(row[k])}
        for s, v in zip(moment_stats, row[k + 1:]):
            values[s.key] = float(v)
        for s in stats:
            if s.kind == "hist":
                values[s.key] = [0.0] * s.bins
        out[tuple(row[:k])] = values
    return out


def _histogram(con, analysis: PlanAnalysis, rows: str, s: Statistic,
               out: dict[tuple[str, ...], dict[str, float | list[float]]]) -> None:
    keys = _keys(analysis)
    head = f"{keys}, " if keys else ""
    width = s.hi - s.lo
    b = f"least(greatest(floor(({ident('v:' + s.column)} - {s.lo!r}) * {float(s.bins)!r} / {width!r}), 0), " \
        f"{s.bins - 1})"
    sql = f"SELECT {head}CAST({b} AS BIGINT) AS b, count(*) FROM ({rows}) GROUP BY ALL"
    k = len(analysis.group_by)
    for row in con.execute(sql).fetchall():
        counts = out[tuple(row[:k])][s.key]
        counts[int(row[k])] += float(row[k + 1])  # type: ignore[index]


def _check_groups(plan: Plan, analysis: PlanAnalysis, product: PlanProduct,
                  out: dict[tuple[str, ...], dict]) -> None:
    allowed = set(declared_groups(plan, analysis))
    bad = sorted({k for k in out if k not in allowed})
    if bad:
        rows = sum(int(out[k]["count"]) for k in bad)  # type: ignore[arg-type]
        raise DataError(f"product {product.id}: {rows} rows in {len(bad)} group{'s' if len(bad) > 1 else ''} of "
                        f"{', '.join(analysis.group_by)} outside the declared values",
                        detail=f"e.g. {[list(k) for k in bad[:3]]}")


# -- answering the coordinator -----------------------------------------------------


def answer(plan: Plan, domain: str, base_dir: Path, ins: wire.AnalyzeIns, run: str,
           rng: np.random.Generator | None = None) -> wire.AnalyzeRes | wire.ErrorReply:
    """The daemon's reply to `ins`: gated aggregates, a policy refusal, or an error."""
    analysis = next((a for a in plan.analyses if a.name == ins.analysis), None)
    if analysis is None:
        return wire.ErrorReply(code="unknown-analysis", reason=f"the plan has no analysis {ins.analysis!r}")
    read = next((r for r in analysis.reads if r.domain == domain), None)
    if read is None:
        return wire.ErrorReply(code="not-participant", reason=f"{domain} does not take part in {analysis.name}")
    product = plan.product(read.product)
    ledger = Ledger(ledger_path(base_dir))
    denial = _grant_check(plan, analysis, product) or _precheck(analysis, product, ledger)
    if denial is not None:
        return wire.AnalyzeRes(analysis=analysis.name, denied=[denial])
    try:
        release = compute(plan, analysis, product, base_dir, rng)
    except UserError as err:  # the message is in the domain's own words; the path and detail stay here
        detail = f" [detail: {err.detail}]" if isinstance(err, DataError) and err.detail else ""
        print(f"analysis {analysis.name}: {err.render()}{detail}", file=sys.stderr, flush=True)
        return wire.ErrorReply(code="data", reason=f"analysis {analysis.name}: {err.message}"[:4096])
    res = wire.AnalyzeRes(analysis=analysis.name, suppressed=release.suppressed, groups=[
        wire.GroupAggregates(key=list(k), values=v) for k, v in release.groups.items()])
    try:
        gate(res, plan, analysis, product.id)
    except GateError as err:
        return wire.ErrorReply(code="gate", reason=f"output gate refused the result: {err}")
    if analysis.dp is None:
        return res
    try:
        charge = ledger.charge(product.id, analysis.dp.epsilon, product.epsilon_budget,
                               subject=f"analysis:{analysis.name}", run=run)
    except BudgetExceeded as err:
        return wire.AnalyzeRes(analysis=analysis.name, denied=[wire.Denial(policy=LEDGER_POLICY, reason=str(err))])
    return res.model_copy(update={"charges": [wire.LedgerCharge(
        product=charge.product, epsilon=charge.epsilon, total=charge.total, cap=charge.cap)]})


def _grant_check(plan: Plan, analysis: PlanAnalysis, product: PlanProduct,
                 today: date | None = None) -> wire.Denial | None:
    """An `access: request` product is read only under an unexpired grant for this analysis and purpose."""
    if product.access != "request":
        return None
    day = (today or datetime.now(UTC).date()).isoformat()
    subject = f"analysis:{analysis.name}"
    grants = [g for g in plan.grants if g.product == product.id and g.subject == subject
              and g.purpose == analysis.purpose]
    if any(not g.until or g.until >= day for g in grants):
        return None
    why = f"expired on {max(g.until for g in grants)}" if grants else "there is none"
    return wire.Denial(policy=GRANT_POLICY, reason=f"{product.id} is access: request and needs a grant for "
                       f"{subject} with purpose {analysis.purpose!r}; {why}")


def _precheck(analysis: PlanAnalysis, product: PlanProduct, ledger: Ledger) -> wire.Denial | None:
    """Refuse before reading anything when the product's ledger cannot afford the analysis."""
    cap = product.epsilon_budget
    if cap is None or analysis.dp is None:  # the ledger accounts for DP releases only
        return None
    spent = ledger.spent(product.id)
    if spent + analysis.dp.epsilon > cap + 1e-12:
        return wire.Denial(policy=LEDGER_POLICY, reason=str(BudgetExceeded(product.id, spent,
                                                                           analysis.dp.epsilon, cap)))
    return None
