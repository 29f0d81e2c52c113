"""What the dashboard knows about a run: a pure reducer over the event stream.

`reduce(state, event)` folds one event into a `MeshState`. It mutates `state`
in place and returns it, so `functools.reduce(reduce, events, MeshState())` works;
it reads nothing but the event (no clock, no randomness), so the same events
always give an equal state. The widgets render a `MeshState`; nothing here or
there computes anything the coordinator has not already said.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from meshctl.runtime import events as ev

RunStatus = Literal["starting", "running", "completed", "failed"]
DomainStatus = Literal["connecting", "joined", "training", "idle", "lost", "refused"]
JobStatus = Literal["waiting", "training", "completed", "failed"]
Level = Literal["info", "warning", "error"]

MAX_EVENT_LINES = 500
"""How many rendered event lines a state keeps (the oldest are dropped)."""


@dataclass
class LogLine:
    """One rendered line of the event log."""

    index: int
    """Position among every line this state has ever logged, from 1."""
    level: str
    """`info`, `warning` or `error`."""
    text: str
    ts: float = 0.0
    """The event's time; 0 for lines the dashboard itself wrote."""
    kind: str = ""
    """The event's type, or `note` / `summary` for the dashboard's own lines."""


@dataclass
class DomainView:
    """A domain as the events have described it."""

    name: str
    state: DomainStatus = "connecting"
    products: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    """Why a domain was lost or refused."""
    last_job: str = ""
    last_round: int = 0
    last_examples: int | None = None
    last_loss: float | None = None
    last_seconds: float | None = None


@dataclass
class RoundRow:
    """One completed round of one job."""

    job: str
    round: int
    rounds: int
    participants: int
    train_loss: float
    metrics: dict[str, float]
    bytes_in: int
    bytes_out: int
    seconds: float


@dataclass
class JobView:
    """A federated job's progress."""

    name: str
    rounds_total: int = 0
    current_round: int = 0
    state: JobStatus = "waiting"
    participants: list[str] = field(default_factory=list)
    quorum: int = 0
    parameters: int = 0
    waiting_have: list[str] = field(default_factory=list)
    rounds: list[RoundRow] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    """Final metrics from `job_completed`."""
    model_path: str = ""
    checkpoint: str = ""
    reason: str = ""
    seconds: float | None = None


@dataclass
class Decision:
    """A policy decision, as the policy engine reported it."""

    policy: str
    scope: str
    subject: str
    effect: str
    reason: str
    stage: str = "compile"
    at: str = ""


@dataclass
class MeshState:
    """Everything the dashboard shows. Build with `MeshState()` and fold events in."""

    run_id: str = ""
    mesh: str = ""
    plan_hash: str = ""
    run_dir: str = ""
    state: RunStatus = "starting"
    reason: str = ""
    seconds: float | None = None
    domains: dict[str, DomainView] = field(default_factory=dict)
    jobs: dict[str, JobView] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    events: deque[LogLine] = field(default_factory=lambda: deque(maxlen=MAX_EVENT_LINES))
    logged: int = 0
    """Lines ever logged; `events` holds the last `MAX_EVENT_LINES` of them."""
    event_count: int = 0
    """Events reduced so far."""
    rejected: int = 0
    """Messages the coordinator rejected."""
    skipped: int = 0
    """Frames the dashboard could not parse (counted by the bridge)."""
    rounds: list[RoundRow] = field(default_factory=list)
    """Every job's completed rounds, in the order they completed."""

    def log(self, level: str, text: str, *, ts: float = 0.0, kind: str = "note") -> LogLine:
        """Append a line to the event log and return it."""
        self.logged += 1
        line = LogLine(self.logged, level, text, ts, kind)
        self.events.append(line)
        return line

    def domain(self, name: str) -> DomainView:
        """The view of domain `name`, created on first mention."""
        if name not in self.domains:
            self.domains[name] = DomainView(name)
        return self.domains[name]

    def job(self, name: str) -> JobView:
        """The view of job `name`, created on first mention."""
        if name not in self.jobs:
            self.jobs[name] = JobView(name)
        return self.jobs[name]


def reduce(state: MeshState, event: ev.Event) -> MeshState:
    """Fold `event` into `state` (in place) and return `state`.

    Every event adds one line to the log; the known types also update the
    run, domain, job and decision views. Unknown types are only logged.
    """
    state.event_count += 1
    state.log(event.level, event.message(), ts=event.ts, kind=event.type)
    handler = _HANDLERS.get(type(event))
    if handler is not None:
        handler(state, event)
    return state


def reduce_all(events: Iterable[ev.Event], state: MeshState | None = None) -> MeshState:
    """Fold every event, in order, into `state` (a fresh one by default)."""
    state = MeshState() if state is None else state
    for event in events:
        reduce(state, event)
    return state


