"""The collector room: replies checked against the plan, and one phase collected with its deadline.

A reply is kept only when it is for the job that runs, from one of its admitted
participants, for the round that runs or the next one (kept until collected), not
a duplicate, not late for a phase that went on without it, and its tensors match
the plan's model. `collect` waits for every active participant's reply, or after
`round_timeout_s` goes on with at least `quorum` of them (the rest are
stragglers); fewer fails the job with each missing domain's reason, unless the missing
ones were lost (not refused): then `RoundInterrupted` lets the round template wait for
them (`await_back`) and re-run the round.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from meshctl.compiler.plan import PlanJob
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.coordinator.members import Members, Sink
from meshctl.runtime.kernels import client_dp, compress
from meshctl.runtime.transport import Clock

REJECT_CODES = ("not-running", "not-participant", "superseded", "duplicate", "late", "stale", "far-future",
                "dropped", "not-admitted", "bad-update", "bad-evaluation")
"""Why a result is rejected: `Collector.judge`'s first value."""


CONTROL = "control/"
"""SCAFFOLD: the name prefix of a control variate beside the weights (daemon.CONTROL, the same)."""


class JobAborted(Exception):
    """The current job cannot go on; the message says why."""


def pump_until(missing: Callable[[], list[str]], timeout_s: float, *, clock: Clock, pump: Callable[[], Any],
               check: Callable[[], None], aborted: Callable[[list[str]], str]) -> None:
    """Pump until `missing()` (the participants still awaited) is empty. `check()` raises when a
    participant is gone; past `timeout_s`, JobAborted with `aborted(still missing)`."""
    deadline = clock.monotonic() + timeout_s
    while True:
        check()
        left = missing()
        if not left:
            return
        if clock.monotonic() > deadline:
            raise JobAborted(aborted(left))
        pump()


class RoundInterrupted(JobAborted):
    """A phase fell below quorum because participants were lost: the job can go on if enough of
    `lost` come back (`Collector.await_back`); unhandled, it fails the job like any JobAborted."""

    def __init__(self, message: str, lost: list[str]):
        super().__init__(message)
        self.lost = lost


