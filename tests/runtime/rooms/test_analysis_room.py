"""The analysis workflow run by the coordinator service on the in-memory hub (issue 10: a room, not a subclass).

Each scripted domain answers AnalyzeIns with what a real daemon answers (analytics_domain.answer over the
hospitals data, DuckDB); the service runs `Analysis` instead of `Training` because the manifest says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from analytics_util import copy_data, hospitals_plan, union_stats
from sinks import ListSink

from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.analytics_domain import answer
from meshctl.runtime.coordinator import Coordinator, JobAborted
from meshctl.runtime.coordinator.analysis import Analysis
from meshctl.runtime.run import RunManifest
from meshctl.runtime.transport.memory import Connection, FakeClock, MemoryHub


def _room(tmp_path: Path, *, forge: str = "", silent: str = "") -> tuple[Coordinator, ListSink]:
    """A service whose run is analysis `nuclei`; `forge` answers for another analysis, `silent` never joins."""
    copy_data(tmp_path)
    plan = hospitals_plan()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    manifest = RunManifest(run="r1", run_dir=str(run_dir), base_dir=str(tmp_path), router="tcp://10.0.0.5:7700",
                           events="inproc://y", coordinator_key="", coordinator_public="", analysis="nuclei",
                           domain_keys={d.name: f"key-{d.name}" for d in plan.domains}, checkpoint=False)
    clock = FakeClock()
    hub = MemoryHub(clock)
    c = Coordinator(manifest, plan, link=hub, clock=clock)
    sink = ListSink()
    c.sink = sink
    for d in plan.domains:
        if d.name == silent:
            continue

        def reply(conn: Connection, msg: Any, _t: wire.Tensors, name: str = d.name) -> None:
            if isinstance(msg, wire.AnalyzeIns):
                ins = msg.model_copy(update={"analysis": "other"}) if name == forge else msg
                res = answer(plan, name, tmp_path, msg, "r1")
                conn.send(res.model_copy(update={"analysis": ins.analysis}))

        conn = hub.connect(d.name, reply)
        conn.send(wire.Hello(plan_hash=plan.plan.hash, pid=1, rows={}))
        hub.every(2.0, lambda conn=conn: conn.send(wire.Heartbeat(state="idle")) or True)
    return c, sink


def test_the_service_runs_the_analysis_workflow_and_its_result_equals_the_union_query(tmp_path):
    c, sink = _room(tmp_path)
    c._work()
    assert isinstance(c.analysis, Analysis) and c._work_names() == ["analysis:nuclei"]
    kinds = [e.type for e in sink.events]
    assert kinds.index("analysis_started") < kinds.index("analysis_completed")
    result = json.loads((tmp_path / "run" / "analyses" / "nuclei.json").read_text())
    got = {g["key"]["diagnosis"]: g["values"] for g in result["groups"]}
    for diagnosis, want in union_stats(tmp_path / "data").items():
        assert got[diagnosis]["count"] == want["count"]
        assert got[diagnosis]["mean(radius_mean)"] == pytest.approx(want["mean"], rel=1e-12)
        assert got[diagnosis]["variance(area_mean)"] == pytest.approx(want["variance"], rel=1e-10)


def test_aggregates_for_another_analysis_are_rejected_and_fail_the_run(tmp_path):
    c, sink = _room(tmp_path, forge="karolinska")
    with pytest.raises(JobAborted, match="analysis nuclei: domain karolinska sent aggregates the plan does not "
                                         "allow .aggregates for analysis 'other', which is not running"):
        c._work()
    assert [e.sender for e in sink.events if isinstance(e, ev.MessageRejected)] == ["karolinska"]
    assert not (tmp_path / "run" / "analyses" / "nuclei.json").exists()


def test_a_participant_that_never_joins_fails_the_run_after_the_join_timeout(tmp_path):
    c, sink = _room(tmp_path, silent="charite")
    with pytest.raises(JobAborted, match=r"analysis nuclei: domains charite did not join within \d+s"):
        c._work()
    assert not [e for e in sink.events if isinstance(e, ev.AnalysisStarted)]
