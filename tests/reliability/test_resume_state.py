"""A resumed run goes on exactly as if it never died, state that crosses rounds included: FedAdam's
moments, SCAFFOLD's control variates (the server's c and each domain's c_i), client DP's adaptive clip
norm, top-k compression's error-feedback residual, personalisation's local layers. Each plan runs once straight and once with its
coordinator (and with it its daemons) SIGKILLed mid-job, as tests/runtime/test_resume.py does: real
processes, DuckDB, ZeroMQ. Local training is seeded per round and domain, so the final models agree to
float32 rounding (atol 1e-6). Client DP's noise is drawn per round from a test seed (NOISE_SEED_ENV): a
real run's noise is seeded by the operating system, and a resumed run draws fresh noise."""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest
import torch
from safetensors.torch import load_file

from meshctl.compiler.plan import (
    Plan,
    PlanAdaptiveClip,
    PlanAggregation,
    PlanClientDp,
    PlanCompression,
    PlanPersonalization,
    PlanPrivacy,
)
from meshctl.runtime import events as ev
from meshctl.runtime.coordinator.training import NOISE_SEED_ENV
from meshctl.runtime.launcher import start_run

ROUNDS = 30
KILL_AT = 3
"""Each job's coordinator is killed once the follower sees this round; ROUNDS leaves it mid-job however
late the follower sees it (as in test_resume.py)."""


def _plan(make_plan, jobs: dict[str, dict]) -> Plan:
    plan = make_plan(n=3, rounds=ROUNDS)
    base = plan.jobs[0]
    return plan.model_copy(update={"jobs": [base.model_copy(update={"name": name, **u})
                                            for name, u in jobs.items()]}).with_hash()


def _run(mesh_file, plan: Plan, kill: bool) -> tuple[dict[str, dict[str, torch.Tensor]], list[ev.RunResumed]]:
    """(each job's final model, the RunResumed events) of one run; with `kill`, its coordinator is SIGKILLed
    once in each job, at round KILL_AT."""
    run = start_run(mesh_file, plan)
    daemons: dict[str, int] = {}
    killed: set[str] = set()
    for e in run.follow():
        if isinstance(e, ev.DomainJoined):
            daemons[e.domain] = e.pid
        if kill and isinstance(e, ev.RoundCompleted) and e.round == KILL_AT and e.job not in killed:
            killed.add(e.job)
            os.kill(psutil.Process(daemons["client-0"]).ppid(), signal.SIGKILL)
    result = run.finish()
    assert result.ok, result.reason
    kept = mesh_file.parent / ".meshctl" / "state" / result.run_dir.name  # the domains kept state in it...
    assert not kept.exists(), sorted(kept.rglob("*"))  # ...and dropped it once the run completed
    events = ev.read_events(str(result.run_dir / "events.jsonl"))
    models = {j.name: load_file(str(result.run_dir / "models" / f"{j.name}.safetensors")) for j in plan.jobs}
    return models, [e for e in events if isinstance(e, ev.RunResumed)]


def _same_after_resume(mesh_file, plan: Plan) -> None:
    straight, _ = _run(mesh_file, plan, kill=False)
    resumed, points = _run(mesh_file, plan, kill=True)
    for job in plan.jobs:  # each job's kill landed mid-job, after a checkpoint: its state had to come back
        assert any(1 <= p.rounds.get(job.name, 0) < ROUNDS for p in points), (job.name, points)
        for name in straight[job.name]:
            a, b = straight[job.name][name], resumed[job.name][name]
            assert torch.allclose(a, b, rtol=0, atol=1e-6), (job.name, name, float((a - b).abs().max()))


def test_fedadam_and_scaffold_resume_with_their_state(mesh_file, make_plan):
    _same_after_resume(mesh_file, _plan(make_plan, {
        "adam": {"aggregation": PlanAggregation(strategy="fedadam", server_lr=0.01)},
        "scaffold": {"aggregation": PlanAggregation(strategy="scaffold")},
    }))


