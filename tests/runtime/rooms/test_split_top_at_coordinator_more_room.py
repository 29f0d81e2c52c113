"""The coordinator's top model (`top: {at: coordinator}`, issue 15) kept across a resume and built from an
`entrypoint:`, on the in-memory hub with the real SplitDomains over examples/vertical's data (DuckDB)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sinks import ListSink
from test_split_room import _room
from test_split_top_at_coordinator_room import AT_COORDINATOR, LABEL_ONLY, _train

from meshctl.runtime import events as ev
from meshctl.runtime.coordinator import JobAborted
from meshctl.runtime.coordinator.split import top_path


def test_a_resumed_job_takes_up_the_coordinators_top_model(tmp_path: Path) -> None:
    """With checkpoints the coordinator keeps its top model and optimizer beside the run's resume points
    (`<run>/split/<job>/`); a coordinator killed after epoch 1 and resumed ends with the uninterrupted top
    model, bit for bit (adam: its moments are state). The label-only part keeps only its rows' hash."""
    from test_split_resume_room import EPOCHS, _coordinator, _killed_after, _mesh

    from meshctl.runtime.domain import split_state

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()
    two = (f"epochs: {EPOCHS}", "epochs: 2")  # (_mesh has set the example's epochs to EPOCHS)
    plan = _mesh(straight, AT_COORDINATOR, LABEL_ONLY, two)
    _coordinator(straight, plan, ListSink())._work()
    _mesh(killed, AT_COORDINATOR, LABEL_ONLY, two)
    _killed_after(killed, plan, 1)
    assert split_state.load(killed / "run" / "split" / "malignancy", 1)[0].keys() >= {"top/0.weight", "rng"}
    assert set(split_state.load(split_state.job_dir(killed, "r1", "clinic", "malignancy"), 1)[0]) == {"rng"}
    resumed = ListSink()
    _coordinator(killed, plan, resumed, resumed="killed")._work()
    assert [e.round for e in resumed.of(ev.RoundCompleted)] == [2]
    a, b = load_file(top_path(straight / "run", "malignancy")), load_file(top_path(killed / "run", "malignancy"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the job completed: the coordinator's epoch files of its top model are gone (models/ keeps the top model)
    assert not (straight / "run" / "split").exists() and not (killed / "run" / "split").exists()


def test_a_completed_run_leaves_no_split_epoch_files_in_its_domains(tmp_path: Path) -> None:
    """The run completed (Shutdown.completed): each domain deletes its epoch files of the run's split jobs;
    the final bottom models, which are outputs, stay."""
    from types import SimpleNamespace

    from test_split_resume_room import _coordinator, _mesh

    from meshctl.runtime.daemon import Daemon
    from meshctl.runtime.domain import split_state
    from meshctl.runtime.domain.split import bottom_path

    plan = _mesh(tmp_path, ("optimizer: adam, lr: 0.01", "optimizer: sgd, lr: 0.1"), ("epochs: 3", "epochs: 1"))
    _coordinator(tmp_path, plan, ListSink())._work()
    domains = ("lab", "imaging", "clinic")
    assert all(any(split_state.job_dir(tmp_path, "r1", d, "malignancy").glob("epoch-*")) for d in domains)
    for d in domains:  # what a daemon does on Shutdown(completed=True)
        Daemon._drop_state(SimpleNamespace(cfg=SimpleNamespace(run="r1", base_dir=tmp_path, domain=d)))
    assert not any(split_state.job_dir(tmp_path, "r1", d, "malignancy").exists() for d in domains)
    assert all(bottom_path(tmp_path, "r1", d, "malignancy").is_file() for d in domains)


def test_an_entrypoint_top_runs_at_the_coordinator_which_checks_its_code_first(tmp_path: Path) -> None:
    """The coordinator builds an `entrypoint:` top from the mesh's directory after re-hashing its code against
    the plan's pin, as a domain does its own (the label owner no longer runs it, so no longer checks it)."""
    from test_split_entrypoint_room import NETS

    for run in ("same", "changed"):
        (tmp_path / run / "vmodels").mkdir(parents=True)
        (tmp_path / run / "vmodels" / "__init__.py").write_text("")
        (tmp_path / run / "vmodels" / "nets.py").write_text(NETS)
    custom = ("top: {hidden: [16]}", 'top: {entrypoint: "vmodels.nets:top", args: {hidden: 5}, at: coordinator}')
    done, top = _train(tmp_path / "same", custom)
    assert [top[k].shape for k in ("0.weight", "2.weight")] == [(5, 24), (2, 5)] and set(done.metrics) == {
        "loss", "accuracy"}
    shutil.copytree(tmp_path / "same" / ".meshctl" / "cache", tmp_path / "changed" / ".meshctl" / "cache")  # warm
    c, sink = _room(tmp_path / "changed", custom)
    (tmp_path / "changed" / "vmodels" / "nets.py").write_text(NETS.replace("nn.ReLU()", "nn.Tanh()"))
    with pytest.raises(JobAborted, match=r"^split job malignancy: the coordinator refused the top model: model code "
                                         r"file vmodels/nets.py differs from the plan's"):
        c._work()
    assert not [e for e in sink.events if isinstance(e, ev.IntersectionComputed)]  # before any row is read
