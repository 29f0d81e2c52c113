"""Secure aggregation with dropout recovery on the in-memory hub (fake clock): a domain dropping
after its keys (before it shares), after its shares (before its masked update), and a survivor
dropping during the unmasking. The fake domains run the daemon's own share, mask and unmask code."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.daemon import Daemon


def _answers(r, values: dict[str, float], *, share_only: tuple[str, ...] = (), silent_on_unmask: tuple[str, ...] = (),
             dark_before_share: tuple[str, ...] = ()) -> None:
    """Each domain answers round 1's TrainIns with an update of its value, shares first. `share_only`
    ones share, then die (no update, no beats); `dark_before_share` ones die on the TrainIns;
    `silent_on_unmask` ones die when asked to unmask."""
    for name, d in r.domains.items():
        on = d._on_message

        def answer(conn, msg, tensors, d=d, name=name, on=on):
            if conn is not d.conn or not d.alive:
                return
            if isinstance(msg, wire.TrainIns):
                if name in dark_before_share:
                    d.alive = False
                    return
                masked = d.secagg_masked(conn, msg, values[name])
                if name in share_only:
                    d.alive = False
                    return
                conn.send(wire.TrainRes(job=msg.job, round=msg.round, examples=10, loss=0.5, seconds=0.01,
                                        attempt=msg.attempt), {"masked": masked})
            elif isinstance(msg, wire.SecaggUnmaskIns) and name in silent_on_unmask:
                d.alive = False
            else:
                on(conn, msg, tensors)
        d.conn.on_message = answer


def _model(r, name: str) -> dict[str, torch.Tensor]:
    return r.domains[name].weights  # what the last EvalIns carried


def test_two_domains_that_die_after_sharing_are_recovered_and_the_mean_is_the_survivors(room):
    r = room(n=6, quorum=4, rounds=1, secure_aggregation=True)  # threshold ceil(2 * 6 / 3) = 4
    _answers(r, {f"client-{i}": float(i) for i in range(6)}, share_only=("client-1", "client-4"))
    assert r.run() == ""
    [rec] = r.sink.of(ev.DropoutsRecovered)
    assert (rec.round, rec.dropped, rec.survivors, rec.threshold) == (1, ["client-1", "client-4"], 4, 4)
    assert sorted(e.domain for e in r.sink.of(ev.MasksShared)) == [f"client-{i}" for i in range(6)]
    mean = (0 + 2 + 3 + 5) / 4  # plain FedAvg over the survivors (equal example counts)
    for t in _model(r, "client-0").values():
        assert torch.allclose(t, torch.full_like(t, mean), atol=2**-18)


def test_a_survivor_dying_during_the_unmasking_still_counts_while_threshold_answer(room):
    r = room(n=6, quorum=4, rounds=1, secure_aggregation=True)
    _answers(r, {f"client-{i}": float(i) for i in range(6)}, share_only=("client-1",),
             silent_on_unmask=("client-5",))
    assert r.run() == ""
    [rec] = r.sink.of(ev.DropoutsRecovered)
    assert rec.dropped == ["client-1"] and rec.survivors == 5
    for t in _model(r, "client-0").values():  # client-5's update is in: its seed came from the others
        assert torch.allclose(t, torch.full_like(t, (0 + 2 + 3 + 4 + 5) / 5), atol=2**-18)


def test_below_the_threshold_or_before_sharing_the_round_fails_with_one_line(room):
    r = room(n=6, quorum=3, rounds=1, secure_aggregation=True)
    _answers(r, {f"client-{i}": 1.0 for i in range(6)}, share_only=("client-1", "client-2", "client-4"))
    reason = r.run()
    assert reason == ("job digits round 1: secure aggregation: 3 masked updates are below the threshold 4 "
                      "(none from client-1, client-2, client-4)")
    r = room(n=6, quorum=4, rounds=1, secure_aggregation=True)
    _answers(r, {f"client-{i}": 1.0 for i in range(6)}, dark_before_share=("client-3",))
    assert r.run() == ("job digits round 1: secure aggregation: client-3 dropped out before it shared its "
                       "masks, so they cannot be removed without it")


def test_a_domain_never_reveals_both_a_seed_and_a_key_of_one_domain(room):
    r = room(n=4, rounds=1, secure_aggregation=True)
    d = r.domains["client-0"]
    job = r.coordinator.plan.jobs[0]
    keys = {name: dom.secagg_key for name, dom in r.domains.items()}
    names = sorted(keys)

    def ins(rnd: int) -> wire.TrainIns:
        return wire.TrainIns(sender="coordinator", run="r1", job=job.name, round=rnd, version=0,
                             participants=names, peer_keys=keys)

    me = d._daemon(ins(1))
    assert isinstance(Daemon._secagg_share(me, ins(1)), wire.SecaggShares)

    def unmask(rnd: int, survivors: list[str], dropped: list[str]):
        return Daemon._secagg_unmask(me, wire.SecaggUnmaskIns(
            sender="coordinator", run="r1", job=job.name, round=rnd, survivors=survivors, dropped=dropped,
            shares={u: "AAAA" for u in survivors + dropped if u != "client-0"}))

    both = unmask(1, names, ["client-3"])
    assert isinstance(both, wire.ErrorReply) and "split the round's participants" in both.reason
    few = unmask(1, ["client-0", "client-1"], ["client-2", "client-3"])
    assert isinstance(few, wire.ErrorReply) and "below the threshold 3" in few.reason
    # a relayed share that does not open is refused (and the round is answered once only)
    bad = unmask(1, ["client-0", "client-1", "client-2"], ["client-3"])
    assert isinstance(bad, wire.ErrorReply) and "does not open" in bad.reason
    again = unmask(1, ["client-0", "client-1", "client-2"], ["client-3"])
    assert isinstance(again, wire.ErrorReply) and "already answered" in again.reason
    # one seed per round attempt: a TrainIns of an attempt already shared is refused
    twice = Daemon._secagg_share(me, ins(1))
    assert isinstance(twice, wire.ErrorReply) and "shared already" in twice.reason
    # once it revealed client-3's key shares, it never reveals client-3's seed
    me.secagg_revealed.add(keys["client-3"])
    Daemon._secagg_share(me, ins(2))
    later = unmask(2, names, [])
    assert isinstance(later, wire.ErrorReply) and "revealed in an earlier round" in later.reason


@pytest.mark.parametrize("attempt", [1, 2])
def test_the_masked_words_of_one_domain_are_noise(room, attempt):
    r = room(n=3, rounds=1, secure_aggregation=True)
    d = r.domains["client-0"]
    job = r.coordinator.plan.jobs[0]
    keys = {name: dom.secagg_key for name, dom in r.domains.items()}
    msg = wire.TrainIns(sender="coordinator", run="r1", job=job.name, round=1, version=0,
                        participants=sorted(keys), peer_keys=keys, attempt=attempt)
    conn = SimpleNamespace(send=lambda *a, **k: None)
    masked = d.secagg_masked(conn, msg, 1.0)
    assert float((masked.double() / 2.0**20).abs().mean()) > 1e6
