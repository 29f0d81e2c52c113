"""Run-time events: past-tense facts, the one stream every consumer reads.

The coordinator publishes each event on its XPUB socket and appends it to
`events.jsonl`; the headless printer, the dashboard, `meshctl status` and the
metrics file are all consumers of the same stream. An event is a frozen pydantic
model with a `type` tag, a sequence number and a timestamp; `message()` renders it
as one human line.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


class Event(BaseModel):
    """Base of every event."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: ClassVar[str] = "event"
    level: ClassVar[str] = "info"
    seq: int = 0
    """Position in the run's stream, from 1."""
    ts: float = 0.0
    """Unix time when the event happened."""

    def message(self) -> str:
        return self.type

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.model_dump(mode="json")}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=False)


class RunStarted(Event):
    type: ClassVar[str] = "run_started"
    run: str
    mesh: str
    plan_hash: str
    run_dir: str
    jobs: list[str]
    domains: list[str]

    def message(self) -> str:
        return f"run {self.run} started: mesh {self.mesh}, {len(self.domains)} domains, jobs {', '.join(self.jobs)}"


class RunResumed(Event):
    """The coordinator process died and a new one took the run up from its checkpoints."""

    type: ClassVar[str] = "run_resumed"
    level: ClassVar[str] = "warning"
    run: str
    rounds: dict[str, int]
    """Job -> the last round whose checkpoint it resumed from (rounds after it are trained again)."""
    reason: str
    """How the previous coordinator process ended."""

    def message(self) -> str:
        where = ", ".join(f"{j} after round {r}" for j, r in self.rounds.items()) or "from the start"
        return f"run {self.run} resumed ({self.reason}): {where}"


class PolicyDecided(Event):
    type: ClassVar[str] = "policy_decided"
    policy: str
    scope: str
    subject: str
    effect: str
    reason: str
    at: str = ""
    stage: str = "compile"
    """`compile` (the compiler) or `runtime` (a domain or the coordinator, at run time)."""
    domain: str = ""
    """The domain that decided at run time; empty for the compiler or the coordinator."""

    @property
    def level(self) -> str:  # type: ignore[override]
        return {"deny": "error", "warn": "warning"}.get(self.effect, "info")

    def message(self) -> str:
        verb = "denies" if self.effect == "deny" else f"{self.effect}s"
        return f"policy {self.policy} {verb} {self.subject}: {self.reason}"


class DomainJoined(Event):
    type: ClassVar[str] = "domain_joined"
    domain: str
    products: list[str] = Field(default_factory=list)
    rows: dict[str, int] = Field(default_factory=dict)
    """Row count per product (a count, never a row)."""
    pid: int = 0
    """The daemon's process id, as it reported it."""

    def message(self) -> str:
        return f"domain {self.domain} joined with {', '.join(self.products) or 'no products'}"


class DomainRefused(Event):
    type: ClassVar[str] = "domain_refused"
    level: ClassVar[str] = "error"
    domain: str
    reason: str

    def message(self) -> str:
        return f"domain {self.domain} refused: {self.reason}"


class DomainLost(Event):
    type: ClassVar[str] = "domain_lost"
    level: ClassVar[str] = "error"
    domain: str
    reason: str
    cause: str = ""
    """Why the coordinator decided it is lost: `heartbeat silence`, `restarted`, `connection closed`,
    `exited with code N`, `data refused` (its daemon exited before it joined), `error reported`,
    `output gate`; '' in events written before the field."""

    def message(self) -> str:
        return f"domain {self.domain} lost: {self.reason}"


class DomainRejoined(Event):
    """A domain that was lost (or whose daemon restarted) said Hello again and was re-admitted
    at a round boundary: it takes part again from `round` of `job` (0: before the job's first round)."""

    type: ClassVar[str] = "domain_rejoined"
    domain: str
    job: str = ""
    round: int = 0
    was: str = ""
    """Why it had left: the loss it comes back from."""
    pid: int = 0
    """The process id of the daemon that said Hello again."""

    def message(self) -> str:
        at = f" at job {self.job} round {self.round}" if self.job and self.round else (
            f" before job {self.job}" if self.job else "")
        return f"domain {self.domain} rejoined{at}" + (f" (was lost: {self.was})" if self.was else "")


