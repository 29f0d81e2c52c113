"""Analysis plans built directly over the committed hospitals data, and the union query they must equal."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb

from meshctl.compiler.plan import (
    Plan,
    PlanAnalysis,
    PlanColumn,
    PlanCoordinator,
    PlanDomain,
    PlanDp,
    PlanHeader,
    PlanMetric,
    PlanProduct,
    PlanRead,
)

ROOT = Path(__file__).resolve().parents[2]
HOSPITALS = ROOT / "examples" / "hospitals" / "data"
SOURCES = {"charite": "charite.parquet", "karolinska": "karolinska.parquet", "amsterdam-umc": "amsterdam-umc.csv"}

COLUMNS = [
    PlanColumn(name="patient_name", type="string", pii="direct"),
    PlanColumn(name="mrn", type="string", pii="direct"),
    PlanColumn(name="date_of_birth", type="date", pii="indirect", masking="drop"),
    PlanColumn(name="radius_mean", type="float", range=[0.0, 40.0]),
    PlanColumn(name="texture_mean", type="float"),
    PlanColumn(name="area_mean", type="float", range=[0.0, 3000.0]),
    PlanColumn(name="diagnosis", type="category", values=["benign", "malignant"]),
]

METRICS = [
    PlanMetric(fn="count", label="count"),
    PlanMetric(fn="sum", column="texture_mean", label="sum(texture_mean)"),
    PlanMetric(fn="mean", column="radius_mean", label="mean(radius_mean)"),
    PlanMetric(fn="variance", column="area_mean", label="variance(area_mean)"),
    PlanMetric(fn="histogram", column="radius_mean", bins=8, range=[5.0, 29.0], label="histogram(radius_mean)"),
    PlanMetric(fn="quantile", column="radius_mean", bins=40, range=[5.0, 29.0], q=[0.25, 0.5, 0.9],
               label="quantile(radius_mean, 0.25, 0.5, 0.9)"),
]


def copy_data(tmp: Path) -> Path:
    """The hospitals data under tmp/data; returns tmp/mesh.yaml (a path for .meshctl/ to land beside)."""
    shutil.copytree(HOSPITALS, tmp / "data")
    mesh = tmp / "mesh.yaml"
    mesh.write_text("# plans in these tests are built directly\n")
    return mesh


def hospitals_plan(*, min_group_size: int = 10, dp: PlanDp | None = None, budget: float | None = None,
                   metrics: list[PlanMetric] | None = None, group_by: list[str] | None = None,
                   domains: list[str] | None = None) -> Plan:
    """An analysis `nuclei` over the hospitals (sources under data/), by diagnosis unless told."""
    names = domains or list(SOURCES)
    group_by = ["diagnosis"] if group_by is None else group_by
    metrics = metrics or METRICS
    products = [PlanProduct(id=f"{d}.biopsies", domain=d, name="biopsies", source=f"data/{SOURCES[d]}",
                            format="csv" if SOURCES[d].endswith(".csv") else "parquet", epsilon_budget=budget,
                            columns=COLUMNS) for d in names]
    used = list(dict.fromkeys([*group_by, *(m.column for m in metrics if m.column)]))
    analysis = PlanAnalysis(
        name="nuclei", purpose="cancer-research", participants=names,
        reads=[PlanRead(domain=d, product=f"{d}.biopsies", client_id=i) for i, d in enumerate(names)],
        group_by=group_by, group_values={g: ["benign", "malignant"] for g in group_by}, metrics=metrics,
        columns=used, min_group_size=min_group_size, dp=dp)
    return Plan(plan=PlanHeader(mesh="analytics-test", meshctl_version="0.1.0", protocol_version=1, spec_hash="t"),
                coordinator=PlanCoordinator(address="tcp://127.0.0.1:0"),
                domains=[PlanDomain(name=d) for d in names], products=products, jobs=[],
                analyses=[analysis]).with_hash()


def union_sql(data: Path, domains: list[str] | None = None) -> str:
    """A relation over the union of the hospitals' files (the query federated analytics must equal)."""
    parts = [f"SELECT diagnosis, radius_mean, texture_mean, area_mean FROM '{data / SOURCES[d]}'"
             for d in (domains or list(SOURCES))]
    return " UNION ALL ".join(parts)


def union_stats(data: Path) -> dict[str, dict[str, float]]:
    """count, sum, mean, var_samp per diagnosis over the union, by DuckDB."""
    rows = duckdb.sql(f"SELECT diagnosis, count(*), sum(texture_mean), avg(radius_mean), var_samp(area_mean) "
                      f"FROM ({union_sql(data)}) GROUP BY diagnosis").fetchall()
    return {d: {"count": n, "sum": s, "mean": m, "variance": v} for d, n, s, m, v in rows}
