"""Liveness, quorum and stragglers with real daemon processes, stopped and continued with signals."""

from __future__ import annotations

import os
import signal
import time

from meshctl.runtime import events as ev
from meshctl.runtime.launcher import start_run


def _quorum(plan, quorum: int, **job):
    return plan.model_copy(update={"jobs": [plan.jobs[0].model_copy(update={"quorum": quorum, **job})]}).with_hash()


def test_a_stopped_daemon_is_lost_and_the_job_goes_on_with_quorum(mesh_file, make_plan, monkeypatch):
    monkeypatch.setenv("MESHCTL_HEARTBEAT_TIMEOUT_S", "3")
    run = start_run(mesh_file, _quorum(make_plan(n=3, rounds=12), 2))
    pids: dict[str, int] = {}
    stopped_at = lost_after = None
    try:
        for e in run.follow():
            if isinstance(e, ev.DomainJoined):
                pids[e.domain] = e.pid
            if isinstance(e, ev.RoundCompleted) and e.round == 2 and stopped_at is None:
                os.kill(pids["client-2"], signal.SIGSTOP)
                stopped_at = time.monotonic()
            if isinstance(e, ev.DomainLost):
                lost_after = time.monotonic() - stopped_at
                assert e.domain == "client-2" and e.reason.startswith("no heartbeat for ")
                os.kill(pids["client-2"], signal.SIGKILL)
    finally:
        if stopped_at is not None and lost_after is None:  # never leave a stopped process behind
            os.kill(pids["client-2"], signal.SIGKILL)
    result = run.finish()
    assert result.ok, result.reason
    assert lost_after is not None and 2.5 < lost_after < 10
    events = ev.read_events(str(result.run_dir / "events.jsonl"))
    beats = {e.domain for e in events if isinstance(e, ev.DomainHeartbeat)}
    assert {"client-0", "client-1"} <= beats
    completed = [e for e in events if isinstance(e, ev.RoundCompleted)]
    assert len(completed) == 12
    assert completed[0].participants == ["client-0", "client-1", "client-2"]
    assert completed[-1].participants == ["client-0", "client-1"]


def test_a_slow_domain_becomes_a_straggler_and_a_lost_one_below_quorum_fails(mesh_file, make_plan, monkeypatch):
    monkeypatch.setenv("MESHCTL_HEARTBEAT_TIMEOUT_S", "30")
    # enough rounds that the follower, however late it sees round 2, stops client-2 mid-job
    run = start_run(mesh_file, _quorum(make_plan(n=3, rounds=60), 2, round_timeout_s=2.0))
    pids: dict[str, int] = {}
    paused = False
    for e in run.follow():
        if isinstance(e, ev.DomainJoined):
            pids[e.domain] = e.pid
        if isinstance(e, ev.RoundCompleted) and e.round == 2 and not paused:
            paused = True
            os.kill(pids["client-2"], signal.SIGSTOP)
        if isinstance(e, ev.StragglersDropped) and paused:
            os.kill(pids["client-2"], signal.SIGCONT)
    result = run.finish()
    assert result.ok, result.reason
    events = ev.read_events(str(result.run_dir / "events.jsonl"))
    dropped = [e for e in events if isinstance(e, ev.StragglersDropped)]
    assert dropped and dropped[0].domains == ["client-2"] and dropped[0].waited_s >= 2.0
    rounds = [e for e in events if isinstance(e, ev.RoundCompleted)]
    assert len(rounds) == 60
    # it went on without client-2 in the phase client-2 stalled in (it may have sent that round's
    # update before SIGSTOP landed, and then stalled in the evaluation)
    if dropped[0].phase == "train":
        assert next(e for e in rounds if e.round == dropped[0].round).participants == ["client-0", "client-1"]
    else:
        assert dropped[0].phase == "eval"
        assert any(isinstance(e, ev.MessageRejected) and e.sender == "client-2"
                   and f"late eval_res for round {dropped[0].round}" in e.reason for e in events)
    assert not any(isinstance(e, ev.DomainLost) for e in events)

    # two of two with one killed: below quorum, the job fails naming the domain
    run = start_run(mesh_file, _quorum(make_plan(n=2, rounds=10_000), 2))
    pids = {}
    for e in run.follow():
        if isinstance(e, ev.DomainJoined):
            pids[e.domain] = e.pid
        if isinstance(e, ev.RoundCompleted) and e.round == 2:
            os.kill(pids["client-1"], signal.SIGKILL)
    result = run.finish()
    assert not result.ok
    assert "1 of 2 participants remain, quorum is 2" in result.reason and "client-1" in result.reason
    failed = [e for e in ev.read_events(str(result.run_dir / "events.jsonl")) if isinstance(e, ev.JobFailed)]
    assert len(failed) == 1 and failed[0].reason == result.reason
