"""The collector: replies judged against the plan (with their codes), duplicates and late ones dropped."""

from __future__ import annotations

import pytest

from meshctl.runtime import events as ev
from meshctl.runtime import wire


@pytest.fixture
def mid_round(room):
    """A coordinator in round 2 of its job: round 1 collected, three domains joined, client-2 lost and back
    (waiting for the next round boundary)."""
    r = room(n=3, quorum=2, rounds=5)
    c = r.coordinator
    c._pump()  # the three Hellos
    assert sorted(c.peers) == ["client-0", "client-1", "client-2"]
    c.members.lose("client-2", "no heartbeat for 16s")
    r.domains["client-2"].connect()
    c._pump()  # its Hello again: it waits for the boundary
    c.collector.start(c.plan.jobs[0])
    c.round = 2
    c.closed.add(("train_res", 1))
    return r


def _res(kind: str, rnd: int):
    if kind == "train_res":
        return wire.TrainRes(job="digits", round=rnd, examples=10, loss=0.5, seconds=0.1)
    return wire.EvalRes(job="digits", round=rnd, examples=10, loss_sum=1.0, correct=5)


@pytest.mark.parametrize("domain,kind,rnd,code,reason", [
    ("client-0", "eval_res", 2, "", ""),
    ("client-0", "eval_res", 3, "", ""),                       # the next round's: kept until collected
    ("client-0", "train_res", 1, "late", "late train_res for round 1, which went on without it"),
    ("client-0", "eval_res", 1, "stale", "eval_res for round 1 while round 2 runs"),
    ("client-0", "eval_res", 4, "far-future", "eval_res for round 4 while round 2 runs"),
    ("client-2", "eval_res", 2, "not-admitted", ("eval_res from client-2 before it is re-admitted "
                                                "(at the next round boundary)")),
    ("client-9", "eval_res", 2, "not-participant", "client-9 is not a participant of job digits"),
])
def test_a_reply_is_judged_against_the_round_that_runs(mid_round, domain, kind, rnd, code, reason):
    got = mid_round.coordinator.collector.judge(domain, _res(kind, rnd), {})
    assert got[:2] == (code, reason)


def test_a_duplicate_is_rejected_and_the_first_kept(mid_round):
    c, sink = mid_round.coordinator, mid_round.sink
    first, second = _res("eval_res", 2), _res("eval_res", 2).model_copy(update={"correct": 1})
    c.collector.receive("client-0", first, {}, 10)
    c.collector.receive("client-0", second, {}, 10)
    assert c.inbox[("eval_res", 2, "client-0")][0].correct == 5
    assert sink.of(ev.MessageRejected)[-1].reason == "duplicate eval_res for round 2"
    assert c.collector.judge("client-0", second, {})[0] == "duplicate"


def test_another_job_is_not_running(mid_round):
    msg = _res("eval_res", 2).model_copy(update={"job": "other"})
    assert mid_round.coordinator.collector.judge("client-0", msg, {})[:2] == (
        "not-running", "eval_res for job 'other', which is not running")
