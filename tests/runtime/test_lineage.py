"""OpenLineage export of a run recorded through the coordinator's real EventSink."""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path

import zmq
from openlineage_schemas import problems

from meshctl.compiler.plan import PlanAnalysis, PlanColumn, PlanMetric, PlanRead
from meshctl.runtime import events as ev
from meshctl.runtime import lineage
from meshctl.runtime.coordinator import EventSink
from meshctl.runtime.run import RunManifest


def _plan_with_pii_and_analysis(make_plan):
    plan = make_plan()
    products = [
        p.model_copy(
            update={"columns": [*p.columns, PlanColumn(name="mrn", type="string", pii="direct")]}
        )
        for p in plan.products
    ]
    analysis = PlanAnalysis(
        name="label-counts",
        participants=["client-0"],
        reads=[PlanRead(domain="client-0", product="client-0.digits", client_id=0)],
        group_by=["label"],
        metrics=[PlanMetric(fn="count", label="count")],
    )
    return plan.model_copy(update={"products": products, "analyses": [analysis]}).with_hash()


def _record_run(root: Path, plan, fail: bool = False, stopped: str = "") -> Path:
    d = root / ".meshctl" / "runs" / "r-0001"
    d.mkdir(parents=True)
    plan.write(d / "plan.toml")
    RunManifest(
        run="r-0001",
        run_dir=str(d),
        base_dir=str(root),
        router="tcp://127.0.0.1:1",
        events="tcp://127.0.0.1:2",
        coordinator_key="k",
        coordinator_public="p",
        domain_keys={},
    ).write()
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(f"inproc://lineage-{id(d)}")
    sink = EventSink(d / "events.jsonl", pub)
    sink.emit(
        ev.RunStarted(
            run="r-0001",
            mesh=plan.plan.mesh,
            plan_hash=plan.plan.hash,
            run_dir=str(d),
            jobs=["digits"],
            domains=["client-0", "client-1"],
        )
    )
    sink.emit(
        ev.JobStarted(
            job="digits", participants=["client-0", "client-1"], rounds=3, parameters=2410, quorum=2
        )
    )
    if stopped:  # a stopped run's job ends with the run: no job_failed
        pass
    elif fail:
        sink.emit(ev.JobFailed(job="digits", round=2, reason="domain client-1 lost"))
    else:
        sink.emit(
            ev.JobCompleted(
                job="digits",
                rounds=3,
                metrics={"accuracy": 0.9},
                model_path="models/digits.safetensors",
                seconds=1.5,
            )
        )
        sink.emit(
            ev.AnalysisStarted(
                analysis="label-counts", participants=["client-0"], metrics=["count"]
            )
        )
        sink.emit(
            ev.AnalysisCompleted(
                analysis="label-counts",
                groups=10,
                suppressed=0,
                result_path="analyses/label-counts.json",
                seconds=0.2,
            )
        )
    sink.emit(
        ev.RunCompleted(
            run="r-0001", ok=not fail, seconds=2.0, reason=stopped or ("domain lost" if fail else "")
        )
    )
    sink.close()
    pub.close()
    return d


def test_a_run_exports_start_and_complete_per_job_and_analysis(tmp_path, make_plan):
    plan = _plan_with_pii_and_analysis(make_plan)
    d = _record_run(tmp_path, plan)
    events = lineage.export_events(d)
    assert [(e["eventType"], e["job"]["name"]) for e in events] == [
        ("START", "model.digits"),
        ("COMPLETE", "model.digits"),
        ("START", "analysis.label-counts"),
        ("COMPLETE", "analysis.label-counts"),
    ]
    for e in events:
        assert problems(e) == []  # the official OpenLineage schemas
        assert lineage.missing_fields(e) == []
        uuid.UUID(e["run"]["runId"])
        datetime.fromisoformat(e["eventTime"])
        assert e["job"]["namespace"] == "digits-test" and e["producer"] == lineage.PRODUCER
        assert e["schemaURL"].startswith("https://openlineage.io/spec/")
    start, done = events[0], events[1]
    assert (
        start["run"]["runId"] == done["run"]["runId"] == lineage.run_uuid("r-0001", "model.digits")
    )
    assert events[2]["run"]["runId"] != start["run"]["runId"]
    assert lineage.export_events(d) == events  # deterministic: same ids and times again
    ds = start["inputs"][0]
    assert (ds["namespace"], ds["name"]) == ("file", str(tmp_path / "data" / "client-0.parquet"))
    assert ds["facets"]["symlinks"]["identifiers"] == [
        {"namespace": "meshctl://client-0", "name": "client-0.digits", "type": "DATA_PRODUCT"}
    ]
    fields = ds["facets"]["schema"]["fields"]
    assert fields[-1] == {"name": "mrn", "type": "string"} and all(
        set(f) == {"name", "type"} for f in fields
    )
    assert ds["facets"]["meshctl_pii"]["columns"]["mrn"] == "direct"
    assert ds["facets"]["meshctl_pii"]["columns"]["px0"] == "none"
    assert done["outputs"] == [
        {"namespace": "file", "name": str((d / "models" / "digits.safetensors").resolve())}
    ]
    assert done["run"]["facets"]["meshctl"]["metrics"] == {"accuracy": 0.9}
    assert done["run"]["facets"]["parent"]["run"]["runId"] == lineage.run_uuid("r-0001")


def test_a_failed_job_exports_fail_with_its_reason(tmp_path, make_plan):
    d = _record_run(tmp_path, make_plan(), fail=True)
    events = lineage.export_events(d)
    assert [e["eventType"] for e in events] == ["START", "FAIL"]
    assert events[1]["run"]["facets"]["meshctl"]["reason"] == "domain client-1 lost"
    assert events[1]["run"]["facets"]["errorMessage"]["message"] == "domain client-1 lost"
    assert events[1]["outputs"] == []
    assert [problems(e) for e in events] == [[], []]


def test_a_stopped_run_exports_abort_not_fail(tmp_path, make_plan):
    d = _record_run(tmp_path, make_plan(), fail=True, stopped="stopped by SIGTERM")
    events = lineage.export_events(d)
    assert [e["eventType"] for e in events] == ["START", "ABORT"]
    assert events[1]["run"]["facets"]["meshctl"]["reason"] == "stopped by SIGTERM"
    assert [problems(e) for e in events] == [[], []]


def test_a_job_of_a_run_still_going_has_started_and_not_failed(tmp_path, make_plan):
    d = _record_run(tmp_path, make_plan(), fail=True)
    events = d / "events.jsonl"
    lines = events.read_text().splitlines()
    events.write_text("\n".join(lines[:2]) + "\n")  # RunStarted, JobStarted: the run goes on
    assert [e["eventType"] for e in lineage.export_events(d)] == ["START"]


def test_missing_fields_names_what_a_runevent_lacks():
    assert lineage.missing_fields({"run": {}, "job": {"name": "x"}}) == [
        "eventTime",
        "producer",
        "schemaURL",
        "run.runId",
        "job.namespace",
    ]
