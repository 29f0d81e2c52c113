"""A coordinator that dies mid-run is replaced and the run resumes from its newest checkpoint:
the same model as an uninterrupted run, one metrics row per round, an intact audit chain."""

from __future__ import annotations

import csv
import os
import signal
import time

import psutil
import torch
from safetensors.torch import load_file

from meshctl.runtime import events as ev
from meshctl.runtime.audit import verify_run
from meshctl.runtime.launcher import start_run


def _model(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "models" / "digits.safetensors"))


def test_a_killed_coordinator_is_resumed_from_its_newest_checkpoint(mesh_file, make_plan, tmp_path):
    rounds = 40  # enough that the kill, however late the follower sees round 5, lands mid-job
    plan = make_plan(n=3, rounds=rounds)
    straight = start_run(mesh_file, plan)
    list(straight.follow())
    straight = straight.finish()
    assert straight.ok, straight.reason

    run = start_run(mesh_file, plan)
    daemons: dict[str, int] = {}
    old: list[int] = []
    for e in run.follow():
        if isinstance(e, ev.DomainJoined):
            daemons[e.domain] = e.pid
        if isinstance(e, ev.RoundCompleted) and e.round == 5 and not old:
            coordinator = psutil.Process(daemons["client-0"]).ppid()
            assert coordinator != run.proc.pid  # the coordinator proper, under its supervisor
            old = [coordinator, *daemons.values()]
            os.kill(coordinator, signal.SIGKILL)
    result = run.finish()
    assert result.ok, result.reason
    events = ev.read_events(str(result.run_dir / "events.jsonl"))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    [resumed] = [e for e in events if isinstance(e, ev.RunResumed)]
    last = resumed.rounds["digits"]
    # the newest checkpoint written before the kill: the follower saw round 5, the coordinator
    # may have got further by the time SIGKILL landed (checkpoints are written in the background)
    before = [e.round for e in events[:events.index(resumed)] if isinstance(e, ev.RoundCompleted)]
    assert before == list(range(1, len(before) + 1)) and len(before) >= 5
    assert 1 <= last <= len(before) and "SIGKILL" in resumed.reason
    after = [e.round for e in events[events.index(resumed):] if isinstance(e, ev.RoundCompleted)]
    assert after == list(range(last + 1, rounds + 1))
    assert isinstance(events[-1], ev.RunCompleted) and events[-1].ok
    assert verify_run(result.run_dir).ok
    with (result.run_dir / "metrics.csv").open() as f:
        assert [int(r["round"]) for r in csv.DictReader(f)] == list(range(1, rounds + 1))
    a, b = _model(straight.run_dir), _model(result.run_dir)
    for name in a:  # local training is seeded per round and domain: resuming changes nothing
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                              for p in old):
        time.sleep(0.1)
    assert not [p for p in old if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def test_a_resumed_dp_job_charges_each_round_once(mesh_file, make_plan):
    from meshctl.compiler.plan import PlanDp, PlanPrivacy
    from meshctl.runtime.ledger import Ledger, ledger_path

    plan = make_plan(n=3, rounds=8)
    job = plan.jobs[0].model_copy(update={"privacy": PlanPrivacy(dp=PlanDp(epsilon=3.0, delta=1e-5, clip=1.0))})
    products = [p.model_copy(update={"epsilon_budget": 3.5}) for p in plan.products]  # no room for twice
    plan = plan.model_copy(update={"jobs": [job], "products": products}).with_hash()
    run = start_run(mesh_file, plan)
    daemons: dict[str, int] = {}
    killed = False
    for e in run.follow():
        if isinstance(e, ev.DomainJoined):
            daemons[e.domain] = e.pid
        if isinstance(e, ev.RoundCompleted) and e.round == 4 and not killed:
            killed = True
            os.kill(psutil.Process(daemons["client-0"]).ppid(), signal.SIGKILL)
    result = run.finish()
    assert result.ok, result.reason
    events = ev.read_events(str(result.run_dir / "events.jsonl"))
    assert any(isinstance(e, ev.RunResumed) for e in events)
    ledger = Ledger(ledger_path(mesh_file.parent))
    for product in ("client-0.digits", "client-1.digits", "client-2.digits"):
        assert 2.9 < ledger.spent(product) <= 3.0 + 1e-9  # the job's ε, not more: retrained rounds not charged twice
