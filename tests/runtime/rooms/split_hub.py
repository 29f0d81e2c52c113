"""The split room tests' service: a coordinator of run r1 on the in-memory hub (fake clock) whose domains
are real SplitDomains over a compiled plan's data (DuckDB), each answering as the daemon does
(`SplitDomain.answer`, what daemon._split sends) and beating every 2 s."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sinks import ListSink

from meshctl.compiler.plan import Plan
from meshctl.runtime import wire
from meshctl.runtime.coordinator import Coordinator
from meshctl.runtime.domain.split import SplitDomain
from meshctl.runtime.run import RunManifest
from meshctl.runtime.transport.memory import Connection, FakeClock, MemoryHub

Reply = Callable[[Connection, Any, wire.Tensors], None]


def daemon_reply(side: SplitDomain) -> Reply:
    """What a daemon sends for each SplitIns: the step's replies, or its one ErrorReply."""

    def reply(conn: Connection, msg: Any, tensors: wire.Tensors) -> None:
        if isinstance(msg, wire.SplitIns):
            for res, out in side.answer(msg, tensors):
                conn.send(res, out)

    return reply


def split_service(tmp_path: Path, plan: Plan, *, serve: Callable[[SplitDomain, str], Reply] | None = None,
                  checkpoint: bool = False, resumed: str = "", sink: ListSink | None = None
                  ) -> tuple[Coordinator, ListSink]:
    """The coordinator (its run directory `tmp_path/run`) and the sink its events go to; `serve(side, domain)`
    makes a domain's reply function instead of `daemon_reply(side)` (a domain that misbehaves)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    manifest = RunManifest(run="r1", run_dir=str(run_dir), base_dir=str(tmp_path), router="tcp://10.0.0.5:7700",
                           events="inproc://y", coordinator_key="", coordinator_public="",
                           domain_keys={d.name: f"key-{d.name}" for d in plan.domains}, checkpoint=checkpoint)
    clock = FakeClock()
    hub = MemoryHub(clock)
    c = Coordinator(manifest, plan, link=hub, clock=clock, resumed=resumed)
    c.sink = sink = sink if sink is not None else ListSink()
    for d in plan.domains:
        side = SplitDomain(plan, d.name, tmp_path, "r1")
        conn = hub.connect(d.name, serve(side, d.name) if serve is not None else daemon_reply(side))
        conn.send(wire.Hello(plan_hash=plan.plan.hash, pid=1, rows={}))
        hub.every(2.0, lambda conn=conn: conn.send(wire.Heartbeat(state="idle")) or True)
    return c, sink
