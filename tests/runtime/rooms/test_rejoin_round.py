"""With the default quorum (every participant), a domain lost mid-round that comes back within the rejoin
grace re-runs the round instead of failing the job (issue 10, "Membership that heals").

Each test runs the real round template on the in-memory hub with a fake clock: a 15 s heartbeat timeout
and a 60 s grace cost microseconds.
"""

from __future__ import annotations

import base64
from typing import Any

import torch

from meshctl.runtime import events as ev
from meshctl.runtime import wire

LOST_S = 15.0
"""The heartbeat timeout the room's coordinator runs with (HEARTBEAT_TIMEOUT_S)."""


def _dark_on(r, name: str, kind: type, rnd: int, *, answer: bool = False) -> None:
    """`name` goes silent (no beats, no replies) when it receives `kind` of round `rnd`."""
    d = r.domains[name]
    on = d._on_message

    def cut(conn, msg, tensors):
        if isinstance(msg, kind) and msg.round == rnd and conn is d.conn:
            if answer:
                on(conn, msg, tensors)
            d.alive = False
            return
        on(conn, msg, tensors)
    d.conn.on_message = cut


def _back_after_loss(r, name: str, after_s: float, *, key: str = "") -> dict[str, Any]:
    """Restart `name` (a new connection saying Hello, pid 999) `after_s` after it is declared lost."""
    back: dict[str, Any] = {}

    def restart() -> None:
        d = r.domains[name]
        d.alive, d.pid = True, 999
        if key:
            d.secagg_key = key
        back["conn"] = d.connect()
        back["at"] = r.clock.now

    def watch() -> bool:
        if name not in r.coordinator.failed:
            return True
        back["lost_at"] = r.clock.now
        r.hub.after(after_s, restart)
        return False
    r.hub.every(0.5, watch)
    return back


def _train_ins(conn, rnd: int) -> list[wire.TrainIns]:
    return [m for m, _ in conn.received if isinstance(m, wire.TrainIns) and m.round == rnd]


def test_a_domain_lost_in_training_and_back_within_the_grace_reruns_the_round(room):
    r = room(n=3, rounds=3)  # quorum 3: every participant
    _dark_on(r, "client-2", wire.TrainIns, 2)
    back = _back_after_loss(r, "client-2", 20.0)
    assert r.run() == ""
    retried = r.sink.of(ev.RoundRetried)
    assert [(e.round, e.attempt, e.phase, e.domains) for e in retried] == [(2, 2, "train", ["client-2"])]
    assert retried[0].reason.startswith("domain client-2 lost: no heartbeat for 1")
    assert [(e.domain, e.round, e.pid) for e in r.sink.of(ev.DomainRejoined)] == [("client-2", 2, 999)]
    # the new connection gets round 2 again, from the same global weights (version 1) the others trained on
    train, weights = r.domains["client-2"].instructions(back["conn"])[0]
    assert isinstance(train, wire.TrainIns) and (train.round, train.version) == (2, 1)
    evals = [t for m, t in r.domains["client-0"].instructions() if isinstance(m, wire.EvalIns) and m.round == 1]
    assert weights and all(torch.equal(weights[k], evals[0][k]) for k in weights)
    # the others' replies to the first attempt stand: they are not asked to train round 2 again
    assert [len(_train_ins(r.domains[d].conn, 2)) for d in ("client-0", "client-1")] == [1, 1]
    rounds = {e.round: e.participants for e in r.sink.of(ev.RoundCompleted)}
    assert rounds == {n: ["client-0", "client-1", "client-2"] for n in (1, 2, 3)}
    assert r.sink.of(ev.JobCompleted)[0].domains == ["client-0", "client-1", "client-2"]
    assert r.sink.of(ev.JobFailed) == []


def test_a_domain_lost_in_evaluation_gets_the_early_sent_next_round_again(room):
    r = room(n=3, rounds=3)
    _dark_on(r, "client-1", wire.EvalIns, 1)  # round 2's TrainIns, right behind, reaches a dead daemon
    back = _back_after_loss(r, "client-1", 5.0)
    assert r.run() == ""
    retried = r.sink.of(ev.RoundRetried)
    assert [(e.round, e.phase, e.domains) for e in retried] == [(1, "eval", ["client-1"])]
    first = r.domains["client-1"].instructions(back["conn"])[0][0]
    assert isinstance(first, wire.TrainIns) and (first.round, first.version) == (2, 1)
    rounds = {e.round: e.participants for e in r.sink.of(ev.RoundCompleted)}
    assert rounds[1] == rounds[2] == ["client-0", "client-1", "client-2"]
    assert r.sink.of(ev.JobCompleted)[0].domains == ["client-0", "client-1", "client-2"]


