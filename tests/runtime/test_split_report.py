"""A split-learning run's audit report (Markdown) and lineage name its split model and intersection."""

from __future__ import annotations

from pathlib import Path

import zmq
from openlineage_schemas import problems

from meshctl.compiler.compile import compile_mesh
from meshctl.runtime import events as ev
from meshctl.runtime import lineage
from meshctl.runtime.audit_report import build_report, render_markdown
from meshctl.runtime.coordinator import EventSink
from meshctl.runtime.run import RunManifest

ROOT = Path(__file__).resolve().parents[2]


def _record_split_run(root: Path) -> Path:
    plan = compile_mesh(ROOT / "examples" / "vertical" / "mesh.yaml").plan
    assert plan is not None
    d = root / ".meshctl" / "runs" / "r-0001"
    d.mkdir(parents=True)
    plan.write(d / "plan.toml")
    RunManifest(run="r-0001", run_dir=str(d), base_dir=str(root), router="tcp://127.0.0.1:1",
                events="tcp://127.0.0.1:2", coordinator_key="k", coordinator_public="p", domain_keys={}).write()
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(f"inproc://split-report-{id(d)}")
    sink = EventSink(d / "events.jsonl", pub)
    parties = ["lab", "imaging", "clinic"]
    sink.emit(ev.RunStarted(run="r-0001", mesh=plan.plan.mesh, plan_hash=plan.plan.hash, run_dir=str(d),
                            jobs=["malignancy"], domains=parties))
    sink.emit(ev.JobStarted(job="malignancy", participants=parties, rounds=15, parameters=100, quorum=3))
    sink.emit(ev.IntersectionComputed(job="malignancy", size=484, parties=parties))
    sink.emit(ev.JobCompleted(job="malignancy", rounds=15, metrics={"accuracy": 0.95},
                              model_path="models/malignancy.top.safetensors", seconds=1.5))
    sink.emit(ev.RunCompleted(run="r-0001", ok=True, seconds=2.0))
    sink.close()
    pub.close()
    return d


def test_the_markdown_report_lists_the_split_model_and_its_intersection(tmp_path):
    # Execute
    md = render_markdown(build_report(_record_split_run(tmp_path)))
    # Assert
    ran = md.split("## What ran\n\n", 1)[1].split("\n## ", 1)[0]
    assert "(none)" not in ran.splitlines()[0]
    assert "| malignancy | split model |" in ran
    assert "### Split model malignancy" in md and "- intersection: 484 shared ids" in md
    assert "| lab | lab.nuclei |" in md


def test_the_lineage_of_a_split_model_names_the_intersection(tmp_path):
    # Execute
    events = lineage.export_events(_record_split_run(tmp_path))
    # Assert
    complete = next(e for e in events if e["eventType"] == "COMPLETE")
    assert complete["run"]["facets"]["meshctl"]["intersection"] == 484
    assert complete["run"]["facets"]["meshctl"]["_schemaURL"] == lineage.CUSTOM_FACET
    for e in events:
        assert problems(e) == []
