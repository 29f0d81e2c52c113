"""Secure aggregation through real processes: the model equals plain FedAvg's, what a domain
sends is masked words that decode to nothing like weights, and a domain that drops out of a
round below the reconstruction threshold fails it rather than leaving its masks in the model
(above it the round recovers: test_secagg_dropout.py)."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from meshctl.compiler.plan import PlanPrivacy
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.daemon import read_tap
from meshctl.runtime.launcher import start_run


def _secure(plan, quorum: int | None = None, threshold: int | None = None):
    job = plan.jobs[0].model_copy(update={"privacy": PlanPrivacy(secure_aggregation=True,
                                                                 secagg_threshold=threshold),
                                          **({"quorum": quorum} if quorum else {})})
    return plan.model_copy(update={"jobs": [job]}).with_hash()


def _model(result) -> dict[str, torch.Tensor]:
    return load_file(str(next((result.run_dir / "models").glob("*.safetensors"))))


def test_the_securely_aggregated_model_is_fedavgs_and_the_wire_carries_only_masks(mesh_file, make_plan,
                                                                                   tmp_path, monkeypatch):
    plain = start_run(mesh_file, make_plan(n=4, rounds=3))
    list(plain.follow())
    plain = plain.finish()
    assert plain.ok, plain.reason
    tap = tmp_path / "tap"
    tap.mkdir()
    monkeypatch.setenv("MESHCTL_WIRE_TAP", str(tap))
    run = start_run(mesh_file, _secure(make_plan(n=4, rounds=3)))
    events = list(run.follow())
    secure = run.finish()
    assert secure.ok, secure.reason
    a, b = _model(plain), _model(secure)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    received = [e for e in events if isinstance(e, ev.UpdateReceived)]
    assert len(received) == 12 and all(e.update_norm is None for e in received)
    # what client-1 sent: headers, and for each round one int64 tensor that decodes to noise
    frames = read_tap(tap / "client-1.tap")
    i, masked = 0, []
    while i < len(frames):
        k = 1 + sum(t["chunks"] for t in json.loads(frames[i])["tensors"])
        msg, tensors = wire.decode(frames[i:i + k])
        i += k
        if isinstance(msg, wire.TrainRes):
            assert list(tensors) == ["masked"] and tensors["masked"].dtype == torch.int64
            masked.append(tensors["masked"])
    assert len(masked) == 3
    for m in masked:
        alone = m.double() / (2.0**20 * 300)  # as if it were one domain's weighted update
        assert float(alone.abs().mean()) > 1e6  # real weights are below 10
        for t in b.values():
            assert t.reshape(-1)[:16].numpy().tobytes() not in np.asarray(m).tobytes()


def test_a_domain_that_drops_out_below_the_threshold_fails_the_round_instead_of_skewing_it(mesh_file, make_plan):
    run = start_run(mesh_file, _secure(make_plan(n=4, rounds=10_000), quorum=3, threshold=4))
    pids = {}
    for e in run.follow():
        if isinstance(e, ev.DomainJoined):
            pids[e.domain] = e.pid
        if isinstance(e, ev.RoundCompleted) and e.round == 2:
            os.kill(pids["client-2"], signal.SIGKILL)
    result = run.finish()
    assert not result.ok
    assert "secure aggregation" in result.reason and "client-2" in result.reason, result.reason
    # (as it dies: before its masked update, or after it, while the round is unmasked)
    assert any(why in result.reason for why in ("below the threshold 4", "before it shared",
                                                "the unmasking needs 4 of the 4 survivors")), result.reason


@pytest.mark.parametrize("n", [2])
def test_a_domain_refuses_to_mask_for_fewer_than_three(mesh_file, make_plan, n):
    run = start_run(mesh_file, _secure(make_plan(n=n, rounds=2)))
    list(run.follow())
    result = run.finish()
    assert not result.ok and "needs 3" in result.reason, result.reason
