"""Secure aggregation with dropout recovery through real processes: two of six domains are killed
mid-round, after they shared their masks and before their masked update; the round completes, and
the model equals plain FedAvg over the four survivors (to fixed-point precision)."""

from __future__ import annotations

import json
import os
import signal

import duckdb
import pytest
import torch
from safetensors.torch import load_file

from meshctl.compiler.plan import PlanPrivacy, PlanTraining
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.daemon import read_tap
from meshctl.runtime.launcher import start_run

VICTIMS = ("client-1", "client-4")
EPOCHS = 50
"""Long enough local training that a domain is still training when the test kills it."""


def _plan(make_plan, *, secure: bool, keep: list[str] | None = None):
    plan = make_plan(n=6, rounds=2, round_timeout_s=60.0)
    job = plan.jobs[0]
    keep = keep or job.participants
    job = job.model_copy(update={
        "participants": keep, "reads": [r for r in job.reads if r.domain in keep], "quorum": 4,
        "training": PlanTraining(rounds=2, lr=0.05, momentum=0.9, local_epochs=EPOCHS),
        "privacy": PlanPrivacy(secure_aggregation=secure)})
    return plan.model_copy(update={"jobs": [job], "domains": [d for d in plan.domains if d.name in keep],
                                   "products": [p for p in plan.products if p.domain in keep]}).with_hash()


@pytest.fixture
def six(mesh_file):
    """The mesh file, its data dir holding the digits rows dealt to six clients (row i to client i mod 6)."""
    data = mesh_file.parent / "data"
    source = data.resolve()
    data.unlink()
    data.mkdir()
    with duckdb.connect() as con:
        con.execute(f"CREATE TABLE rows AS SELECT *, row_number() OVER () AS i FROM '{source}/client-*.parquet'")
        for k in range(6):
            con.execute(f"COPY (SELECT * EXCLUDE (i) FROM rows WHERE i % 6 = {k}) TO '{data}/client-{k}.parquet'")
    return mesh_file


def _model(result) -> dict[str, torch.Tensor]:
    return load_file(str(next((result.run_dir / "models").glob("*.safetensors"))))


def test_two_of_six_killed_mid_round_the_round_completes_as_fedavg_over_the_survivors(six, make_plan, tmp_path,
                                                                                     monkeypatch):
    mesh_file = six
    tap = tmp_path / "tap"
    tap.mkdir()
    monkeypatch.setenv("MESHCTL_WIRE_TAP", str(tap))
    run = start_run(mesh_file, _plan(make_plan, secure=True))
    pids, shared, events = {}, set(), []
    for e in run.follow():
        events.append(e)
        if isinstance(e, ev.DomainJoined):
            pids[e.domain] = e.pid
        if isinstance(e, ev.MasksShared) and e.round == 1 and e.domain in VICTIMS:
            os.kill(pids[e.domain], signal.SIGKILL)  # it shared its masks and is training: kill it now
            shared.add(e.domain)
    secure = run.finish()
    assert secure.ok, secure.reason
    assert shared == set(VICTIMS)
    got = [e for e in events if isinstance(e, ev.UpdateReceived) and e.round == 1]
    assert sorted(e.domain for e in got) == ["client-0", "client-2", "client-3", "client-5"]
    recovered = [e for e in events if isinstance(e, ev.DropoutsRecovered)]
    assert [(e.round, e.dropped, e.survivors, e.threshold) for e in recovered] == [(1, list(VICTIMS), 4, 4)]

    monkeypatch.delenv("MESHCTL_WIRE_TAP")
    survivors = [d for d in (f"client-{i}" for i in range(6)) if d not in VICTIMS]
    plain = start_run(mesh_file, _plan(make_plan, secure=False, keep=survivors))
    list(plain.follow())
    plain = plain.finish()
    assert plain.ok, plain.reason
    a, b = _model(plain), _model(secure)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), (name, float((a[name] - b[name]).abs().max()))

    # a wire tap of a survivor: masked words only, and the unmasking reveals seeds of survivors and
    # mask keys of the dropped, never both for one domain
    frames = read_tap(tap / "client-0.tap")
    i, kinds = 0, []
    while i < len(frames):
        k = 1 + sum(t["chunks"] for t in json.loads(frames[i])["tensors"])
        msg, tensors = wire.decode(frames[i:i + k])
        i += k
        kinds.append(msg.type)
        if isinstance(msg, wire.TrainRes):
            assert list(tensors) == ["masked"]
            assert float((tensors["masked"].double() / 2.0**20).abs().mean()) > 1e6  # noise, not weights
        if isinstance(msg, wire.SecaggUnmaskRes) and msg.round == 1:
            assert set(msg.keys) == set(VICTIMS) and not set(msg.seeds) & set(VICTIMS)
    assert kinds.count("secagg_shares") == 2 and kinds.count("secagg_unmask_res") == 2


