"""The coordinator runs a split model's top model (`top: {at: coordinator}`, issue 15) on the in-memory hub:
the real SplitDomain of each domain over examples/vertical's data (DuckDB), the real coordinator room. The
label owner runs only the loss and returns d loss / d logits; the trained model is the label owner's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pytest
import torch
from safetensors.torch import load_file
from test_split_room import _room

from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.coordinator import JobAborted
from meshctl.runtime.coordinator.split import top_path
from meshctl.runtime.domain.split import SplitDomain, SplitError, bottom_path

AT_COORDINATOR = ("top: {hidden: [16]}", "top: {hidden: [16], at: coordinator}")
TWO = ("epochs: 4", "epochs: 2")
LABEL_ONLY = ("""      - product: clinic.diagnoses
        features: [radius_se, texture_se, perimeter_se, area_se, smoothness_se]
        bottom: {hidden: [16], out: 8}
""", "      - product: clinic.diagnoses\n")


def _record(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, list[str], list[tuple[str, dict]]]]:
    """(domain, step asked, tensors received, [(reply step, {tensor: (dtype, shape)})]) of every instruction."""
    seen: list[tuple[str, str, list[str], list[tuple[str, dict]]]] = []
    handle = SplitDomain.handle

    def recording(self: SplitDomain, ins: wire.SplitIns, tensors: wire.Tensors) -> Any:
        replies = handle(self, ins, tensors)
        seen.append((self.domain, ins.step, sorted(tensors), [
            (res.step, {k: (v.dtype, list(v.shape)) for k, v in (out or {}).items()}) for res, out in replies]))
        return replies

    monkeypatch.setattr(SplitDomain, "handle", recording)
    return seen


def _train(tmp_path: Path, *edits: tuple[str, str]) -> tuple[Any, Any]:
    c, sink = _room(tmp_path, *edits)
    c._work()
    done = next(e for e in sink.events if isinstance(e, ev.JobCompleted))
    return done, load_file(top_path(tmp_path / "run", "malignancy"))


def test_the_coordinator_trains_the_label_owners_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same seeds, batches and optimizer: the top model and the holdout metrics are the label-owner run's
    (the top's step, cut around the loss, does the same float operations)."""
    owner, owner_top = _train(tmp_path / "owner")
    seen = _record(monkeypatch)
    here, here_top = _train(tmp_path / "here", AT_COORDINATOR)
    assert here_top.keys() == owner_top.keys()
    for name, t in owner_top.items():
        assert torch.allclose(here_top[name], t, atol=1e-6), name
    assert here.metrics == pytest.approx(owner.metrics, abs=1e-6)
    # the message flow: the clinic (label owner, with features) serves its bottom and the loss, never the top
    clinic = {step for d, step, _, _ in seen if d == "clinic"}
    assert {"forward", "backward", "eval", "loss", "eval_loss"} <= clinic and not clinic & {"top", "eval_top"}
    steps = [step for d, step, _, _ in seen if d == "clinic" and step in ("forward", "loss", "backward")][:3]
    assert steps == ["forward", "loss", "backward"]
    # what the label owner sends back for the loss: one float gradient per logit, never an int (a label)
    for d, step, received, replies in seen:
        if step == "loss":
            assert d == "clinic" and received == ["logits"]
            assert [(r, {k: v[0] for k, v in t.items()}) for r, t in replies] == [("logit_grads",
                                                                                 {"grad": torch.float32})]
            assert replies[0][1]["grad"][1][1] == 2  # [rows, classes]
        if d == "clinic" and step == "finish":
            assert replies == [("saved", {})]  # the top model is the coordinator's


