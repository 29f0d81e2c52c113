"""The coordinator's rooms on the in-memory hub with a fake clock: no processes, no sockets, no sleeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from meshctl.compiler.plan import Plan, PlanDp, PlanPolicy, PlanPrivacy
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.coordinator import Coordinator
from meshctl.runtime.run import RunManifest
from meshctl.runtime.transport.memory import Connection, FakeClock, MemoryHub

BEAT_S = 2.0


class ListSink:
    """Events kept in a list (the coordinator's EventSink writes and publishes them)."""

    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    def emit(self, event: ev.Event) -> ev.Event:
        self.events.append(event)
        return event

    def of(self, cls: type[ev.Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]

    def kinds(self) -> list[str]:
        return [e.type for e in self.events]


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
                n = self.plan.jobs[0].parameters
                update = {"masked": torch.zeros(n, dtype=torch.int64)}
            self._later(conn, reply, update)
        elif isinstance(msg, wire.EvalIns):
            self._later(conn, wire.EvalRes(job=msg.job, round=msg.round, examples=10, loss_sum=5.0, correct=7))

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
    import base64

    return base64.b64encode(bytes([i + 1]) * 32).decode()
