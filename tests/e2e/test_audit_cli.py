"""`meshctl audit verify/report` and `meshctl lineage export` on a real `meshctl up` run.

One real run of the hospitals mesh (module fixture); each test works on its own copy of
the resulting `.meshctl/` so that tampering in one test never leaks into another.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.xdist_group("audit-run")  # one worker runs the module-scoped `up`
MESHCTL = str(Path(sys.executable).parent / "meshctl")


def _meshctl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MESHCTL, *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=180
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A directory holding mesh.yaml, its data and the .meshctl/ of one finished run."""
    base = tmp_path_factory.mktemp("hospitals")
    shutil.copy(ROOT / "mesh.yaml", base / "mesh.yaml")
    shutil.copytree(
        ROOT / "examples" / "hospitals" / "data", base / "examples" / "hospitals" / "data"
    )
    out = _meshctl("up", "--headless", "--address", "tcp://127.0.0.1:0", cwd=base)
    assert out.returncode == 0, out.stderr + out.stdout
    return base


@pytest.fixture
def mesh(finished, tmp_path) -> Path:
    """A private copy of the finished mesh directory (mesh.yaml and .meshctl/)."""
    shutil.copy(finished / "mesh.yaml", tmp_path / "mesh.yaml")
    shutil.copytree(finished / ".meshctl", tmp_path / ".meshctl")
    return tmp_path


def _run(mesh: Path) -> tuple[str, Path]:
    (run,) = (mesh / ".meshctl" / "runs").iterdir()
    return run.name, run / "events.jsonl"


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _one_line_error(out: subprocess.CompletedProcess[str], text: str) -> None:
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and text in out.stderr and "Traceback" not in out.stderr


def test_verify_passes_on_a_real_run_and_its_mesh_history(mesh):
    run, events = _run(mesh)
    head = json.loads((events.parent / "run.json").read_text())["audit_head"]
    n = len(_lines(events))
    out = _meshctl("audit", "verify", run, cwd=mesh)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == f"{n} entries verified, head {head}\n"
    assert head == json.loads(_lines(events)[-1])["hash"]
    whole = _meshctl("audit", "verify", cwd=mesh)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert whole.stdout.startswith(f"{n} entries verified across 1 run, head sha256:")
    elsewhere = _meshctl("audit", "verify", "--mesh", str(mesh / "mesh.yaml"), cwd=mesh.parent)
    assert elsewhere.returncode == 0 and elsewhere.stdout == whole.stdout


def test_one_changed_byte_is_found_and_its_line_named(mesh):
    run, events = _run(mesh)
    lines = _lines(events)
    i = next(k for k, ln in enumerate(lines) if '"type":"round_completed"' in ln)
    at = lines[i].index('"train_loss":0.') + len('"train_loss":0.')
    lines[i] = lines[i][:at] + ("1" if lines[i][at] != "1" else "2") + lines[i][at + 1 :]
    events.write_text("".join(lines))
    where = f".meshctl/runs/{run}/events.jsonl:{i + 1}: entry {i + 1}"
    for args in (["audit", "verify", run], ["audit", "verify"]):
        out = _meshctl(*args, cwd=mesh)
        assert out.returncode == 1
        assert f"{where}: hash mismatch (changed?)" in out.stdout.splitlines()
        assert out.stdout.splitlines()[-1].startswith("audit log NOT verified: 1 problem")


def test_a_removed_entry_is_found(mesh):
    run, events = _run(mesh)
    lines = _lines(events)
    del lines[10]
    events.write_text("".join(lines))
    out = _meshctl("audit", "verify", run, cwd=mesh)
    assert out.returncode == 1
    assert out.stdout.splitlines()[0] == (
        f".meshctl/runs/{run}/events.jsonl:11: entry 11: "
        "prev does not match entry 10 (removed or reordered?)"
    )


def test_two_swapped_entries_are_found(mesh):
    run, events = _run(mesh)
    lines = _lines(events)
    lines[20], lines[21] = lines[21], lines[20]
    events.write_text("".join(lines))
    out = _meshctl("audit", "verify", run, cwd=mesh)
    assert out.returncode == 1
    problems = out.stdout.splitlines()[:-1]
    assert [p.split(": ")[0] for p in problems] == [
        f".meshctl/runs/{run}/events.jsonl:{k}" for k in (21, 22, 23)
    ]
    assert all("prev does not match" in p for p in problems)


def test_a_truncated_last_entry_is_found_through_the_head_in_run_json(mesh):
    run, events = _run(mesh)
    lines = _lines(events)
    events.write_text("".join(lines[:-1]))
    out = _meshctl("audit", "verify", run, cwd=mesh)
    assert out.returncode == 1
    assert out.stdout.splitlines()[0].startswith(
        f".meshctl/runs/{run}/events.jsonl: ends at entry {len(lines) - 1} with head "
    )
    assert f"run.json records {len(lines)} entries" in out.stdout