class Collector:
    """The current job's replies, by (kind, round, domain), until a phase collects them."""

    def __init__(self, members: Members, clock: Clock, pump: Callable[[], None]):
        self.members, self.clock, self.pump = members, clock, pump
        self.sink: Sink = None  # type: ignore[assignment] - set by the coordinator before use
        self.current: PlanJob | None = None
        self.round = 0
        self.inbox: dict[tuple[str, int, str], tuple[Any, wire.Tensors]] = {}
        self.closed: set[tuple[str, int]] = set()
        """(kind, round) of the current job whose collection is over: later replies are late."""
        self.norms: dict[tuple[int, str], float] = {}
        self.bytes_in: dict[tuple[str, int], int] = {}
        self.update_bytes: dict[tuple[str, int], int] = {}
        """Of `bytes_in`: the bytes of the updates (TrainRes) kept, per (job, round)."""
        self.job_epsilon: dict[tuple[str, str], float] = {}
        """DP training: ε charged in this run per (job, product)."""
        self.gated = False
        """The job has `scope: round` policies: keep each update's norm for them."""
        self.bases: dict[int, wire.Tensors] = {}
        """Round -> the global weights its TrainIns carried: an update's norm is taken from them."""
        self.attempts: dict[int, int] = {}
        """Secure aggregation: round -> the attempt now running (re-runs after a loss); a masked update
        of an earlier attempt is refused (its masks cancel only against that attempt's)."""
        self.shares: dict[tuple[int, int, str], wire.SecaggShares] = {}
        """Secure aggregation: (round, attempt, domain) -> the sealed shares it sent (relayed at unmasking)."""

    def start(self, job: PlanJob | None) -> None:
        self.current, self.closed, self.round = job, set(), 0
        self.norms.clear()
        self.bases.clear()
        self.attempts.clear()
        self.shares.clear()

    def receive(self, domain: str, msg: wire.TrainRes | wire.EvalRes, tensors: wire.Tensors, size: int) -> None:
        """Keep a result for its phase, or reject it (a MessageRejected event)."""
        _, problem, norm = self.judge(domain, msg, tensors)
        if problem:
            self.sink.emit(ev.MessageRejected(sender=domain, reason=problem))
            return
        self.bytes_in[(msg.job, msg.round)] = self.bytes_in.get((msg.job, msg.round), 0) + size
        if isinstance(msg, wire.TrainRes):
            self.update_bytes[(msg.job, msg.round)] = self.update_bytes.get((msg.job, msg.round), 0) + size
        job = self.current
        if isinstance(msg, wire.TrainRes) and job is not None and job.compression is not None \
                and not job.privacy.secure_aggregation:  # (judged: it restores, and its round has a base)
            tensors = restored(job, tensors, self.bases[msg.round])
        self.inbox[(kind_of(msg), msg.round, domain)] = (msg, tensors)
        if self.gated and isinstance(msg, wire.TrainRes) and norm is not None:
            self.norms[(msg.round, domain)] = norm
        if isinstance(msg, wire.TrainRes):
            for c in msg.charges:
                key = (msg.job, c.product)
                self.job_epsilon[key] = self.job_epsilon.get(key, 0.0) + c.epsilon
                self.sink.emit(ev.BudgetSpent(product=c.product, subject=f"model.{msg.job}", epsilon=c.epsilon,
                                              total=c.total, cap=c.cap))
            self.sink.emit(ev.UpdateReceived(job=msg.job, round=msg.round, domain=domain, examples=msg.examples,
                                             loss=msg.loss, seconds=msg.seconds, bytes=size, update_norm=norm))

    def receive_secagg(self, domain: str, msg: wire.SecaggShares | wire.SecaggUnmaskRes) -> None:
        """Keep a domain's sealed shares, or its unmasking answer (collected as `secagg_unmask_res`)."""
        job, problem = self.current, ""
        if job is None or msg.job != job.name or not job.privacy.secure_aggregation:
            problem = f"{msg.type} for job {msg.job!r}, which is not running with secure aggregation"
        elif domain not in job.participants:
            problem = f"{domain} is not a participant of job {job.name}"
        elif msg.attempt != self.attempts.get(msg.round, 1):
            problem = f"{msg.type} for round {msg.round} attempt {msg.attempt}, which was re-run"
        elif not self.round <= msg.round <= self.round + 1:
            problem = f"{msg.type} for round {msg.round} while round {self.round} runs"
        elif (msg.round, msg.attempt, domain) in self.shares if isinstance(msg, wire.SecaggShares) else \
                ("secagg_unmask_res", msg.round, domain) in self.inbox or ("secagg_unmask_res", msg.round) in self.closed:
            problem = f"duplicate or late {msg.type} for round {msg.round}"
        if problem:
            self.sink.emit(ev.MessageRejected(sender=domain, reason=problem))
        elif isinstance(msg, wire.SecaggShares):
            self.shares[(msg.round, msg.attempt, domain)] = msg
            self.sink.emit(ev.MasksShared(job=msg.job, round=msg.round, domain=domain, attempt=msg.attempt))
        else:
            self.inbox[("secagg_unmask_res", msg.round, domain)] = (msg, {})

    def check(self, domain: str, msg: Any, tensors: wire.Tensors) -> tuple[str, float | None]:
        """(problem or "", update norm); the norm is finite only if every value is, so one pass checks both.
        Under secure aggregation the norm is None: the coordinator sees masked words only."""
        _, problem, norm = self.judge(domain, msg, tensors)
        return problem, norm

    def judge(self, domain: str, msg: Any, tensors: wire.Tensors) -> tuple[str, str, float | None]:
        """(code, problem, norm): `check` with the rejection's code (one of REJECT_CODES, "" when kept)."""
        job = self.current
        if job is None or msg.job != job.name:
            return "not-running", f"{msg.type} for job {msg.job!r}, which is not running", 0.0
        if domain not in job.participants and not self._holds_product(job, domain, msg):
            return "not-participant", f"{domain} is not a participant of job {job.name}", 0.0
        if (isinstance(msg, wire.TrainRes) and job.privacy.secure_aggregation
                and msg.attempt != self.attempts.get(msg.round, 1)):
            return "superseded", (f"{msg.type} for round {msg.round} attempt {msg.attempt}, which was re-run "
                                  f"(attempt {self.attempts.get(msg.round, 1)})"), 0.0
        if (kind_of(msg), msg.round, domain) in self.inbox:
            return "duplicate", f"duplicate {msg.type} for round {msg.round}", 0.0
        if (kind_of(msg), msg.round) in self.closed:
            return "late", f"late {msg.type} for round {msg.round}, which went on without it", 0.0
        if not self.round <= msg.round <= self.round + 1:  # kept until collected: only what is next
            code = "stale" if msg.round < self.round else "far-future"
            return code, f"{msg.type} for round {msg.round} while round {self.round} runs", 0.0
        if domain in self.members.dropped:
            return "dropped", f"{domain} left job {job.name}: {self.members.dropped[domain]}", 0.0
        if domain in self.members.waiting:
            return "not-admitted", (f"{msg.type} from {domain} before it is re-admitted "
                                    "(at the next round boundary)"), 0.0
        if isinstance(msg, wire.TrainRes):
            problem, norm = _check_update(job, domain, msg, tensors, self.bases.get(msg.round))
            return ("bad-update" if problem else ""), problem, norm
        problem = ""
        if tensors:
            problem = "evaluation results carry tensors"
        elif not (math.isfinite(msg.loss_sum) and msg.loss_sum >= 0):
            problem = "evaluation loss is negative or not finite"
        elif msg.correct > msg.examples:
            problem = f"evaluation counts {msg.correct} correct of {msg.examples} examples"
        elif msg.stats:
            problem = check_stats(job, msg)
        if not problem and msg.personal is not None:
            problem = check_personal(job, msg)
        return ("bad-evaluation" if problem else ""), problem, 0.0

    def _holds_product(self, job: PlanJob, domain: str, msg: Any) -> bool:
        """Whether `msg` is the score of `job`'s evaluation product from the domain that holds it."""
        pid = job.evaluation.product
        return (isinstance(msg, wire.EvalRes) and msg.on == "product" and bool(pid)
                and any(p.id == pid and p.domain == domain for p in self.members.plan.products))

    def collect(self, job: PlanJob, kind: str, rnd: int, participants: list[str],
                need: int | None = None) -> dict[str, tuple[Any, wire.Tensors]]:
        """Replies of round `rnd` from the active participants; after `round_timeout_s` those of at least
        `need` (default: the job's quorum) of them (the rest are stragglers). Fewer than that left fails
        the job, or interrupts the round when lost participants could make it up (RoundInterrupted)."""
        quorum = job.quorum if need is None else need
        start = self.clock.monotonic()
        while True:
            active = self.members.active(participants)
            if len(active) < quorum:
                gone = "; ".join(v for d, v in self.members.excluded(job).items() if d in participants)
                why = (f"job {job.name} round {rnd}: {len(active)} of {len(participants)} participants "
                       f"remain, quorum is {quorum}: {gone}")
                lost = self._lost(participants)
                if len(active) + len(lost) >= quorum:
                    raise RoundInterrupted(why, lost)
                raise JobAborted(why)
            got = [d for d in active if (kind, rnd, d) in self.inbox]
            if len(got) == len(active):
                break
            waited = self.clock.monotonic() - start
            if waited > job.round_timeout_s:
                missing = [d for d in active if d not in got]
                if len(got) < quorum:
                    raise JobAborted(f"job {job.name} round {rnd}: no reply from {', '.join(missing)} within "
                                     f"{job.round_timeout_s:.0f}s and only {len(got)} replied, quorum is "
                                     f"{quorum}")
                self.sink.emit(ev.StragglersDropped(job=job.name, round=rnd, phase=kind.removesuffix("_res"),
                                                    domains=missing, waited_s=waited))
                break
            self.pump()
        self.closed.add((kind, rnd))
        results = {d: self.inbox.pop((kind, rnd, d)) for d in got}
        self.discard(kind, rnd)
        return results

    def _lost(self, participants: list[str]) -> list[str]:
        """Those of `participants` lost (silent, unreachable, restarted), not refused, out of the job or
        gone for good: the ones that may come back."""
        m = self.members
        return [d for d in participants
                if d in m.failed and d not in m.dropped and d not in m.refused and d not in m.gone]

    def await_back(self, job: PlanJob, rnd: int, participants: list[str], grace_s: float) -> list[str]:
        """Wait up to `grace_s` for lost participants to say Hello again; those back (waiting for
        admission) once the active ones and they make quorum. Raises JobAborted when they cannot."""
        start = self.clock.monotonic()
        while True:
            active, lost = self.members.active(participants), self._lost(participants)
            back = [d for d in lost if d in self.members.waiting]
            if len(active) + len(back) >= job.quorum:
                return back
            excluded = self.members.excluded(job)
            if len(active) + len(lost) < job.quorum or self.clock.monotonic() - start > grace_s:
                gone = "; ".join(excluded[d] + (f" and did not come back within {grace_s:.0f}s" if d in lost else "")
                                 for d in participants if d in excluded)
                raise JobAborted(f"job {job.name} round {rnd}: {len(active)} of {len(participants)} participants "
                                 f"remain, quorum is {job.quorum}: {gone}")
            self.pump()

    def discard(self, kind: str, rnd: int) -> None:
        """Forget every reply of (kind, round) kept so far."""
        for key in [k for k in self.inbox if k[:2] == (kind, rnd)]:
            del self.inbox[key]