def test_adaptive_client_dp_and_topk_resume_with_their_state(mesh_file, make_plan, monkeypatch):
    monkeypatch.setenv(NOISE_SEED_ENV, "7")  # (the coordinator's processes inherit it)
    cdp = PlanClientDp(epsilon=1e9, clip=0.2, adaptive=PlanAdaptiveClip(target_quantile=0.5, lr=0.2))
    tensors = make_plan(n=3).jobs[0].tensors  # mlp 64 -> [32] -> 10: the head (2.*) stays in each domain
    _same_after_resume(mesh_file, _plan(make_plan, {
        "clientdp": {"privacy": PlanPrivacy(client_dp=cdp)},
        "topk": {"compression": PlanCompression(kind="topk", k=0.05)},
        "personal": {"tensors": tensors[:2], "personalization": PlanPersonalization(
            local=["2.*"], local_tensors=tensors[2:])},  # (the local head trained before the kill comes back)
    }))


def test_a_domain_whose_control_variate_is_gone_fails_the_resumed_job(mesh_file, make_plan):
    """`meshctl resume` after kill -9 of the whole tree, with one domain's SCAFFOLD state deleted: that
    domain says so in one line and the job fails, rather than going on with c_i = 0."""
    from power import power_cut

    from meshctl.runtime.launcher import resume_run

    plan = _plan(make_plan, {"scaffold": {"aggregation": PlanAggregation(strategy="scaffold")}})
    run = start_run(mesh_file, plan)
    for e in run.follow():
        if isinstance(e, ev.RoundCompleted) and e.round == KILL_AT:
            break
    checkpoint = run.m.path / "checkpoints" / "scaffold" / f"round-{KILL_AT - 1:04d}.safetensors"
    assert _await(checkpoint.exists)
    power_cut(run)  # no one gets to clean up
    kept = mesh_file.parent / ".meshctl" / "state" / run.m.run / "client-1" / "scaffold"
    assert list(kept.glob("round-*.safetensors"))
    for path in kept.iterdir():
        path.unlink()
    result = resume_run(run.m.run, mesh_file)
    list(result.follow())
    result = result.finish()
    assert not result.ok
    assert "cannot restore the SCAFFOLD control variate of job scaffold before round" in result.reason, result.reason
    assert str(mesh_file.parent) not in result.reason  # the domain's host path stays in its own log


STRATEGY_CASES = {
    "fedavg": {}, "fedadam": {}, "fedyogi": {}, "fedavgm": {}, "median": {"server_momentum": 0.9},
    "trimmed_mean": {"server_momentum": 0.5, "bucketing": 2}, "krum": {"byzantine": 1},
    "multi_krum": {"byzantine": 1}, "bulyan": {"byzantine": 1}, "centered_clip": {"server_momentum": 0.5},
    "scaffold": {}}
"""Every registered strategy but fedprox (it aggregates as fedavg), with the settings that give it state."""


@pytest.mark.parametrize("name", sorted(STRATEGY_CASES))
def test_every_strategy_steps_on_from_its_saved_state_as_it_would_have(name, tmp_path):
    """Pure logic: a strategy's `state()`, through a safetensors file and JSON, restored into a fresh instance
    (the resumed coordinator's) gives the third round the uninterrupted instance gives, to the bit."""
    from safetensors.torch import load_file, save_file

    from meshctl.runtime.coordinator.strategy import STRATEGIES, Scaffold, make_strategy

    assert set(STRATEGY_CASES) == set(STRATEGIES) - {"fedprox"}
    agg = PlanAggregation(strategy=name, **STRATEGY_CASES[name])
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)]
    domains = [f"d{i}" for i in range(7)]

    def step(s, w, r):
        g = torch.Generator().manual_seed(100 + r)
        updates = [[t + 0.1 * torch.randn(t.shape, generator=g) for t in w] for _ in domains]
        examples = [10 + i for i in range(len(domains))]
        if isinstance(s, Scaffold):
            deltas = [[0.01 * torch.randn(t.shape, generator=g) for t in w] for _ in domains]
            return s.aggregate_controlled(w, domains, updates, deltas, examples, len(domains))[0]
        return s.aggregate(w, domains, updates, examples)[0]

    straight, w = make_strategy(agg), weights
    for r in (1, 2):
        w = step(straight, w, r)
    tensors, scalars = straight.state()
    save_file(tensors, str(tmp_path / "state.safetensors"))
    resumed = make_strategy(agg)
    resumed.restore(load_file(str(tmp_path / "state.safetensors")), json.loads(json.dumps(scalars)))
    for a, b in zip(step(straight, w, 3), step(resumed, w, 3)):
        assert torch.equal(a, b)
    (ta, sa), (tb, sb) = straight.state(), resumed.state()  # (SCAFFOLD's c is what its next round sends)
    assert sa == sb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _await(condition, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