def test_report_writes_markdown_and_json_with_the_facts_of_the_run(mesh, tmp_path):
    run, events = _run(mesh)
    out = _meshctl("audit", "report", run, "-o", str(tmp_path / "reports"), cwd=mesh)
    assert out.returncode == 0, out.stderr
    md = tmp_path / "reports" / f"audit-{run}.md"
    report = json.loads((tmp_path / "reports" / f"audit-{run}.json").read_text())
    assert out.stdout.splitlines() == [f"wrote {md}", f"wrote {md.with_suffix('.json')}"]
    (job,) = report["jobs"]
    assert (job["name"], job["status"], job["rounds_completed"], job["rounds_planned"]) == (
        "malignancy",
        "completed",
        15,
        15,
    )
    assert len(job["rounds"]) == 15 and job["metrics"]["accuracy"] >= 0.9
    assert sorted(job["participants"]) == ["amsterdam-umc", "charite", "karolinska"]
    assert {p["id"]: (p["contract"], p["contract_version"]) for p in report["products"]} == {
        f"{d}.biopsies": ("tumor-biopsy@1.0.0", "1.0.0")
        for d in ("charite", "karolinska", "amsterdam-umc")
    }
    assert {d["policy"]: d["effect"] for d in report["policies"]["compile"]} == {
        "minimum-cohort": "allow",
        "purpose-limitation": "allow",
        "restricted-needs-privacy": "warn",
    }
    assert all(d["at"].startswith("mesh.yaml:") for d in report["policies"]["compile"])
    head = json.loads((events.parent / "run.json").read_text())["audit_head"]
    assert report["audit"] == {
        "verified": True,
        "entries": len(_lines(events)),
        "head": head,
        "recorded_head": head,
        "problems": [],
        "notes": [],
    }
    assert report["run"]["plan_hash"].startswith("sha256:") and report["run"]["meshctl_version"]
    text = md.read_text()
    for fact in (
        "# Audit report: run " + run,
        "malignancy",
        "15/15",
        "charite.biopsies",
        "tumor-biopsy@1.0.0",
        "minimum-cohort",
        "restricted-needs-privacy",
        head,
    ):
        assert fact in text
    default = _meshctl("audit", "report", str(events.parent), cwd=tmp_path)
    assert default.returncode == 0 and (events.parent / f"audit-{run}.json").is_file()


def test_report_of_a_tampered_run_says_it_does_not_verify(mesh, tmp_path):
    run, events = _run(mesh)
    events.write_text("".join(_lines(events)[:-1]))
    out = _meshctl("audit", "report", run, "-o", str(tmp_path), cwd=mesh)
    assert out.returncode == 0 and "does not verify" in out.stderr
    assert json.loads((tmp_path / f"audit-{run}.json").read_text())["audit"]["verified"] is False


def test_lineage_export_writes_valid_runevents(mesh, tmp_path):
    run, _ = _run(mesh)
    out = _meshctl("lineage", "export", run, "-o", str(tmp_path / "lineage.jsonl"), cwd=mesh)
    assert out.returncode == 0, out.stderr
    events = [json.loads(x) for x in (tmp_path / "lineage.jsonl").read_text().splitlines()]
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    for e in events:
        assert {"eventType", "eventTime", "run", "job", "producer", "schemaURL"} <= set(e)
        assert e["job"] == {**e["job"], "namespace": "oncology-network", "name": "model.malignancy"}
        assert [d["namespace"] for d in e["inputs"]] == ["file", "file", "file"]  # OpenLineage naming
        assert [d["facets"]["symlinks"]["identifiers"][0]["namespace"] for d in e["inputs"]] == [
            "meshctl://charite",
            "meshctl://karolinska",
            "meshctl://amsterdam-umc",
        ]
        pii = e["inputs"][0]["facets"]["meshctl_pii"]["columns"]
        assert pii["patient_name"] == "direct" and pii["radius_mean"] == "none"
    assert events[1]["outputs"][0]["name"].endswith(f"{run}/models/malignancy.safetensors")
    stdout = _meshctl("lineage", "export", run, cwd=mesh)
    assert [json.loads(x) for x in stdout.stdout.splitlines()] == events


def test_user_errors_are_one_line_and_exit_1(mesh, tmp_path_factory):
    run, events = _run(mesh)
    empty = tmp_path_factory.mktemp("empty")
    _one_line_error(_meshctl("audit", "verify", "r-nope", cwd=mesh), "error: no such run: r-nope")
    _one_line_error(_meshctl("audit", "report", "r-nope", cwd=mesh), "error: no such run: r-nope")
    _one_line_error(_meshctl("lineage", "export", "r-nope", cwd=mesh), "error: no such run: r-nope")
    _one_line_error(
        _meshctl("audit", "report", str(empty), cwd=mesh),
        "error: not a run directory (no run.json)",
    )
    _one_line_error(_meshctl("audit", "verify", cwd=empty), "error: no audit log")
    events.unlink()
    events.mkdir()  # unreadable as a file
    _one_line_error(_meshctl("audit", "verify", run, cwd=mesh), "events.jsonl: error: cannot read")
    (events.parent / "run.json").write_text("{broken")
    _one_line_error(
        _meshctl("audit", "verify", run, cwd=mesh), "run.json: error: not a run manifest"
    )
