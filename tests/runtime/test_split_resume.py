"""A run holding an unfinished split job is not resumed (docs/split-learning.md): the job keeps no
checkpoints, so a restart would train its epochs again and break the audit log."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from meshctl.compiler.compile import compile_mesh
from meshctl.errors import UserError
from meshctl.runtime import events as ev
from meshctl.runtime.coordinator.split import unfinished_split
from meshctl.runtime.launcher import resume_run
from meshctl.runtime.run import EVENTS_FILE, RunManifest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vertical"


def _killed_run(tmp_path: Path, *events: ev.Event) -> Path:
    """A run directory of examples/vertical whose processes are gone, with `events` written."""
    shutil.copytree(EXAMPLE / "data", tmp_path / "data")
    shutil.copy(EXAMPLE / "mesh.yaml", tmp_path / "mesh.yaml")
    plan = compile_mesh(tmp_path / "mesh.yaml").plan
    assert plan is not None
    run_dir = tmp_path / ".meshctl" / "runs" / "r1"
    run_dir.mkdir(parents=True)
    plan.write(run_dir / "plan.toml")
    RunManifest(run="r1", run_dir=str(run_dir), base_dir=str(tmp_path), router="tcp://127.0.0.1:0",
                events="tcp://127.0.0.1:0", coordinator_key="", coordinator_public="",
                domain_keys={}).write()
    lines = [ev.RunStarted(run="r1", mesh="mesh.yaml", plan_hash=plan.plan.hash, run_dir=str(run_dir),
                           jobs=["malignancy"], domains=["clinic", "lab"]), *events]
    (run_dir / EVENTS_FILE).write_text("".join(e.to_json() + "\n" for e in lines))
    return run_dir


def test_a_run_killed_during_its_split_job_is_refused_in_one_line(tmp_path):
    run_dir = _killed_run(tmp_path, ev.JobStarted(job="malignancy", participants=["clinic", "lab"], rounds=30, parameters=1,
                                                    quorum=2))
    assert unfinished_split(run_dir) == "malignancy"
    with pytest.raises(UserError, match=r"^run r1 holds split job malignancy, which keeps no checkpoints: "
                                        r"it cannot be resumed$"):
        resume_run(str(run_dir), tmp_path / "mesh.yaml")


def test_a_completed_split_job_does_not_stop_a_resume(tmp_path):
    run_dir = _killed_run(tmp_path, ev.JobCompleted(job="malignancy", rounds=30, metrics={}, model_path="m",
                                                                seconds=1.0))
    assert unfinished_split(run_dir) is None
