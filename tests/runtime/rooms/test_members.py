"""Membership on the in-memory hub with a fake clock: join, refuse, lose, rejoin, restart, quorum.

Each test runs a whole job of the real round template (meshctl.runtime.coordinator) against
scripted domains; time moves only while the coordinator waits, so a 15 s heartbeat
timeout or a 60 s round deadline costs microseconds.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import torch

from meshctl.runtime import events as ev
from meshctl.runtime import wire


def new_key(i: int) -> str:
    """A secure aggregation key other than the one a domain started with (a real X25519 public key)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from meshctl.runtime.kernels import secagg

    return base64.b64encode(secagg.public_bytes(X25519PrivateKey.from_private_bytes(bytes([200 + i]) * 32))).decode()


def test_every_domain_joins_and_the_result_covers_them(room):
    r = room(n=3, rounds=2)
    assert r.run() == ""
    assert [e.domain for e in r.sink.of(ev.DomainJoined)] == ["client-0", "client-1", "client-2"]
    for d in r.domains.values():
        assert isinstance(d.conn.received[0][0], wire.Welcome)
    done = r.sink.of(ev.JobCompleted)[0]
    assert done.domains == ["client-0", "client-1", "client-2"] and done.left_out == {}
    assert r.sink.of(ev.DomainLost) == [] and r.sink.of(ev.DomainRejoined) == []


def test_a_domain_on_another_plan_is_refused_and_the_summary_says_so(room):
    r = room(n=3, quorum=2, rounds=2, connect=False)
    r.domains["client-0"].connect()
    r.domains["client-1"].connect()
    other = r.domains["client-2"].connect(plan_hash="sha256:" + "0" * 64)
    assert r.run() == ""
    refused = r.sink.of(ev.DomainRefused)
    assert [e.domain for e in refused] == ["client-2"] and "plan hash differs" in refused[0].reason
    assert isinstance(other.received[0][0], wire.Refused)
    done = r.sink.of(ev.JobCompleted)[0]
    assert done.domains == ["client-0", "client-1"]
    assert done.left_out["client-2"].startswith("was refused: plan hash differs")


def test_a_silent_domain_is_lost_after_the_heartbeat_timeout_and_quorum_goes_on(room):
    r = room(n=3, quorum=2, rounds=3)
    start = r.clock.now
    r.domains["client-2"].alive = False  # no heartbeat, no reply: a partition
    assert r.run() == ""
    lost = r.sink.of(ev.DomainLost)
    assert [e.domain for e in lost] == ["client-2"] and lost[0].reason.startswith("no heartbeat for 1")
    assert lost[0].cause == "heartbeat silence"  # issue 14: the coordinator says why, status and dashboard show it
    assert 15.0 < r.clock.now - start < 17.5  # lost at the timeout, not at the round deadline (60 s)
    assert [e.participants for e in r.sink.of(ev.RoundCompleted)] == [["client-0", "client-1"]] * 3
    assert r.sink.of(ev.JobCompleted)[0].left_out == {"client-2": lost[0].reason.join(["lost: ", ""])}


def test_below_quorum_the_job_fails_with_each_domains_reason(room):
    r = room(n=3, rounds=2)  # quorum 3
    r.domains["client-1"].alive = False
    reason = r.run()
    assert reason.startswith("job digits round 1: 2 of 3 participants remain, quorum is 3: domain client-1 lost: "
                             "no heartbeat for 1"), reason


def test_below_quorum_at_the_start_names_refused_and_missing_domains(room):
    r = room(n=3, quorum=3, rounds=2, connect=False, join_timeout_s=30.0)
    r.domains["client-0"].connect()
    r.domains["client-1"].connect(plan_hash="sha256:" + "1" * 64)
    reason = r.run()
    assert reason.startswith("job digits: 1 of 3 participants can take part, quorum is 3: domain client-1 was "
                             "refused: plan hash differs"), reason
    assert reason.endswith("domains client-2 did not join within 30s")


def _silence_after_round(r, name: str, rnd: int) -> None:
    """`name` stops beating and answering once it has been told to train round `rnd`."""
    d = r.domains[name]
    on = d._on_message

    def cut(conn, msg, tensors):
        on(conn, msg, tensors)
        if isinstance(msg, wire.TrainIns) and msg.round == rnd and conn is d.conn:
            d.alive = False
    d.conn.on_message = cut


