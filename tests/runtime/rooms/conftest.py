"""The coordinator's rooms on the in-memory hub with a fake clock: no processes, no sockets, no sleeps."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from sinks import ListSink

from meshctl.compiler.plan import Plan, PlanDp, PlanPolicy, PlanPrivacy
from meshctl.runtime import wire
from meshctl.runtime.coordinator import Coordinator
from meshctl.runtime.run import RunManifest
from meshctl.runtime.transport.memory import Connection, FakeClock, MemoryHub

BEAT_S = 2.0


def secagg_key(byte: int) -> str:
    """The public half (base64) of the real X25519 key pair whose private half is `byte` 32 times (the
    test files make their keys this way; a fake domain finds its private half by `private_key`)."""
    from meshctl.runtime.kernels import secagg

    return base64.b64encode(secagg.public_bytes(_private(byte))).decode()


def _private(byte: int) -> Any:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(bytes([byte]) * 32)


def private_key(public: str) -> Any:
    """The private half of a key `secagg_key` made."""
    return next(_private(b) for b in range(1, 256) if secagg_key(b) == public)


@dataclass
class Domain:
    """A scripted daemon on the hub: answers each TrainIns with the weights it holds plus one, each EvalIns
    with counts; beats every BEAT_S while `alive`. `delay_s` delays its replies; `answer=False` keeps silent."""

    hub: MemoryHub
    name: str
    plan: Plan
    delay_s: float = 0.0
    answer: bool = True
    alive: bool = True
    pid: int = 100
    secagg_key: str = ""
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    conn: Connection | None = None
    secagg_rounds: dict[Any, Any] = field(default_factory=dict)
    secagg_revealed: set[str] = field(default_factory=set)

    def connect(self, plan_hash: str | None = None) -> Connection:
        """A new connection that says Hello (the daemon started, or restarted)."""
        self.conn = self.hub.connect(self.name, self._on_message)
        conn = self.conn
        job = self.plan.jobs[0].name
        self.conn.send(wire.Hello(plan_hash=plan_hash or self.plan.plan.hash, pid=self.pid,
                                  rows={f"{self.name}.digits": 10},
                                  secagg_keys={job: self.secagg_key} if self.secagg_key else {}))
        self.hub.every(BEAT_S, lambda: self.alive and conn is self.conn and not conn.closed
                       and (conn.send(wire.Heartbeat(state="idle")) or True))
        return self.conn

    def instructions(self, conn: Connection | None = None) -> list[tuple[Any, wire.Tensors]]:
        return [(m, t) for m, t in (conn or self.conn).received if isinstance(m, (wire.TrainIns, wire.EvalIns))]

    def _on_message(self, conn: Connection, msg: Any, tensors: wire.Tensors) -> None:
        if tensors:
            self.weights = dict(tensors)
        if not (self.answer and self.alive) or conn is not self.conn:
            return
        if isinstance(msg, wire.TrainIns):
            update = {k: v + 1.0 for k, v in self.weights.items()}
            reply = wire.TrainRes(job=msg.job, round=msg.round, examples=10, loss=0.5, seconds=0.01,
                                  attempt=msg.attempt)
            if self.secagg_key:
                update = {"masked": self.secagg_masked(conn, msg)}
            self._later(conn, reply, update)
        elif isinstance(msg, wire.SecaggUnmaskIns):
            from meshctl.runtime.daemon import Daemon

            self._later(conn, Daemon._secagg_unmask(self._daemon(msg), msg))
        elif isinstance(msg, wire.EvalIns):
            self._later(conn, wire.EvalRes(job=msg.job, round=msg.round, examples=10, loss_sum=5.0, correct=7))

    def _daemon(self, msg: Any) -> Any:
        """What the daemon's secure-aggregation methods read of a daemon, for this fake domain."""
        job = self.plan.jobs[0]
        return SimpleNamespace(cfg=SimpleNamespace(domain=self.name, run=msg.run), jobs={job.name: SimpleNamespace(job=job)},
                               secagg={job.name: private_key(self.secagg_key)}, secagg_rounds=self.secagg_rounds,
                               secagg_revealed=self.secagg_revealed)

    def secagg_masked(self, conn: Connection, msg: wire.TrainIns, value: float = 0.0) -> torch.Tensor:
        """The daemon's secure aggregation of an update of `value`s: its shares go out now (an ErrorReply if
        it refuses), its masked words are returned."""
        from meshctl.runtime.daemon import Daemon

        me, job = self._daemon(msg), self.plan.jobs[0]
        shares = Daemon._secagg_share(me, msg)
        if shares is not None:
            conn.send(shares)
        zero = {t.name: torch.full(t.shape, value) for t in job.tensors}
        masked = Daemon._masked(me, SimpleNamespace(job=job), msg, zero, 10)
        return masked if isinstance(masked, torch.Tensor) else torch.zeros(job.parameters, dtype=torch.int64)

    def _later(self, conn: Connection, msg: Any, tensors: wire.Tensors | None = None) -> None:
        if self.delay_s:
            self.hub.after(self.delay_s, lambda: conn.send(msg, tensors))
        else:
            conn.send(msg, tensors)