def kind_of(msg: Any) -> str:
    """The inbox kind of a reply: its type; an evaluation product's score and a cross-site model's apart
    (`eval_res:product`, `eval_res:local:<domain>`, `eval_res:product:local:<domain>`)."""
    kind = msg.type
    if isinstance(msg, wire.EvalRes):
        kind += (":product" if msg.on == "product" else "") + (f":{msg.model}" if msg.model else "")
    return kind


def _check_update(job: PlanJob, domain: str, msg: wire.TrainRes, tensors: wire.Tensors,
                  base: wire.Tensors | None = None) -> tuple[str, float | None]:
    """(problem or "", the update's L2 norm: of what the domain sent minus the round's global weights
    `base`, i.e. the update itself, not the weights)."""
    expect = [(t.name, t.shape, t.dtype) for t in job.tensors]
    if job.privacy.secure_aggregation:
        expect = [("masked", [job.shared_parameters + client_dp.extra_words(job)], "int64")]
    elif job.compression is not None:
        expect = compress.layout(job.compression.kind, job.compression.k, [(t.name, t.shape) for t in job.tensors])
    elif job.aggregation.strategy == "scaffold":  # each control variate change follows the weights (CONTROL)
        expect += [(CONTROL + t.name, t.shape, t.dtype) for t in job.tensors]
    got = [(s.name, s.shape, s.dtype) for s in msg.tensors]
    if got != expect:
        return "update tensors do not match the plan's model", 0.0
    if not math.isfinite(msg.loss):
        return "non-finite training loss", 0.0
    if msg.examples <= 0:
        return "update trained on no examples", 0.0
    mine = {r.product for r in job.reads if r.domain == domain}
    if msg.charges and ((job.privacy.dp or job.privacy.client_dp) is None
                        or any(c.product not in mine for c in msg.charges)):
        return "ledger charges for a product this domain does not train on with DP", 0.0
    if job.privacy.secure_aggregation:
        return "", None  # masked words: no norm to see, and no way to check finiteness
    if job.compression is not None:
        if base is None:
            return f"a compressed update for round {msg.round}, whose global weights are gone", 0.0
        try:
            delta = compress.restore(job.compression.kind, job.compression.k,
                                     [(t.name, t.shape) for t in job.tensors], tensors)
        except compress.CompressError as err:
            return f"compressed update: {err}", 0.0
        return "", math.sqrt(sum(float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2 for d in delta.values()))
    norm = math.sqrt(sum(float(torch.linalg.vector_norm(
        t.to(torch.float64) - base[name].to(torch.float64) if base is not None and name in base else t,
        dtype=torch.float64)) ** 2 for name, t in tensors.items() if not name.startswith(CONTROL)))
    if not all(bool(torch.isfinite(t).all()) for name, t in tensors.items() if name.startswith(CONTROL)):
        return "control variate change holds non-finite values", norm
    if not math.isfinite(norm):
        return "update holds non-finite values", norm
    return "", norm


