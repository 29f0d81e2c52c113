"""What the dashboard knows about a run: a pure reducer over the event stream.

`reduce(state, event)` folds one event into a `MeshState`. It mutates `state`
in place and returns it, so `functools.reduce(reduce, events, MeshState())` works;
it reads nothing but the event (no clock, no randomness), so the same events
always give an equal state. The widgets render a `MeshState`; nothing here or
there computes anything the coordinator has not already said.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from meshctl.runtime import events as ev
from meshctl.runtime.liveness import heartbeat_timeout

RunStatus = Literal["starting", "running", "completed", "failed", "lost"]
"""`lost`: the dashboard stopped hearing the coordinator before the run ended (`coordinator_lost`)."""
DomainStatus = Literal["connecting", "joined", "waiting", "training", "evaluating", "idle",
                       "lost", "refused", "done"]
JobStatus = Literal["waiting", "training", "completed", "failed"]
Level = Literal["info", "warning", "error"]

LIVE = ("joined", "waiting", "training", "evaluating", "idle")
"""Domain states that expect more news from the domain."""


def lost_after() -> float:
    """How long silence may last before the dashboard flags it: the runtime's heartbeat timeout."""
    return heartbeat_timeout()


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
    domain: str = ""
    """The domain the event is about (its `domain`, `sender`, or a product's domain), if any."""
    job: str = ""
    """The job or analysis the event is about, if any."""
    round: int = 0
    """The round the event is about; 0 for none."""


@dataclass
class DomainView:
    """A domain as the events have described it."""

    name: str
    state: DomainStatus = "connecting"
    products: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    """Why a domain was lost or refused."""
    cause: str = ""
    """What refused it: `data` (it could not read or accept its data), `plan`; '' otherwise."""
    last_job: str = ""
    last_round: int = 0
    last_examples: int | None = None
    last_loss: float | None = None
    last_seconds: float | None = None
    last_bytes: int | None = None
    """Size of the domain's last model update on the wire."""
    last_update_ts: float = 0.0
    """When the coordinator received that update."""
    last_seen: float = 0.0
    """Time of the last event from this domain (join, update, heartbeat); 0 = never."""
    jurisdiction: str = ""
    owner: str = ""


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
    epsilon: float | None = None
    """Privacy budget (ε) the job had spent when this round completed; None without DP."""
    domain_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """Each evaluating domain's own test metrics."""
    domain_examples: dict[str, int] = field(default_factory=dict)
    """The holdout examples behind each domain's metrics."""


@dataclass
class Contribution:
    """One domain's update in one round, as `update_received` reported it."""

    domain: str
    examples: int
    loss: float
    update_norm: float | None
    seconds: float
    bytes: int


@dataclass
class CheckView:
    """One contract quality rule checked on one product."""

    rule: str
    passed: bool
    severity: str = "error"
    observed: float | None = None
    operator: str = ""
    threshold: float | list[float] | None = None
    contract: str = ""
    detail: str = ""


@dataclass
class ProductView:
    """A data product, as `product_listed`, `domain_joined` and `contract_checked` described it."""

    address: str
    domain: str
    owner: str = ""
    classification: str = ""
    access: str = ""
    contract: str = ""
    tags: list[str] = field(default_factory=list)
    description: str = ""
    columns: list[dict[str, object]] = field(default_factory=list)
    freshness: str = ""
    rows: int | None = None
    checks: dict[str, CheckView] = field(default_factory=dict)
    """Latest result per rule."""
    epsilon: float | None = None
    """ε spent from this product's privacy ledger (`budget_spent`)."""
    epsilon_cap: float | None = None


@dataclass
class AnalysisView:
    """A federated analysis of the run."""

    name: str
    state: str = "running"
    participants: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    groups: int = 0
    suppressed: int = 0
    seconds: float | None = None
    result_path: str = ""
    """The result file, relative to the run directory (from `analysis_completed`)."""


