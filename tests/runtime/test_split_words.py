"""A split job's rounds are epochs everywhere a user reads them (issue 15, a user trial): the resume
line, the run's summary, the dashboard's events pane and the audit Markdown; and one epoch's
headless line fits 120 columns with a regression's losses in the thousands. In-process: an event
sequence and a run directory, no processes."""

from __future__ import annotations

import json
from pathlib import Path

from meshctl.compiler.compile import compile_mesh
from meshctl.runtime import events as ev
from meshctl.runtime.audit import Chain
from meshctl.runtime.audit_report import build_report, render_markdown
from meshctl.runtime.launcher import RunResult, headless_lines, summary_lines
from meshctl.runtime.run import RunManifest
from meshctl.runview import render_status
from meshctl.tui.plan_info import seed
from meshctl.tui.state import MeshState, reduce_all

ROOT = Path(__file__).resolve().parents[2]
PARTS = ["lab", "imaging", "clinic"]


def _events() -> list[ev.Event]:
    """malignancy (30 epochs) killed after epoch 16 and resumed, then completed."""
    done = [ev.RoundCompleted(job="malignancy", round=r, rounds=30, participants=PARTS, train_loss=0.3,
                              metrics={"loss": 0.2, "accuracy": 0.9}, bytes_in=55_744, bytes_out=70_790,
                              seconds=0.3, update_bytes=55_744) for r in range(1, 31)]
    return [ev.RunStarted(run="r1", mesh="vertical", plan_hash="h", run_dir="d", jobs=[], domains=PARTS),
            ev.JobStarted(job="malignancy", participants=PARTS, rounds=30, parameters=1290, quorum=3),
            *done[:16],
            ev.RunResumed(run="r1", rounds={"malignancy": 16}, reason="coordinator exited with code -9"),
            ev.RoundStarted(job="malignancy", round=17, participants=PARTS),
            *done[16:],
            ev.JobCompleted(job="malignancy", rounds=30, metrics={"loss": 0.2, "accuracy": 0.9},
                            model_path="models/malignancy.top.safetensors", seconds=4.0, domains=PARTS),
            ev.RunCompleted(run="r1", ok=True, seconds=9.0)]


def _run_dir(tmp_path: Path, events: list[ev.Event] | None = None) -> Path:
    plan = compile_mesh(ROOT / "examples" / "vertical" / "mesh.yaml").plan
    d = tmp_path / ".meshctl" / "runs" / "20261206-000000-abcd"
    (d / "logs").mkdir(parents=True)
    RunManifest(run=d.name, run_dir=str(d), base_dir=str(tmp_path), router="tcp://127.0.0.1:1",
                events="tcp://127.0.0.1:2", coordinator_key="k", coordinator_public="p", domain_keys={}).write()
    plan.write(d / "plan.toml")
    chain = Chain.open(d / "events.jsonl")  # a chained log, as the coordinator writes it
    lines = [chain.seal(json.loads(e.model_copy(update={"seq": i, "ts": 1.78e9 + i}).to_json()))
             for i, e in enumerate(events or _events(), 1)]
    (d / "events.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_the_resume_and_summary_lines_of_a_split_job_say_epoch(tmp_path: Path) -> None:
    lines = list(headless_lines(_events(), frozenset({"malignancy"})))
    assert "run r1 resumed (coordinator exited with code -9): malignancy after epoch 16" in lines
    done = summary_lines(RunResult(True, _run_dir(tmp_path), "", _events()))
    assert done[0].startswith("job malignancy: 30 epochs (resumed after epoch 16) in 4.00s"), done
    federated = list(headless_lines(_events(), frozenset()))  # a federated job's words are as before
    assert "run r1 resumed (coordinator exited with code -9): malignancy after round 16" in federated


def test_the_dashboard_events_pane_says_epoch_for_a_split_job() -> None:
    plan = compile_mesh(ROOT / "examples" / "vertical" / "mesh.yaml").plan
    texts = [line.text for line in reduce_all(_events(), seed(MeshState(), plan)).events]
    assert "job malignancy started: 3 participants, 30 epochs, 1,290 parameters" in texts
    assert "job malignancy epoch 17 started with 3 participants" in texts
    assert "run r1 resumed (coordinator exited with code -9): malignancy after epoch 16" in texts
    assert not [t for t in texts if "round" in t], texts


def test_the_audit_markdown_counts_a_split_jobs_epochs(tmp_path: Path) -> None:
    report = build_report(_run_dir(tmp_path))
    row = next(line for line in render_markdown(report).splitlines() if line.startswith("| malignancy "))
    assert "| 30 epochs |" in row, row


def test_an_epoch_of_a_regression_fits_one_line_of_120_columns() -> None:
    e = ev.RoundCompleted(job="progression", round=60, rounds=60, participants=["clinic", "lab"],
                          train_loss=29722.17417, metrics={"loss": 20711.6726, "mae": 127.6916, "rmse": 143.9155,
                                                           "r2": -3.2358}, bytes_in=10_832, bytes_out=17_509,
                          seconds=1.68, update_bytes=10_832)
    lines = list(headless_lines([e], frozenset({"progression"})))
    assert lines == [("progression  epoch  60/60  train_loss 29722  loss 20712  mae 127.69  rmse 143.92  r2 -3.2358  "
                      "in+out 27.7 KiB  1.680s")]
    assert len(lines[0]) <= 120


def test_status_says_once_how_a_daemon_ended(tmp_path: Path) -> None:
    lost = ev.DomainLost(domain="lab", reason="daemon exited with code -9: see its log", cause="exited with code -9")
    status = render_status(_run_dir(tmp_path, [*_events()[:3], lost]))
    assert "daemon exited with code -9: see its log" in status and "exited with code -9: daemon" not in status
