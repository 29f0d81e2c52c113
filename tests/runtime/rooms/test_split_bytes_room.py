"""The bytes benchmarks/split_workload.py says cross per split batch and epoch (`crossing`, computed
from the parts) are what the coordinator measures (a `round_completed`'s update_bytes), with the top
model at the label owner (only the other parts' activations and gradients cross) and at the
coordinator (every part's, the logits and their gradients), for a classification and a regression.
On the in-memory hub with the real SplitDomain (tests/runtime/rooms/test_split_tasks_room.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from test_split_tasks_room import MALIGNANCY, PROGRESSION, _room

from meshctl.runtime import events as ev
from meshctl.runtime.kernels.split import holdout_split

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("split_workload", ROOT / "benchmarks" / "split_workload.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

AT_COORDINATOR = ("top: {hidden: [16]}", "top: {hidden: [16], at: coordinator}")


@pytest.mark.parametrize(("mesh", "edits", "batch_in"), [
    ("vertical/mesh.yaml", MALIGNANCY, 2 * 2 * 32 * 8 * 4),  # lab's and imaging's acts and grads; not the clinic's
    ("vertical/mesh.yaml", (*MALIGNANCY, AT_COORDINATOR), (3 * 8 + 2) * 32 * 4),  # every part's acts, logit grads
    ("vertical-regression/mesh.yaml", PROGRESSION, 2 * 32 * 4 * 4),  # the lab's acts and grads
])
def test_the_benchmarks_bytes_are_the_runs(tmp_path: Path, mesh: str, edits: tuple, batch_in: int) -> None:
    c, sink = _room(tmp_path, mesh, *edits)
    c._work()
    split_job = c.plan.split_models[0]
    size = next(e.size for e in sink.events if isinstance(e, ev.IntersectionComputed))
    train, hold = holdout_split(size, split_job.holdout, split_job.seed)
    measured = [e.update_bytes for e in sink.events if isinstance(e, ev.RoundCompleted)]
    predicted = bench.crossing(split_job, len(train), len(hold))
    assert measured == [predicted["epoch_update_bytes"]]
    assert predicted["batch_in"] == batch_in
