"""What `contract test` checks beyond the quality rules: declared columns, and duplicateValues
counted as ODCS and datacontract-cli count them (issue 11, "Contracts")."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import duckdb
import pytest
import yaml

from meshctl.compiler.plan import PlanColumn, PlanContract, PlanProduct, PlanQualityRule
from meshctl.runtime.quality import check_product

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "hospitals" / "data"

PEER_DUPLICATES = {"radius_mean": 24, "texture_mean": 21, "symmetry_mean": 28, "patient_name": 26}
"""datacontract-cli 1.2.8's duplicate_count on charite.parquet, from
`datacontract test dup.odcs.yaml --output-format json` with one
`{metric: duplicateValues, mustBe: 0}` per property (physicalType double, so the peer does not
round the numbers into a DECIMAL first). meshctl counted 27, 22, 32 and 28 before."""


def csv_product(tmp: Path, text: str, *cols: PlanColumn) -> PlanProduct:
    (tmp / "t.csv").write_text(text)
    return PlanProduct(id="d.t", domain="d", name="t", source="t.csv", format="csv", columns=list(cols))


def dup_rule(name: str, column: str = "", unit: str = "rows") -> PlanQualityRule:
    return PlanQualityRule(name=name, metric="duplicateValues", column=column, unit=unit,
                           operator="mustBe", threshold=0)


def by_rule(results: list) -> dict:
    return {r.rule: r for r in results}


# -- duplicateValues ---------------------------------------------------------------------


def test_duplicate_values_count_the_values_that_repeat(tmp_path: Path) -> None:
    # Prepare: 1 three times, 2 twice, 3 once, NULL twice (NULLs are never duplicates);
    # the whole row (x, y) repeats for (1, a) only
    prod = csv_product(tmp_path, "x,y\n1,a\n1,a\n1,b\n2,c\n2,d\n3,e\n,f\n,g\n",
                       PlanColumn(name="x", type="int"), PlanColumn(name="y", type="string"))
    contract = PlanContract(id="c@1.0.0", name="c", version="1.0.0", quality=[
        dup_rule("x"), dup_rule("x%", "x", "percent"), dup_rule("x-col", "x"), dup_rule("rows")])
    # Execute
    res = by_rule(check_product(None, prod, contract, tmp_path))
    # Assert: two values (1 and 2) repeat; non-null minus distinct would say 3
    assert res["x-col"].observed == 2 and not res["x-col"].passed
    assert res["x%"].observed == pytest.approx(100 * 2 / 8)
    assert res["rows"].observed == 1


def test_duplicate_values_on_charite_equal_the_peers() -> None:
    prod = PlanProduct(id="charite.biopsies", domain="charite", name="biopsies",
                       source="charite.parquet", format="parquet", columns=[])
    contract = PlanContract(id="c@1.0.0", name="c", version="1.0.0",
                            quality=[dup_rule(c, c) for c in PEER_DUPLICATES])
    res = by_rule(check_product(None, prod, contract, DATA))
    assert {c: res[c].observed for c in PEER_DUPLICATES} == PEER_DUPLICATES


PEER = Path(os.environ.get("MESHCTL_DATACONTRACT", "/tmp/dcc/bin/datacontract"))


@pytest.mark.skipif(not PEER.is_file(), reason="datacontract-cli not installed (MESHCTL_DATACONTRACT)")
def test_duplicate_values_equal_datacontract_cli_on_every_column(tmp_path: Path) -> None:
    """Runs the peer itself on the same file (about 5 s) when it is installed."""
    import json

    shutil.copy(DATA / "charite.parquet", tmp_path / "charite.parquet")
    cols = [r[0] for r in duckdb.sql(f"DESCRIBE SELECT * FROM '{tmp_path / 'charite.parquet'}'").fetchall()]
    props = [{"name": c, "logicalType": "string", "physicalType": "varchar",
              "quality": [{"metric": "duplicateValues", "mustBe": 0}]} for c in cols]
    for p in props:  # the peer casts to the declared type: keep each column's own type
        kind = duckdb.sql(f"SELECT typeof({p['name']}) FROM '{tmp_path / 'charite.parquet'}' "
                          "LIMIT 1").fetchall()[0][0]
        p["logicalType"], p["physicalType"] = {"DOUBLE": ("number", "double"),
                                               "DATE": ("date", "date")}.get(kind, ("string", "varchar"))
    doc = {"apiVersion": "v3.1.0", "kind": "DataContract", "id": "dup", "version": "1.0.0",
           "status": "active", "servers": [{"server": "local", "type": "local",
                                            "path": "./charite.parquet", "format": "parquet"}],
           "schema": [{"name": "charite", "physicalType": "table", "properties": props}]}
    (tmp_path / "dup.odcs.yaml").write_text(yaml.safe_dump(doc))
    subprocess.run([str(PEER), "test", "dup.odcs.yaml", "--output-format", "json", "--output",
                    "out.json"], cwd=tmp_path, capture_output=True, timeout=300, check=False)
    peer = {c["field"]: c["diagnostics"]["value"] for c in json.loads(
        (tmp_path / "out.json").read_text())["checks"] if c["key"].endswith("duplicate_values")}
    prod = PlanProduct(id="charite.biopsies", domain="charite", name="biopsies",
                       source="charite.parquet", format="parquet", columns=[])
    contract = PlanContract(id="c@1.0.0", name="c", version="1.0.0",
                            quality=[dup_rule(c, c) for c in cols])
    ours = {r.rule: r.observed for r in check_product(None, prod, contract, tmp_path)}
    assert len(peer) == len(cols)
    assert {c: ours[c] for c in cols} == peer


# -- declared columns ----------------------------------------------------------------------


def test_a_float_column_holding_text_fails_its_type_check(tmp_path: Path) -> None:
    prod = csv_product(tmp_path, "perimeter_mean,diagnosis\n1.5,benign\nn/a,malignant\n,benign\n",
                       PlanColumn(name="perimeter_mean", type="float"),
                       PlanColumn(name="diagnosis", type="category", values=["benign", "malignant"]))
    res = by_rule(check_product(None, prod, None, tmp_path))
    bad = res["type(perimeter_mean)"]
    assert (bad.observed, bad.passed, bad.severity, bad.blocking) == (1, False, "error", True)
    assert bad.detail == "1 value of perimeter_mean is not float (its declared type)"
    assert "n/a" not in bad.detail
    assert res["type(diagnosis)"].passed


@pytest.mark.parametrize(("kind", "values", "bad"), [
    ("int", "1\n2\n1.5\nx\n", 2), ("int", "1\n-2\n\n", 0), ("bool", "true\nfalse\nmaybe\n", 1),
    ("date", "2024-01-31\n2024-02-30\n", 1), ("timestamp", "2024-01-31 10:00:00\nnoon\n", 1),
    ("float", "1e3\n-0.5\n", 0), ("string", "x\n1\n", 0)])
def test_type_checks_count_values_that_do_not_convert(tmp_path: Path, kind: str, values: str,
                                                      bad: int) -> None:
    prod = csv_product(tmp_path, "v\n" + values, PlanColumn(name="v", type=kind))
    check = by_rule(check_product(None, prod, None, tmp_path))["type(v)"]
    assert (check.observed, check.passed) == (bad, bad == 0)


def test_a_declared_column_the_data_lacks_fails(tmp_path: Path) -> None:
    prod = csv_product(tmp_path, "a\n1\n", PlanColumn(name="a", type="int"),
                       PlanColumn(name="gone", type="float"))
    contract = PlanContract(id="c@1.0.0", name="c", version="1.0.0",
                            columns=[PlanColumn(name="a", type="float")])
    res = by_rule(check_product(None, prod, contract, tmp_path))
    gone = res["type(gone)"]
    assert (gone.observed, gone.passed, gone.detail) == (None, False, "declared column gone is not in the data")
    assert res["type(a)"].passed  # the contract's type (float) is what is checked


def test_an_optional_contract_column_is_checked_only_when_present(tmp_path: Path) -> None:
    prod = csv_product(tmp_path, "a,extra\n1,x\n", PlanColumn(name="a", type="int"))
    contract = PlanContract(id="c@1.0.0", name="c", version="1.0.0", columns=[
        PlanColumn(name="a", type="int"), PlanColumn(name="extra", type="float"),
        PlanColumn(name="later", type="float")])
    res = by_rule(check_product(None, prod, contract, tmp_path))
    assert res["type(extra)"].observed == 1 and not res["type(extra)"].passed
    assert "type(later)" not in res