class DomainsAwaited(Event):
    """A job still waits for domains that have not joined (every AWAIT_EVENT_S while it waits);
    `commands` holds, for each remote one, what its operator runs to bring it."""

    type: ClassVar[str] = "domains_awaited"
    level: ClassVar[str] = "warning"
    job: str
    domains: list[str]
    waited_s: float
    commands: dict[str, str] = Field(default_factory=dict)

    def message(self) -> str:
        head = f"job {self.job} waits for {', '.join(self.domains)} (for {self.waited_s:.0f}s)"
        return head + "".join(f"\n  {d}: {cmd}" for d, cmd in self.commands.items())


class RoundRetried(Event):
    """A round fell below quorum because participants were lost, and they came back within the rejoin
    grace: its `phase` (`train` or `eval`) runs again, attempt `attempt`, with the same global weights;
    `domains` are those back (re-admitted, each also a DomainRejoined)."""

    type: ClassVar[str] = "round_retried"
    level: ClassVar[str] = "warning"
    job: str
    round: int
    attempt: int
    phase: str
    domains: list[str] = Field(default_factory=list)
    reason: str = ""
    """Why the attempt before it stopped: each domain's loss."""

    def message(self) -> str:
        return (f"job {self.job} round {self.round}: {self.phase} re-run (attempt {self.attempt}) with "
                f"{', '.join(self.domains)} back" + (f" (was {self.reason})" if self.reason else ""))


class UpdateExcluded(Event):
    """A round policy with `effect: exclude` left `domain`'s update out of round `round`'s aggregation
    (an audit entry; the round goes on with the others)."""

    type: ClassVar[str] = "update_excluded"
    level: ClassVar[str] = "warning"
    job: str
    round: int
    domain: str
    policy: str
    reason: str
    at: str = ""
    update_norm: float = 0.0
    exclusions: int = 1
    """How many of the domain's updates the policy has excluded in this job, this one included."""

    def message(self) -> str:
        return (f"job {self.job} round {self.round}: policy {self.policy} excludes the update of "
                f"{self.domain}: {self.reason}")


class DomainSuspended(Event):
    """`domain` takes no further part in `job`: policy `policy` excluded `exclusions` of its updates
    (its `suspend_after`). An audit entry; the domain is listed in the job's left_out."""

    type: ClassVar[str] = "domain_suspended"
    level: ClassVar[str] = "warning"
    job: str
    round: int
    domain: str
    policy: str
    exclusions: int
    reason: str = ""

    def message(self) -> str:
        return (f"job {self.job} round {self.round}: {self.domain} suspended by policy {self.policy} "
                f"after {self.exclusions} excluded update(s)")


class MessageRejected(Event):
    type: ClassVar[str] = "message_rejected"
    level: ClassVar[str] = "warning"
    sender: str
    reason: str

    def message(self) -> str:
        return f"message from {self.sender} rejected: {self.reason}"


class JobStarted(Event):
    type: ClassVar[str] = "job_started"
    job: str
    participants: list[str]
    rounds: int
    parameters: int
    quorum: int

    def message(self) -> str:
        return (f"job {self.job} started: {len(self.participants)} participants, "
                f"{self.rounds} rounds, {self.parameters:,} parameters")


class JobWaiting(Event):
    type: ClassVar[str] = "job_waiting"
    job: str
    have: list[str]
    need: int

    def message(self) -> str:
        return f"job {self.job} waiting for quorum: {len(self.have)}/{self.need} domains connected"


