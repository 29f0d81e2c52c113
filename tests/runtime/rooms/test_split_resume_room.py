"""Resuming a split job (issue 15) on the in-memory hub: each scripted domain is the real SplitDomain over
examples/vertical's data (DuckDB). A coordinator that dies after epoch 2 is replaced by a resumed one with
new domains (new processes: nothing in memory), which take up their kept state and finish the job with the
uninterrupted run's top model, bit for bit. No processes, no sockets, no sleeps."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from sinks import ListSink
from split_hub import split_service

from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import Plan
from meshctl.runtime import events as ev
from meshctl.runtime.coordinator import Coordinator, JobAborted
from meshctl.runtime.coordinator.split import top_path
from meshctl.runtime.domain import split_state

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "vertical"
EPOCHS = 3
SGD = ("optimizer: adam, lr: 0.01", "optimizer: sgd, lr: 0.1")
"""Adam's first step imports torch._dynamo (seconds): only the equality test, whose moments must come back, uses it."""


class Died(BaseException):
    """The coordinator process died here (SIGKILL): nothing after it runs."""


class DyingSink(ListSink):
    """Events in a list; the coordinator dies right after emitting `at` (a predicate)."""

    def __init__(self, at: Any = None) -> None:
        super().__init__()
        self.at = at

    def emit(self, event: ev.Event) -> ev.Event:
        super().emit(event)
        if self.at is not None and self.at(event):
            raise Died()
        return event


def _mesh(tmp_path: Path, *edits: tuple[str, str]) -> Plan:
    text = (EXAMPLE / "mesh.yaml").read_text()
    for old, new in (("epochs: 30", f"epochs: {EPOCHS}"), *edits):  # adam: its moments are state to resume
        assert old in text, old
        text = text.replace(old, new)
    shutil.copytree(EXAMPLE / "data", tmp_path / "data")
    (tmp_path / "mesh.yaml").write_text(text)
    plan = compile_mesh(tmp_path / "mesh.yaml").plan
    assert plan is not None
    return plan


def _coordinator(tmp_path: Path, plan: Plan, sink: ListSink, resumed: str = "",
                 checkpoint: bool = True) -> Coordinator:
    """A coordinator of run r1 whose domains are fresh SplitDomains (a new daemon each) on a new hub."""
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "events.jsonl").touch()
    return split_service(tmp_path, plan, checkpoint=checkpoint, resumed=resumed, sink=sink)[0]


def _killed_after(tmp_path: Path, plan: Plan, epoch: int) -> None:
    """Run until the resume point of `epoch` is recorded, then die there."""
    sink = DyingSink(lambda e: isinstance(e, ev.CheckpointWritten) and e.round == epoch)
    with pytest.raises(Died):
        _coordinator(tmp_path, plan, sink)._work()


