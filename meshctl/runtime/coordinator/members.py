"""The membership room: join, refuse, lose, rejoin at a round boundary, liveness, quorum.

A domain joins with its first Hello on the plan's hash and is refused on another.
It is lost when it is silent for the heartbeat timeout, when the coordinator cannot
reach it, or when its daemon says Hello again on a new connection (a restart: the
old connection is dead to it). A lost domain that says Hello again waits in
`waiting` and is re-admitted by `admit()` at the next round boundary, never in the
middle of a round; it then gets the current global weights with the next round's
instruction. Nothing here waits or reads a socket: the coordinator feeds messages in
and asks at each boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from meshctl.compiler.plan import Plan, PlanJob
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.transport import Clock, Link, Unreachable

HEARTBEAT_EVENT_S = 5.0
"""At most one DomainHeartbeat event per domain this often."""


class Sink(Protocol):
    """Where events go (meshctl.runtime.coordinator.outputs.EventSink, or a list in tests)."""

    def emit(self, event: ev.Event) -> ev.Event: ...


@dataclass
class Peer:
    """A joined domain, as its Hello described it, on the connection it joined on."""

    domain: str
    identity: bytes
    rows: dict[str, int] = field(default_factory=dict)
    stats: dict[str, wire.FeatureStats] = field(default_factory=dict)
    category_counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    """Job -> categorical feature -> counts of the values at least k of the domain's rows hold."""
    versions: dict[str, int] = field(default_factory=dict)
    """Weights version each job's daemon holds."""
    refused: dict[str, str] = field(default_factory=dict)
    """Jobs the domain refused to take part in, with its reasons."""
    secagg: dict[str, str] = field(default_factory=dict)
    """Secure aggregation: job -> the domain's X25519 public key for it."""
    state: str = "idle"
    last_seen: float = 0.0
    last_beat_event: float = 0.0
    pid: int = 0