class RoundStarted(Event):
    type: ClassVar[str] = "round_started"
    job: str
    round: int
    participants: list[str]
    """Those that train this round (with client sampling: the round's sample)."""
    idle: list[str] = Field(default_factory=list)
    """Client sampling: the active participants not sampled this round (they still evaluate)."""

    def message(self) -> str:
        rest = f" (sampled; {len(self.idle)} idle)" if self.idle else ""
        return f"job {self.job} round {self.round} started with {len(self.participants)} participants{rest}"


class UpdateReceived(Event):
    type: ClassVar[str] = "update_received"
    job: str
    round: int
    domain: str
    examples: int
    loss: float
    seconds: float
    """Local training time reported by the domain."""
    bytes: int
    update_norm: float | None = 0.0
    """L2 norm of the update; None under secure aggregation, where the coordinator cannot see it."""

    def message(self) -> str:
        return (f"job {self.job} round {self.round}: update from {self.domain} "
                f"({self.examples} examples, loss {self.loss:.4f}, {self.seconds:.3f}s)")


class RoundCompleted(Event):
    type: ClassVar[str] = "round_completed"
    job: str
    round: int
    rounds: int
    participants: list[str]
    train_loss: float
    metrics: dict[str, float]
    """Evaluation of the aggregated model on the domains' holdouts (example-weighted)."""
    bytes_in: int
    """Bytes of the round's replies as received: its updates (`update_bytes`) and evaluation results."""
    bytes_out: int
    seconds: float
    update_bytes: int = 0
    """Of `bytes_in`: the round's updates (TrainRes messages, compressed when the model declares
    `compression`), header and tensor frames."""
    aggregation: str = ""
    """What a robust strategy did (e.g. which update krum chose); empty for means."""
    epsilon: float | None = None
    """DP training: ε this job has spent so far (the most any product was charged in this run)."""
    domain_metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    """Each evaluating domain's own metrics (a metric undefined on its holdout, e.g. auroc of one class, is left out)."""
    domain_examples: dict[str, int] = Field(default_factory=dict)
    """The holdout examples behind each domain's metrics."""

    def message(self) -> str:
        ms = " ".join(f"{k}={v:.4f}" for k, v in self.metrics.items())
        return (f"job {self.job} round {self.round}/{self.rounds}: "
                f"train_loss={self.train_loss:.4f} {ms} ({self.seconds:.3f}s)")


class CheckpointWritten(Event):
    type: ClassVar[str] = "checkpoint_written"
    job: str
    round: int
    path: str

    def message(self) -> str:
        return f"job {self.job} round {self.round} checkpoint {self.path}"


class JobCompleted(Event):
    type: ClassVar[str] = "job_completed"
    job: str
    rounds: int
    metrics: dict[str, float]
    model_path: str
    seconds: float
    domains: list[str] = Field(default_factory=list)
    """The domains whose updates the model holds (one or more rounds)."""
    left_out: dict[str, str] = Field(default_factory=dict)
    """Participants whose updates it does not hold, each with why (lost, refused, rejected)."""
    domain_metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    """The last round's metrics of each evaluating domain (RoundCompleted.domain_metrics)."""
    domain_examples: dict[str, int] = Field(default_factory=dict)
    """The holdout examples behind each domain's metrics."""

    def message(self) -> str:
        ms = " ".join(f"{k}={v:.4f}" for k, v in self.metrics.items())
        covers = f"; covers {', '.join(self.domains)}" if self.domains else ""
        out = "".join(f"; without {d} ({why})" for d, why in self.left_out.items())
        return f"job {self.job} completed after {self.rounds} rounds: {ms}; model {self.model_path}{covers}{out}"


class JobFailed(Event):
    type: ClassVar[str] = "job_failed"
    level: ClassVar[str] = "error"
    job: str
    round: int
    reason: str

    def message(self) -> str:  # round 0: the join, the data checks or the resume, before any round ran
        where = f"in round {self.round}" if self.round else "before round 1"
        return f"job {self.job} failed {where}: {self.reason}"


