"""A real coordinator under a hostile peer that holds a real domain key, and runs whose failure must not
be recorded as success: real processes, real ZeroMQ with Curve, real files."""

from __future__ import annotations

import json
import math
import os
import threading
import time

import psutil
import zmq

from meshctl.compiler.plan import Plan, mlp_tensors
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.coordinator import INTERNAL_ERROR, Coordinator
from meshctl.runtime.keys import KeyPair, curve_client, fingerprint
from meshctl.runtime.launcher import LocalRun, prepare_run, start_run

FLOOD = 400


def _plan(make_plan, hidden: int = 32, rounds: int = 2, remote: dict[str, str] | None = None,
          quorum: int = 2) -> Plan:
    """The `make_plan` digits plan of two domains, with `hidden` units."""
    plan = make_plan(n=2, rounds=rounds, remote=remote)
    job = plan.jobs[0]
    tensors = mlp_tensors(64, [hidden], 10)
    job = job.model_copy(update={"architecture": job.architecture.model_copy(update={"hidden": [hidden]}),
                                 "quorum": quorum,
                                 "tensors": tensors, "parameters": sum(math.prod(t.shape) for t in tensors)})
    return plan.model_copy(update={"jobs": [job]}).with_hash()


def _dealer(ctx: zmq.Context, keys: KeyPair, run) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    curve_client(s, keys, run.m.coordinator_public.encode())
    s.connect(run.m.router)
    return s


def _recv(s: zmq.Socket, timeout_s: float = 30.0):
    if not s.poll(int(timeout_s * 1000)):
        raise TimeoutError("no message from the coordinator")
    return wire.decode(s.recv_multipart())


class HostilePeer(threading.Thread):
    """Joins as client-1 with its real key, attacks once the job starts, "restarts" (a Hello on a new
    connection), then answers every round honestly there (it echoes the weights it gets back as its update)."""

    def __init__(self, run, keys: KeyPair, plan: Plan):
        super().__init__(daemon=True)
        self.local, self.keys, self.plan = run, keys, plan
        self.flooded = threading.Event()
        self.stop = threading.Event()
        self.second_hello_reply = None
        self.stranger = KeyPair.generate()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as err:  # noqa: BLE001 - the test reads it
            self.error = err

    def _send(self, s: zmq.Socket, msg, tensors=None) -> None:
        s.send_multipart(wire.encode(msg.model_copy(update={"sender": "client-1", "run": self.local.m.run}), tensors))

    def _serve(self) -> None:
        ctx = zmq.Context()
        s = _dealer(ctx, self.keys, self.local)
        self._send(s, wire.Hello(plan_hash=self.plan.plan.hash, pid=os.getpid(), rows={"client-1.digits": 100}))
        job, weights, deadline, old = self.plan.jobs[0], {}, time.monotonic() + 120, None
        while not self.stop.is_set() and time.monotonic() < deadline:
            if not s.poll(100):
                continue
            msg, tensors = wire.decode(s.recv_multipart())
            weights = tensors or weights
            self._send(s, wire.Heartbeat(state="training"))
            if isinstance(msg, wire.TrainIns):
                if not self.flooded.is_set():
                    old, s = s, self._attack(ctx, s, job, weights)  # old stays open: its flood is queued
                    continue  # the old connection's round is lost with it; the new one joins at the next
                self._send(s, wire.TrainRes(job=job.name, round=msg.round, examples=100, loss=0.5, seconds=0.01),
                           weights)
            elif isinstance(msg, wire.EvalIns):
                self._send(s, wire.EvalRes(job=job.name, round=msg.round, examples=50, loss_sum=20.0, correct=30))
            elif isinstance(msg, wire.Shutdown):
                break
        s.close()
        if old is not None:
            old.close()
        ctx.term()

    def _attack(self, ctx: zmq.Context, s: zmq.Socket, job, weights) -> zmq.Socket:
        head = {"v": 1, "run": self.local.m.run, "sender": "client-1"}
        s.send_multipart([json.dumps({**head, "type": "train_res", "x": "@"}).encode().replace(
            b'"@"', b"[" * 100_000 + b"]" * 100_000)])
        s.send_multipart([json.dumps({**head, "type": "train_res", "job": job.name, "round": 1, "examples": 1,
                                      "loss": 0.5, "seconds": 0.1, "tensors": [
                                          {"name": "0.weight", "dtype": "float32", "shape": [0, 2**64],
                                           "nbytes": 0, "chunks": 1}]}).encode(), b""])
        frames = wire.encode(wire.TrainRes(job=job.name, round=1, examples=100, loss=0.5, seconds=0.01,
                                           sender="client-1", run=self.local.m.run), weights)
        s.send_multipart([bytes(frames[0]).replace(b'"examples":100', b'"examples":1' + b"0" * 400),
                          *frames[1:]])
        for i in range(FLOOD):  # far-future rounds, each with a full-size update
            self._send(s, wire.TrainRes(job=job.name, round=10 + i, examples=100, loss=0.5, seconds=0.01),
                       weights)
        self._send(s, wire.Knock())  # answered after the flood: one connection's messages stay in order
        while not isinstance(_recv(s)[0], wire.RunInfo):
            pass
        second = _dealer(ctx, self.keys, self.local)  # the same key on a new connection: a restart
        self._send(second, wire.Hello(plan_hash=self.plan.plan.hash, pid=os.getpid(), rows={"client-1.digits": 9}))
        self.second_hello_reply = _recv(second)[0]
        stranger = _dealer(ctx, self.stranger, self.local)  # a key the run does not know
        stranger.send_multipart(wire.encode(wire.Heartbeat(sender="client-1")))
        time.sleep(0.3)  # the handshake is refused (and logged) meanwhile
        stranger.close()
        self.flooded.set()
        return second


