"""Issue 12, features: category, string and tensor columns feed a model (docs/features.md).

The plan records each feature's kind and width and the model's input shape; what cannot
feed a model is refused with MESH503 or MESH520-MESH523.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from meshctl.cli import main
from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import Plan

COLUMNS = """
      - {name: age, type: int}
      - {name: color, type: category, values: [red, green, blue]}
      - {name: city, type: string}
      - {name: seen, type: date}
      - {name: img, type: tensor, shape: [8, 8]}
      - {name: label, type: category, values: [yes, no]}"""

MESH = """apiVersion: meshctl/v1
mesh: {{name: shop}}
domains: [{{name: north}}, {{name: south}}]
products:
  - name: sales
    domain: north
    source: north.csv
    contract: sales@1
    columns: &cols{columns}
  - {{name: sales, domain: south, source: south.csv, contract: sales@1, columns: *cols}}
contracts:
  - name: sales
    version: 1.0.0
    columns:{contract}
models:
  - name: m
    inputs: {inputs}
    architecture: {{kind: mlp, hidden: [4]}}
    training: {{rounds: 1}}{extra}
"""


def _compile(tmp_path: Path, inputs: str, *, columns: str = COLUMNS, contract: str | None = None,
             extra: str = ""):
    path = tmp_path / "mesh.yaml"
    for name in ("north.csv", "south.csv"):
        (tmp_path / name).write_text("age,label\n1,yes\n")
    path.write_text(MESH.format(columns=columns, contract=contract or columns, inputs=inputs, extra=extra))
    return compile_mesh(path)


def _codes(result) -> list[str]:
    return [d.code for d in result.diagnostics if d.severity == "error"]


def test_numeric_features_keep_the_plan_as_it_was(tmp_path: Path) -> None:
    result = _compile(tmp_path, "{contract: sales, features: [age], target: label}")
    job = result.plan.jobs[0]
    assert job.inputs is None and job.input_shape is None
    assert "inputs" not in result.plan.to_toml() and "input_shape" not in result.plan.to_toml()


def test_category_and_string_features_are_one_hot_with_an_other_slot(tmp_path: Path) -> None:
    result = _compile(tmp_path, "{contract: sales, features: [age, color, city], target: label, "
                                "categories: {city: 20}, min_category_count: 5}")
    assert _codes(result) == []
    job = result.plan.jobs[0]
    kinds = [(f.name, f.kind, f.width, f.vocabulary, f.min_count) for f in job.inputs]
    assert kinds == [("age", "numeric", 1, None, None),
                     ("color", "categorical", 4, ["red", "green", "blue"], 5),
                     ("city", "categorical", 21, None, 5)]
    assert job.input_shape == [26] and job.architecture.input_dim == 26
    assert job.tensors[0].shape == [4, 26]
    again = Plan.from_toml(result.plan.to_toml())  # the plan keeps it
    assert again.jobs[0].inputs == job.inputs


def test_a_cap_below_the_declared_values_narrows_a_category(tmp_path: Path) -> None:
    result = _compile(tmp_path, "{contract: sales, features: [color], target: label, categories: {color: 1}}")
    assert result.plan.jobs[0].inputs[0].width == 2


def test_a_lone_tensor_feature_gives_a_channels_first_input_shape(tmp_path: Path) -> None:
    result = _compile(tmp_path, "{contract: sales, features: [img], target: label}")
    job = result.plan.jobs[0]
    assert (job.inputs[0].kind, job.inputs[0].width, job.inputs[0].shape) == ("tensor", 64, [8, 8])
    assert job.input_shape == [1, 8, 8]
    assert job.architecture.input_dim == 64
    column = next(c for c in result.plan.products[0].columns if c.name == "img")
    assert column.type == "tensor" and column.shape == [8, 8]


def test_a_3d_tensor_keeps_its_shape_and_mixed_features_are_flat(tmp_path: Path) -> None:
    cols = COLUMNS.replace("shape: [8, 8]", "shape: [3, 4, 4]")
    result = _compile(tmp_path, "{contract: sales, features: [img], target: label}", columns=cols)
    assert result.plan.jobs[0].input_shape == [3, 4, 4]
    result = _compile(tmp_path, "{contract: sales, features: [age, img], target: label}", columns=cols)
    assert result.plan.jobs[0].input_shape == [49]


@pytest.mark.parametrize(("inputs", "code", "text"), [
    ("{contract: sales, features: [city], target: label}", "MESH503", "string column with no cap"),
    ("{contract: sales, features: [seen], target: label}", "MESH503", "date column, which cannot feed"),
    ("{contract: sales, features: [age], target: label, categories: {age: 3}}", "MESH521", "a feature of type int"),
    ("{contract: sales, features: [age], target: label, categories: {color: 3}}", "MESH521",
     "not a feature of the model"),
])
def test_features_that_cannot_feed_a_model_are_refused(tmp_path: Path, inputs: str, code: str, text: str) -> None:
    result = _compile(tmp_path, inputs)
    assert code in _codes(result), result.diagnostics
    assert any(text in d.message for d in result.diagnostics), [d.message for d in result.diagnostics]
    assert result.plan is None


def test_a_tensor_column_needs_a_shape(tmp_path: Path) -> None:
    for bad in ("{name: img, type: tensor}", "{name: img, type: tensor, shape: [0, 8]}",
                "{name: img, type: tensor, shape: [2, 2, 2, 2]}", "{name: img, type: float, shape: [4]}"):
        cols = COLUMNS.replace("{name: img, type: tensor, shape: [8, 8]}", bad)
        result = _compile(tmp_path, "{contract: sales, features: [age], target: label}", columns=cols)
        assert "MESH520" in _codes(result), (bad, result.diagnostics)


def test_a_product_tensor_of_another_shape_than_its_contract_is_refused(tmp_path: Path) -> None:
    result = _compile(tmp_path, "{contract: sales, features: [img], target: label}",
                      columns=COLUMNS.replace("[8, 8]", "[4, 16]"), contract=COLUMNS)
    assert _codes(result) == ["MESH522", "MESH522"]  # both products


def test_categorical_features_under_dp_are_refused(tmp_path: Path) -> None:
    result = _compile(tmp_path, "{contract: sales, features: [color], target: label}",
                      extra="\n    privacy: {dp: {epsilon: 1.0}}")
    assert "MESH523" in _codes(result)


@pytest.mark.parametrize("code", ["MESH503", "MESH520", "MESH521", "MESH522", "MESH523"])
def test_explain_knows_the_codes(code: str) -> None:
    out = CliRunner().invoke(main, ["explain", code])
    assert out.exit_code == 0 and code in out.output and len(out.output.strip()) > 30, out.output


def test_a_tensor_column_round_trips_through_odcs(tmp_path: Path) -> None:
    import yaml

    from meshctl.compiler.odcs import dump, export_contract, import_contract
    from meshctl.compiler.spec import Contract

    result = _compile(tmp_path, "{contract: sales, features: [img], target: label}")
    contract = result.spec.contracts[0]
    text = dump(export_contract(contract))
    prop = next(p for p in yaml.safe_load(text)["schema"][0]["properties"] if p["name"] == "img")
    assert prop["logicalType"] == "array" and prop["items"]["logicalType"] == "number"
    assert prop["logicalTypeOptions"] == {"minItems": 64, "maxItems": 64}
    imported = import_contract(yaml.safe_load(text))
    assert imported.dropped == []
    assert {"name": "img", "type": "tensor", "shape": [8, 8]} in imported.contract["columns"]
    back = Contract.model_validate(imported.contract)
    assert dump(export_contract(back)) == text
    # another tool's array of 16 numbers, without meshctl's shape: a tensor of [16]
    doc = yaml.safe_load(text)
    doc["schema"][0]["properties"] = [{"name": "v", "logicalType": "array", "items": {"logicalType": "number"},
                                       "logicalTypeOptions": {"minItems": 16, "maxItems": 16}},
                                      {"name": "tags", "logicalType": "array", "items": {"logicalType": "string"}}]
    imported = import_contract(doc)
    assert imported.contract["columns"] == [{"name": "v", "type": "tensor", "shape": [16]}]
    assert any("tags" in line for line in imported.dropped)


def test_reshaping_a_tensor_column_is_a_breaking_change(tmp_path: Path) -> None:
    from meshctl.compiler.breaking import classify
    from meshctl.gitrev import load_side

    _compile(tmp_path, "{contract: sales, features: [img], target: label}")
    base = (tmp_path / "mesh.yaml").read_text()
    (tmp_path / "base.yaml").write_text(base)
    (tmp_path / "head.yaml").write_text(base.replace("shape: [8, 8]", "shape: [64]"))
    old = load_side(str(tmp_path / "base.yaml"), tmp_path / "head.yaml")
    new = load_side(str(tmp_path / "head.yaml"), tmp_path / "head.yaml")
    got = {(f.rule, f.message) for f in classify(old, new)}
    assert ("BRK002", "column 'img' reshaped [8, 8] -> [64]") in got, got


def test_the_json_schema_takes_tensor_shapes_and_feature_caps(tmp_path: Path) -> None:
    import yaml
    from jsonschema import Draft202012Validator

    from meshctl.compiler.schema import mesh_json_schema

    validator = Draft202012Validator(mesh_json_schema())
    _compile(tmp_path, "{contract: sales, features: [age, city, img], target: label, categories: {city: 20}, "
                       "min_category_count: 5}")
    good = yaml.safe_load((tmp_path / "mesh.yaml").read_text())
    assert list(validator.iter_errors(good)) == []
    for bad in ("{name: img, type: tensor}", "{name: img, type: tensor, shape: [0]}",
                "{name: img, type: float, shape: [4]}"):
        _compile(tmp_path, "{contract: sales, features: [age], target: label}",
                 columns=COLUMNS.replace("{name: img, type: tensor, shape: [8, 8]}", bad))
        assert list(validator.iter_errors(yaml.safe_load((tmp_path / "mesh.yaml").read_text()))), bad