class RunCompleted(Event):
    type: ClassVar[str] = "run_completed"
    run: str
    ok: bool
    seconds: float
    reason: str = ""

    def message(self) -> str:
        state = "completed" if self.ok else f"failed: {self.reason}"
        return f"run {self.run} {state} in {self.seconds:.2f}s"


class ProductListed(Event):
    """A product the run's plan declares, as the catalog shows it (published at run start)."""

    type: ClassVar[str] = "product_listed"
    product: str
    domain: str
    owner: str = ""
    classification: str = "internal"
    access: str = "open"
    contract: str = ""
    tags: list[str] = Field(default_factory=list)
    description: str = ""
    columns: list[dict[str, Any]] = Field(default_factory=list)
    """name, type, pii, masking of each column."""
    freshness: str = ""

    def message(self) -> str:
        return f"product {self.product} ({self.classification}) under {self.contract or 'no contract'}"


class ContractChecked(Event):
    """One quality rule of a product's contract, checked in the domain with DuckDB."""

    type: ClassVar[str] = "contract_checked"
    product: str
    domain: str
    contract: str
    rule: str
    observed: float | None = None
    operator: str = ""
    threshold: float | list[float] | None = None
    passed: bool
    severity: str = "error"
    detail: str = ""

    def message(self) -> str:
        verdict = "passed" if self.passed else f"FAILED ({self.severity})"
        obs = "" if self.observed is None else f" observed {self.observed:g}"
        return f"{self.product} {self.rule}{obs} {self.operator} {self.threshold}: {verdict}"


class DomainHeartbeat(Event):
    """A domain's daemon is alive (published at most every few seconds per domain)."""

    type: ClassVar[str] = "domain_heartbeat"
    domain: str
    state: str = "idle"
    """idle | training | evaluating | analyzing"""

    def message(self) -> str:
        return f"{self.domain} alive ({self.state})"


class BudgetSpent(Event):
    """Privacy budget charged to a product's ledger."""

    type: ClassVar[str] = "budget_spent"
    product: str
    subject: str
    epsilon: float
    total: float
    cap: float | None = None

    def message(self) -> str:
        cap = "" if self.cap is None else f" of {self.cap:g}"
        return f"{self.product}: ε {self.epsilon:g} spent by {self.subject}, {self.total:g}{cap} in all"


class AnalysisStarted(Event):
    type: ClassVar[str] = "analysis_started"
    analysis: str
    participants: list[str]
    metrics: list[str]

    def message(self) -> str:
        return f"analysis {self.analysis} started with {', '.join(self.participants)}"


class AnalysisCompleted(Event):
    type: ClassVar[str] = "analysis_completed"
    analysis: str
    groups: int
    suppressed: int
    result_path: str = ""
    seconds: float = 0.0

    def message(self) -> str:
        return (f"analysis {self.analysis} completed: {self.groups} groups, "
                f"{self.suppressed} suppressed, in {self.seconds:.2f}s")


class Personalized(Event):
    """A personalised job's final round: each domain's metrics of its personal model before and after
    its local fine-tuning (computed by the coordinator from the domains' holdout sums, never a model)."""

    type: ClassVar[str] = "personalized"
    job: str
    local: list[str] = Field(default_factory=list)
    """Tensors each domain kept (FedPer); empty when only fine-tuned."""
    fine_tune_epochs: int = 0
    domains: dict[str, dict[str, dict[str, float]]]
    """domain -> {"before": metrics, "after": metrics} ("after" only when fine-tuned)."""
    examples: dict[str, int] = Field(default_factory=dict)
    """domain -> holdout examples behind its metrics."""
    pooled: dict[str, dict[str, float]] = Field(default_factory=dict)
    """{"before": ..., "after": ...}: the pooled sums of every domain's personal model."""

    def message(self) -> str:
        parts = []
        for d, m in self.domains.items():
            before_m = m.get("before", {})
            key = next((k for k in ("accuracy", "rmse") if k in before_m), next(iter(before_m), "loss"))
            before = before_m.get(key, float("nan"))
            after = f" -> {m['after'][key]:.4f}" if "after" in m and key in m["after"] else ""
            parts.append(f"{d} {key} {before:.4f}{after}")
        return f"job {self.job} personalised: " + "; ".join(parts)