@dataclass
class JobView:
    """A federated job's progress."""

    name: str
    rounds_total: int = 0
    current_round: int = 0
    """The round (a split job's epoch) that runs now, or ran last."""
    done: int = 0
    """Rounds completed (what every count of progress shows once the job no longer trains)."""
    failed_in: int = 0
    """The round that was running when the job failed; 0: before its first (the join, a split job's intersection)."""
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
    epsilon: float | None = None
    """ε spent so far (the largest ledger total charged to this job), None without DP."""
    sampled: list[str] = field(default_factory=list)
    """Client sampling: the current round's sample (empty without sampling)."""
    idle: list[str] = field(default_factory=list)
    """Client sampling: the active participants the current round did not sample."""
    unit: str = "round"
    """What the panels call its rounds: `epoch` for a split model (its `round_completed` events are epochs)."""


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
    domain: str = ""
    """The domain that decided at run time ('' for the compiler or the coordinator)."""

    @property
    def decided_by(self) -> str:
        """`compiler`, `coordinator` or `domain D`."""
        if self.stage == "compile":
            return "compiler"
        return f"domain {self.domain}" if self.domain else "coordinator"


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
    events: list[LogLine] = field(default_factory=list)
    """Every line logged, in order (none is dropped: the Events tab filters all of them)."""
    logged: int = 0
    """Lines ever logged."""
    event_count: int = 0
    """Events reduced so far."""
    rejected: int = 0
    """Messages the coordinator rejected."""
    skipped: int = 0
    """Frames the dashboard could not parse (counted by the bridge)."""
    rounds: list[RoundRow] = field(default_factory=list)
    """Every job's completed rounds, in the order they completed."""
    contributions: dict[tuple[str, int], list[Contribution]] = field(default_factory=dict)
    """(job, round) -> each domain's update, in arrival order."""
    products: dict[str, ProductView] = field(default_factory=dict)
    """The catalog: address (`domain.name`) -> product."""
    analyses: dict[str, AnalysisView] = field(default_factory=dict)
    reads: dict[str, list[str]] = field(default_factory=dict)
    """Consumer (`model NAME` / `analysis NAME`) -> product addresses it reads (from the plan)."""
    planned_rounds: dict[str, int] = field(default_factory=dict)
    """Job -> its rounds (a split model's epochs) in the plan: a job that fails early still has a total."""
    epochs: set[str] = field(default_factory=set)
    """Jobs whose rounds are epochs: the plan's split models (and any job with an `intersection_computed`)."""
    coordinator_jurisdiction: str = ""
    clock: float = 0.0
    """Time of the newest event reduced (the replay's `now`)."""
    ended_at: float = 0.0
    """Time of `run_completed`; 0 while the run goes on. Ages stop counting there."""
    phase: str = ""
    """What `meshctl up` is doing before the run speaks (`compiling mesh.yaml`, `starting ...`)."""

    def log(self, level: str, text: str, *, ts: float = 0.0, kind: str = "note",
            domain: str = "", job: str = "", round: int = 0) -> LogLine:
        """Append a line to the event log and return it."""
        self.logged += 1
        line = LogLine(self.logged, level, text, ts, kind, domain, job, round)
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
            self.jobs[name] = JobView(name, rounds_total=self.planned_rounds.get(name, 0),
                                      unit="epoch" if name in self.epochs else "round")
        return self.jobs[name]

    def product(self, address: str, domain: str = "") -> ProductView:
        """The catalog entry of `address`, created on first mention."""
        if address not in self.products:
            self.products[address] = ProductView(address, domain or address.split(".", 1)[0])
        return self.products[address]


def reduce(state: MeshState, event: ev.Event) -> MeshState:
    """Fold `event` into `state` (in place) and return `state`.

    Every event adds one line to the log; the known types also update the
    run, domain, job and decision views. Unknown types are only logged.
    """
    state.event_count += 1
    state.clock = max(state.clock, event.ts)
    if state.state == "lost":  # the coordinator speaks again: it was slow, not gone
        state.state, state.reason = "running", ""
    state.log(event.level, ev.in_epochs(event, event.message(), state.epochs), ts=event.ts, kind=event.type,
              **about(event))
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


