"""ODCS import and export keep ODCS's meaning (issue 11, "Contracts" and "ODCS").

Export: `apiVersion: v3.1.0` (the newest approved version), valid against the official
v3.1.0 JSON Schema; `required` means not null; `validRange` (not an ODCS argument) becomes an
ODCS sql rule that counts the same rows; the schema object keeps its name. Import: lenient
per field (ODCS unit spellings, ISO-8601 durations, `95%` with unit `%`, `500ms`, custom
properties, `validValues` with null): what meshctl cannot express is dropped, with warnings
summarised, and the contract imports.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import duckdb
import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from compiler_util import ROOT, ROOT_MESH
from test_odcs import RICH, SCHEMA

from meshctl.cli import main
from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.odcs import dump, export_contract, import_contract, summarize
from meshctl.compiler.plan import PlanContract, PlanProduct, PlanQualityRule
from meshctl.compiler.spec import Contract
from meshctl.runtime.quality import check_product

DATA = ROOT / "examples" / "hospitals" / "data"
VALIDATOR = jsonschema.Draft201909Validator(SCHEMA)


def odcs(**over: Any) -> dict[str, Any]:
    """A small valid ODCS v3.1.0 document; `over` replaces top-level keys."""
    doc: dict[str, Any] = {
        "apiVersion": "v3.1.0", "kind": "DataContract", "id": "orders", "name": "orders",
        "version": "1.0.0", "status": "active",
        "schema": [{"name": "orders_tbl", "logicalType": "object", "properties": [
            {"name": "order_id", "logicalType": "string", "required": True},
            {"name": "amount", "logicalType": "number"}]}]}
    doc.update(over)
    assert not list(VALIDATOR.iter_errors(doc)), "the test document is valid ODCS"
    return doc


def errors(doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:120]}"
            for e in VALIDATOR.iter_errors(doc)]


# -- export --------------------------------------------------------------------------------


def exported_examples() -> list[tuple[str, Contract]]:
    """Every contract the repository holds: meshes, the rich contract, the official examples."""
    out = [("rich", Contract.model_validate(RICH))]
    for mesh in [ROOT_MESH, *sorted((ROOT / "examples").glob("*/mesh.yaml")),
                 *sorted((ROOT / "tests" / "fixtures" / "specs" / "valid").glob("*.yaml"))]:
        spec = compile_mesh(mesh).spec
        out += [(f"{mesh.parent.name}/{mesh.name}:{c.name}", c) for c in (spec.contracts if spec else [])]
    for path in sorted((ROOT / "tests" / "fixtures" / "odcs").glob("*.odcs.yaml")):
        contract = import_contract(yaml.safe_load(path.read_text()), name="imported").contract
        out.append((path.name, Contract.model_validate(contract)))
    return out


EXAMPLES = exported_examples()


@pytest.mark.parametrize(("label", "contract"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_every_export_is_valid_odcs_v3_1_0(label: str, contract: Contract) -> None:
    doc = yaml.safe_load(dump(export_contract(contract, "restricted")))
    assert doc["apiVersion"] == "v3.1.0"
    assert errors(doc) == []
    assert "validRange" not in {k for r in _rules(doc) for k in r.get("arguments", {})}


def test_the_examples_cover_ranges_required_categories_and_optional_columns() -> None:
    """The parametrised export test above is only as strong as what its examples use."""
    docs = [export_contract(c) for _, c in EXAMPLES]
    props = [p for d in docs for o in d["schema"] for p in o["properties"]]
    assert len(EXAMPLES) >= 12
    assert any(p.get("required") for p in props)
    assert any("logicalTypeOptions" in p for p in props)
    assert any(cp["property"] == "values" for p in props for cp in p.get("customProperties", []))
    assert any(cp["property"] == "optional" for p in props for cp in p.get("customProperties", []))
    assert any(r["type"] == "sql" and any(cp["property"] == "meshctl" for cp in r.get(
        "customProperties", [])) for d in docs for r in _rules(d))


def _rules(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for o in doc["schema"] for r in [*o.get("quality", []), *(
        q for p in o["properties"] for q in p.get("quality", []))]]


def test_required_means_not_null_in_both_directions() -> None:
    contract = Contract.model_validate({
        "name": "c", "version": "1.0.0",
        "columns": [{"name": "a", "type": "string"}, {"name": "b", "type": "float"},
                    {"name": "c", "type": "int", "required": False}],
        "quality": [{"column": "a", "metric": "nullValues", "mustBe": 0},
                    {"column": "b", "metric": "nullValues", "unit": "percent", "mustBeLessThan": 5}]})
    props = {p["name"]: p for p in export_contract(contract)["schema"][0]["properties"]}
    assert props["a"]["required"] is True  # never null: that is what ODCS `required` says
    assert "required" not in props["b"] and "required" not in props["c"]  # nulls allowed
    back = import_contract(export_contract(contract))
    assert Contract.model_validate(back.contract) == contract and back.dropped == []
    # a foreign document: `required: true` is a not-null rule; a column without it is still
    # a column of the table (meshctl's `required: false` means "may be absent")
    imported = import_contract(odcs()).contract
    assert imported["quality"] == [{"column": "order_id", "metric": "nullValues", "mustBe": 0}]
    assert all("required" not in c for c in imported["columns"])


def test_a_valid_range_exports_as_sql_that_counts_what_meshctl_counts(tmp_path: Path) -> None:
    rules = [{"column": "radius_mean", "metric": "invalidValues", "validRange": [10, 20],
              "mustBeLessOrEqualTo": 50, "name": "in-range"},
             {"column": "radius_mean", "metric": "invalidValues", "validRange": [10, 20],
              "unit": "percent", "mustBeLessThan": 5, "name": "in-range%"}]
    contract = Contract.model_validate({"name": "c", "version": "1.0.0", "columns": [
        {"name": "radius_mean", "type": "float"}], "quality": rules})
    doc = export_contract(contract)
    sql = {r["name"]: r for r in doc["schema"][0]["properties"][0]["quality"]}
    assert {r["type"] for r in sql.values()} == {"sql"} and "validRange" not in dump(doc).split(
        "customProperties")[0]
    source = f"read_parquet('{DATA / 'charite.parquet'}')"
    odcs_counts = {n: duckdb.sql(r["query"].replace("{object}", source).replace(
        "{property}", "radius_mean")).fetchall()[0][0] for n, r in sql.items()}
    plan_rules = [PlanQualityRule(name=r["name"], column="radius_mean", metric="invalidValues",
                                  valid_range=r["validRange"], unit=r.get("unit", "rows"),
                                  operator="mustBe", threshold=0) for r in rules]
    product = PlanProduct(id="charite.b", domain="charite", name="b", source="charite.parquet",
                          format="parquet", columns=[])
    ours = {r.rule: r.observed for r in check_product(
        None, product, PlanContract(id="c@1", name="c", version="1.0.0", quality=plan_rules), DATA)}
    assert odcs_counts["in-range"] == ours["in-range"] > 0
    assert odcs_counts["in-range%"] == pytest.approx(ours["in-range%"])
    back = import_contract(doc)
    assert Contract.model_validate(back.contract) == contract and back.dropped == []


def test_the_schema_objects_name_is_kept() -> None:
    imported = import_contract(odcs()).contract
    assert imported["object_name"] == "orders_tbl"
    again = export_contract(Contract.model_validate(imported))
    assert again["schema"][0]["name"] == "orders_tbl" and again["name"] == "orders"
    plain = export_contract(Contract.model_validate({"name": "c", "version": "1.0.0"}))
    assert plain["schema"][0]["name"] == "c"


# -- import: lenient per field -------------------------------------------------------------


@pytest.mark.parametrize(("sla", "expected"), [
    ({"property": "latency", "value": 1, "unit": "day"}, {"freshness": "1d"}),
    ({"property": "latency", "value": 3, "unit": "days"}, {"freshness": "3d"}),
    ({"property": "retention", "value": "P1Y"}, {"retention": "1y"}),
    ({"property": "retention", "value": "P30D"}, {"retention": "30d"}),
    ({"property": "latency", "value": "PT1H30M"}, {"freshness": "90m"}),
    ({"property": "latency", "value": 500, "unit": "ms"}, {"freshness": "0.5s"}),
    ({"property": "latency", "value": "500ms"}, {"freshness": "0.5s"}),
    ({"property": "availability", "value": "95%", "unit": "%"}, {"availability": "95%"}),
    ({"property": "availability", "value": 99.9, "unit": "percent"}, {"availability": "99.9%"}),
    ({"property": "retention", "value": 2, "unit": "yr"}, {"retention": "2y"}),
])
def test_odcs_sla_spellings_import(sla: dict, expected: dict) -> None:
    imported = import_contract(odcs(slaProperties=[sla]))
    assert imported.contract["sla"] == expected and imported.dropped == []


@pytest.mark.parametrize("sla", [
    {"property": "retention", "value": "P1M"},  # a month has no fixed length
    {"property": "latency", "value": None},
    {"property": "availability", "value": 120, "unit": "%"},
    {"property": "latency", "value": 4, "unit": "fortnights"},
])
def test_an_sla_value_meshctl_cannot_read_is_dropped_not_fatal(sla: dict) -> None:
    imported = import_contract(odcs(slaProperties=[sla, {"property": "retention", "value": 3,
                                                           "unit": "y"}]))
    assert imported.contract["sla"] == {"retention": "3y"}
    assert len(imported.dropped) == 1 and imported.dropped[0].startswith("slaProperties[0]: ")


def test_rules_meshctl_cannot_run_are_dropped_one_line_each() -> None:
    doc = odcs()
    doc["schema"][0]["properties"][1]["quality"] = [
        {"metric": "invalidValues", "arguments": {"validValues": [1, None]}, "mustBe": 0},
        {"metric": "nullValues", "mustBe": 0, "mustBeLessThan": 3},  # two operators
        {"type": "sql", "query": "SELECT count(*) FROM {schema}.{table}", "mustBe": 0},
        {"type": "sql", "query": "SELECT count(*) FROM ${model} WHERE {field} < 0", "mustBe": 0},
    ]
    doc["customProperties"] = [{"property": "owner-slack", "value": "#orders"}]
    doc["schema"][0]["properties"][0]["customProperties"] = [{"property": "pii", "value": "True"}]
    imported = import_contract(doc)
    rules = [r for r in imported.contract["quality"] if r["column"] == "amount"]
    # null is never an invalid value (invalidValues counts non-null values): nothing is lost
    assert rules[0] == {"column": "amount", "metric": "invalidValues", "validValues": [1],
                        "mustBe": 0}
    # datacontract-cli reads {model} as {object} and {field} as {property}; so does meshctl
    assert rules[1]["query"] == "SELECT count(*) FROM ${object} WHERE {property} < 0"
    assert len(rules) == 2
    assert imported.contract["columns"][0]["pii"] == "direct"  # `True`, as the peer writes it
    where = [d.split(": ")[0] for d in imported.dropped]
    assert where == ["customProperties[0]", "schema[0].properties[1].quality[1]",
                     "schema[0].properties[1].quality[2]"]
    assert "exactly one operator" in imported.dropped[1]
    assert "unknown placeholder {schema}" in imported.dropped[2]


def test_warnings_are_summarised() -> None:
    dropped = ["servers: [...]", "schema[0].properties[0].primaryKey: true",
               "schema[0].properties[1].primaryKey: true", "schema[0].properties[2]: property 'x'",
               "schema[0].properties[1].quality[0]: library rule 'x' (...)", "team: {...}"]
    assert summarize(dropped) == ["schema[0].properties[2]: property 'x'",
                                  "schema[0].properties[1].quality[0]: library rule 'x' (...)",
                                  "4 fields meshctl does not use: servers, primaryKey (2), team"]
    many = [f"k{i}: 1" for i in range(12)]
    assert summarize(many, limit=10)[-1].endswith("k9, and 2 more")


def test_cli_import_verbose_lists_every_field(tmp_path: Path) -> None:
    shutil.copy(ROOT_MESH, tmp_path / "mesh.yaml")
    shutil.copytree(DATA, tmp_path / "examples" / "hospitals" / "data")
    official = ROOT / "tests/fixtures/odcs/full-example.odcs.yaml"
    runner = CliRunner()
    quiet = runner.invoke(main, ["contract", "import", str(official), "--mesh",
                                 str(tmp_path / "mesh.yaml"), "--name", "seller"])
    assert quiet.exit_code == 0, quiet.output
    shutil.copy(ROOT_MESH, tmp_path / "mesh.yaml")
    loud = runner.invoke(main, ["contract", "import", str(official), "--mesh",
                                str(tmp_path / "mesh.yaml"), "--name", "seller", "-v"])
    n = int(loud.stdout.split("; ")[1].split()[0])
    assert len(loud.stderr.splitlines()) == n > 3 * len(quiet.stderr.splitlines())
    assert all(ln.startswith(f"{official}: warning: dropped ") for ln in quiet.stderr.splitlines())