def summary(state: MeshState) -> list[str]:
    """Closing lines for a finished run: the outcome, then one line per job."""
    outcome = "completed" if state.state == "completed" else f"failed: {state.reason or 'unknown'}"
    took = f" in {state.seconds:.2f}s" if state.seconds is not None else ""
    lines = [f"summary: run {state.run_id} {outcome}{took}"]
    for job in state.jobs.values():
        metrics = job.metrics or (job.rounds[-1].metrics if job.rounds else {})
        ms = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        done = f"{job.current_round}/{job.rounds_total} rounds"
        lines.append(f"summary: job {job.name} {job.state}, {done}" + (f", {ms}" if ms else ""))
    return lines


# --- handlers, one per event type -------------------------------------------


def _run_started(s: MeshState, e: ev.RunStarted) -> None:
    s.run_id, s.mesh, s.plan_hash, s.run_dir = e.run, e.mesh, e.plan_hash, e.run_dir
    s.state = "running"
    for name in e.domains:
        s.domain(name)
    for name in e.jobs:
        s.job(name)


def _policy_decided(s: MeshState, e: ev.PolicyDecided) -> None:
    s.decisions.append(Decision(e.policy, e.scope, e.subject, e.effect, e.reason, e.stage, e.at))


def _domain_joined(s: MeshState, e: ev.DomainJoined) -> None:
    d = s.domain(e.domain)
    d.state, d.products, d.rows, d.reason = "joined", list(e.products), dict(e.rows), ""


def _domain_refused(s: MeshState, e: ev.DomainRefused) -> None:
    d = s.domain(e.domain)
    d.state, d.reason = "refused", e.reason


def _domain_lost(s: MeshState, e: ev.DomainLost) -> None:
    d = s.domain(e.domain)
    d.state, d.reason = "lost", e.reason


def _message_rejected(s: MeshState, e: ev.MessageRejected) -> None:
    s.rejected += 1


def _job_started(s: MeshState, e: ev.JobStarted) -> None:
    j = s.job(e.job)
    j.participants, j.rounds_total = list(e.participants), e.rounds
    j.parameters, j.quorum, j.state = e.parameters, e.quorum, "waiting"


def _job_waiting(s: MeshState, e: ev.JobWaiting) -> None:
    j = s.job(e.job)
    j.state, j.waiting_have, j.quorum = "waiting", list(e.have), e.need


def _round_started(s: MeshState, e: ev.RoundStarted) -> None:
    j = s.job(e.job)
    j.state, j.current_round, j.waiting_have = "training", e.round, []
    for name in e.participants:
        _set_live(s.domain(name), "training")


def _update_received(s: MeshState, e: ev.UpdateReceived) -> None:
    d = s.domain(e.domain)
    _set_live(d, "idle")
    d.last_job, d.last_round = e.job, e.round
    d.last_examples, d.last_loss, d.last_seconds = e.examples, e.loss, e.seconds


def _round_completed(s: MeshState, e: ev.RoundCompleted) -> None:
    j = s.job(e.job)
    j.current_round, j.rounds_total = e.round, e.rounds
    row = RoundRow(e.job, e.round, e.rounds, len(e.participants), e.train_loss,
                   dict(e.metrics), e.bytes_in, e.bytes_out, e.seconds)
    j.rounds.append(row)
    s.rounds.append(row)
    for name in e.participants:
        _set_live(s.domain(name), "idle")


def _checkpoint_written(s: MeshState, e: ev.CheckpointWritten) -> None:
    s.job(e.job).checkpoint = e.path


def _job_completed(s: MeshState, e: ev.JobCompleted) -> None:
    j = s.job(e.job)
    j.state, j.current_round, j.metrics = "completed", e.rounds, dict(e.metrics)
    j.model_path, j.seconds = e.model_path, e.seconds
    for name in j.participants:
        _set_live(s.domain(name), "idle")


def _job_failed(s: MeshState, e: ev.JobFailed) -> None:
    j = s.job(e.job)
    j.state, j.reason = "failed", e.reason
    if e.round:
        j.current_round = e.round


def _run_completed(s: MeshState, e: ev.RunCompleted) -> None:
    s.run_id = s.run_id or e.run
    s.state = "completed" if e.ok else "failed"
    s.reason, s.seconds = e.reason, e.seconds
    level = "info" if e.ok else "error"
    for text in summary(s):
        s.log(level, text, ts=e.ts, kind="summary")


def _set_live(d: DomainView, state: DomainStatus) -> None:
    """Move a domain to a live state, unless it is lost or refused."""
    if d.state not in ("lost", "refused"):
        d.state = state


_HANDLERS: dict[type[ev.Event], Callable[[MeshState, ev.Event], None]] = {
    ev.RunStarted: _run_started,
    ev.PolicyDecided: _policy_decided,
    ev.DomainJoined: _domain_joined,
    ev.DomainRefused: _domain_refused,
    ev.DomainLost: _domain_lost,
    ev.MessageRejected: _message_rejected,
    ev.JobStarted: _job_started,
    ev.JobWaiting: _job_waiting,
    ev.RoundStarted: _round_started,
    ev.UpdateReceived: _update_received,
    ev.RoundCompleted: _round_completed,
    ev.CheckpointWritten: _checkpoint_written,
    ev.JobCompleted: _job_completed,
    ev.JobFailed: _job_failed,
    ev.RunCompleted: _run_completed,
}  # type: ignore[dict-item]