def about(event: ev.Event) -> dict[str, str | int]:
    """The domain, job and round an event is about, as far as its fields say (for filtering)."""
    domain = getattr(event, "domain", "") or getattr(event, "sender", "")
    if not domain and isinstance(getattr(event, "product", None), str) and "." in event.product:
        domain = event.product.split(".", 1)[0]
    job = getattr(event, "job", "") or getattr(event, "analysis", "")
    subject = getattr(event, "subject", "")
    rnd = getattr(event, "round", 0)
    if isinstance(subject, str) and subject.startswith(("model.", "analysis.", "round.")):
        parts = subject.split(".")
        job = job or parts[1]
        if parts[0] == "round" and len(parts) > 2 and parts[2].isdigit():  # round.JOB.N
            rnd = rnd or int(parts[2])
    elif isinstance(subject, str) and "." in subject and not subject.startswith("plan."):
        domain = domain or subject.split(".", 1)[0]  # a product address: DOMAIN.NAME
    return {"domain": domain if isinstance(domain, str) else "", "job": job if isinstance(job, str) else "",
            "round": rnd if isinstance(rnd, int) else 0}


def coordinator_lost(state: MeshState, reason: str) -> MeshState:
    """Record that the coordinator went silent before the run ended (the dashboard saw it, no event did).

    The next event, if one comes, puts the run back to `running`. A finished run is left as it is.
    """
    if state.state in ("starting", "running"):
        state.state, state.reason = "lost", reason
        state.log("error", f"coordinator lost: {reason}", ts=state.clock)
    return state


def summary(state: MeshState) -> list[str]:
    """Closing lines for a finished run: the outcome, then one line per job."""
    outcome = "completed" if state.state == "completed" else f"failed: {state.reason or 'unknown'}"
    took = f" in {state.seconds:.2f}s" if state.seconds is not None else ""
    lines = [f"summary: run {state.run_id} {outcome}{took}"]
    for job in state.jobs.values():
        metrics = job.metrics or (job.rounds[-1].metrics if job.rounds else {})
        ms = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        done = f"{progress(job)}/{job.rounds_total} {job.unit}s"
        lines.append(f"summary: job {job.name} {job.state}, {done}" + (f", {ms}" if ms else ""))
    return lines


# --- derived views: pure functions of a state (and a `now` passed in) -------


def progress(job: JobView) -> int:
    """The round a count of `job`'s progress shows: the one that runs while it trains, else the rounds completed."""
    return job.current_round if job.state == "training" else job.done


def failed_where(job: JobView) -> str:
    """`in epoch 62` (the one that was running), or `before epoch 1` for a job that failed before its first."""
    return f"in {job.unit} {job.failed_in}" if job.failed_in else f"before {job.unit} 1"


def heartbeat_age(domain: DomainView, now: float) -> float | None:
    """Seconds since the last event from `domain` at time `now`; None if never heard from."""
    return max(0.0, now - domain.last_seen) if domain.last_seen else None


def seen_at(state: MeshState, now: float) -> float:
    """When ages are measured: `now` while the run goes on, its end once it has ended."""
    return min(now, state.ended_at) if state.ended_at else now


def silent(domain: DomainView, now: float, limit: float | None = None) -> bool:
    """Whether a domain that should be talking has said nothing for longer than `limit` (the loss limit)."""
    age = heartbeat_age(domain, now)
    return domain.state in LIVE and age is not None and age > (lost_after() if limit is None else limit)


def job_eta(job: JobView) -> float | None:
    """Seconds left for `job`: mean round seconds × rounds left; None before the first round."""
    if job.state in ("completed", "failed") or not job.rounds or not job.rounds_total:
        return 0.0 if job.state == "completed" else None
    mean = sum(r.seconds for r in job.rounds) / len(job.rounds)
    return mean * max(0, job.rounds_total - job.rounds[-1].round)


def coordinator_status(state: MeshState) -> str:
    """What the coordinator is doing, in a few words."""
    if state.state in ("completed", "failed"):
        return state.state if state.state == "completed" else f"failed: {state.reason}"
    if state.state == "lost":
        return f"lost: {state.reason}"
    for job in state.jobs.values():
        if job.state == "training":
            sampled = f", sampled {', '.join(job.sampled)}" if job.sampled else ""
            return f"training {job.name}, {job.unit} {job.current_round}/{job.rounds_total or '?'}{sampled}"
        if job.state == "waiting" and job.quorum and len(job.waiting_have) >= job.quorum:
            return f"starting {job.name} ({len(job.waiting_have)}/{job.quorum} domains joined)"
        if job.state == "waiting" and (job.waiting_have or job.quorum):
            return (f"waiting for quorum for {job.name} "
                    f"({len(job.waiting_have)}/{job.quorum or '?'} domains)")
    if state.run_id and not any(j.quorum for j in state.jobs.values()):  # before the jobs: the joins
        joined = [d for d in state.domains.values() if d.state != "connecting"]
        if len(joined) < len(state.domains):
            return f"waiting for domains {len(joined)}/{len(state.domains)}"
    running = [a.name for a in state.analyses.values() if a.state in ("running", "waiting")]
    if running:
        return f"running analysis {', '.join(running)}"
    if state.state == "starting":
        return state.phase or "starting"
    return "running"


