"""`meshctl resume` of a run killed during its split job (docs/split-learning.md "Resuming a split job"):
real processes, DuckDB and ZeroMQ. The whole tree is killed as a power cut would, after the resume point of
epoch 1; the resumed run takes the job up after its newest recorded epoch, drops no row it keeps, and its
audit log verifies. (The supervisor's resume and the equality with an uninterrupted run:
tests/e2e/test_vertical.py; the logic and the refusals: tests/runtime/rooms/test_split_resume_room.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

from power import power_cut

from meshctl.compiler.compile import compile_mesh
from meshctl.runtime import events as ev
from meshctl.runtime.audit import verify_run
from meshctl.runtime.launcher import resume_run, start_run

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vertical"
EPOCHS = 6
"""The kill lands mid-job however late the follower sees the record of epoch 1."""


def test_meshctl_resume_takes_a_killed_split_job_up_after_its_newest_epoch(tmp_path):
    # Prepare: examples/vertical with 6 epochs of sgd (Adam's first step imports torch._dynamo in each domain)
    text = (EXAMPLE / "mesh.yaml").read_text()
    text = text.replace("epochs: 30", f"epochs: {EPOCHS}").replace("optimizer: adam, lr: 0.01", "optimizer: sgd, lr: 0.1")
    shutil.copytree(EXAMPLE / "data", tmp_path / "data")
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(text)
    plan = compile_mesh(mesh).plan
    assert plan is not None
    run = start_run(mesh, plan, address="tcp://127.0.0.1:0")
    for e in run.follow():
        if isinstance(e, ev.CheckpointWritten) and e.job == "malignancy":
            break
    power_cut(run)  # no one gets to clean up
    # Execute
    resumed = resume_run(run.m.run, mesh)
    list(resumed.follow())
    result = resumed.finish()
    # Assert
    assert result.ok, result.reason
    events = ev.read_events(str(result.run_dir / "events.jsonl"))
    (point,) = [e for e in events if isinstance(e, ev.RunResumed)]
    assert 1 <= point.rounds["malignancy"] <= EPOCHS
    assert [e.job for e in events if isinstance(e, ev.JobCompleted)] == ["malignancy"]
    rounds = [int(line.split(",")[1]) for line in (result.run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert rounds == list(range(1, EPOCHS + 1))
    assert verify_run(result.run_dir).ok
