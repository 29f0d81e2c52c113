"""Contract checks in the domain: ODCS rules run with DuckDB over the hospitals data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import duckdb
import pytest

from meshctl.compiler.plan import PlanColumn, PlanContract, PlanProduct, PlanQualityRule, PlanSla
from meshctl.errors import UserError
from meshctl.runtime.events import ContractChecked
from meshctl.runtime.quality import OPERATORS, check_product, compare, implicit_rules

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "hospitals" / "data"


def product(file: str = "charite.parquet", **extra: object) -> PlanProduct:
    cols = [PlanColumn(name="patient_name", type="string", pii="direct"),
            PlanColumn(name="mrn", type="string", pii="direct"),
            PlanColumn(name="date_of_birth", type="date", pii="indirect"),
            PlanColumn(name="radius_mean", type="float", range=[0, 50]),
            PlanColumn(name="area_mean", type="float"),
            PlanColumn(name="diagnosis", type="category", values=["benign", "malignant"])]
    fmt = "csv" if file.endswith(".csv") else "parquet"
    return PlanProduct(id="charite.biopsies", domain="charite", name="biopsies", source=file,
                       format=fmt, columns=cols, **extra)


def rule(name: str, **kw: object) -> PlanQualityRule:
    return PlanQualityRule(name=name, **kw)


def contract(*rules: PlanQualityRule, **kw: object) -> PlanContract:
    return PlanContract(id="tumor-biopsy@1.0.0", name="tumor-biopsy", version="1.0.0", quality=list(rules), **kw)


def run(*rules: PlanQualityRule, prod: PlanProduct | None = None, **kw: object) -> dict:
    results = check_product(None, prod or product(), contract(*rules, **kw), DATA)
    return {r.rule: r for r in results}


def truth(sql: str) -> float:
    """The expected number, computed independently from the file."""
    return float(duckdb.sql(sql.replace("{f}", f"read_parquet('{DATA / 'charite.parquet'}')")).fetchall()[0][0])


def test_library_metrics_observe_the_real_numbers():
    big = truth("SELECT count(*) FROM {f} WHERE area_mean > 1500")
    res = run(rule("rows", metric="rowCount", operator="mustBeGreaterThan", threshold=100),
              rule("nulls", metric="nullValues", column="radius_mean", unit="percent",
                   operator="mustBeLessThan", threshold=1),
              rule("missing", metric="missingValues", column="diagnosis", missing_values=["null", "benign"],
                   operator="mustBe", threshold=0, severity="warning"),
              rule("area", metric="invalidValues", column="area_mean", valid_range=[0, 1500],
                   operator="mustBeLessOrEqualTo", threshold=big),
              rule("area%", metric="invalidValues", column="area_mean", valid_range=[0, 1500], unit="percent",
                   operator="mustBeLessThan", threshold=1),
              rule("mrn-format", metric="invalidValues", column="mrn", pattern=r"CH-\d{7}",
                   operator="mustBe", threshold=0),
              rule("mrn-unique", metric="duplicateValues", column="mrn", operator="mustBe", threshold=0),
              rule("rows-unique", metric="duplicateValues", operator="mustBe", threshold=0))
    assert res["rows"].observed == 259 and res["rows"].passed
    assert res["nulls"].observed == 0 and res["nulls"].passed
    assert res["missing"].observed == truth("SELECT count(*) FROM {f} WHERE diagnosis = 'benign'")
    assert not res["missing"].passed and res["missing"].severity == "warning" and not res["missing"].blocking
    assert res["area"].observed == big > 0 and res["area"].passed
    assert res["area%"].observed == pytest.approx(100 * big / 259) and not res["area%"].passed
    assert res["area%"].blocking
    assert res["mrn-format"].observed == truth(r"SELECT count(*) FROM {f} WHERE NOT regexp_full_match(mrn, 'CH-\d{7}')")
    assert res["mrn-unique"].observed == 259 - truth("SELECT count(DISTINCT mrn) FROM {f}")
    assert res["rows-unique"].observed == 0


def test_valid_values_count_what_is_outside():
    res = run(rule("dx", metric="invalidValues", column="diagnosis", valid_values=["benign"],
                   operator="mustBe", threshold=0))
    assert res["dx"].observed == truth("SELECT count(*) FROM {f} WHERE diagnosis = 'malignant'")
    assert not res["dx"].passed


def test_declared_ranges_and_values_are_implicit_rules():
    res = run()
    assert res["values(diagnosis)"].observed == 0 and res["values(diagnosis)"].passed
    assert res["range(radius_mean)"].observed == 0 and res["range(radius_mean)"].passed
    narrow = product()
    cols = [c.model_copy(update={"range": [0, 15]}) if c.name == "radius_mean" else c for c in narrow.columns]
    res = run(prod=narrow.model_copy(update={"columns": cols}))
    assert res["range(radius_mean)"].observed == truth("SELECT count(*) FROM {f} WHERE radius_mean > 15")
    assert not res["range(radius_mean)"].passed
    extra = contract(columns=[PlanColumn(name="area_mean", type="float", range=[0, 3000])])
    assert [r.name for r in implicit_rules(product(), extra)] == [
        "range(area_mean)", "range(radius_mean)", "values(diagnosis)"]


@pytest.mark.parametrize("op,threshold,observed,ok", [
    ("mustBe", 3, 3, True), ("mustBe", 3, 4, False), ("mustNotBe", 3, 4, True), ("mustNotBe", 3, 3, False),
    ("mustBeGreaterThan", 3, 4, True), ("mustBeGreaterThan", 3, 3, False),
    ("mustBeGreaterOrEqualTo", 3, 3, True), ("mustBeGreaterOrEqualTo", 3, 2, False),
    ("mustBeLessThan", 3, 2, True), ("mustBeLessThan", 3, 3, False),
    ("mustBeLessOrEqualTo", 3, 3, True), ("mustBeLessOrEqualTo", 3, 4, False),
    ("mustBeBetween", [1, 3], 3, True), ("mustBeBetween", [1, 3], 4, False),
    ("mustNotBeBetween", [1, 3], 4, True), ("mustNotBeBetween", [1, 3], 2, False)])
def test_every_odcs_operator(op, threshold, observed, ok):
    assert compare(observed, op, threshold) is ok
    res = run(rule("r", type="sql", query=f"SELECT {observed}", operator=op, threshold=threshold))
    assert res["r"].passed is ok and res["r"].observed == observed


def test_operators_cover_the_spec():
    from meshctl.compiler.spec import OPERATORS as SPEC_OPERATORS

    assert set(OPERATORS) == set(SPEC_OPERATORS)


def test_sql_rules_replace_object_and_property():
    res = run(rule("big", type="sql", column="radius_mean", operator="mustBe", threshold=0,
                   query="SELECT count(*) FROM {object} WHERE {property} > 25"),
              rule("odcs", type="sql", column="radius_mean", operator="mustBeLessThan", threshold=30,
                   query="SELECT max(${property}) FROM ${object}"))
    assert res["big"].observed == truth("SELECT count(*) FROM {f} WHERE radius_mean > 25")
    assert res["odcs"].observed == truth("SELECT max(radius_mean) FROM {f}") and res["odcs"].passed


@pytest.mark.parametrize("query,detail", [
    ("SELEC 1", "Parser Error"),
    ("SELECT nosuch FROM {object}", 'Referenced column "nosuch" not found'),
    ("DROP TABLE x", "a sql rule must be a SELECT, found DROP"),
    ("COPY (SELECT 1) TO '/tmp/x.csv'", "a sql rule must be a SELECT, found COPY"),
    ("SELECT 1; SELECT 2", "one SELECT statement, found 2 statements"),
    ("SELECT 1, 2", "must return one number, returned 1 rows of 2 columns"),
    ("SELECT 'x'", "must return a number, returned str"),
    ("SELECT * FROM range(3)", "must return one number, returned 2+ rows"),
])
def test_a_bad_sql_rule_is_a_failed_check_not_a_crash(query, detail):
    res = run(rule("bad", type="sql", query=query, operator="mustBe", threshold=0, severity="warning"),
              rule("rows", metric="rowCount", operator="mustBeGreaterThan", threshold=0))
    assert not res["bad"].passed and res["bad"].observed is None and res["bad"].severity == "warning"
    assert detail in res["bad"].detail and "\n" not in res["bad"].detail
    assert res["rows"].passed


def test_a_rule_on_a_column_the_data_lacks_fails_with_a_detail():
    res = run(rule("ghost", metric="nullValues", column="ghost", operator="mustBe", threshold=0))
    assert not res["ghost"].passed and "ghost" in res["ghost"].detail


def test_text_and_custom_rules_are_skipped():
    res = run(rule("prose", type="text"), rule("vendor", type="custom"))
    for name in ("prose", "vendor"):
        assert res[name].skipped and res[name].passed and res[name].severity == "info"
        assert res[name].detail.startswith("skipped")


def test_freshness_is_the_source_files_age(tmp_path):
    shutil.copy(DATA / "charite.parquet", tmp_path / "charite.parquet")
    mtime = 1_700_000_000
    os.utime(tmp_path / "charite.parquet", (mtime, mtime))
    day = PlanSla(freshness_s=86400, freshness="1d")
    fresh = check_product(None, product(sla=day), None, tmp_path, now=mtime + 3600)[-1]
    assert (fresh.rule, fresh.observed, fresh.passed) == ("freshness", 3600, True)
    stale = check_product(None, product(), contract(sla=day), tmp_path, now=mtime + 2 * 86400)[-1]
    assert (stale.rule, stale.observed, stale.passed, stale.severity) == ("freshness", 172800, False, "error")
    assert stale.detail == "data is 2.0d old, SLA freshness is 1d"


def test_results_become_contract_checked_events():
    res = run(rule("rows", metric="rowCount", operator="mustBeBetween", threshold=[100, 300]))
    event = ContractChecked(product="charite.biopsies", domain="charite", contract="tumor-biopsy@1.0.0",
                            **res["rows"].event_fields())
    assert event.passed and event.observed == 259 and event.threshold == [100, 300]


def test_csv_sources_are_checked_too():
    res = run(rule("rows", metric="rowCount", operator="mustBe", threshold=164), prod=product("amsterdam-umc.csv"))
    assert res["rows"].passed


def test_a_missing_data_file_raises_one_line(tmp_path):
    with pytest.raises(UserError) as err:
        check_product(None, product(), None, tmp_path)
    assert err.value.render() == f"{tmp_path / 'charite.parquet'}: error: data file of product charite.biopsies not found"


def test_checks_see_raw_columns_but_return_only_numbers():
    con = duckdb.connect()
    results = check_product(con, product(), contract(
        rule("mrn", metric="duplicateValues", column="mrn", operator="mustBe", threshold=0)), DATA)
    mrns = {r[0] for r in duckdb.sql(f"SELECT mrn FROM '{DATA / 'charite.parquet'}'").fetchall()}
    for r in results:
        assert r.observed is None or isinstance(r.observed, float)
        assert not any(m in r.detail for m in mrns)
