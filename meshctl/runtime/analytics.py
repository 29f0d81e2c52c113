"""Federated analytics, coordinator side: run one `analyses:` entry and merge exactly.

`meshctl analyze NAME` prepares a run like `meshctl up` (run directory, ephemeral
Curve keys, events.jsonl) with `analysis` set in the run manifest; the coordinator
service then runs the analysis workflow (meshctl.runtime.coordinator.analysis), which
asks every participant for its aggregates (`AnalyzeIns`), checks each reply against the
plan with the same output gate the domains apply, emits the domains' ledger charges and
refusals as events, and hands the replies to `merge` here: counts, sums and
histograms add; means are Σsum/Σcount; variances come from the domains' centered
sums of squares (Chan et al.); quantiles are read off the merged histogram. The result is `analyses/<name>.json` in the run directory.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meshctl.compiler.plan import Plan, PlanAnalysis
from meshctl.errors import UserError
from meshctl.tables import cell, format_table

if TYPE_CHECKING:  # (merge imports them: `meshctl analyze` itself never needs torch, which they import)
    from meshctl.runtime import wire
    from meshctl.runtime.analytics_domain import Statistic

REPLY_TIMEOUT_S = 600.0
"""How long the coordinator waits for every participant's aggregates."""


# -- choosing and checking an analysis (before anything starts) ---------------------


def find_analysis(plan: Plan, name: str, where: str) -> PlanAnalysis:
    """The plan's analysis `name`, or a UserError naming the nearest one."""
    names = [a.name for a in plan.analyses]
    if name in names:
        return plan.analysis(name)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean '{close[0]}'?" if close else (
        f"the mesh declares {', '.join(names)}" if names else "declare one under `analyses:`")
    raise UserError(f"no analysis '{name}' in the mesh", where=where, hint=hint)


def check_sources(plan: Plan, analysis: PlanAnalysis, base_dir: Path) -> None:
    """Every local participant's data file exists (a missing one is a one-line error now, not later)."""
    from meshctl.runtime.data import source_path

    local = {d.name for d in plan.domains if d.address == "local"}
    for read in analysis.reads:
        product = plan.product(read.product)
        if read.domain in local and product.format != "postgresql":
            path = source_path(product, base_dir)
            if not path.is_file():
                raise UserError(f"data file of product {product.id} not found", where=str(path))


def result_path(run_dir: Path, name: str) -> Path:
    """Where a run writes the result of analysis `name`."""
    return Path(run_dir) / "analyses" / f"{name}.json"


# -- merging ------------------------------------------------------------------------


def merge(plan: Plan, analysis: PlanAnalysis, replies: dict[str, wire.AnalyzeRes]) -> dict[str, Any]:
    """The mesh-wide result of `analysis` from each domain's (gated) reply, as a JSON-able dict."""
    from meshctl.runtime.analytics_domain import declared_groups, metric_statistics, statistics
    from meshctl.runtime.kernels import aggregates as agg

    stats = statistics(plan, analysis)
    by_metric = metric_statistics(plan, analysis)
    by_domain = {d: {tuple(g.key): g.values for g in replies[d].groups}
                 for d in analysis.participants if d in replies}  # plan order: deterministic
    groups, merged_suppressed = [], 0
    for key in declared_groups(plan, analysis):
        parts = [(d, vals[key]) for d, vals in by_domain.items() if key in vals]
        if not parts:
            continue
        count = float(sum(v["count"] for _, v in parts))  # type: ignore[misc]
        if count < analysis.min_group_size:
            merged_suppressed += 1
            continue
        values = _metric_values(analysis, by_metric, [v for _, v in parts], exact=analysis.dp is None)
        groups.append({"key": dict(zip(analysis.group_by, key)), "count": _count(count, analysis),
                       "domains": [d for d, _ in parts], "values": values})
    dp = None if analysis.dp is None else {
        "epsilon": analysis.dp.epsilon, "mechanism": "laplace", "per_statistic_epsilon":
        agg.split_epsilon(analysis.dp.epsilon, len(stats)), "statistics": [s.key for s in stats]}
    return {
        "analysis": analysis.name, "purpose": analysis.purpose, "group_by": analysis.group_by,
        "metrics": [m.label for m in analysis.metrics], "participants": list(by_domain),
        "min_group_size": analysis.min_group_size, "variance": "sample (n - 1)", "dp": dp,
        "groups": groups,
        "suppressed": {"by_domain": {d: r.suppressed for d, r in sorted(replies.items())},
                       "merged": merged_suppressed},
    }


