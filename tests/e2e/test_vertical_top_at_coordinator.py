"""Split learning with the top model at the coordinator (`top: {at: coordinator}`, issue 15), end to end:
examples/vertical through real daemons, a real coordinator, CurveZMQ and DuckDB. The trained model equals
the same network trained centrally on the joined rows (and so the label-owner run, which equals it too:
tests/e2e/test_vertical.py); the label owner's wire holds no label, no key and no raw feature value, only
the gradients of the logits, which reveal the labels to the coordinator exactly as MESH580 warns."""

from __future__ import annotations

import math
import struct

import torch
from test_vertical import EPOCHS, EXAMPLE, FILES, _centralised, _mesh, _run, _table, _tap

from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.audit_report import build_report
from meshctl.runtime.domain.split import bottom_path
from meshctl.runtime.kernels import split as ks


def test_the_coordinator_runs_the_top_model_and_the_label_owner_sends_only_logit_gradients(tmp_path, monkeypatch):
    # Prepare
    mesh = _mesh(tmp_path, ("top: {hidden: [16]}", "top: {hidden: [16], at: coordinator}"))
    tap = tmp_path / "tap"
    tap.mkdir()
    monkeypatch.setenv("MESHCTL_WIRE_TAP", str(tap))
    # Execute
    plan, result, events = _run(mesh)
    # Assert: the run and its outputs; the clinic keeps its bottom model, the run directory the top model
    assert result.ok, result.reason
    split = plan.split_models[0]
    assert split.top_at == "coordinator"
    done = next(e for e in events if isinstance(e, ev.JobCompleted))
    assert (result.run_dir / done.model_path).is_file()
    assert [e.round for e in events if isinstance(e, ev.RoundCompleted)] == list(range(1, EPOCHS + 1))
    for d in FILES:
        assert bottom_path(tmp_path, result.run_dir.name, d, "malignancy").is_file()
    assert build_report(result.run_dir)["split_models"][0]["top_at"] == "coordinator"  # the audit says who saw labels
    # Assert: the same network trained centrally on the joined rows scores the same
    loss, accuracy = _centralised(plan)
    assert abs(done.metrics["accuracy"] - accuracy) <= 0.01
    assert math.isclose(done.metrics["loss"], loss, rel_tol=1e-3, abs_tol=1e-4)
    # Assert: the label owner's wire: no label, no key, no raw feature value; its activations, the
    # gradients of the logits and the intersection's messages; no top model
    blob, messages = _tap(tap / "clinic.tap")
    assert b"malignant" not in blob and b"benign" not in blob
    assert not [k for k in (str(k) for k in _table(EXAMPLE / "data" / FILES["clinic"])["patient_id"]) if k.encode() in blob]
    table = _table(EXAMPLE / "data" / FILES["clinic"])
    for f in split.part("clinic").features:
        values = [float(v) for v in table[f] if len(repr(float(v))) >= 5][:50]
        assert not [v for v in values if struct.pack("<d", v) in blob or repr(v).encode() in blob]
    grads = []
    for msg, tensors in messages:
        if isinstance(msg, wire.SplitRes):
            for name, t in tensors.items():
                assert (name, t.dtype) in {("mine", torch.int8), ("theirs", torch.int8), ("order", torch.int64),
                                           ("acts", torch.float32), ("grad", torch.float32)}, (msg.step, name)
                assert name != "acts" or t.shape[1] == 8
                if name == "grad":
                    assert msg.step == "logit_grads" and t.shape[1] == len(split.classes)
                    if msg.epoch == 0:
                        grads.append(t)
            assert msg.step != "saved" or not tensors  # the top model is the coordinator's
    # Assert: what MESH580 warns: each row's logit gradient is negative only at its label, so the coordinator
    # reads the training rows' labels off them (here: as many malignant rows as the training set holds)
    label = table["diagnosis"]
    ids = {d: {str(k) for k in _table(EXAMPLE / "data" / f)["patient_id"]} for d, f in FILES.items()}
    shared = sorted(set.intersection(*ids.values()))
    train, _ = ks.holdout_split(len(shared), split.holdout, split.seed)
    row = {str(k): r for r, k in enumerate(table["patient_id"])}
    malignant = sum(str(label[row[shared[i]]]) == "malignant" for i in train)
    revealed = torch.cat(grads).argmin(dim=1)
    assert len(revealed) == len(train) and int((revealed == split.classes.index("malignant")).sum()) == malignant
