"""A split job's rounds are epochs (issue 15): the headless lines, the run's summary, the dashboard's
job views, `meshctl status` and `meshctl runs` say `epoch`; the events stay `round_completed` and a
federated job's lines say `round` as before. In-process: events and a run directory, no processes."""

from __future__ import annotations

from pathlib import Path

from meshctl.compiler.compile import compile_mesh
from meshctl.runtime import events as ev
from meshctl.runtime.launcher import RunResult, epoch_jobs, headless_lines, summary_lines
from meshctl.runtime.run import RunDir, RunManifest
from meshctl.runview import render_runs, render_status
from meshctl.tui.plan_info import seed
from meshctl.tui.state import MeshState, coordinator_status, reduce_all, summary
from meshctl.tui.widgets.failure_banner import failure_lines

ROOT = Path(__file__).resolve().parents[2]
PARTS = ["clinic", "lab"]


def _events(job: str, *, fail: bool = False) -> list[ev.Event]:
    out: list[ev.Event] = [
        ev.RunStarted(run="r1", mesh="m", plan_hash="h", run_dir="d", jobs=[job], domains=PARTS),
        ev.JobStarted(job=job, participants=PARTS, rounds=3, parameters=185, quorum=2),
        ev.RoundCompleted(job=job, round=1, rounds=3, participants=PARTS, train_loss=2.0, metrics={"mae": 1.5},
                          bytes_in=10, bytes_out=10, seconds=0.1)]
    if fail:
        return [*out, ev.JobFailed(job=job, round=2, reason=f"split job {job}: the loss at clinic diverged"),
                ev.RunCompleted(run="r1", ok=False, seconds=1.0, reason="x")]
    return [*out, ev.JobCompleted(job=job, rounds=3, metrics={"mae": 1.5}, model_path="models/x", seconds=0.5),
            ev.RunCompleted(run="r1", ok=True, seconds=1.0)]


