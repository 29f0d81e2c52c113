"""`meshctl explain`, `meshctl validate --format json` and `--strict`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from compiler_util import ROOT_MESH, SPECS

from meshctl.cli import main
from meshctl.compiler.diagnostics import CODES, STAGES, normalize_code, stage_of


@pytest.mark.parametrize("arg", ["MESH402", "402", "mesh402"])
def test_explain_prints_code_stage_and_help(arg: str) -> None:
    result = CliRunner().invoke(main, ["explain", arg])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"MESH402 (policy)\n{CODES['MESH402']}\n"


def test_explain_unknown_code_is_one_line_exit_1() -> None:
    result = CliRunner().invoke(main, ["explain", "MESH999"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("error: unknown diagnostic code 'MESH999'")


def test_explain_without_code_lists_every_code() -> None:
    result = CliRunner().invoke(main, ["explain"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(CODES)


def test_every_code_has_a_stage_and_help() -> None:
    for code, text in CODES.items():
        assert text.strip(), code
        assert stage_of(code) in STAGES.values(), code
    assert normalize_code(" 101 ") == "MESH101" and stage_of("MESH101") == "syntax"


def _json_validate(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["validate", "--format", "json", *args])
    return result.exit_code, json.loads(result.stdout)


def test_validate_json_root_is_valid_with_one_warning() -> None:
    code, report = _json_validate(str(ROOT_MESH))
    assert code == 0
    assert (report["format_version"], report["valid"], report["error_count"],
            report["warning_count"]) == ("1.0", True, 0, 1)
    [diag] = report["diagnostics"]
    assert diag["severity"] == "warning" and diag["code"] == "MESH411"
    assert diag["summary"].startswith("policy 'restricted-needs-privacy' warns")
    assert diag["detail"] == "policy 'restricted-needs-privacy' is declared at mesh.yaml:96:5"
    assert diag["range"] == {"filename": str(ROOT_MESH), "start": {"line": 104, "column": 5},
                             "end": {"line": 104, "column": 5}}


def test_validate_json_errors_exit_1_with_every_diagnostic() -> None:
    code, report = _json_validate(str(SPECS / "invalid" / "many_errors.yaml"))
    assert code == 1
    assert report["valid"] is False and report["error_count"] == 4
    assert len(report["diagnostics"]) == report["error_count"] + report["warning_count"]
    assert all(d["code"] in CODES and d["range"]["start"]["line"] > 0
               for d in report["diagnostics"])


def test_validate_json_unreadable_file_has_no_range() -> None:
    code, report = _json_validate("does-not-exist.yaml")
    assert code == 1
    [diag] = report["diagnostics"]
    assert diag["code"] == "MESH104" and "range" not in diag and diag["detail"] == ""


def test_validate_strict_fails_on_warnings() -> None:
    text = CliRunner().invoke(main, ["validate", "--strict", str(ROOT_MESH)])
    assert text.exit_code == 1
    assert "warning[MESH411]" in text.output
    assert text.output.rstrip().endswith("1 warning (--strict: warnings are errors)")
    assert "ok" not in text.stdout
    code, report = _json_validate("--strict", str(ROOT_MESH))
    assert code == 1 and report["valid"] is False and report["warning_count"] == 1


def test_validate_strict_passes_without_warnings() -> None:
    minimal = SPECS / "valid" / "minimal.yaml"
    result = CliRunner().invoke(main, ["validate", "--strict", str(minimal)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.stdout