def _centralised(tmp_path: Path, domains: list[str]) -> tuple[float, float]:
    """SplitNet on the joined rows (the intersection ordered by key, its holdout, each part standardized
    with its training rows), the plan's seeds, batches and optimizer: the holdout's loss and accuracy."""
    from meshctl.compiler.compile import compile_mesh
    from meshctl.runtime.domain.split import standardize
    from meshctl.runtime.kernels import split as ks

    plan = compile_mesh(tmp_path / "mesh.yaml").plan
    assert plan is not None
    split = plan.split_models[0]
    files = {"lab": "lab.parquet", "imaging": "imaging.parquet", "clinic": "clinic.csv"}
    tables = {}
    for d, f in files.items():
        scan = f"read_parquet('{tmp_path / 'data' / f}')" if f.endswith("parquet") else \
            f"read_csv('{tmp_path / 'data' / f}')"
        tables[d] = duckdb.connect().execute(f"SELECT * FROM {scan}").fetchnumpy()
    index = {d: {str(k): r for r, k in enumerate(t["patient_id"])} for d, t in tables.items()}
    shared = sorted(set.intersection(*(set(i) for i in index.values())))
    train, test = ks.holdout_split(len(shared), split.holdout, split.seed)
    parts, bottoms = [], []
    for i, p in enumerate(split.parts):
        if p.domain not in domains:
            continue
        rows = [index[p.domain][k] for k in shared]
        x = torch.tensor([[float(tables[p.domain][f][r]) for f in p.features] for r in rows], dtype=torch.float32)
        parts.append(standardize(x, train)[0])
        bottoms.append(ks.build_bottom({"kind": "mlp", "hidden": p.hidden, "out": p.out}, len(p.features),
                                       split.seed + i))
    label = tables["clinic"]["diagnosis"]
    y = torch.tensor([split.classes.index(str(label[index["clinic"][k]])) for k in shared])
    top = ks.build_top({"kind": "mlp", "hidden": split.top_hidden}, sum(p.out for p in split.parts),
                       len(split.classes), split.seed + len(split.parts))
    ks.train_centralised(bottoms, top, [x[train] for x in parts], y[train], epochs=split.epochs,
                         batch_size=split.batch_size, optimizer={"name": split.optimizer, "lr": split.lr},
                         seed=split.seed)
    with torch.no_grad():
        out = ks.SplitNet(bottoms, top).eval()([x[test] for x in parts])
    return float(torch.nn.functional.cross_entropy(out, y[test])), float((out.argmax(1) == y[test]).float().mean())


def test_a_label_only_part_trains_with_the_top_at_the_coordinator(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The clinic holds only the diagnosis: it joins the intersection and runs the loss, no bottom model."""
    seen = _record(monkeypatch)
    done, top = _train(tmp_path, AT_COORDINATOR, LABEL_ONLY)
    assert top["0.weight"].shape == (16, 16)  # the lab's 8 and the imaging centre's 8 activations
    loss, accuracy = _centralised(tmp_path, ["lab", "imaging"])  # the network of the parts with features
    assert done.metrics["loss"] == pytest.approx(loss, rel=1e-4)
    assert done.metrics["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert {step for d, step, _, _ in seen if d == "clinic"} == {
        "psi_start", "psi_answer", "psi_held", "psi_order", "loss", "eval_loss", "finish"}
    assert bottom_path(tmp_path, "r1", "lab", "malignancy").is_file()
    assert not bottom_path(tmp_path, "r1", "clinic", "malignancy").exists()


def test_the_label_owner_serves_only_its_steps_when_the_top_is_at_the_coordinator(tmp_path: Path) -> None:
    c, _ = _room(tmp_path, AT_COORDINATOR, LABEL_ONLY)
    clinic, lab = (SplitDomain(c.plan, d, tmp_path, "r1") for d in ("clinic", "lab"))
    start = wire.SplitIns(job="malignancy", step="psi_start", salt="ab" * 16)
    clinic.handle(start, {})
    lab.handle(start, {})
    for step in ("top", "eval_top", "forward"):  # no top model, and a label-only part has no bottom
        with pytest.raises(SplitError, match=f"step {step} is not for the label owner"):
            clinic.handle(wire.SplitIns(job="malignancy", step=step), {})
    with pytest.raises(SplitError, match="step loss is not for the other parts"):
        lab.handle(wire.SplitIns(job="malignancy", step="loss"), {"logits": torch.zeros(32, 2)})


def test_activations_of_the_wrong_shape_fail_the_job_naming_their_domain(tmp_path: Path) -> None:
    c, sink = _room(tmp_path, AT_COORDINATOR, narrow="lab")
    with pytest.raises(JobAborted, match=r"^split job malignancy: domain lab sent activations that are not "
                                         r"\[32, 8\] float32$"):
        c._work()
    assert [e.round for e in sink.events if isinstance(e, ev.JobFailed)] == [1]



def test_a_top_model_that_diverges_at_the_coordinator_fails_the_job_in_one_line(tmp_path: Path) -> None:
    """sgd at lr 1e4 overflows the coordinator's top model within the first epoch: named, no domain lost."""
    c, sink = _room(tmp_path, AT_COORDINATOR, ("optimizer: sgd, lr: 0.1", "optimizer: sgd, lr: 1e4"))
    with pytest.raises(JobAborted, match=r"^split job malignancy: the top model at the coordinator diverged at "
                                         r"epoch 1 batch \d+ \(lr 10000.0 too high\?\)$"):
        c._work()
    assert not [e for e in sink.events if isinstance(e, ev.DomainLost)]