@pytest.fixture(scope="module")
def digits16(tmp_path_factory: pytest.TempPathFactory):
    """The benchmark's digits mesh over 16 domains."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "digits"))
    from make_data import write_mesh

    return write_mesh(tmp_path_factory.mktemp("digits16"), 16, rounds=2)


def _compile(mesh, secure: str, quorum: int | None = None):
    from meshctl.compiler.compile import compile_mesh

    text = mesh.read_text().replace("    aggregation: {strategy: fedavg}", (f"    quorum: {quorum}\n" if quorum else "")
                                    + f"    aggregation: {{strategy: fedavg}}\n    privacy: {{secure_aggregation: {secure}}}")
    spec = mesh.parent / "variant.yaml"
    spec.write_text(text)
    return compile_mesh(spec)


def test_the_threshold_is_declared_checked_and_carried(digits16):
    result = _compile(digits16, "{threshold: 11}", quorum=11)
    assert result.plan is not None and not result.errors and not result.warnings, result.render_diagnostics()
    privacy = result.plan.jobs[0].privacy
    assert privacy.secure_aggregation and privacy.secagg_threshold == 11
    default = _compile(digits16, "true", quorum=11)  # ceil(2 * 16 / 3) = 11: the plan carries no threshold
    assert default.plan is not None and default.plan.jobs[0].privacy.secagg_threshold is None
    assert "secagg_threshold" not in default.plan.to_toml() and "secagg_threshold = 11" in result.plan.to_toml()
    for threshold in (8, 17):
        [err] = _compile(digits16, f"{{threshold: {threshold}}}", quorum=11).errors
        assert err.code == "MESH540" and f"threshold of {threshold} for rounds of 16" in err.message
    [err] = _compile(digits16, "{threshold: 12}", quorum=11).errors
    assert err.code == "MESH541" and "quorum 11, below its secure aggregation threshold 12" in err.message
    [err] = _compile(digits16, "true", quorum=10).errors
    assert err.code == "MESH541" and "threshold 11" in err.message
    warned = _compile(digits16, "{threshold: 11}")
    assert warned.plan is not None and [w.code for w in warned.warnings] == ["MESH542"]


def test_explain_the_new_codes():
    from click.testing import CliRunner

    from meshctl.cli import main

    for code, words in (("MESH540", "more than half"), ("MESH541", "below its secure aggregation threshold"),
                        ("MESH542", "no round goes on without a dropped domain")):
        out = CliRunner().invoke(main, ["explain", code])
        assert out.exit_code == 0 and code in out.output and words in " ".join(out.output.split()), out.output


def test_dp_sgd_inside_secure_aggregation_survives_a_dropout(mesh_file, make_plan):
    """DP-SGD noises each update in its domain as before; the masked, noised updates of the survivors
    are unmasked without the domain that died after sharing, and every round charges the ledgers."""
    from meshctl.compiler.plan import PlanDp

    plan = make_plan(n=4, rounds=2)
    job = plan.jobs[0].model_copy(update={
        "quorum": 3, "privacy": PlanPrivacy(secure_aggregation=True, dp=PlanDp(epsilon=8.0)),
        "training": PlanTraining(rounds=2, lr=0.05, local_epochs=EPOCHS // 5)})
    run = start_run(mesh_file, plan.model_copy(update={"jobs": [job]}).with_hash())
    pids, events = {}, []
    for e in run.follow():
        events.append(e)
        if isinstance(e, ev.DomainJoined):
            pids[e.domain] = e.pid
        if isinstance(e, ev.MasksShared) and (e.round, e.domain) == (1, "client-2"):
            os.kill(pids["client-2"], signal.SIGKILL)
    result = run.finish()
    assert result.ok, result.reason
    [rec] = [e for e in events if isinstance(e, ev.DropoutsRecovered)]
    assert (rec.round, rec.dropped, rec.survivors, rec.threshold) == (1, ["client-2"], 3, 3)
    assert {(e.round, e.domain) for e in events if isinstance(e, ev.UpdateReceived)} == {
        (r, d) for r in (1, 2) for d in ("client-0", "client-1", "client-3")}
    assert len([e for e in events if isinstance(e, ev.BudgetSpent)]) >= 6
    assert all(torch.isfinite(t).all() for t in _model(result).values())