def test_a_lost_domain_rejoins_at_the_next_round_boundary_with_the_current_weights(room):
    r = room(n=3, quorum=2, rounds=8)
    for d in ("client-0", "client-1"):
        r.domains[d].delay_s = 4.0  # each phase takes 4 s: a Hello can land mid-round
    _silence_after_round(r, "client-2", 1)  # answers round 1's training, then goes dark
    back = {}

    def restart():
        d = r.domains["client-2"]
        d.alive, d.pid = True, 999
        back["conn"] = d.connect()
        back["round"] = r.sink.of(ev.RoundStarted)[-1].round  # the round in progress when its Hello arrives
    def watch():
        if "client-2" not in r.coordinator.failed:
            return True
        r.hub.after(1.0, restart)  # back 1 s after the loss: in the middle of a round (a phase is 4 s)
        return False
    r.hub.every(0.5, watch)
    assert r.run() == ""
    lost, rejoined = r.sink.of(ev.DomainLost), r.sink.of(ev.DomainRejoined)
    assert [e.domain for e in lost] == ["client-2"] and len(rejoined) == 1
    first = rejoined[0].round
    assert rejoined[0].domain == "client-2" and rejoined[0].pid == 999 and rejoined[0].was == lost[0].reason
    assert first == back["round"] + 1, "admitted at the next round boundary, never mid-round"
    kinds = r.sink.kinds()
    at = kinds.index("domain_rejoined")
    assert kinds[at + 1] == "round_started" and r.sink.events[at + 1].round == first
    assert "client-2" in r.sink.events[at + 1].participants
    # the first instruction on the new connection is the next round's, with the current global weights
    ins = r.domains["client-2"].instructions(back["conn"])
    train, weights = ins[0]
    assert isinstance(train, wire.TrainIns) and train.round == first and train.version == first - 1
    evals = [t for m, t in r.domains["client-0"].instructions() if isinstance(m, wire.EvalIns) and m.round == first - 1]
    assert weights and all(torch.equal(weights[k], evals[0][k]) for k in weights)
    rounds = {e.round: e.participants for e in r.sink.of(ev.RoundCompleted)}
    assert "client-2" not in rounds[first - 1] and "client-2" in rounds[first]
    assert r.sink.of(ev.JobCompleted)[0].domains == ["client-0", "client-1", "client-2"]


def test_a_restarted_daemon_replaces_its_old_connection(room):
    r = room(n=3, quorum=2, rounds=4)
    for d in r.domains.values():
        d.delay_s = 3.0
    old = r.domains["client-1"].conn
    seen = {}

    def restart():
        d = r.domains["client-1"]
        d.pid = 555
        seen["round"] = r.sink.of(ev.RoundStarted)[-1].round
        seen["conn"] = d.connect()  # a Hello on a new connection; the old one still beats
        old.send(wire.Heartbeat(state="training"))
        d.conn.send(wire.Hello(plan_hash=d.plan.plan.hash, pid=555))  # twice on the same connection: ignored
    r.hub.at(r.clock.now + 4.0, restart)  # in round 1's evaluation / round 2's training
    assert r.run() == ""
    lost = r.sink.of(ev.DomainLost)
    assert [(e.domain, e.reason) for e in lost] == [
        ("client-1", "restarted: said Hello again on a new connection (pid 555)")]
    rejoined = r.sink.of(ev.DomainRejoined)
    assert [(e.domain, e.round) for e in rejoined] == [("client-1", seen["round"] + 1)]
    rejected = [e.reason for e in r.sink.of(ev.MessageRejected)]
    assert "second Hello from client-1 on its joined connection: ignored" in rejected
    assert seen["conn"].received[0][0].type == "welcome"
    assert r.sink.of(ev.JobCompleted)[0].domains == ["client-0", "client-1", "client-2"]


def test_a_straggler_is_dropped_after_the_round_timeout(room):
    r = room(n=3, quorum=2, rounds=1, round_timeout_s=10.0)
    r.domains["client-2"].answer = False  # alive (beats) but never replies
    start = r.clock.now
    assert r.run() == ""
    dropped = r.sink.of(ev.StragglersDropped)
    assert [(e.phase, e.domains) for e in dropped] == [("train", ["client-2"]), ("eval", ["client-2"])]
    assert 10.0 < dropped[0].waited_s < 10.5 and r.clock.now - start < 21.0
    assert r.sink.of(ev.DomainLost) == []
    assert r.sink.of(ev.JobCompleted)[0].left_out == {"client-2": "sent no update that was aggregated"}