class Members:
    """Who takes part in the run now, and why the others do not."""

    def __init__(self, plan: Plan, run: str, clock: Clock, heartbeat_timeout: float,
                 logs: dict[str, Path] | None = None):
        self.plan, self.run, self.clock = plan, run, clock
        self.heartbeat_timeout = heartbeat_timeout
        self.logs = dict(logs or {})
        """Local domains' log files, named in their loss reasons."""
        self.link: Link = None  # type: ignore[assignment] - set by the coordinator before use
        self.sink: Sink = None  # type: ignore[assignment]
        self.peers: dict[str, Peer] = {}
        self.failed: dict[str, str] = {}
        """Domains lost (and not back yet), with the reason."""
        self.refused: dict[str, str] = {}
        """Domains the coordinator refused (another plan), with the reason."""
        self.dropped: dict[str, str] = {}
        """Domains that left the current job by rejecting an instruction, with the reason."""
        self.waiting: dict[str, Peer] = {}
        """Lost domains that said Hello again: admitted at the next round boundary."""
        self.gone: set[str] = set()
        """Lost domains that cannot come back by themselves (their daemon, a child of this
        coordinator, exited): a round does not wait for them."""
        self.closing = False
        self.next_liveness = 0.0
        self.exited: Callable[[str], bool] = lambda domain: False
        """Asked when a domain's connection is found closed: True when its daemon (a child of this
        coordinator) has exited and was lost by the caller with its exit code, the more exact reason."""

    # -- messages in ---------------------------------------------------------------
    def seen(self, identity: bytes, domain: str, msg: Any) -> bool:
        """Note that `domain` spoke; False when the message is to be dropped (another connection's)."""
        peer = self.peers.get(domain)
        if (peer is not None and peer.identity != identity
                and not isinstance(msg, (wire.Heartbeat, wire.Hello))):  # (a daemon beats on a socket of its own)
            self.sink.emit(ev.MessageRejected(sender=domain, reason=f"{msg.type} from {domain} on a connection "
                                              "other than the one it joined on"))
            return False
        for p in (peer, self.waiting.get(domain)):
            if p is not None and (p.identity == identity or isinstance(msg, wire.Heartbeat)):
                p.last_seen = self.clock.monotonic()
        return True

    def hello(self, identity: bytes, domain: str, msg: wire.Hello) -> None:
        """Join, refuse, or (for a domain lost or restarted) wait for the next round boundary."""
        peer = self.peers.get(domain)
        if identity in (getattr(peer, "identity", None), getattr(self.waiting.get(domain), "identity", None)):
            # a daemon says Hello once per connection
            self.sink.emit(ev.MessageRejected(sender=domain, reason=f"second Hello from {domain} on its joined "
                                              "connection: ignored"))
            return
        if msg.plan_hash != self.plan.plan.hash:
            reason = (f"plan hash differs: domain has {msg.plan_hash[:19]}, coordinator runs "
                      f"{self.plan.plan.hash[:19]}")
            self.link.reply(identity, self._stamp(wire.Refused(reason=reason)))
            if peer is not None:  # its joined connection goes on; only this one is turned away
                self.sink.emit(ev.MessageRejected(sender=domain, reason=f"Hello from {domain} on a new "
                                                  f"connection refused: {reason}"))
                return
            self.refused[domain] = reason
            self.sink.emit(ev.DomainRefused(domain=domain, reason=reason))
            return
        new = Peer(domain, identity, dict(msg.rows), dict(msg.stats), refused=dict(msg.refused),
                   secagg=dict(msg.secagg_keys), last_seen=self.clock.monotonic(), pid=msg.pid,
                   category_counts=dict(msg.category_counts))
        if peer is not None:  # the same key on a new connection: the daemon restarted, the old connection is dead
            silent = self.clock.monotonic() - peer.last_seen
            if silent > self.heartbeat_timeout:
                self.lose(domain, f"no heartbeat for {silent:.0f}s", cause="heartbeat silence")
            else:
                self.lose(domain, f"restarted: said Hello again on a new connection (pid {msg.pid})",
                          cause="restarted")
        back = domain in self.failed or domain in self.waiting
        self.gone.discard(domain)
        if back:
            self.waiting[domain] = new
        else:
            self.peers[domain] = new
            self.refused.pop(domain, None)
        if not self.send(new, wire.Welcome(plan_hash=self.plan.plan.hash)):
            self.waiting.pop(domain, None)
            return
        if not back:
            self.sink.emit(ev.DomainJoined(domain=domain, products=sorted(msg.rows), rows=dict(msg.rows),
                                           pid=msg.pid))
        for d in msg.decisions:  # who decided is the Curve-authenticated domain, whatever the message says
            self.sink.emit(ev.PolicyDecided(policy=d.policy, scope=d.scope, subject=d.subject, effect=d.effect,
                                            reason=d.reason, at=d.at, stage="runtime", domain=domain))
        for c in msg.checks:
            self.sink.emit(ev.ContractChecked(product=c.product, domain=domain, contract=c.contract, rule=c.rule,
                                              observed=c.observed, operator=c.operator, threshold=c.threshold,
                                              passed=c.passed, severity=c.severity))

    def heartbeat(self, domain: str, msg: wire.Heartbeat) -> None:
        peer = self.peers.get(domain)
        if peer is None:  # not joined (or lost): liveness is only tracked for peers
            return
        peer.state = msg.state
        if peer.last_seen - peer.last_beat_event >= HEARTBEAT_EVENT_S:
            peer.last_beat_event = peer.last_seen
            self.sink.emit(ev.DomainHeartbeat(domain=domain, state=msg.state))

    # -- losing and coming back ------------------------------------------------------
    def lose(self, domain: str, reason: str, *, final: bool = False, cause: str = "") -> None:
        """Declare `domain` lost with `reason` (once per loss; nothing while the run closes); `final`:
        it cannot come back by itself (see `gone`); `cause`: DomainLost.cause."""
        if final:
            self.gone.add(domain)
        if self.closing or (domain in self.failed and domain not in self.peers):
            return
        if domain in self.logs and "(log: " not in reason:
            reason += f" (log: {self.logs[domain]})"
        self.failed[domain] = reason
        self.peers.pop(domain, None)
        self.sink.emit(ev.DomainLost(domain=domain, reason=reason, cause=cause))

    def check_liveness(self) -> None:
        """Lose every joined domain silent for the heartbeat timeout; forget silent waiting ones."""
        now = self.clock.monotonic()
        if now < self.next_liveness:
            return
        self.next_liveness = now + min(1.0, self.heartbeat_timeout / 4)
        for peer in list(self.peers.values()):
            silent = now - peer.last_seen
            if silent > self.heartbeat_timeout:
                self.lose(peer.domain, f"no heartbeat for {silent:.0f}s", cause="heartbeat silence")
        for domain, peer in list(self.waiting.items()):
            if now - peer.last_seen > self.heartbeat_timeout:
                del self.waiting[domain]

    def admit(self, job: str = "", rnd: int = 0) -> list[str]:
        """A round boundary: re-admit the domains waiting since they said Hello again (DomainRejoined each)."""
        back = list(self.waiting)
        for domain in back:
            peer = self.waiting.pop(domain)
            self.peers[domain] = peer
            self.refused.pop(domain, None)
            self.sink.emit(ev.DomainRejoined(domain=domain, job=job, round=rnd, was=self.failed.pop(domain, ""),
                                             pid=peer.pid))
        return back

    # -- who takes part ------------------------------------------------------------
    def start_job(self) -> None:
        self.dropped = {}

    def active(self, participants: list[str]) -> list[str]:
        """Those of `participants` joined now and not out of the job."""
        return [d for d in participants if d in self.peers and d not in self.failed and d not in self.dropped]

    def excluded(self, job: PlanJob) -> dict[str, str]:
        """Participants that cannot take part in `job` now, each with a reason naming who decided."""
        out = {}
        for d in job.participants:
            peer = self.peers.get(d)
            if d in self.refused:
                out[d] = f"domain {d} was refused: {self.refused[d]}"
            elif d in self.failed:
                out[d] = f"domain {d} lost: {self.failed[d]}"
            elif d in self.dropped:
                out[d] = f"domain {d} {self.dropped[d]}"
            elif peer is not None and job.name in peer.refused:
                out[d] = f"domain {d} refused the job: {peer.refused[job.name]}"
        return out

    def quorum(self, job: PlanJob) -> tuple[list[str], list[str], dict[str, str]]:
        """(joined and able, not heard from yet, excluded with reasons) among `job`'s participants."""
        out = self.excluded(job)
        have = [d for d in job.participants if d in self.peers and d not in out]
        pending = [d for d in job.participants if d not in self.peers and d not in out]
        return have, pending, out

    # -- messages out ----------------------------------------------------------------
    def send(self, peer: Peer, msg: Any, tensors: wire.Tensors | None = None) -> int:
        """Send to a peer's connection; bytes sent, 0 (and the domain lost) when it is unreachable."""
        try:
            return self.link.send(peer.identity, self._stamp(msg), tensors)
        except Unreachable as err:
            if not self.exited(peer.domain):
                self.lose(peer.domain, f"unreachable: {err}", cause="connection closed")
            return 0

    def _stamp(self, msg: Any) -> Any:
        return msg.model_copy(update={"run": self.run, "sender": "coordinator"})
