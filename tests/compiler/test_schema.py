"""`meshctl schema` (issue 11, "mesh.yaml JSON Schema"): the editor's schema and the compiler agree.

Every mesh that compiles validates against the schema, read as an editor reads it
(yaml-language-server: YAML 1.2, dates as strings), with the `jsonschema` validator of the
draft the schema declares. Every schema-stage (MESH2xx) invalid fixture is rejected, and
at the places the compiler reports, except those listed in CANNOT_EXPRESS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from jsonschema import Draft202012Validator, validators
from ruamel.yaml import YAML

from meshctl.cli import main
from meshctl.compiler.compile import compile_bytes, compile_mesh
from meshctl.compiler.loader import load_text
from meshctl.compiler.schema import DRAFT, SCHEMA_ID, mesh_json_schema

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "tests" / "fixtures" / "specs"
VALID = [*sorted(SPECS.glob("valid/*.yaml")), ROOT / "mesh.yaml",
         *sorted(ROOT.glob("examples/**/mesh.yaml"))]
INVALID = sorted(SPECS.glob("invalid/*.yaml"))

CANNOT_EXPRESS = {
    "range_inverted": "MESH209 compares a column range's low with its high; JSON Schema "
                      "constrains each value on its own and cannot compare two of them",
    "metric_range_empty": "MESH209 compares a metric range's low with its high (low < high); "
                          "no JSON Schema keyword compares two values",
}
"""Schema-stage invalid fixtures the schema accepts, and why it cannot reject them."""

KEY = "51Y>.o(f[h4+!N/bYujaZm(2rloCE&ISi6t<kmJL"  # a CurveZMQ public key (zmq.curve_keypair)

EDGES = f"""\
apiVersion: meshctl/v1
mesh:
  name: edges
  coordinator: {{address: "tcp://[::1]:0", public_key: "{KEY}"}}