class StragglersDropped(Event):
    """A round went on without participants that did not reply by its deadline."""

    type: ClassVar[str] = "stragglers_dropped"
    level: ClassVar[str] = "warning"
    job: str
    round: int
    phase: str
    """`train` or `eval`."""
    domains: list[str]
    waited_s: float

    def message(self) -> str:
        return (f"job {self.job} round {self.round}: {self.phase} went on without "
                f"{', '.join(self.domains)} (no reply within {self.waited_s:.0f}s)")


class MasksShared(Event):
    """Secure aggregation: a domain's sealed Shamir shares of its round masks reached the coordinator
    (from here on the round survives its dropping out)."""

    type: ClassVar[str] = "masks_shared"
    job: str
    round: int
    domain: str
    attempt: int = 1

    def message(self) -> str:
        return f"job {self.job} round {self.round}: {self.domain} shared its masks"


class DropoutsRecovered(Event):
    """Secure aggregation: the round was unmasked without `dropped`, whose pairwise masks were rebuilt
    from `threshold` or more survivors' shares (never their updates: they sent none)."""

    type: ClassVar[str] = "dropouts_recovered"
    level: ClassVar[str] = "warning"
    job: str
    round: int
    dropped: list[str]
    survivors: int
    threshold: int

    def message(self) -> str:
        return (f"job {self.job} round {self.round}: secure aggregation recovered without "
                f"{', '.join(self.dropped)} ({self.survivors} survivors, threshold {self.threshold})")


class HeldOutEvaluated(Event):
    """A round's global model scored on the job's evaluation product by the domain that holds it
    (coordinator/crosssite.py); `reason` says why it was not, when it was not."""

    type: ClassVar[str] = "held_out_evaluated"
    job: str
    round: int
    product: str
    domain: str
    examples: int = 0
    metrics: dict[str, float] = Field(default_factory=dict)
    reason: str = ""

    def message(self) -> str:
        if self.reason:
            return f"job {self.job} round {self.round}: evaluation product {self.product} not scored: {self.reason}"
        ms = " ".join(f"{k}={v:.4f}" for k, v in self.metrics.items())
        return f"job {self.job} round {self.round}: {self.product} (held out, {self.examples} examples) {ms}"


