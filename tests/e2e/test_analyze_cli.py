"""`meshctl analyze` and `meshctl ledger` on a copy of examples/analytics: real CLI, processes, files."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import duckdb
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
FREE = ["--address", "tcp://127.0.0.1:0"]
MESH = "examples/analytics/mesh.yaml"
FILES = ["charite.parquet", "karolinska.parquet", "amsterdam-umc.csv"]


@pytest.fixture
def analytics(tmp_path: Path) -> Path:
    """tmp/examples/{analytics,hospitals/data}; returns tmp (run the CLI there)."""
    shutil.copytree(ROOT / "examples" / "analytics", tmp_path / "examples" / "analytics",
                    ignore=shutil.ignore_patterns(".meshctl"))
    shutil.copytree(ROOT / "examples" / "hospitals" / "data", tmp_path / "examples" / "hospitals" / "data")
    return tmp_path


def _union(tmp: Path) -> str:
    data = tmp / "examples" / "hospitals" / "data"
    return " UNION ALL ".join(f"SELECT diagnosis, radius_mean, area_mean FROM '{data / f}'" for f in FILES)


def test_analyze_prints_the_merged_table_equal_to_the_union_query(analytics, meshctl_telling_torch):
    # Execute
    out = subprocess.run([*meshctl_telling_torch, "analyze", "nucleus-size-by-diagnosis", MESH, "--headless",
                          *FREE, "-o", "result.json"], cwd=analytics, capture_output=True, text=True, timeout=180,
                         check=False)
    # Assert
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stderr.splitlines()[-1] == "no torch", out.stderr  # the coordinator and the domains train
    lines = out.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("diagnosis"))
    assert lines[head].split()[:3] == ["diagnosis", "count", "mean(radius_mean)"]
    assert lines[head + 1].startswith("benign     357") and lines[head + 2].startswith("malignant  212")
    assert lines[-1] == "2 groups; suppressed: 0 in domains, 0 after merging"
    result = json.loads((analytics / "result.json").read_text())
    run_dir = analytics / "examples" / "analytics" / ".meshctl" / "runs" / result["run"]
    assert json.loads((run_dir / "analyses" / "nucleus-size-by-diagnosis.json").read_text()) == result
    union = _union(analytics)
    for g in result["groups"]:
        d, v = g["key"]["diagnosis"], g["values"]
        n, mean, var = duckdb.sql(f"SELECT count(*), avg(radius_mean), var_samp(area_mean) FROM ({union}) "
                                  f"WHERE diagnosis = '{d}'").fetchall()[0]
        assert v["count"] == g["count"] == n
        assert v["mean(radius_mean)"] == pytest.approx(mean, rel=1e-12)
        assert v["variance(area_mean)"] == pytest.approx(var, rel=1e-10)
        x = duckdb.sql(f"SELECT radius_mean FROM ({union}) WHERE diagnosis = '{d}'").fetchnumpy()["radius_mean"]
        want, _ = np.histogram(np.clip(x, 5, 29), bins=12, range=(5, 29))
        assert v["histogram(radius_mean)"]["counts"] == want.tolist()
        for q, est in v["quantile(radius_mean, 0.25, 0.5, 0.75)"].items():
            assert abs(est - np.quantile(x, float(q), method="inverted_cdf")) <= 24 / 48
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    kinds = [e["type"] for e in events]
    assert "analysis_started" in kinds and "analysis_completed" in kinds and events[-1]["ok"]
    assert not [k for k in kinds if k in ("job_started", "round_completed")], "an analysis run trains nothing"


def test_a_dp_analysis_charges_the_ledger_which_meshctl_ledger_prints(analytics, meshctl):
    out = meshctl("analyze", "nucleus-size-private", MESH, "--headless", *FREE, cwd=analytics)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "charite.biopsies: ε 1 spent by analysis.nucleus-size-private, 1 of 3 in all" in out.stdout
    assert "DP ε 1 (Laplace)" in out.stdout
    ledger = meshctl("ledger", "--mesh", MESH, cwd=analytics)
    assert ledger.returncode == 0, ledger.stderr
    assert ledger.stdout.splitlines() == [
        "product                 spent ε  reserved ε  budget ε  left ε  runs",
        "amsterdam-umc.biopsies  1        0           3         2       1",
        "charite.biopsies        1        0           3         2       1",
        "karolinska.biopsies     1        0           3         2       1",
    ]
    assert (analytics / "examples" / "analytics" / ".meshctl" / "ledger.db").is_file()


def test_an_unknown_analysis_is_one_line_with_the_nearest_name(analytics, meshctl):
    out = meshctl("analyze", "nucleus-size-by-diagnosys", MESH, cwd=analytics)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == (f"{MESH}: error: no analysis 'nucleus-size-by-diagnosys' in the mesh "
                                  "(hint: did you mean 'nucleus-size-by-diagnosis'?)")
    assert not (analytics / "examples" / "analytics" / ".meshctl" / "runs").exists()


def test_a_missing_data_file_is_an_error_naming_it(analytics, meshctl):
    (analytics / "examples" / "hospitals" / "data" / "karolinska.parquet").unlink()
    out = meshctl("analyze", "nucleus-size-by-diagnosis", MESH, "--headless", *FREE, cwd=analytics)
    assert out.returncode == 1 and "Traceback" not in out.stderr + out.stdout
    first = out.stderr.splitlines()[0]
    assert first.startswith(f"{MESH}:") and "'../hospitals/data/karolinska.parquet'" in first
    assert "does not exist" in first
    assert not (analytics / "examples" / "analytics" / ".meshctl" / "runs").exists()