domains:
  - {{name: a, address: "tcp://a.example:7701", public_key: "{KEY}"}}
  - {{name: b, address: tcp://b.example, public_key: "{KEY}"}}
  - {{name: c, address: "tcp://10.0.0.3:65535", public_key: "{KEY}"}}
  - {{name: d, address: "tcp://*:00080", public_key: "{KEY}"}}
products:
  - name: visits
    domain: a
    source: data/visits.CSV
    contract: visit@2
    sla: {{freshness: 1.5d, retention: 5y, availability: 100%}}
    columns: &cols
      - {{name: who, type: string, pii: direct}}
      - {{name: zip, type: string, pii: indirect, masking: generalize, generalize: "prefix:3"}}
      - {{name: born, type: date, pii: indirect, masking: generalize, generalize: month}}
      - {{name: seen, type: timestamp, pii: indirect, masking: hash}}
      - {{name: income, type: int, pii: indirect, masking: generalize, generalize: "bucket:1000"}}
      - {{name: weight, type: float, pii: indirect, masking: generalize, generalize: "bucket:.5"}}
      - {{name: age, type: int, range: [0, 120]}}
      - {{name: bmi, type: float, range: [10, 60]}}
      - {{name: smoker, type: bool, pii: indirect, masking: drop}}
      - {{name: stage, type: category, values: [1, 2, 3]}}
      - {{name: flag, type: category, values: [true, false]}}
  - {{name: visits, domain: b, source: "sqlite:data/b.db", table: visits, contract: visit@2,
      columns: *cols}}
  - {{name: visits, domain: c, source: "postgresql://me@db.example:5432/clinic",
      table: public.visits, contract: visit@2, columns: *cols, access: request}}
  - {{name: archive, domain: d, source: "duckdb:data/c.duckdb", table: visits, contract: visit@2,
      columns: *cols}}
contracts:
  - name: visit
    version: 2.1.0
    purposes: [research]
    sla: {{freshness: 30m}}
    columns:
      - {{name: age, type: int, range: [0, 120]}}
      - {{name: bmi, type: float, required: false, range: [10, 60]}}
      - {{name: stage, type: category, values: [1, 2, 3]}}
    quality:
      - {{metric: rowCount, mustBeBetween: [10, 100000]}}
      - {{column: age, metric: nullValues, unit: percent, mustBeLessThan: 1}}
      - {{column: age, metric: invalidValues, validRange: [0, 120], mustBe: 0, severity: warning}}
      - {{column: stage, metric: invalidValues, validValues: [1, 2, 3], mustBe: 0}}
      - {{column: stage, metric: missingValues, missingValues: [null, ''], mustBe: 0}}
      - {{column: age, metric: duplicateValues, mustBeLessOrEqualTo: 1000}}
      - {{type: sql, column: age, mustBe: 0,
          query: "SELECT count(*) FROM {{object}} WHERE {{property}} < 0"}}
      - {{type: text, description: reviewed yearly}}
models:
  - name: staging
    purpose: research
    inputs: {{contract: visit, features: [age, bmi], target: stage}}
    participants: [a, b, c]
    architecture: {{hidden: [16]}}
    training: {{rounds: 3, lr: 0.1}}
    aggregation: {{strategy: fedprox, mu: 0.1}}
    privacy: {{secure_aggregation: true, dp: {{epsilon: 8, delta: 1e-5, clip: 1.0}}}}
analyses:
  - name: ages
    purpose: research
    inputs: {{contract: visit}}
    group_by: [stage]
    metrics: [count(age), "sum(age)", mean( bmi ), "variance(age)", "histogram(age, bins: 12)",
              "histogram(bmi, bins: 5, range: [10, 40])", "quantile(age, 0.25, 0.5)",
              {{fn: quantile, column: bmi, q: [0.9]}}]
grants:
  - {{product: c.visits, model: staging, purpose: research, until: 2027-01-31}}
  - {{product: c.visits, analysis: ages, purpose: research}}
"""
"""A mesh that compiles and uses the forms the schema must not flag: category values that are
numbers or bools, metric calls, every source kind, remote domains, masking forms, quality rules."""


def _as_editor_reads(text: str) -> Any:
    """The document as yaml-language-server sees it: YAML 1.2, then JSON (dates as strings)."""
    return json.loads(json.dumps(YAML(typ="safe", pure=True).load(text), default=str))


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    schema = json.loads(CliRunner().invoke(main, ["schema"]).stdout)
    cls = validators.validator_for(schema, default=None)
    assert cls is Draft202012Validator  # the draft the schema declares, and the one we check with
    cls.check_schema(schema)
    return cls(schema)


def test_schema_declares_its_draft_and_id() -> None:
    schema = mesh_json_schema()
    assert (schema["$schema"], schema["$id"]) == (DRAFT, SCHEMA_ID)
    assert schema == mesh_json_schema()  # pure: the same schema every time
    assert list(schema)[:2] == ["$schema", "$id"]


@pytest.mark.parametrize("path", VALID, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_valid_mesh_validates(path: Path, validator: Draft202012Validator) -> None:
    assert compile_mesh(path).errors == []
    errors = [(list(e.absolute_path), e.message) for e in validator.iter_errors(
        _as_editor_reads(path.read_text()))]
    assert errors == []


def test_the_edge_forms_compile_and_validate(
        tmp_path: Path, validator: Draft202012Validator) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "visits.CSV").write_text("who,age\n")
    result = compile_bytes(EDGES.encode(), tmp_path / "mesh.yaml")
    assert [d.where + " " + d.message for d in result.errors] == []
    data = _as_editor_reads(EDGES)
    errors = [(list(e.absolute_path), e.message) for e in validator.iter_errors(data)]
    assert errors == []


def _lines(entry: Any) -> set[int]:
    """1-based lines of a SourceMap entry's key, value and everything below it."""
    key, value, tree = entry
    out = {m.line + 1 for m in (key, value) if m is not None}
    children = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list) else []
    for child in children:
        out |= _lines(child)
    return out


def _lines_at(root: Any, path: list[Any]) -> set[int]:
    entry = root
    for step in path:
        tree = entry[2]
        entry = tree.get(step) if isinstance(tree, dict) else tree[step]
    return _lines(entry)


def _schema_stage(path: Path) -> bool:
    return "error[MESH2" in path.with_suffix(".expected.txt").read_text()


@pytest.mark.parametrize("path", [p for p in INVALID if _schema_stage(p)], ids=lambda p: p.stem)
def test_schema_stage_invalid_fixtures_are_rejected_where_the_compiler_says(
        path: Path, validator: Draft202012Validator) -> None:
    text = path.read_text()
    errors = list(validator.iter_errors(_as_editor_reads(text)))
    if path.stem in CANNOT_EXPRESS:
        assert errors == [], f"the schema now rejects {path.stem}: drop it from CANNOT_EXPRESS"
        return
    assert errors, f"the schema accepts {path.stem}"
    source, _ = load_text(text, path.name)
    assert source is not None
    flagged = [_lines_at(source.map.root, list(e.absolute_path)) for e in errors]
    diags = [d for d in compile_mesh(path).diagnostics if d.severity == "error"]
    schema_stage = [d for d in diags if d.code.startswith("MESH2")]
    # every schema-stage diagnostic lies within a part the schema flags ...
    missed = [d.where for d in schema_stage if not any(d.line in lines for lines in flagged)]
    assert missed == []
    # ... and every part the schema flags holds some error of the compiler (nothing spurious)
    spurious = [list(e.absolute_path) for e, lines in zip(errors, flagged, strict=True)
                if not any(d.line in lines for d in diags)]
    assert spurious == []


@pytest.mark.parametrize("path", [p for p in INVALID if not _schema_stage(p)], ids=lambda p: p.stem)
def test_later_stage_invalid_fixtures_are_not_flagged_in_their_valid_parts(
        path: Path, validator: Draft202012Validator) -> None:
    """A fixture that fails after the schema stage (references, policy, plan) may be schema-valid;
    where the schema does flag it, it flags a place the compiler reports too."""
    text = path.read_text()
    try:
        data = _as_editor_reads(text)
    except Exception:  # noqa: BLE001 - a syntax-stage fixture (MESH1xx) an editor cannot read either
        pytest.skip("not YAML an editor reads")
    source, _ = load_text(text, path.name)
    if source is None:
        pytest.skip("not YAML meshctl reads")
    diags = [d for d in compile_mesh(path).diagnostics if d.severity == "error"]
    flagged = [(list(e.absolute_path), _lines_at(source.map.root, list(e.absolute_path)))
               for e in validator.iter_errors(data)]
    spurious = [path for path, lines in flagged if not any(d.line in lines for d in diags)]
    assert spurious == []
