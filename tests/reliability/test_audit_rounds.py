"""Issue 9 items 3 and 5: `audit verify` catches duplicated or restarted rounds but accepts a
legitimate resume, and a run that never started (a failed start) does not break it for good."""

from __future__ import annotations

import csv
import socket
from pathlib import Path

import pytest

from meshctl.errors import UserError
from meshctl.runtime.audit import Chain, plan_hash_of, run_anchor, verify_mesh, verify_run
from meshctl.runtime.launcher import LocalRun, prepare_run, state_dir
from meshctl.runtime.run import EVENTS_FILE, RunManifest


def _run(tmp_path: Path, make_plan, events: list[dict], metrics: list[tuple[str, int]] = ()) -> Path:
    """A run directory whose events.jsonl is a correctly chained log of `events`."""
    run_dir = tmp_path / ".meshctl" / "runs" / "20260101-000000-abcd"
    (run_dir / "logs").mkdir(parents=True)
    make_plan(n=2, rounds=6).write(run_dir / "plan.toml")
    RunManifest(run=run_dir.name, run_dir=str(run_dir), base_dir=str(tmp_path), router="tcp://127.0.0.1:1",
                events="tcp://127.0.0.1:2", coordinator_key="", coordinator_public="", domain_keys={}).write()
    chain = Chain(run_anchor(plan_hash_of(run_dir / "plan.toml")[0], run_dir.name))
    lines = [chain.seal({"seq": n, "ts": 0.0, **e}) for n, e in enumerate(events, 1)]
    (run_dir / EVENTS_FILE).write_text("".join(f"{line}\n" for line in lines))
    if metrics:
        with (run_dir / "metrics.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["job", "round"], *metrics])
    return run_dir


def _rounds(job: str, *rounds: int) -> list[dict]:
    return [{"type": "round_completed", "job": job, "round": r} for r in rounds]


START = [{"type": "run_started", "run": "r"}]


def test_a_duplicated_round_fails_verify_naming_job_and_round(tmp_path, make_plan):
    run = _run(tmp_path, make_plan, START + _rounds("digits", 1, 2, 3, 3, 4))
    v = verify_run(run)
    assert not v.ok
    [problem] = v.problems
    assert "events.jsonl:5:" in problem and "job digits round 3 completed again" in problem


def test_a_run_restarted_from_round_1_fails_verify(tmp_path, make_plan):
    """What the hidden `meshctl coordinator --run-dir` did on a killed run: run_started again, round 1 again."""
    run = _run(tmp_path, make_plan, START + _rounds("digits", 1, 2, 3) + START + _rounds("digits", 1, 2),
               metrics=[("digits", 1), ("digits", 2), ("digits", 3), ("digits", 1), ("digits", 2)])
    problems = verify_run(run).problems
    assert any("job digits round 1 completed again" in p for p in problems)
    assert any("metrics.csv:5: job digits round 1 recorded again" in p for p in problems)


def test_a_legitimate_resume_still_verifies(tmp_path, make_plan):
    """Rounds 4 and 5 completed before the crash, the newest checkpoint was round 3: trained again."""
    resumed = [{"type": "run_resumed", "run": "r", "rounds": {"digits": 3}, "reason": "killed"}]
    run = _run(tmp_path, make_plan, START + _rounds("digits", 1, 2, 3, 4, 5) + resumed + _rounds("digits", 4, 5, 6),
               metrics=[("digits", r) for r in range(1, 7)])
    v = verify_run(run)
    assert v.ok, v.problems


def test_a_repeat_beyond_what_the_resume_explains_fails(tmp_path, make_plan):
    resumed = [{"type": "run_resumed", "run": "r", "rounds": {"digits": 4}, "reason": "killed"}]
    run = _run(tmp_path, make_plan, START + _rounds("digits", 1, 2, 3, 4, 5) + resumed + _rounds("digits", 3, 4))
    assert any("job digits round 3 completed again after round 4" in p for p in verify_run(run).problems)


def test_a_duplicated_metrics_row_fails_verify(tmp_path, make_plan):
    run = _run(tmp_path, make_plan, START + _rounds("digits", 1, 2),
               metrics=[("digits", 1), ("digits", 2), ("digits", 2)])
    assert verify_run(run).problems == [
        f"{run / 'metrics.csv'}:4: job digits round 2 recorded again (first at line 3; duplicated or restarted round)"]


def test_a_busy_port_leaves_no_run_directory(hospitals, meshctl):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = meshctl("up", "--headless", "--address", f"tcp://127.0.0.1:{port}", cwd=hospitals.parent)
    assert out.returncode == 1 and f"port {port} on 127.0.0.1 is in use" in out.stderr
    runs = hospitals.parent / ".meshctl" / "runs"
    assert not runs.exists() or not list(runs.iterdir())


def test_a_port_taken_between_check_and_bind_ends_the_run_and_verify_passes(mesh_file, make_plan):
    """The bind race of two `up`s: the port was free when the run was prepared, taken when it binds."""
    for _ in range(5):  # a free port: another test (another xdist worker) may take it before prepare_run
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            manifest, observer = prepare_run(mesh_file, make_plan(n=2, rounds=3), address=f"tcp://127.0.0.1:{port}")
            break
        except UserError:
            continue
    else:
        pytest.fail("no free port in 5 tries")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        run = LocalRun(manifest, observer)
        run.start()
        result = run.finish()
    assert not result.ok and "Address already in use" in result.reason
    v = verify_mesh(state_dir(mesh_file))
    assert v.ok, v.problems
    assert not list((manifest.path / "keys").glob("*.key_secret"))


def test_a_run_that_never_started_verifies_with_a_note(mesh_file, make_plan):
    """A run directory left by a start that failed before the coordinator wrote any event."""
    manifest, _ = prepare_run(mesh_file, make_plan(n=2, rounds=3), address="tcp://127.0.0.1:0")
    v = verify_mesh(state_dir(mesh_file))
    assert v.ok, v.problems
    assert any("never started (no events)" in n for n in v.notes)
    assert verify_run(manifest.path).ok