def _count(count: float, analysis: PlanAnalysis) -> float | int:
    return round(count) if analysis.dp is None else count


def _metric_values(analysis: PlanAnalysis, by_metric: dict[str, list[Statistic]], parts: list[dict],
                   exact: bool) -> dict[str, Any]:
    from meshctl.runtime.kernels import aggregates as agg

    out: dict[str, Any] = {}
    for m in analysis.metrics:
        stats = {s.kind: s for s in by_metric[m.label]}
        if m.fn == "count":
            total = sum(p["count"] for p in parts)
            out[m.label] = round(total) if exact else total
        elif m.fn in ("histogram", "quantile"):
            s = stats["hist"]
            counts = agg.merge_histograms([p[s.key] for p in parts])
            if m.fn == "histogram":
                edges = np.linspace(s.lo, s.hi, s.bins + 1)
                out[m.label] = {"edges": edges.tolist(), "counts": [_num(c, exact) for c in counts]}
            else:
                out[m.label] = {format(q, "g"): _finite(agg.histogram_quantile(counts, s.lo, s.hi, q))
                                for q in m.q}
        else:
            m2 = stats.get("m2")
            moments = agg.merge_moments([agg.Moments(p["count"], p[stats["sum"].key],
                                                     p[m2.key] if m2 else 0.0) for p in parts])
            out[m.label] = {"sum": moments.sum, "mean": _finite(moments.mean),
                            "variance": _finite(agg.variance(moments, ddof=1))}[m.fn]
    return out


def _expanded(head: list[str], rows: list[list[str]], keys: int, width: int) -> str:
    """One block per group: a `-[ key=value ... ]-` rule, then a `name  value` line per metric (a value
    too long for `width` goes on under the name, indented, cut at its spaces)."""
    name_w = max(len(h) for h in head[keys:])
    rule = min(width, name_w + 2 + max((len(v) for row in rows for v in row[keys:]), default=0))
    out: list[str] = []
    for row in rows:
        title = " ".join(f"{h}={v}" for h, v in zip(head[:keys], row[:keys])) or "all"
        out.append(f"-[ {title} ]".ljust(rule, "-"))
        for h, v in zip(head[keys:], row[keys:]):
            if name_w + 2 + len(v) <= width:
                out.append(f"{h.ljust(name_w)}  {v}")
                continue
            out.append(h)
            line = ""
            for word in v.split(" "):
                if line and 4 + len(line) + 1 + len(word) > width:
                    out.append("    " + line)
                    line = word
                else:
                    line = f"{line} {word}" if line else word
            out.append("    " + line)
    return "\n".join(out)


def _num(x: float, exact: bool) -> float | int:
    return round(x) if exact else float(x)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# -- rendering --------------------------------------------------------------------


def render_result(result: dict[str, Any], width: int | None = None) -> str:
    """The result as a text table: one row per group, one column per metric. When the table is wider
    than `width` (the terminal's), each group is a block of `name  value` lines instead (psql's
    expanded display, `\\x auto`); `width` None: always the table (a pipe, a file)."""
    head = [*result["group_by"], *result["metrics"], "domains"]
    rows = []
    for g in result["groups"]:
        rows.append([*(str(g["key"][c]) for c in result["group_by"]),
                     *(cell(g["values"][m]) for m in result["metrics"]), str(len(g["domains"]))])
    table = format_table(head, rows, upper=False)
    if width is not None and max(map(len, table.splitlines()), default=0) > width:
        table = _expanded(head, rows, len(result["group_by"]), width)
    lines = [table]
    sup = result["suppressed"]
    held = sum(sup["by_domain"].values())
    lines.append(f"{len(result['groups'])} groups; suppressed: {held} in domains, {sup['merged']} after merging"
                 + (f"; DP ε {result['dp']['epsilon']:g} (Laplace)" if result.get("dp") else ""))
    return "\n".join(lines)


def read_result(run_dir: Path, name: str, copy_to: Path | None = None) -> dict[str, Any]:
    """The result a run wrote for analysis `name`; also written to `copy_to` when given."""
    path = result_path(run_dir, name)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        raise UserError("the run wrote no result", where=str(path)) from None
    if copy_to is not None:
        try:
            copy_to.write_text(text, encoding="utf-8")
        except OSError as err:
            raise UserError(f"cannot write the result: {err.strerror}", where=str(copy_to)) from None
    return json.loads(text)