@dataclass
class Room:
    """A coordinator of `plan` on the hub, its sink and its scripted domains."""

    coordinator: Coordinator
    hub: MemoryHub
    clock: FakeClock
    sink: ListSink
    domains: dict[str, Domain]

    def run(self) -> str:
        """Run the plan's jobs; "" when they completed, else the reason the job failed."""
        from meshctl.runtime.coordinator import JobAborted

        try:
            self.coordinator._work()
        except JobAborted as err:
            return str(err)
        return ""


def tune_plan(base: Plan, *, quorum: int | None = None, rounds: int | None = None, round_timeout_s: float = 60.0,
              secure_aggregation: bool = False, dp: PlanDp | None = None, policies: tuple[PlanPolicy, ...] = ()) -> Plan:
    job = base.jobs[0]
    job = job.model_copy(update={"quorum": quorum or job.quorum, "round_timeout_s": round_timeout_s,
                                 "privacy": PlanPrivacy(secure_aggregation=secure_aggregation, dp=dp),
                                 "training": job.training.model_copy(update={"rounds": rounds or job.training.rounds})})
    return base.model_copy(update={"jobs": [job], "policies": [*base.policies, *policies]}).with_hash()


@pytest.fixture
def room(tmp_path: Path, make_plan: Any, monkeypatch: pytest.MonkeyPatch):
    """`room(n=3, quorum=2, rounds=3, ...)`: a Room whose domains are connected (Hello sent), not yet run."""
    monkeypatch.delenv("MESHCTL_HEARTBEAT_TIMEOUT_S", raising=False)
    base = make_plan

    def build(n: int = 3, *, quorum: int | None = None, rounds: int = 3, round_timeout_s: float = 60.0,
              secure_aggregation: bool = False, connect: bool = True, join_timeout_s: float | None = 60.0,
              dp: PlanDp | None = None, policies: tuple[PlanPolicy, ...] = ()) -> Room:
        plan = tune_plan(base(n=n, rounds=rounds), quorum=quorum, round_timeout_s=round_timeout_s,
                         secure_aggregation=secure_aggregation, dp=dp, policies=policies)
        run_dir = tmp_path / "run"
        run_dir.mkdir(exist_ok=True)
        manifest = RunManifest(run="r1", run_dir=str(run_dir), base_dir=str(tmp_path), router="tcp://10.0.0.5:7700",
                               events="inproc://y", coordinator_key="", coordinator_public="",
                               domain_keys={d.name: f"key-{d.name}" for d in plan.domains}, checkpoint=False,
                               remote_join_timeout_s=join_timeout_s)
        clock = FakeClock()
        hub = MemoryHub(clock)
        c = Coordinator(manifest, plan, link=hub, clock=clock)
        sink = ListSink()
        c.sink = sink
        domains = {d.name: Domain(hub, d.name, plan, pid=100 + i,
                                  secagg_key=_key(i) if secure_aggregation else "")
                   for i, d in enumerate(plan.domains)}
        if connect:
            for d in domains.values():
                d.connect()
        return Room(c, hub, clock, sink, domains)

    return build


def _key(i: int) -> str:
    return secagg_key(i + 1)