class CrossSiteCell(BaseModel):
    """One model scored at one site: its metrics, or why it was not scored."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    """`global`, or `local:<domain>` (that domain's last local model)."""
    site: str
    """A participant (its holdout), or the evaluation product's id."""
    examples: int = 0
    metrics: dict[str, float] = Field(default_factory=dict)
    reason: str = ""


class CrossSiteEvaluated(Event):
    """The end of a job with `cross_site: true`: every model (global, each participant's last local one)
    scored at every site; the matrix is also in the run directory (`path`, cross_site.csv)."""

    type: ClassVar[str] = "cross_site_evaluated"
    job: str
    round: int
    models: list[str]
    sites: list[str]
    cells: list[CrossSiteCell]
    path: str = ""

    def message(self) -> str:
        missing = sum(1 for c in self.cells if c.reason)
        gaps = f", {missing} not scored" if missing else ""
        return (f"job {self.job}: cross-site evaluation of {len(self.models)} models at {len(self.sites)} sites"
                f"{gaps} ({self.path})")

    def table(self, metric: str = "") -> list[str]:
        """The matrix as text lines, models down, sites across, one metric (the first non-loss one)."""
        cells = {(c.model, c.site): c for c in self.cells}
        names = [k for c in self.cells for k in c.metrics]
        metric = metric or next((k for k in names if "loss" not in k), names[0] if names else "")
        width = max([len(m) for m in self.models] + [len(metric)])
        cols = [max(len(s), 8) for s in self.sites]
        rows = [f"  {metric:<{width}}" + "".join(f"  {s:>{w}}" for s, w in zip(self.sites, cols))]
        for m in self.models:
            vals = [(cells.get((m, s)), w) for s, w in zip(self.sites, cols)]
            rows.append(f"  {m:<{width}}" + "".join(
                f"  {c.metrics[metric]:>{w}.4f}" if c is not None and metric in c.metrics else f"  {'-':>{w}}"
                for c, w in vals))
        return rows


class IntersectionComputed(Event):
    """A split model's private set intersection is done: how many entities every part shares (a count)."""

    type: ClassVar[str] = "intersection_computed"
    job: str
    size: int
    """Entities every part holds: the rows the split model trains and evaluates on."""
    parties: list[str]
    min_intersection: int = 1

    def message(self) -> str:
        return (f"job {self.job}: {self.size} entities shared by {', '.join(self.parties)} "
                f"(private set intersection; at least {self.min_intersection} needed)")


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (RunStarted, RunResumed, PolicyDecided, DomainJoined, DomainRefused, DomainLost, DomainRejoined,
                DomainsAwaited,
                MessageRejected, JobStarted, JobWaiting, RoundStarted, UpdateReceived,
                RoundCompleted, CheckpointWritten, JobCompleted, JobFailed, RunCompleted,
                ProductListed, ContractChecked, DomainHeartbeat, BudgetSpent,
                AnalysisStarted, AnalysisCompleted, StragglersDropped, RoundRetried, UpdateExcluded, DomainSuspended,
                Personalized, MasksShared, DropoutsRecovered,
                HeldOutEvaluated, CrossSiteEvaluated, IntersectionComputed)
}


def parse_event(data: dict[str, Any] | str | bytes) -> Event:
    """An Event from its JSON form (a dict or the JSON text). Raises ValueError."""
    obj = json.loads(data) if isinstance(data, (str, bytes)) else dict(data)
    if not isinstance(obj, dict):
        raise ValueError("event is not a JSON object")  # noqa: TRY004 - callers catch ValueError for bad input
    kind = obj.pop("type", None)
    obj.pop("prev", None)  # the audit chain's fields (meshctl.runtime.audit), not the event's
    obj.pop("hash", None)
    cls = EVENT_TYPES.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown event type {kind!r}")
    return cls.model_validate(obj)


def read_events(path: str) -> list[Event]:
    """Every event of an `events.jsonl` file, in order."""
    with open(path, encoding="utf-8") as f:
        return [parse_event(line) for line in f if line.strip()]


def in_epochs(event: Event, line: str, epochs: Collection[str]) -> str:
    """`line` (the event's message, or a line made of it) with the rounds of the `epochs` jobs (split
    models: their `round_*` events are epochs) called epochs: `job m started: 3 participants, 30 epochs`,
    `m  epoch   3/30`, `job m epoch 61 started`, `failed in epoch 3`, `resumed (...): m after epoch 16`."""
    if isinstance(event, RunResumed):
        for job in epochs:
            line = line.replace(f"{job} after round ", f"{job} after epoch ")
        return line
    job = getattr(event, "job", None)
    if job not in epochs:
        return line
    if isinstance(event, (JobStarted, JobCompleted)):
        return line.replace(f" {event.rounds} rounds", f" {event.rounds} epochs", 1)
    if isinstance(event, RoundCompleted):  # a headless line (`m  round`) or the message (`job m round`)
        return line.replace(f"{job}  round ", f"{job}  epoch ", 1).replace(f"job {job} round ", f"job {job} epoch ", 1)
    if isinstance(event, JobFailed):  # the epoch that was running; 0: the join, the intersection or the resume
        was, where = ((f"in round {event.round}", f"in epoch {event.round}") if event.round
                      else ("before round 1", "before epoch 1"))
        return line.replace(f" failed {was}:", f" failed {where}:", 1)
    number = getattr(event, "round", None)
    return line.replace(f"job {job} round {number}", f"job {job} epoch {number}", 1) if number else line