def test_a_lost_domain_that_does_not_come_back_fails_the_job_after_the_grace(room):
    r = room(n=3, rounds=3)
    _dark_on(r, "client-2", wire.TrainIns, 2)
    start = r.clock.now
    reason = r.run()
    assert reason.startswith("job digits round 2: 2 of 3 participants remain, quorum is 3: domain client-2 lost: "
                             "no heartbeat for 1"), reason
    assert reason.endswith("and did not come back within 60s"), reason
    lost_at = start + LOST_S
    assert lost_at + 60.0 < r.clock.now < lost_at + 65.0  # it waited the grace, max(60 s, 3 x 15 s), and no more
    assert r.sink.of(ev.RoundRetried) == [] and r.sink.of(ev.JobCompleted) == []


def test_a_domain_that_rejects_an_instruction_is_not_waited_for(room):
    r = room(n=3, rounds=3)
    d = r.domains["client-1"]
    on = d._on_message

    def refuse(conn, msg, tensors):
        if isinstance(msg, wire.TrainIns) and msg.round == 2:
            conn.send(wire.ErrorReply(code="refused", reason="policy says no", job=msg.job, round=msg.round))
            return
        on(conn, msg, tensors)
    d.conn.on_message = refuse
    start = r.clock.now
    reason = r.run()
    assert reason.startswith("job digits round 1: 2 of 3 participants remain, quorum is 3: domain client-1 "
                             "rejected job 'digits' round 2: policy says no"), reason
    assert r.clock.now - start < 5.0  # at once: a refusal is final
    assert r.sink.of(ev.RoundRetried) == []


