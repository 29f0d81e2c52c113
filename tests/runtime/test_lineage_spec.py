"""Lineage against the OpenLineage spec (issue 11, "Lineage"), on real runs.

A job that fails before its first round exports START and FAIL with the standard
`errorMessage` facet; a completed run exports START and COMPLETE; every event validates
against the official schemas; datasets are named per the OpenLineage naming spec.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
from openlineage_schemas import problems

from meshctl.compiler.plan import PlanProduct
from meshctl.runtime import events as ev
from meshctl.runtime import lineage
from meshctl.runtime.launcher import start_run

ROOT = Path(__file__).resolve().parents[2]


def meshctl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.fixture
def unreadable(tmp_path: Path) -> Path:
    """The root mesh.yaml over data files no domain can read: every domain is lost, no quorum."""
    shutil.copy(ROOT / "mesh.yaml", tmp_path / "mesh.yaml")
    data = tmp_path / "examples" / "hospitals" / "data"
    data.mkdir(parents=True)
    for name in ("charite.parquet", "karolinska.parquet", "amsterdam-umc.csv"):
        (data / name).write_text("not a table\n")
    return tmp_path


def test_a_job_that_fails_before_its_first_round_exports_start_and_fail(unreadable: Path) -> None:
    up = meshctl("up", "--headless", "--address", "tcp://127.0.0.1:0", cwd=unreadable)
    assert up.returncode == 1 and "quorum is 3" in up.stderr, up.stderr
    out = meshctl("lineage", "export", "latest", cwd=unreadable)
    assert out.returncode == 0, out.stderr  # the export succeeded; the run's failure is in it
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(e["eventType"], e["job"]["name"]) for e in events] == [
        ("START", "model.malignancy"), ("FAIL", "model.malignancy")]
    assert [problems(e) for e in events] == [[], []]
    error = events[1]["run"]["facets"]["errorMessage"]
    assert error["programmingLanguage"] == "python"
    quorum = "job malignancy: 0 of 3 participants can take part, quorum is 3"
    assert error["message"].startswith(quorum)
    assert events[0]["run"]["runId"] == events[1]["run"]["runId"]
    data = unreadable / "examples" / "hospitals" / "data"
    assert [(d["namespace"], d["name"]) for d in events[1]["inputs"]] == [
        ("file", str(data / "charite.parquet")), ("file", str(data / "karolinska.parquet")),
        ("file", str(data / "amsterdam-umc.csv"))]
    written = meshctl("lineage", "export", "latest", "-o", "ol.jsonl", cwd=unreadable)
    assert written.returncode == 0 and "wrote 2 RunEvents (1 FAIL) to ol.jsonl" in written.stderr
    assert (unreadable / "ol.jsonl").read_text() == out.stdout


def test_a_completed_run_exports_start_and_complete(mesh_file: Path, make_plan) -> None:
    run = start_run(mesh_file, make_plan(n=2, rounds=1))
    list(run.follow())
    result = run.finish()
    assert result.ok, result.reason
    events = lineage.export_events(result.run_dir)
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    assert [problems(e) for e in events] == [[], []]
    assert "errorMessage" not in events[1]["run"]["facets"]
    assert events[1]["outputs"] == [
        {"namespace": "file", "name": str(result.run_dir / "models" / "digits.safetensors")}]


def test_an_analysis_run_that_fails_before_it_starts_exports_fail(
        tmp_path: Path, make_plan) -> None:
    from test_lineage import _plan_with_pii_and_analysis

    from meshctl.runtime.coordinator import EventSink
    from meshctl.runtime.run import RunManifest

    plan = _plan_with_pii_and_analysis(make_plan)
    d = tmp_path / ".meshctl" / "runs" / "r-0002"
    d.mkdir(parents=True)
    plan.write(d / "plan.toml")
    RunManifest(run="r-0002", run_dir=str(d), base_dir=str(tmp_path), router="tcp://127.0.0.1:1",
                events="tcp://127.0.0.1:2", coordinator_key="k", coordinator_public="p",
                domain_keys={}).write()
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(f"inproc://lineage-spec-{id(d)}")
    sink = EventSink(d / "events.jsonl", pub)
    why = "analysis label-counts: domains client-0 did not join within 30s"
    sink.emit(ev.RunStarted(run="r-0002", mesh=plan.plan.mesh, plan_hash=plan.plan.hash,
                            run_dir=str(d), jobs=["analysis:label-counts"], domains=["client-0"]))
    sink.emit(ev.RunCompleted(run="r-0002", ok=False, seconds=30.0, reason=why))
    sink.close()
    pub.close()
    events = lineage.export_events(d)
    assert [(e["eventType"], e["job"]["name"]) for e in events] == [
        ("START", "analysis.label-counts"), ("FAIL", "analysis.label-counts")]
    assert events[1]["run"]["facets"]["errorMessage"]["message"] == why
    assert [problems(e) for e in events] == [[], []]


def _product(source: str, fmt: str, table: str = "") -> PlanProduct:
    return PlanProduct(id="h.visits", domain="h", name="visits", source=source, format=fmt,
                       table=table, columns=[])


@pytest.mark.parametrize(("source", "fmt", "table", "address", "expected"), [
    ("data/v.csv", "csv", "", "local", ("file", "/mesh/data/v.csv")),
    ("../shared/v.parquet", "parquet", "", "local", ("file", "/shared/v.parquet")),
    ("/srv/v.parquet", "parquet", "", "local", ("file", "/srv/v.parquet")),
    ("/srv/v.parquet", "parquet", "", "tcp://h.example:7701",
     ("file://h.example", "/srv/v.parquet")),
    ("data/v.csv", "csv", "", "tcp://[::1]:7701", ("file://[::1]", "data/v.csv")),
    ("duckdb:data/clinic.duckdb", "duckdb", "visits", "local",
     ("duckdb:///mesh/data/clinic.duckdb", "clinic.main.visits")),
    ("duckdb:/srv/clinic.duckdb", "duckdb", "raw.visits", "tcp://h.example",
     ("duckdb://h.example/srv/clinic.duckdb", "clinic.raw.visits")),
    ("sqlite:data/clinic.db", "sqlite", "visits", "local",
     ("sqlite:///mesh/data/clinic.db", "visits")),
    ("postgresql://meshctl:s3cret@db.example:6543/clinic?sslmode=require", "postgresql", "visits",
     "local", ("postgres://db.example:6543", "clinic.public.visits")),
    ("postgres://db.example/clinic", "postgresql", "other.visits", "local",
     ("postgres://db.example:5432", "clinic.other.visits")),
    ("postgresql://me@[2001:db8::1]:5433/clinic", "postgresql", "visits", "local",
     ("postgres://[2001:db8::1]:5433", "clinic.public.visits")),
    ("postgresql:///clinic?host=/var/run/postgresql&password=s3cret", "postgresql", "visits",
     "local", ("postgres://localhost:5432", "clinic.public.visits")),
    ("postgresql://alice:s3cret@db.example", "postgresql", "visits", "local",
     ("postgres://db.example:5432", "alice.public.visits")),
])
def test_datasets_are_named_per_the_openlineage_naming_spec(source, fmt, table, address, expected):
    got = lineage.dataset_name(_product(source, fmt, table), address, Path("/mesh"))
    assert got == expected
    assert "s3cret" not in "".join(got)