def _run_dir(tmp_path: Path, events: list[ev.Event]) -> Path:
    plan = compile_mesh(ROOT / "examples" / "vertical-regression" / "mesh.yaml").plan
    d = tmp_path / ".meshctl" / "runs" / "20261206-000000-abcd"
    (d / "logs").mkdir(parents=True)
    RunManifest(run=d.name, run_dir=str(d), base_dir=str(tmp_path), router="tcp://127.0.0.1:1",
                events="tcp://127.0.0.1:2", coordinator_key="k", coordinator_public="p", domain_keys={}).write()
    plan.write(d / "plan.toml")
    lines = [e.model_copy(update={"seq": i, "ts": 1.78e9 + i}).to_json() for i, e in enumerate(events, 1)]
    (d / "events.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_the_headless_lines_of_a_split_job_say_epoch(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path, _events("progression"))
    assert epoch_jobs(run_dir) == {"progression"}
    lines = list(headless_lines(_events("progression"), epoch_jobs(run_dir)))
    assert "job progression started: 2 participants, 3 epochs, 185 parameters" in lines
    assert any(line.startswith("progression  epoch   1/3  train_loss 2.0000  mae 1.5000  in+out 20 B")
               for line in lines), lines
    assert any(line.startswith("job progression completed after 3 epochs: mae=1.5000") for line in lines), lines
    failed = list(headless_lines(_events("progression", fail=True), frozenset({"progression"})))
    assert "job progression failed in epoch 2: split job progression: the loss at clinic diverged" in failed
    done = summary_lines(RunResult(True, run_dir, "", _events("progression")))
    assert done[0].startswith("job progression: 3 epochs in 0.50s  mae 1.5000"), done


def test_a_federated_job_keeps_its_rounds(tmp_path: Path) -> None:
    lines = list(headless_lines(_events("digits"), frozenset({"progression"})))
    assert "job digits started: 2 participants, 3 rounds, 185 parameters" in lines
    assert any(line.startswith("digits  round   1/3") for line in lines)
    assert epoch_jobs(tmp_path) == frozenset()  # no plan: nothing is called an epoch


def test_the_dashboard_calls_a_split_jobs_rounds_epochs_with_or_without_the_plan() -> None:
    plan = compile_mesh(ROOT / "examples" / "vertical-regression" / "mesh.yaml").plan
    training = _events("progression")[:3]
    state = reduce_all(training, seed(MeshState(), plan))
    assert state.jobs["progression"].unit == "epoch"
    assert coordinator_status(reduce_all([ev.RoundStarted(job="progression", round=2, participants=PARTS)], state)) \
        == "training progression, epoch 2/3"
    attached = reduce_all([training[0], ev.IntersectionComputed(job="progression", size=376, parties=PARTS,
                                                                min_intersection=100), *training[1:]])
    assert attached.jobs["progression"].unit == "epoch"  # attached to a run: the intersection says so
    failed = reduce_all(_events("progression", fail=True), seed(MeshState(), plan))
    assert "summary: job progression failed, 1/3 epochs" in "\n".join(summary(failed))  # (epochs completed)
    assert ("job", "progression (epoch 2): split job progression: the loss at clinic diverged") \
        in failure_lines(failed, None)  # (the epoch that was running)
    assert "digits failed, 1/3 rounds" in "\n".join(summary(reduce_all(_events("digits", fail=True))))


def test_every_view_of_a_failed_split_job_counts_its_epochs_by_one_rule(tmp_path: Path) -> None:
    """Progress is the epochs completed (1/3); `failed in epoch 2` is the one that was running: the dashboard's
    header, summary and failure box, the headless line, `meshctl status` and `meshctl runs` agree."""
    from meshctl.tui.widgets.run_header import RunHeader

    plan = compile_mesh(ROOT / "examples" / "vertical-regression" / "mesh.yaml").plan
    events = _events("progression", fail=True)
    state = reduce_all(events, seed(MeshState(), plan))
    assert "progression 1/3 failed" in RunHeader._jobs_line(state)
    assert "summary: job progression failed, 1/3 epochs" in "\n".join(summary(state))
    assert ("job", "progression (epoch 2): split job progression: the loss at clinic diverged") \
        in failure_lines(state, None)
    assert "job progression failed in epoch 2: split job progression: the loss at clinic diverged" in [
        ev.in_epochs(e, e.message(), {"progression"}) for e in events]
    assert "job progression failed in epoch 2:" in "\n".join(headless_lines(iter(events), {"progression"}))
    run_dir = _run_dir(tmp_path, events)
    assert "progression  failed  1/3 epochs" in render_status(run_dir)
    assert "1/3 epochs" in render_runs(tmp_path)
    # a failure before epoch 1 (the intersection, the data, min_intersection) is not `in epoch 0`
    early = [*events[:2], ev.JobFailed(job="progression", round=0, reason="split job progression: the parts share "
                                       "10 entities, fewer than min_intersection 100")]
    state = reduce_all(early, seed(MeshState(), plan))
    assert failure_lines(reduce_all([ev.RunCompleted(run="r1", ok=False, seconds=1.0, reason="x")], state), None)[1] \
        == ("job", early[-1].reason.replace("split job", "progression (before epoch 1): split job", 1))
    assert ev.in_epochs(early[-1], early[-1].message(), {"progression"}).startswith(
        "job progression failed before epoch 1: ")
    assert "summary: job progression failed, 0/3 epochs" in "\n".join(summary(state))


def test_status_and_runs_count_a_split_jobs_epochs(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path, _events("progression"))
    assert [(j.name, j.unit) for j in RunDir(run_dir).jobs()] == [("progression", "epoch")]
    assert "progression  completed  3/3 epochs" in render_status(run_dir)
    assert "3/3 epochs" in render_runs(tmp_path)


def test_the_jobs_panel_says_epoch_for_a_split_job() -> None:
    import asyncio

    from meshctl.tui import make_app
    from meshctl.tui.widgets import JobsPanel

    plan = compile_mesh(ROOT / "examples" / "vertical-regression" / "mesh.yaml").plan

    async def run() -> str:
        app = make_app(plan=plan, clock=lambda: 1.78e9 + 10)
        async with app.run_test(size=(120, 40)) as pilot:
            for i, e in enumerate([*_events("progression")[:3],
                                   ev.RoundStarted(job="progression", round=2, participants=PARTS)], 1):
                app.feed(e.model_copy(update={"seq": i, "ts": 1.78e9 + i}))
            await pilot.pause()
            app.flush()
            return app.query_one(JobsPanel).text

    panel = asyncio.run(run())
    assert "progression epoch 2/3 training" in panel and "training progression, epoch 2/3" in panel, panel


def test_status_shows_a_domain_that_refused_its_data_or_its_state_as_refused_not_joined(tmp_path: Path) -> None:
    """As the dashboard does (`refused (data)`): a split part's runtime `data` or `resume` denial, and a federated
    domain whose daemon could not start on its data (`domain_lost`, cause `data refused`)."""
    joined = [ev.DomainJoined(domain=d, pid=7, products=[]) for d in PARTS]
    events = [*_events("progression")[:2], *joined,
              ev.PolicyDecided(policy="data", scope="product", subject="model.progression", effect="deny",
                               reason="lab.serum: column ldl is not in data/lab.parquet", stage="runtime", domain="lab"),
              ev.JobFailed(job="progression", round=0, reason="split job progression: domain lab refused the job"),
              ev.RunCompleted(run="r1", ok=False, seconds=1.0, reason="x")]
    run_dir = _run_dir(tmp_path, events)
    assert {d.name: (d.state, d.reason) for d in RunDir(run_dir).domains()}["lab"] == (
        "refused", "data: lab.serum: column ldl is not in data/lab.parquet")
    assert "0 missing, 1 lost or refused" in render_status(run_dir)
    lost = ev.DomainLost(domain="clinic", reason="cannot read product clinic.visits", cause="data refused")
    federated = RunDir(_run_dir(tmp_path / "b", [*events[:2], lost, events[-1]]))
    assert {d.name: d.state for d in federated.domains()}["clinic"] == "refused"
