"""`meshctl contract test` and `meshctl catalog` through the real CLI on the hospitals data."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MESH = """\
apiVersion: meshctl/v1
mesh:
  name: contract-checks
  coordinator: {address: tcp://127.0.0.1:7700}
domains:
  - {name: charite, owner: it@charite.example}
  - {name: amsterdam-umc, owner: dm@amsterdamumc.example}
products:
  - name: biopsies
    domain: charite
    source: data/charite.parquet
    contract: tumor-biopsy@1
    tags: [oncology]
    columns: &cols
      - {name: patient_name, type: string, pii: direct}
      - {name: mrn, type: string, pii: direct}
      - {name: date_of_birth, type: date, pii: indirect, masking: generalize, generalize: year}
      - {name: radius_mean, type: float, range: [0, 50]}
      - {name: area_mean, type: float}
      - {name: diagnosis, type: category, values: [benign, malignant]}
  - name: biopsies
    domain: amsterdam-umc
    source: data/amsterdam-umc.csv
    contract: tumor-biopsy@1
    columns: *cols
contracts:
  - name: tumor-biopsy
    version: 1.0.0
    columns:
      - {name: radius_mean, type: float}
      - {name: area_mean, type: float}
      - {name: diagnosis, type: category, values: [benign, malignant]}
    sla: {freshness: 7d}
    quality:
      - {metric: rowCount, mustBeGreaterThan: 100}
      - {column: radius_mean, metric: nullValues, unit: percent, mustBeLessThan: 1}
      - {column: diagnosis, metric: missingValues, missingValues: [null, ''], mustBe: 0}
EXTRA_RULES
models: []
"""

PASSING = ""
WARNING = ("      - {name: area-range, column: area_mean, metric: invalidValues, validRange: [0, 2000],"
           " mustBe: 0, severity: warning}")
ERROR = ("      - {name: big-tumours, type: sql, column: radius_mean, mustBe: 0,"
         " query: 'SELECT count(*) FROM {object} WHERE {property} > 25'}")
BAD_SQL = "      - {name: broken, type: sql, query: 'SELECT nosuch FROM {object}', mustBe: 0}"


def mesh(tmp: Path, extra: str = PASSING) -> Path:
    (tmp / "data").mkdir(exist_ok=True)
    for f in ("charite.parquet", "amsterdam-umc.csv"):
        shutil.copy(ROOT / "examples" / "hospitals" / "data" / f, tmp / "data" / f)
    path = tmp / "mesh.yaml"
    path.write_text(MESH.replace("EXTRA_RULES\n", extra + "\n" if extra else ""))
    return path


def rows(stdout: str) -> dict[tuple[str, str], list[str]]:
    """(product, rule) -> the table row's cells, from the table output."""
    out = {}
    for line in stdout.splitlines()[1:-1]:
        cells = line.split()
        out[(cells[0], cells[1])] = cells[2:]
    return out


def test_passing_contracts_exit_0_and_print_observed_values(tmp_path, meshctl):
    mesh(tmp_path)
    out = meshctl("contract", "test", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    table = rows(out.stdout)
    assert out.stdout.splitlines()[0].split() == ["PRODUCT", "RULE", "OBSERVED", "OPERATOR", "THRESHOLD",
                                                  "RESULT", "SEVERITY", "DETAIL"]
    assert table[("charite.biopsies", "rowCount")][:5] == ["259", "mustBeGreaterThan", "100", "pass", "error"]
    assert table[("amsterdam-umc.biopsies", "rowCount")][0] == "164"
    assert table[("charite.biopsies", "freshness")][1:4] == ["mustBeLessOrEqualTo", "604800", "pass"]
    assert table[("charite.biopsies", "values(diagnosis)")][3] == "pass"
    assert table[("charite.biopsies", "type(radius_mean)")][:4] == ["0", "mustBe", "0", "pass"]
    # 6 rules and 6 type(column) checks per product
    assert out.stdout.splitlines()[-1].startswith("24 checks on 2 products: 24 passed, 0 failed")


def test_a_failing_error_rule_exits_1(tmp_path, meshctl):
    mesh(tmp_path, ERROR)
    out = meshctl("contract", "test", "--mesh", "mesh.yaml", cwd=tmp_path)
    assert out.returncode == 1
    big = rows(out.stdout)[("charite.biopsies", "big-tumours")]
    assert big[0] != "0" and big[3:5] == ["FAIL", "error"]


def test_a_failing_warning_rule_exits_0(tmp_path, meshctl):
    mesh(tmp_path, WARNING)
    out = meshctl("contract", "test", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert rows(out.stdout)[("charite.biopsies", "area-range")][3:5] == ["FAIL", "warning"]
    assert "(0 errors, 2 warnings)" in out.stdout


def test_a_bad_sql_rule_is_a_failed_check_with_one_line_detail(tmp_path, meshctl):
    mesh(tmp_path, BAD_SQL)
    out = meshctl("contract", "test", "charite.biopsies", "--format", "json", cwd=tmp_path)
    assert out.returncode == 1 and out.stderr == ""
    results = {r["rule"]: r for r in json.loads(out.stdout)}
    assert {r["product"] for r in results.values()} == {"charite.biopsies"}
    broken = results["broken"]
    assert broken["passed"] is False and broken["observed"] is None
    assert 'Referenced column "nosuch" not found' in broken["detail"] and "\n" not in broken["detail"]
    assert results["rowCount"]["passed"] is True


def test_a_missing_data_file_is_one_line(tmp_path, meshctl):
    mesh(tmp_path)
    (tmp_path / "data" / "charite.parquet").unlink()
    out = meshctl("contract", "test", cwd=tmp_path)
    assert out.returncode == 1 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1
    assert "source file 'data/charite.parquet' of product 'charite.biopsies' does not exist" in out.stderr


def test_a_missing_mesh_and_a_typo_are_one_line(tmp_path, meshctl):
    out = meshctl("contract", "test", cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.strip() == ("mesh.yaml: error: no such file: this is not a mesh folder "
                                                          "(hint: `meshctl init` writes a mesh.yaml here, or give "
                                                          "the path of one)")
    mesh(tmp_path)
    out = meshctl("contract", "test", "charite.biopsy", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip() == ("error: no product 'charite.biopsy' in the mesh "
                                  "(hint: did you mean 'charite.biopsies'?)")


def test_contract_results_reach_the_catalog(tmp_path, meshctl):
    mesh(tmp_path, WARNING)
    assert meshctl("contract", "test", cwd=tmp_path).returncode == 0
    out = meshctl("catalog", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    listed = {ln.split()[0]: ln.split() for ln in out.stdout.splitlines()[1:]}
    assert listed["charite.biopsies"][-2:] == ["12/13", "96.2%"]  # 12 of 13 checks (6 type checks), freshness met
    shown = meshctl("catalog", "show", "charite.biopsies", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert re.search(r"date_of_birth +date +indirect +generalize year\n", text)
    assert re.search(r"patient_name +string +direct +never selected\n", text)
    assert "area-range" in text and "FAIL" in text and "freshness      met" in text
    assert "no run has read it yet" in text
    found = meshctl("catalog", "search", "oncology", "--mesh", "mesh.yaml", cwd=tmp_path)
    assert [ln.split()[0] for ln in found.stdout.splitlines()[1:]] == ["charite.biopsies"]
    missing = meshctl("catalog", "show", "charite.biopsy", cwd=tmp_path)
    assert missing.returncode == 1 and "did you mean 'charite.biopsies'?" in missing.stderr


@pytest.mark.parametrize("args", [["catalog"], ["catalog", "search", "x"], ["contract", "test"]])
def test_a_broken_mesh_is_one_line(tmp_path, meshctl, args):
    mesh(tmp_path)
    path = tmp_path / "mesh.yaml"
    path.write_text(path.read_text().replace("contract: tumor-biopsy@1\n    tags", "contract: tumor-biopsi@1\n    tags"))
    out = meshctl(*args, cwd=tmp_path)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert "mesh does not compile" in out.stderr and "meshctl validate" in out.stderr


def test_a_value_of_the_wrong_type_fails_contract_test_before_up(hospitals, meshctl):
    """Issue 11: a perimeter_mean holding 'n/a' passed `contract test`, then `up` failed converting it."""
    csv = hospitals.parent / "examples" / "hospitals" / "data" / "amsterdam-umc.csv"
    lines = csv.read_text().splitlines(keepends=True)
    cells = lines[1].split(",")
    cells[5] = "n/a"  # perimeter_mean of the first row
    csv.write_text(lines[0] + ",".join(cells) + "".join(lines[2:]))
    out = meshctl("contract", "test", "amsterdam-umc.biopsies", cwd=hospitals.parent)
    assert out.returncode == 1, out.stdout + out.stderr
    bad = rows(out.stdout)[("amsterdam-umc.biopsies", "type(perimeter_mean)")]
    assert bad[:5] == ["1", "mustBe", "0", "FAIL", "error"]
    assert " ".join(bad[5:]) == "1 value of perimeter_mean is not float (its declared type)"
    assert "n/a" not in out.stdout + out.stderr  # counts only, never a cell
    assert rows(out.stdout)[("amsterdam-umc.biopsies", "type(radius_mean)")][3] == "pass"