def test_a_hostile_domain_key_holder_is_rejected_and_the_run_completes(mesh_file, make_plan):
    keys = KeyPair.generate()
    plan = _plan(make_plan, hidden=1024, rounds=2, remote={"client-1": keys.public.decode()}, quorum=1)
    update_bytes = plan.jobs[0].parameters * 4
    run = start_run(mesh_file, plan)
    peer = HostilePeer(run, keys, plan)
    peer.start()
    coordinator, rss, kinds = None, {}, []
    rejected: list[ev.MessageRejected] = []
    events = []
    for e in run.follow():
        events.append(e)
        kinds.append(type(e).__name__)
        if isinstance(e, ev.MessageRejected):
            rejected.append(e)
        if isinstance(e, ev.JobStarted):
            coordinator = psutil.Process(run.proc.pid).children()[0]  # the supervisor's one child
            rss["start"] = coordinator.memory_info().rss
        if isinstance(e, (ev.RoundCompleted, ev.JobFailed, ev.RunCompleted)) and "flood" not in rss:
            try:
                rss["flood"] = coordinator.memory_info().rss
            except (psutil.NoSuchProcess, AttributeError):
                pass
    result = run.finish()
    peer.stop.set()
    peer.join(30)
    assert peer.error is None, repr(peer.error)
    reasons = [e.reason for e in rejected]
    assert result.ok, result.reason
    assert kinds.count("RoundCompleted") == 2
    assert (result.run_dir / "models" / "digits.safetensors").is_file()
    assert any("nests deeper" in r for r in reasons), reasons[:10]
    assert any("18446744073709551616" in r and "out of range" in r for r in reasons), reasons[:10]
    assert any("1000000000" in r and "out of range" in r for r in reasons), reasons[:10]
    assert sum("while round" in r for r in reasons) == FLOOD
    assert isinstance(peer.second_hello_reply, wire.Welcome)  # a restart: the new connection replaces the old
    assert [(e.domain, e.reason) for e in events if isinstance(e, ev.DomainLost)] == [
        ("client-1", f"restarted: said Hello again on a new connection (pid {os.getpid()})")]
    assert [(e.domain, e.round) for e in events if isinstance(e, ev.DomainRejoined)] == [("client-1", 2)]
    rounds = [e.participants for e in events if isinstance(e, ev.RoundCompleted)]
    assert rounds == [["client-0"], ["client-0", "client-1"]]
    refusals = [r for r in reasons if "refused Curve handshake" in r]
    assert len(refusals) == 1 and f"key {fingerprint(peer.stranger.public)} from 127.0.0.1" in refusals[0], reasons
    log = (result.run_dir / "logs" / "coordinator.log").read_text()
    assert refusals[0] in log and "Traceback" not in log
    grown = rss["flood"] - rss["start"]
    assert grown < FLOOD * update_bytes / 4, f"coordinator grew {grown >> 20} MiB during the flood"


def test_a_write_error_fails_the_run_with_its_reason(mesh_file, make_plan):
    """A full disk (here: metrics.csv is a directory) is a failed run with the reason, never a success."""
    manifest, observer = prepare_run(mesh_file, _plan(make_plan, rounds=3))
    (manifest.path / "metrics.csv").mkdir()
    run = LocalRun(manifest, observer)
    run.start()
    list(run.follow())
    result = run.finish()
    assert run.proc.returncode == 1
    assert not result.ok
    assert "cannot write" in result.reason and "metrics.csv" in result.reason, result.reason
    assert "Traceback" not in (run.m.path / "logs" / "coordinator.log").read_text()


def test_a_checkpoint_write_error_fails_the_run(mesh_file, make_plan):
    manifest, observer = prepare_run(mesh_file, _plan(make_plan, rounds=3))
    (manifest.path / "checkpoints").write_text("not a directory")
    run = LocalRun(manifest, observer)
    run.start()
    list(run.follow())
    result = run.finish()
    assert run.proc.returncode == 1
    assert not result.ok and "cannot write" in result.reason and "checkpoints" in result.reason, result.reason


class _Broken(Coordinator):
    def _work(self) -> None:
        raise RuntimeError("a bug")


def test_an_unexpected_error_is_a_failed_run_with_a_distinct_exit_status(mesh_file, make_plan, capfd):
    plan = _plan(make_plan)
    manifest, _ = prepare_run(mesh_file, plan, wait_for_observer_s=0.0)
    code = _Broken(manifest, plan).run()
    assert code == INTERNAL_ERROR != 1
    last = ev.read_events(str(manifest.path / "events.jsonl"))[-1]
    assert isinstance(last, ev.RunCompleted) and not last.ok
    assert last.reason == "internal error: RuntimeError: a bug"
    assert "Traceback" in capfd.readouterr().err  # the coordinator's own log has where