def product_status(product: ProductView) -> str:
    """`passed`, `failed` (an error rule failed), `warning` (only warnings) or `unchecked`."""
    if not product.checks:
        return "unchecked"
    failed = [c for c in product.checks.values() if not c.passed]
    if not failed:
        return "passed"
    return "failed" if any(c.severity == "error" for c in failed) else "warning"


def lineage(state: MeshState, address: str) -> list[str]:
    """Which models and analyses of this run read product `address`.

    The plan's reads say it exactly when the dashboard has them; otherwise a job or
    analysis counts as a reader when the product's domain took part in it.
    """
    started = {f"model {n}" for n, j in state.jobs.items() if j.rounds or j.state != "waiting"}
    started |= {f"analysis {n}" for n in state.analyses}
    if state.reads:
        return [c for c, products in state.reads.items() if address in products and c in started]
    domain = state.products[address].domain if address in state.products else ""
    out = [f"model {n}" for n, j in state.jobs.items()
           if domain in j.participants and f"model {n}" in started]
    out += [f"analysis {n}" for n, a in state.analyses.items() if domain in a.participants]
    return out


# --- handlers, one per event type -------------------------------------------


def _run_started(s: MeshState, e: ev.RunStarted) -> None:
    s.run_id, s.mesh, s.plan_hash, s.run_dir = e.run, e.mesh, e.plan_hash, e.run_dir
    s.state = "running"
    for name in e.domains:
        s.domain(name)
    for name in e.jobs:
        if name.startswith("analysis:"):  # an analysis run: no rounds, a result
            s.analyses.setdefault(name.removeprefix("analysis:"),
                                  AnalysisView(name.removeprefix("analysis:"), "waiting"))
        else:
            s.job(name)


def _policy_decided(s: MeshState, e: ev.PolicyDecided) -> None:
    s.decisions.append(Decision(e.policy, e.scope, e.subject, e.effect, e.reason, e.stage, e.at, e.domain))
    if e.domain and e.effect == "deny" and e.policy in ("data", "resume"):  # it refused its data, or its state
        d = s.domain(e.domain)                                                  # to resume a split job
        d.state, d.reason, d.cause = "refused", e.reason, e.policy


def _update_excluded(s: MeshState, e: ev.UpdateExcluded) -> None:
    """A round policy left one update out: a row of the policy decisions list (effect `exclude`)."""
    s.decisions.append(Decision(e.policy, "round", f"update.{e.job}.{e.round}.{e.domain}", "exclude", e.reason,
                                "runtime", e.at))


def _domain_suspended(s: MeshState, e: ev.DomainSuspended) -> None:
    """A domain left the job by policy: a row of the policy decisions list (effect `suspend`)."""
    s.decisions.append(Decision(e.policy, "round", f"domain.{e.domain}", "suspend",
                                f"{e.exclusions} update(s) excluded in job {e.job}: {e.domain} takes no further part",
                                "runtime"))


def _domain_joined(s: MeshState, e: ev.DomainJoined) -> None:
    d = s.domain(e.domain)
    waiting = any(j.state == "waiting" and j.quorum for j in s.jobs.values())
    d.state, d.products, d.rows, d.reason = "joined", list(e.products), dict(e.rows), ""
    if waiting:
        d.state = "waiting"
    d.last_seen = e.ts
    for address in e.products:
        s.product(address, e.domain)
    for key, rows in e.rows.items():
        s.product(key if "." in key else f"{e.domain}.{key}", e.domain).rows = rows


def _domain_refused(s: MeshState, e: ev.DomainRefused) -> None:
    d = s.domain(e.domain)
    d.state, d.reason, d.cause = "refused", e.reason, "plan"


