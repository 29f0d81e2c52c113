"""`meshctl validate`, `plan` and `schema` through click's CliRunner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner
from compiler_util import ROOT_MESH, SPECS

from meshctl.cli import main
from meshctl.compiler.plan import Plan


def test_validate_root_prints_one_ok_line() -> None:
    result = CliRunner().invoke(main, ["validate", str(ROOT_MESH)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith(
        "ok \u2014 3 domains, 3 products, 1 contract, 3 policies, 1 model (1 warning)")
    assert "warning[MESH411]" in result.output


def test_validate_invalid_prints_every_diagnostic_and_count() -> None:
    result = CliRunner().invoke(main, ["validate", str(SPECS / "invalid" / "many_errors.yaml")])
    assert result.exit_code == 1
    assert result.output.count("error[MESH") == 4
    assert result.output.rstrip().endswith("4 errors")
    assert "Traceback" not in result.output


def test_validate_missing_file_is_one_line() -> None:
    result = CliRunner().invoke(main, ["validate", "does-not-exist.yaml"])
    assert result.exit_code == 1
    assert result.output.strip() == "does-not-exist.yaml: error: no such file"


def test_plan_writes_beside_the_mesh(tmp_path: Path) -> None:
    shutil.copytree(SPECS / "valid", tmp_path / "valid")
    shutil.copytree(SPECS / "data", tmp_path / "data")
    result = CliRunner().invoke(main, ["plan", str(tmp_path / "valid" / "minimal.yaml")])
    assert result.exit_code == 0, result.output
    written = tmp_path / "valid" / "mesh.plan.toml"
    assert Plan.read(written).job("default-risk").parameters == 50
    assert "job default-risk" in result.stdout and str(written) in result.stdout


def test_plan_output_option_and_errors(tmp_path: Path) -> None:
    out = tmp_path / "p.toml"
    ok = CliRunner().invoke(main, ["plan", str(ROOT_MESH), "-o", str(out)])
    assert ok.exit_code == 0 and out.exists()
    bad = CliRunner().invoke(main, ["plan", str(SPECS / "invalid" / "deny_policy.yaml"),
                                    "-o", str(tmp_path / "q.toml")])
    assert bad.exit_code == 1 and not (tmp_path / "q.toml").exists()
    assert "error[MESH410]" in bad.output


def test_schema_is_json_with_descriptions() -> None:
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert "apiVersion" in schema["properties"]
    assert schema["$defs"]["Product"]["additionalProperties"] is False
    assert schema["$defs"]["Product"]["properties"]["source"]["description"]
