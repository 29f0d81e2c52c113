"""What a reviewer found wrong on the dashboard: a job failed before round 1 shows the plan's
rounds (0/15, not 0/?); a split job whose domains all joined is not `waiting for quorum (0/3)`."""

from __future__ import annotations

from pathlib import Path

from meshctl.compiler.compile import compile_mesh
from meshctl.runtime import events as ev
from meshctl.tui.plan_info import seed
from meshctl.tui.state import MeshState, coordinator_status, reduce_all, summary

ROOT = Path(__file__).resolve().parents[2]


def _vertical() -> MeshState:
    plan = compile_mesh(ROOT / "examples" / "vertical" / "mesh.yaml").plan
    assert plan is not None
    return seed(MeshState(), plan)


def test_a_job_failed_before_its_first_round_shows_the_planned_rounds() -> None:
    # Prepare
    state = _vertical()
    epochs = compile_mesh(ROOT / "examples" / "vertical" / "mesh.yaml").plan.split_models[0].epochs
    # Execute
    reduce_all([ev.RunStarted(run="r1", mesh="m", plan_hash="h", run_dir="d", jobs=["malignancy"],
                              domains=["lab", "imaging", "clinic"]),
                ev.JobFailed(job="malignancy", round=0, reason="domains lab did not join"),
                ev.RunCompleted(run="r1", ok=False, seconds=5.0, reason="x")], state)
    # Assert
    assert state.jobs["malignancy"].rounds_total == epochs
    assert f"0/{epochs} epochs" in "\n".join(summary(state))  # a split job's rounds are epochs


def test_a_split_job_whose_domains_joined_is_not_waiting_for_quorum() -> None:
    # Prepare
    state = _vertical()
    parties = ["lab", "imaging", "clinic"]
    # Execute
    reduce_all([ev.RunStarted(run="r1", mesh="m", plan_hash="h", run_dir="d", jobs=["malignancy"],
                              domains=parties),
                *[ev.DomainJoined(domain=d) for d in parties],
                ev.JobStarted(job="malignancy", participants=parties, rounds=30, parameters=10, quorum=3)],
               state)
    # Assert
    assert coordinator_status(state) == "starting malignancy (3/3 domains joined)"
