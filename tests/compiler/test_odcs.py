"""ODCS v3 export and import: the official JSON Schema, round trips, official examples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import open_data_contract_standard
import pytest
import yaml
from click.testing import CliRunner, Result
from compiler_util import ROOT, ROOT_MESH

from meshctl.cli import main
from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.odcs import dump, export_contract, import_contract
from meshctl.compiler.spec import Contract

SCHEMA = json.loads((ROOT / "tests" / "fixtures" / "odcs" / "odcs-json-schema-v3.1.0.json")
                    .read_text())
"""The official ODCS v3.1.0 JSON Schema (bitol-io/open-data-contract-standard, Apache-2.0)."""
SCHEMA_V320 = json.loads((Path(open_data_contract_standard.__file__).parent / "schema.json")
                         .read_text())
"""v3.2.0 (in progress upstream), as the `open-data-contract-standard` package ships it."""
OFFICIAL = sorted((ROOT / "tests" / "fixtures" / "odcs").glob("*.odcs.yaml"))

RICH = {
    "name": "tumor-biopsy", "version": "2.1.0", "description": "Nucleus measurements.",
    "purposes": ["cancer-research", "teaching"],
    "columns": [
        {"name": "radius_mean", "type": "float", "range": [0, 50], "description": "mean radius"},
        {"name": "age", "type": "int", "required": False},
        {"name": "birth", "type": "date", "pii": "indirect", "masking": "generalize",
         "generalize": "year"},
        {"name": "mrn", "type": "string", "pii": "direct"},
        {"name": "seen", "type": "timestamp"}, {"name": "smoker", "type": "bool"},
        {"name": "diagnosis", "type": "category", "values": ["benign", "malignant"]},
    ],
    "quality": [
        {"column": "radius_mean", "metric": "nullValues", "unit": "percent",
         "mustBeLessThan": 1},
        {"column": "radius_mean", "metric": "invalidValues", "validRange": [0, 50],
         "mustBe": 0, "severity": "warning", "dimension": "accuracy"},
        {"column": "diagnosis", "metric": "invalidValues",
         "validValues": ["benign", "malignant"], "mustBe": 0},
        {"column": "mrn", "metric": "missingValues", "missingValues": ["", "n/a"],
         "mustBeLessOrEqualTo": 5, "dimension": "house-rules"},
        {"metric": "rowCount", "mustBeBetween": [100, 100000], "name": "volume"},
        {"metric": "duplicateValues", "mustBe": 0, "severity": "info"},
        {"type": "sql", "query": "SELECT count(*) FROM {object} WHERE age < 0", "mustBe": 0,
         "description": "no negative ages"},
    ],
    "sla": {"freshness": "7d", "retention": "5y", "availability": "99.5%"},
}
"""A contract that uses every field meshctl exports (quality grouped by column, as exported)."""


def validate(doc: dict) -> None:
    jsonschema.validate(doc, SCHEMA, cls=jsonschema.Draft201909Validator)


def roundtrip(contract: Contract) -> tuple[str, Contract, list[str]]:
    text = dump(export_contract(contract, "restricted"))
    imported = import_contract(yaml.safe_load(text), classification="restricted")
    return text, Contract.model_validate(imported.contract), imported.dropped


def by_column(contract: Contract) -> list[dict]:
    """Quality rules in export order: per column in column order, then table rules."""
    order = [c.name for c in contract.columns] + [None]
    return sorted((r.model_dump() for r in contract.quality), key=lambda r: order.index(
        r["column"]))


def test_root_contract_exports_valid_odcs_and_round_trips() -> None:
    spec = compile_mesh(ROOT_MESH).spec
    contract = spec.contracts[0]
    text, back, dropped = roundtrip(contract)
    validate(yaml.safe_load(text))
    assert back.model_dump() == contract.model_dump() and dropped == []
    assert dump(export_contract(back, "restricted")) == text


def test_rich_contract_round_trips_losslessly() -> None:
    contract = Contract.model_validate(RICH)
    text, back, dropped = roundtrip(contract)
    doc = yaml.safe_load(text)
    validate(doc)
    assert dropped == []
    assert back.model_dump(exclude={"quality"}) == contract.model_dump(exclude={"quality"})
    assert [r.model_dump() for r in back.quality] == by_column(contract)
    assert dump(export_contract(back, "restricted")) == text
    # the shape other ODCS tools read
    assert doc["apiVersion"] == "v3.1.0" and doc["kind"] == "DataContract"
    assert doc["description"] == {"purpose": "Nucleus measurements."}
    props = {p["name"]: p for p in doc["schema"][0]["properties"]}
    assert props["radius_mean"]["logicalTypeOptions"] == {"minimum": 0, "maximum": 50}
    assert props["diagnosis"]["quality"][0] == {
        "name": "values(diagnosis)", "type": "library", "metric": "invalidValues",
        "arguments": {"validValues": ["benign", "malignant"]}, "mustBe": 0, "unit": "rows",
        "severity": "error"}  # v3.1.0 has no `enum`: the values are what ODCS checks
    assert {"property": "optional", "value": True} in props["age"]["customProperties"]
    assert "required" not in props["age"] and props["age"]["logicalType"] == "integer"
    assert {"property": "pii", "value": "direct"} in props["mrn"]["customProperties"]
    assert props["mrn"]["classification"] == "restricted"
    assert {"property": "latency", "value": 7, "unit": "d"} in doc["slaProperties"]
    assert doc["customProperties"] == [{"property": "purposes",
                                        "value": ["cancer-research", "teaching"]}]


@pytest.mark.parametrize("path", OFFICIAL, ids=[p.name for p in OFFICIAL])
def test_official_examples_import_and_round_trip(path: Path) -> None:
    imported = import_contract(yaml.safe_load(path.read_text()), name="imported")
    contract = Contract.model_validate(imported.contract)
    doc = yaml.safe_load(path.read_text())
    assert contract.columns or not doc["schema"], "every example with a schema has columns"
    assert imported.dropped, "every example has something meshctl cannot express"
    text, back, dropped = roundtrip(contract)
    validate(yaml.safe_load(text))
    assert back.model_dump() == contract.model_dump() and dropped == []


def test_official_full_example_reports_each_dropped_field() -> None:
    doc = yaml.safe_load((ROOT / "tests/fixtures/odcs/full-example.odcs.yaml").read_text())
    imported = import_contract(doc, name="seller")
    dropped = imported.dropped
    for where in ("servers", "team", "roles", "price", "support", "tenant",
                  "description.usage", "schema[0].properties[1].primaryKey",
                  "schema[0].properties[0].businessName", "slaProperties[1]",
                  "schema[0].properties[2].quality[0]"):
        assert any(line.startswith(f"{where}: ") for line in dropped), where
    assert imported.contract["sla"] == {"freshness": "4d", "retention": "3y"}
    assert [c["type"] for c in imported.contract["columns"]] == ["date", "string", "string"]
    # ODCS defaults (primaryKey: false, primaryKeyPosition: -1, tags: []) carry nothing
    assert not any(line.startswith(("schema[0].properties[0].primaryKey",
                                    "schema[0].properties[0].tags")) for line in dropped)


@pytest.mark.parametrize(("doc", "message"), [
    ({"kind": "DataContract", "apiVersion": "v2.2.2", "version": "1.0.0", "id": "x"},
     "only ODCS v3 is supported"),
    ({"apiVersion": "v3.0.0", "version": "1.0.0", "id": "x"}, "not an ODCS data contract"),
    ({"kind": "DataContract", "apiVersion": "v3.1.0", "version": "1.0", "id": "x"},
     "is not semantic"),
])
def test_import_refuses_what_is_not_a_v3_contract(doc: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        import_contract(doc)


# -- the CLI ---------------------------------------------------------------------------------


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    shutil.copy(ROOT_MESH, tmp_path / "mesh.yaml")
    shutil.copytree(ROOT / "examples" / "hospitals" / "data",
                    tmp_path / "examples" / "hospitals" / "data")
    return tmp_path / "mesh.yaml"


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_cli_export_to_file_and_stdout(mesh: Path, tmp_path: Path) -> None:
    out = tmp_path / "tb.odcs.yaml"
    result = cli("contract", "export", "tumor-biopsy@1", "--mesh", str(mesh), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {out} (odcs tumor-biopsy 1.0.0)"
    validate(yaml.safe_load(out.read_text()))
    stdout = cli("contract", "export", "tumor-biopsy", "--mesh", str(mesh))
    assert stdout.stdout == out.read_text()


def test_cli_export_unknown_contract_is_one_line(mesh: Path) -> None:
    result = cli("contract", "export", "tumor-biopsi", "--mesh", str(mesh))
    assert result.exit_code == 1
    assert result.output.strip() == (f"{mesh}: error: unknown contract 'tumor-biopsi' "
                                     "(did you mean 'tumor-biopsy'?)")


def test_cli_import_keeps_every_other_byte(mesh: Path) -> None:
    before = mesh.read_text()
    official = ROOT / "tests/fixtures/odcs/enum.odcs.yaml"
    result = cli("contract", "import", str(official), "--mesh", str(mesh))
    assert result.exit_code == 0, result.output
    after = mesh.read_text()
    at = before.index("\npolicies:")  # the new contract goes after the last one
    assert after.startswith(before[:at]) and after.endswith(before[at:])
    assert "  - name: orders_with_enums\n    version: 1.0.0\n" in after
    assert "# An oncology research network" in after and "&biopsy-columns" in after
    assert "mesh.yaml: added contract orders_with_enums 1.0.0 (4 columns" in result.stdout
    warnings = [ln for ln in result.stderr.splitlines() if "warning: dropped" in ln]
    assert "; 30 ODCS fields dropped)" in result.stdout  # told in one summary line:
    assert warnings == [(f"{official}: warning: dropped 30 fields meshctl does not use: id, "
                         "description (4), physicalType (4), primaryKey, primaryKeyPosition, "
                         "label (11), tags (4), authoritativeDefinitions, logicalType, "
                         "customProperties (2)")]
    assert cli("validate", str(mesh)).exit_code == 0
    spec = compile_mesh(mesh).spec
    assert [c.name for c in spec.contracts] == ["tumor-biopsy", "orders_with_enums"]


def test_cli_import_refuses_a_duplicate_and_replaces_on_request(mesh: Path,
                                                                tmp_path: Path) -> None:
    odcs = tmp_path / "tb.odcs.yaml"
    cli("contract", "export", "tumor-biopsy", "--mesh", str(mesh), "-o", str(odcs))
    before = mesh.read_text()
    dup = cli("contract", "import", str(odcs), "--mesh", str(mesh))
    assert dup.exit_code == 1 and mesh.read_text() == before
    assert dup.output.strip() == (f"{mesh}: error: contract 'tumor-biopsy@1' already exists "
                                  "(version 1.0.0) (hint: pass --replace to replace it, or bump "
                                  "the major version)")
    doc = yaml.safe_load(odcs.read_text())
    doc["version"] = "1.1.0"
    doc["schema"][0]["properties"][0]["description"] = "mean nucleus radius"
    odcs.write_text(dump(doc))
    replaced = cli("contract", "import", str(odcs), "--mesh", str(mesh), "--replace")
    assert replaced.exit_code == 0, replaced.output
    assert "replaced contract tumor-biopsy 1.1.0" in replaced.stdout
    after = mesh.read_text()
    head, tail = before.split("contracts:\n")[0], before.split("\npolicies:")[1]
    assert after.startswith(head) and after.endswith(tail)
    assert "{name: radius_mean, type: float, description: mean nucleus radius}" in after
    assert compile_mesh(mesh).spec.contracts[0].version == "1.1.0"


def test_cli_import_errors_are_one_line(mesh: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.odcs.yaml"
    bad.write_text("kind: DataContract\napiVersion: v3.1.0\nversion: [1\n")
    result = cli("contract", "import", str(bad), "--mesh", str(mesh))
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(f"{bad}:") and "not YAML" in result.output
    bad.write_text("kind: DataContract\napiVersion: v2.2.2\nversion: 1.0.0\nid: x\n")
    result = cli("contract", "import", str(bad), "--mesh", str(mesh))
    assert result.output.strip() == (f"{bad}: error: apiVersion v2.2.2: only ODCS v3 is "
                                     "supported")