def restored(job: PlanJob, tensors: wire.Tensors, base: wire.Tensors) -> wire.Tensors:
    """A compressed update (checked by `_check_update`) as full float32 weights: the round's global
    weights `base` plus the delta it restores to, what every aggregation rule takes."""
    assert job.compression is not None
    delta = compress.restore(job.compression.kind, job.compression.k, [(t.name, t.shape) for t in job.tensors], tensors)
    return {t.name: base[t.name] + delta[t.name] for t in job.tensors}


def check_stats(job: PlanJob, msg: wire.EvalRes) -> str:
    """Why an EvalRes's metric sums cannot be pooled ("" if they can): keys and lengths of the job's
    task, finite values, counts that are not negative and add up to the examples."""
    from meshctl.runtime.kernels.metrics import stat_lengths

    want = stat_lengths(job.task_name, job.classes, auroc="auroc" in job.evaluation.metrics)
    got = {k: len(v) for k, v in msg.stats.items()}
    if got != want:
        return f"evaluation sums {sorted(got.items())} are not those of a {job.task_name} job {sorted(want.items())}"
    if not all(math.isfinite(v) for values in msg.stats.values() for v in values):
        return "evaluation sums are not finite"
    if msg.stats["n"][0] != msg.examples:
        return f"evaluation sums count {msg.stats['n'][0]:g} examples, not {msg.examples}"
    counts = [k for k in ("confusion", "score_hist", "pos_hist") if k in msg.stats]
    if any(v < 0 for k in counts for v in msg.stats[k]) or any(sum(msg.stats[k]) != (
            msg.examples * (2 if job.task == "binary" else len(job.classes)) if "hist" in k else msg.examples)
            for k in counts if k != "pos_hist"):
        return "evaluation counts are negative or do not add up to the examples"
    if msg.stats.get("loss", [0.0])[0] < 0:
        return "evaluation loss is negative"
    return ""


def check_personal(job: PlanJob, msg: wire.EvalRes) -> str:
    """Why an EvalRes's sums after fine-tuning cannot be reported ("" if they can): only a fine-tuned
    job's final round has them, and they pass `check_stats`."""
    personal = job.personalization
    if personal is None or not personal.fine_tune_epochs or msg.round != job.training.rounds \
            or msg.on != "holdout" or msg.model:
        return "fine-tuning sums for a job or round that has none"
    for side, stats in msg.personal.items():
        problem = check_stats(job, msg.model_copy(update={"stats": stats}))
        if problem:
            return f"personalisation {side}: {problem}"
    return ""