def _domain_lost(s: MeshState, e: ev.DomainLost) -> None:
    d = s.domain(e.domain)
    if e.cause == "data refused" or (not e.cause and d.state == "connecting" and not d.last_seen):
        # the coordinator says its daemon could not start on its data (events before `cause`: it never joined)
        d.state, d.reason, d.cause = "refused", e.reason, "data"
        return
    d.state, d.reason, d.cause = "lost", e.reason, e.cause


def _domain_rejoined(s: MeshState, e: ev.DomainRejoined) -> None:
    """Back from a loss (or a restart) at a round boundary: it takes part again."""
    d = s.domain(e.domain)
    d.state, d.reason, d.cause = "joined", "", ""
    d.last_seen = max(d.last_seen, e.ts)


def _domain_heartbeat(s: MeshState, e: ev.DomainHeartbeat) -> None:
    d = s.domain(e.domain)
    d.last_seen = max(d.last_seen, e.ts)
    live = {"analyzing": "training"}.get(e.state, e.state)
    if live in ("idle", "training", "evaluating") and d.state not in ("waiting",):
        _set_live(d, live)  # type: ignore[arg-type]


def _message_rejected(s: MeshState, e: ev.MessageRejected) -> None:
    s.rejected += 1


def _job_started(s: MeshState, e: ev.JobStarted) -> None:
    j = s.job(e.job)
    j.participants, j.rounds_total = list(e.participants), e.rounds
    j.parameters, j.quorum, j.state = e.parameters, e.quorum, "waiting"
    j.waiting_have = list(e.participants)  # who joined (a split job announces no job_waiting)
    for name in e.participants:
        if s.domain(name).state == "waiting":
            _set_live(s.domain(name), "idle")


def _job_waiting(s: MeshState, e: ev.JobWaiting) -> None:
    j = s.job(e.job)
    j.state, j.waiting_have, j.quorum = "waiting", list(e.have), e.need
    for name in e.have:
        _set_live(s.domain(name), "waiting")


def _round_started(s: MeshState, e: ev.RoundStarted) -> None:
    j = s.job(e.job)
    j.state, j.current_round, j.waiting_have = "training", e.round, []
    j.sampled, j.idle = (list(e.participants), list(e.idle)) if e.idle else ([], [])
    for name in e.participants:
        _set_live(s.domain(name), "training")
    for name in e.idle:  # client sampling: not in this round's sample
        _set_live(s.domain(name), "idle")


def _update_received(s: MeshState, e: ev.UpdateReceived) -> None:
    d = s.domain(e.domain)
    _set_live(d, "evaluating")
    d.last_job, d.last_round = e.job, e.round
    d.last_examples, d.last_loss, d.last_seconds = e.examples, e.loss, e.seconds
    d.last_bytes, d.last_update_ts, d.last_seen = e.bytes, e.ts, max(d.last_seen, e.ts)
    s.contributions.setdefault((e.job, e.round), []).append(
        Contribution(e.domain, e.examples, e.loss, e.update_norm, e.seconds, e.bytes))


def _round_completed(s: MeshState, e: ev.RoundCompleted) -> None:
    j = s.job(e.job)
    j.current_round, j.rounds_total, j.done = max(j.current_round, e.round), e.rounds, e.round
    row = RoundRow(e.job, e.round, e.rounds, len(e.participants), e.train_loss,
                   dict(e.metrics), e.bytes_in, e.bytes_out, e.seconds,
                   e.epsilon if e.epsilon is not None else j.epsilon,
                   {d: dict(m) for d, m in e.domain_metrics.items()}, dict(e.domain_examples))
    j.rounds.append(row)
    s.rounds.append(row)
    for name in e.participants:
        d = s.domain(name)
        if d.state == "evaluating" and d.last_round <= e.round:
            d.state = "idle"


def _checkpoint_written(s: MeshState, e: ev.CheckpointWritten) -> None:
    s.job(e.job).checkpoint = e.path


def _job_completed(s: MeshState, e: ev.JobCompleted) -> None:
    j = s.job(e.job)
    j.state, j.current_round, j.metrics, j.done = "completed", e.rounds, dict(e.metrics), e.rounds
    j.model_path, j.seconds = e.model_path, e.seconds
    for name in j.participants:
        _set_live(s.domain(name), "idle")