def test_a_resumed_split_job_ends_with_the_uninterrupted_top_model(tmp_path):
    # Prepare: one run straight; one whose coordinator dies after epoch 2 and is resumed
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()
    plan = _mesh(straight)
    sink = ListSink()
    _coordinator(straight, plan, sink)._work()
    _mesh(killed)
    _killed_after(killed, plan, 2)
    # Execute
    resumed = ListSink()
    c = _coordinator(killed, plan, resumed, resumed="the coordinator killed by SIGKILL")
    c._work()
    # Assert: epochs 3 and 4 ran (after the intersection again), with the same top model, bottoms and metrics
    assert c.split_resume_points == {"malignancy": (2, next(e.metrics for e in sink.events if isinstance(
        e, ev.RoundCompleted) and e.round == 2))}
    assert [e.round for e in resumed.of(ev.RoundCompleted)] == [3]
    assert resumed.kinds().index("intersection_computed") < resumed.kinds().index("round_started")
    a, b = load_file(str(top_path(straight / "run", "malignancy"))), load_file(str(top_path(killed / "run", "malignancy")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for d in ("lab", "imaging", "clinic"):
        a = load_file(str(straight / ".meshctl" / "split" / "r1" / d / "malignancy.safetensors"))
        b = load_file(str(killed / ".meshctl" / "split" / "r1" / d / "malignancy.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), d
    assert resumed.of(ev.JobCompleted)[0].metrics == sink.of(ev.JobCompleted)[0].metrics
    rows = (killed / "run" / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[1] for r in rows] == ["1", "2", "3"]
    assert [r.split(",")[3:6] for r in rows] == [
        r.split(",")[3:6] for r in (straight / "run" / "metrics.csv").read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def killed_at_the_end(tmp_path_factory) -> tuple[Path, Plan]:
    """(directory, plan) of a 2-epoch sgd run whose coordinator died after recording its last epoch (made once:
    each test works on its own copy)."""
    base = tmp_path_factory.mktemp("killed")
    plan = _mesh(base, SGD, ("epochs: 3", "epochs: 2"))
    _killed_after(base, plan, 2)
    return base, plan


def _copy(killed: tuple[Path, Plan], tmp_path: Path) -> Plan:
    shutil.copytree(killed[0], tmp_path, dirs_exist_ok=True)
    return killed[1]


def test_a_resume_after_the_last_epoch_only_finishes_the_job(killed_at_the_end, tmp_path):
    plan = _copy(killed_at_the_end, tmp_path)
    resumed = ListSink()
    _coordinator(tmp_path, plan, resumed, resumed="killed")._work()
    assert not resumed.of(ev.RoundStarted)
    done = resumed.of(ev.JobCompleted)[0]
    assert set(done.metrics) == {"loss", "accuracy"}
    assert top_path(tmp_path / "run", "malignancy").is_file()


def test_a_part_whose_state_is_gone_refuses_the_resumed_job_in_one_line(killed_at_the_end, tmp_path):
    plan = _copy(killed_at_the_end, tmp_path)
    kept = split_state.job_dir(tmp_path, "r1", "lab", "malignancy")
    (kept / "epoch-0002.safetensors").unlink()
    sink = ListSink()
    with pytest.raises(JobAborted, match=r"^split job malignancy: domain lab refused: cannot resume after epoch 2: "
                                         r"no state of epoch 2 kept; the run cannot be resumed again: start a new "
                                         r"one with `meshctl up`$"):
        _coordinator(tmp_path, plan, sink, resumed="killed")._work()
    # refused (a `resume` denial, as the dashboard and `meshctl status` show it), not lost
    assert not sink.of(ev.DomainLost)
    assert [e.round for e in sink.of(ev.JobFailed)] == [2]  # (the epoch it was to run; after the last, the last)
    assert [(e.policy, e.effect, e.domain, e.reason) for e in sink.of(ev.PolicyDecided)] == [
        ("resume", "deny", "lab", "cannot resume after epoch 2: no state of epoch 2 kept")]


def test_a_part_whose_data_changed_refuses_the_resumed_job(killed_at_the_end, tmp_path):
    plan = _copy(killed_at_the_end, tmp_path)
    import duckdb

    src = tmp_path / "data" / "lab.parquet"
    with duckdb.connect() as con:  # the same patients, one value changed
        con.execute(f"CREATE TABLE src AS SELECT * FROM read_parquet('{src}')")
        con.execute("UPDATE src SET radius_mean = radius_mean + 1 WHERE rowid = 0")
        con.execute(f"COPY src TO '{src}' (FORMAT parquet)")
    with pytest.raises(JobAborted, match=r"^split job malignancy: domain lab refused: cannot resume after epoch 2: "
                                         r"the data changed since epoch 2 \(its standardization differs\); the run "):
        _coordinator(tmp_path, plan, ListSink(), resumed="killed")._work()


def test_without_checkpoints_a_split_job_keeps_nothing(tmp_path):
    plan = _mesh(tmp_path, SGD, ("epochs: 3", "epochs: 1"))
    sink = ListSink()
    _coordinator(tmp_path, plan, sink, checkpoint=False)._work()
    assert not sink.of(ev.CheckpointWritten)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not split_state.job_dir(tmp_path, "r1", "lab", "malignancy").exists()


def test_a_resumed_noisy_job_draws_fresh_noise_and_keeps_no_noise_generator(tmp_path):
    """The activation noise's generator is seeded from the operating system in each new domain and never kept:
    a resumed noisy job draws noise no earlier epoch drew (documented), and its state files hold only the
    models, the optimizers and the modules' RNG."""
    plan = _mesh(tmp_path, SGD, ("epochs: 3", "epochs: 2"),
                 ("min_intersection: 100", "min_intersection: 100\n    activations: {clip: 3.0, noise: 0.1}"))
    _killed_after(tmp_path, plan, 1)
    kept = split_state.load(split_state.job_dir(tmp_path, "r1", "lab", "malignancy"), 1)[0]
    assert {k.split("/")[0] for k in kept} == {"bottom", "rng"}  # (sgd without momentum keeps no optimizer tensor)
    resumed = ListSink()
    _coordinator(tmp_path, plan, resumed, resumed="killed")._work()
    assert [e.round for e in resumed.of(ev.RoundCompleted)] == [2] and resumed.of(ev.JobCompleted)


def test_a_kill_between_an_epochs_row_and_its_resume_point_trains_that_epoch_once_more_not_twice(tmp_path):
    """Killed after epoch 1's metrics row but before its resume point: the job starts again from epoch 1,
    and metrics.csv holds each epoch once (the row of the epoch trained again replaces the old one)."""
    plan = _mesh(tmp_path, SGD, ("epochs: 3", "epochs: 2"))
    with pytest.raises(Died):
        _coordinator(tmp_path, plan, DyingSink(lambda e: isinstance(e, ev.RoundCompleted) and e.round == 1))._work()
    resumed = ListSink()
    c = _coordinator(tmp_path, plan, resumed, resumed="killed")
    c._work()
    assert c.split_resume_points == {"malignancy": (0, {})}
    assert [e.round for e in resumed.of(ev.RoundCompleted)] == [1, 2]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[:2] for r in rows] == [["malignancy", "1"], ["malignancy", "2"]]