def _key(i: int, fresh: bool = False) -> str:
    """A real X25519 public key (the fake domains mask and share with it, rooms/conftest.py)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from meshctl.runtime.kernels import secagg

    key = X25519PrivateKey.from_private_bytes(bytes([(200 if fresh else 0) + i + 1]) * 32)
    return base64.b64encode(secagg.public_bytes(key)).decode()


def _masked_by_keys(r, name: str, delay_s: float = 0.0) -> list[tuple[int, str]]:
    """`name` answers each TrainIns with a masked update that sums right only with client-3's fresh key (a
    reply masked for the aborted attempt would spoil the sum); returns (round, client-3's key) per reply."""
    d = r.domains[name]
    n = r.coordinator.plan.jobs[0].parameters
    sent: list[tuple[int, str]] = []

    def answer(conn, msg, tensors):
        if not isinstance(msg, wire.TrainIns) or not d.alive or conn is not d.conn:
            d._on_message(conn, msg, tensors)
            return
        fresh = msg.peer_keys.get("client-3") == _key(3, fresh=True)
        masked = d.secagg_masked(conn, msg)  # (its shares go out now; masked words of a zero update)
        masked = masked if fresh else torch.full((n,), 1 << 40, dtype=torch.int64)
        sent.append((msg.round, msg.peer_keys.get("client-3", "")))
        reply = wire.TrainRes(job=msg.job, round=msg.round, examples=10, loss=0.5, seconds=0.01,
                              attempt=msg.attempt)
        r.hub.after(delay_s, lambda: conn.send(reply, {"masked": masked}))
    d.conn.on_message = answer
    return sent


def test_secure_aggregation_restarts_the_mask_setup_and_refuses_the_aborted_attempts_replies(room):
    r = room(n=4, rounds=1, secure_aggregation=True)  # quorum 4
    slow = _masked_by_keys(r, "client-0", delay_s=30.0)  # its first reply lands after the round is re-run
    for name in ("client-1", "client-2"):
        _masked_by_keys(r, name)
    _dark_on(r, "client-3", wire.TrainIns, 1)
    _back_after_loss(r, "client-3", 2.0, key=_key(3, fresh=True))  # a restarted daemon: a new key
    assert r.run() == ""
    assert [(e.round, e.phase) for e in r.sink.of(ev.RoundRetried)] == [(1, "train")]
    # every participant was asked again, with the fresh key: the pairwise masks are new
    assert [k == _key(3, fresh=True) for _, k in slow] == [False, True]
    for name in ("client-1", "client-2"):
        assert [m.peer_keys["client-3"] for m in _train_ins(r.domains[name].conn, 1)] == [_key(3), _key(3, True)]
    rejected = [e for e in r.sink.of(ev.MessageRejected) if e.sender == "client-0"]
    assert [e.reason for e in rejected] == ["train_res for round 1 attempt 1, which was re-run (attempt 2)"]
    assert [m.attempt for m in _train_ins(r.domains["client-1"].conn, 1)] == [1, 2]
    assert [e.domain for e in r.sink.of(ev.UpdateReceived) if e.domain == "client-0"] == ["client-0"]
    # only the fresh replies (all zero words) went into the sum: FedAvg's new model is their mean, zero
    done = r.sink.of(ev.JobCompleted)[0]
    assert done.domains == ["client-0", "client-1", "client-2", "client-3"]
    model = r.domains["client-1"].weights  # what round 1's EvalIns carried
    assert model and all(int(torch.count_nonzero(t)) == 0 for t in model.values())


def test_secure_aggregation_a_loss_in_evaluation_restarts_the_next_rounds_mask_setup(room):
    r = room(n=4, rounds=2, secure_aggregation=True)
    for name in ("client-0", "client-1", "client-2"):
        _masked_by_keys(r, name)
    _dark_on(r, "client-3", wire.EvalIns, 1)  # round 2's TrainIns went out with its old key right behind
    _back_after_loss(r, "client-3", 2.0, key=_key(3, fresh=True))
    assert r.run() == ""
    assert [(e.round, e.phase) for e in r.sink.of(ev.RoundRetried)] == [(1, "eval")]
    for name in ("client-0", "client-1", "client-2"):
        assert [m.peer_keys["client-3"] for m in _train_ins(r.domains[name].conn, 2)] == [_key(3), _key(3, True)]
    done = r.sink.of(ev.JobCompleted)[0]
    assert done.domains == ["client-0", "client-1", "client-2", "client-3"]
    model = r.domains["client-0"].weights  # round 2's EvalIns: the replies masked with the old key left out
    assert model and all(int(torch.count_nonzero(t)) == 0 for t in model.values())


def test_a_forked_daemon_that_exited_is_not_waited_for(room):
    r = room(n=3, rounds=3)
    d = r.domains["client-2"]
    on = d._on_message

    def die(conn, msg, tensors):  # the coordinator reaps its child: nothing will restart it
        if isinstance(msg, wire.TrainIns) and msg.round == 2:
            d.alive = False
            r.hub.after(1.0, lambda: r.coordinator._reap_exited("client-2", -9))
            return
        on(conn, msg, tensors)
    d.conn.on_message = die
    start = r.clock.now
    reason = r.run()
    assert reason.startswith("job digits round 2: 2 of 3 participants remain, quorum is 3: domain client-2 lost: "
                             "daemon exited with code -9"), reason
    assert r.clock.now - start < 5.0 and r.sink.of(ev.RoundRetried) == []
    assert [e.cause for e in r.sink.of(ev.DomainLost)] == ["exited with code -9"]


def test_a_forked_daemon_that_exits_before_joining_is_lost_for_its_data(room):
    """Issue 14: a daemon that never joined exited on its data: DomainLost.cause says so (no guess later)."""
    r = room(n=3, quorum=2, rounds=1, connect=False)
    r.domains["client-0"].connect()
    r.domains["client-1"].connect()
    r.hub.after(0.5, lambda: r.coordinator._reap_exited("client-2", 3))
    assert r.run() == ""
    [lost] = r.sink.of(ev.DomainLost)
    assert (lost.domain, lost.cause) == ("client-2", "data refused")


def test_a_domain_that_reports_its_own_failure_is_not_waited_for(room):
    r = room(n=3, rounds=3)
    d = r.domains["client-0"]
    on = d._on_message

    def fail(conn, msg, tensors):
        if isinstance(msg, wire.TrainIns) and msg.round == 2:
            conn.send(wire.ErrorReply(code="internal", reason="internal error: the disk is full", job=msg.job,
                                      round=msg.round))
            return
        on(conn, msg, tensors)
    d.conn.on_message = fail
    start = r.clock.now
    reason = r.run()
    assert "domain client-0 lost: internal error: the disk is full" in reason, reason
    assert r.clock.now - start < 5.0 and r.sink.of(ev.RoundRetried) == []