def test_a_secure_aggregation_domain_rejoins_at_the_next_mask_setup_with_its_new_key(room):
    r = room(n=4, quorum=3, rounds=2, secure_aggregation=True, connect=False)
    for name, d in r.domains.items():
        if name != "client-3":
            d.connect()
    d3 = r.domains["client-3"]
    d3.connect()
    d3.secagg_key = new_key(3)  # the daemon restarts before the first round: new keys with its new Hello
    d3.connect()
    assert r.run() == ""
    rejoined = r.sink.of(ev.DomainRejoined)
    assert [(e.domain, e.round) for e in rejoined] == [("client-3", 0)]
    ins = [m for m, _ in d3.instructions() if isinstance(m, wire.TrainIns)]
    assert ins[0].round == 1 and ins[0].peer_keys["client-3"] == new_key(3)
    others = [m for m, _ in r.domains["client-0"].instructions() if isinstance(m, wire.TrainIns)]
    assert all(m.peer_keys["client-3"] == new_key(3) for m in others)
    assert r.sink.of(ev.JobCompleted)[0].domains == ["client-0", "client-1", "client-2", "client-3"]


def test_a_job_waits_for_a_remote_domain_and_says_what_brings_it(room):
    r = room(n=3, rounds=1, connect=False, join_timeout_s=None)  # `up` without --join-timeout: wait for ever
    r.domains["client-0"].connect()
    r.domains["client-1"].connect()
    start = r.clock.now
    r.hub.at(start + 35.0, r.domains["client-2"].connect)  # its operator starts it after 35 s
    assert r.run() == ""
    awaited = r.sink.of(ev.DomainsAwaited)
    assert [round(e.waited_s) for e in awaited] == [10, 20, 30]
    assert awaited[0].domains == ["client-2"] and awaited[0].commands == {
        "client-2": "meshctl serve --domain client-2 --coordinator tcp://10.0.0.5:7700"}
    assert r.sink.of(ev.JobStarted)[0].participants == ["client-0", "client-1", "client-2"]
    assert r.clock.now - start >= 35.0


def test_a_hello_on_another_plan_does_not_unseat_the_joined_connection(room):
    r = room(n=3, rounds=2)  # quorum 3: losing client-1 would fail the job
    stale = r.hub.connect("client-1")
    stale.send(wire.Hello(plan_hash="sha256:" + "2" * 64, pid=9))
    assert r.run() == ""
    assert isinstance(stale.received[0][0], wire.Refused)
    assert r.sink.of(ev.DomainRefused) == [] and r.sink.of(ev.DomainLost) == []
    assert any(e.reason.startswith("Hello from client-1 on a new connection refused: plan hash differs")
               for e in r.sink.of(ev.MessageRejected))


def _zombie() -> Any:
    """A child of this process that was killed (SIGKILL) and is not reaped yet: a forked daemon the kernel
    has closed the sockets of, as the coordinator finds one (keep the Popen: collected, it reaps the pid)."""
    import signal
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    child.send_signal(signal.SIGKILL)
    while Path(f"/proc/{child.pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
        time.sleep(0.001)  # (the kernel's, not the coordinator's: it is dead within microseconds)
    return child


def test_a_killed_child_daemon_found_unreachable_is_lost_with_its_exit_code(room):
    """Its connection closes before it can be reaped: a send finding it unreachable must not win the race
    with the reaper and name `unreachable: Host unreachable` where the daemon was killed (a CI flake of
    tests/runtime/test_run.py's daemon-that-dies test)."""
    r = room(n=2, quorum=2, rounds=3)
    daemon = _zombie()
    r.coordinator.children[daemon.pid] = "client-1"
    d = r.domains["client-1"]
    on = d._on_message

    def killed_after_round_1(conn, msg, tensors):
        on(conn, msg, tensors)
        if isinstance(msg, wire.TrainIns) and msg.round == 1 and conn is d.conn:
            conn.close()
    d.conn.on_message = killed_after_round_1
    reason = r.run()
    assert "domain client-1 lost: daemon exited with code -9" in reason, reason
    assert "unreachable" not in reason
    assert daemon.pid not in r.coordinator.children  # reaped