def _job_failed(s: MeshState, e: ev.JobFailed) -> None:
    j = s.job(e.job)
    j.state, j.reason, j.failed_in = "failed", e.reason, e.round
    if e.round:
        j.current_round = e.round


def _run_completed(s: MeshState, e: ev.RunCompleted) -> None:
    s.run_id = s.run_id or e.run
    s.state = "completed" if e.ok else "failed"
    s.reason, s.seconds, s.ended_at = e.reason, e.seconds, e.ts
    for d in s.domains.values():
        if d.state in LIVE:
            d.state = "done"
    for a in s.analyses.values():
        if a.state in ("waiting", "running"):
            a.state = "failed"
    level = "info" if e.ok else "error"
    for text in summary(s):
        s.log(level, text, ts=e.ts, kind="summary")


def _product_listed(s: MeshState, e: ev.ProductListed) -> None:
    p = s.product(e.product, e.domain)
    p.owner, p.classification, p.access, p.contract = e.owner, e.classification, e.access, e.contract
    p.tags, p.description, p.freshness = list(e.tags), e.description, e.freshness
    p.columns = [dict(c) for c in e.columns]


def _contract_checked(s: MeshState, e: ev.ContractChecked) -> None:
    p = s.product(e.product, e.domain)
    p.contract = p.contract or e.contract
    p.checks[e.rule] = CheckView(e.rule, e.passed, e.severity, e.observed, e.operator,
                                 e.threshold, e.contract, e.detail)


def _budget_spent(s: MeshState, e: ev.BudgetSpent) -> None:
    if e.product in s.products or "." in e.product:
        p = s.product(e.product)
        p.epsilon, p.epsilon_cap = e.total, e.cap
    name = e.subject.split(".", 1)[1] if e.subject.startswith("model.") else e.subject
    if name in s.jobs:
        j = s.jobs[name]
        j.epsilon = max(j.epsilon or 0.0, e.total)


def _analysis_started(s: MeshState, e: ev.AnalysisStarted) -> None:
    s.analyses[e.analysis] = AnalysisView(e.analysis, "running", list(e.participants),
                                          list(e.metrics))


def _analysis_completed(s: MeshState, e: ev.AnalysisCompleted) -> None:
    a = s.analyses.setdefault(e.analysis, AnalysisView(e.analysis))
    a.state, a.groups, a.suppressed, a.seconds = "completed", e.groups, e.suppressed, e.seconds
    a.result_path = e.result_path


def _set_live(d: DomainView, state: DomainStatus) -> None:
    """Move a domain to a live state, unless it is lost or refused."""
    if d.state not in ("lost", "refused"):
        d.state = state


def _intersection_computed(s: MeshState, e: ev.IntersectionComputed) -> None:
    """Only a split job intersects: its rounds are epochs (also without the plan, e.g. attached)."""
    s.epochs.add(e.job)
    s.job(e.job).unit = "epoch"


def _run_resumed(s: MeshState, e: ev.RunResumed) -> None:
    """Rounds after the checkpoints resumed from are trained again (their first rows stay, as they happened)."""
    for name, last in e.rounds.items():
        if name in s.jobs:
            s.jobs[name].current_round = min(s.jobs[name].current_round, last)
            s.jobs[name].done = min(s.jobs[name].done, last)


_HANDLERS: dict[type[ev.Event], Callable[[MeshState, ev.Event], None]] = {
    ev.RunStarted: _run_started,
    ev.RunResumed: _run_resumed,
    ev.PolicyDecided: _policy_decided,
    ev.UpdateExcluded: _update_excluded,
    ev.DomainSuspended: _domain_suspended,
    ev.DomainJoined: _domain_joined,
    ev.DomainRefused: _domain_refused,
    ev.DomainLost: _domain_lost,
    ev.DomainRejoined: _domain_rejoined,
    ev.DomainHeartbeat: _domain_heartbeat,
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
    ev.ProductListed: _product_listed,
    ev.ContractChecked: _contract_checked,
    ev.BudgetSpent: _budget_spent,
    ev.AnalysisStarted: _analysis_started,
    ev.AnalysisCompleted: _analysis_completed,
    ev.IntersectionComputed: _intersection_computed,
}  # type: ignore[dict-item]
