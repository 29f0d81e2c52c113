"""The training room: the round template of one job (Flower's `Strategy.start` is the model).

Per round: send TrainIns to every participant (weights attached only to daemons that lack
the current version) -> collect TrainRes -> round policies (`effect: exclude` ones drop single
updates, and may suspend a domain from the job) -> aggregate (the job's `Strategy`, or the secure
sum) -> send EvalIns with the new weights and, right behind it, the next round's TrainIns ->
collect EvalRes -> RoundCompleted, metrics row, checkpoint in the background. Each round
boundary re-admits the domains back from a loss (meshctl.runtime.coordinator.members);
their first TrainIns carries the current weights and the mesh-wide standardization.

A phase that falls below quorum because participants were lost (not refused) waits up
to `rejoin_grace` for them to say Hello again, re-admits them and re-runs the round's
phase with the same global weights (a RoundRetried event): the lost domains get the
instruction again on their new connection. Without secure aggregation the replies the
others already sent stay (they answer the same weights); with it the whole round's mask
setup restarts with the current keys, and every reply of the aborted attempt is refused.
"""

from __future__ import annotations

import base64
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meshctl.compiler.entrypoint import check_code
from meshctl.compiler.plan import Plan, PlanJob
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.coordinator import outputs
from meshctl.runtime.coordinator.collector import CONTROL, Collector, JobAborted, RoundInterrupted
from meshctl.runtime.coordinator.crosssite import Evaluations
from meshctl.runtime.coordinator.members import Members, Peer, Sink
from meshctl.runtime.coordinator.strategy import Scaffold, Strategy, make_strategy
from meshctl.runtime.data import pooled_mean_std
from meshctl.runtime.features import agree_vocabulary, categorical, input_width, job_features
from meshctl.runtime.governance import RoundGate, RoundUpdate, update_cosines
from meshctl.runtime.kernels.models import build_model

REJOIN_HEARTBEATS = 3
"""A lost domain has max(round_timeout_s, REJOIN_HEARTBEATS x heartbeat timeout) to come back."""
NOISE_SEED_ENV = "MESHCTL_TEST_CLIENT_DP_SEED"
"""Tests only: an integer that seeds the coordinator's client-DP noise afresh each round (from it and the
round), so a resumed run draws what an uninterrupted one drew. Regenerable noise can be subtracted and
then protects nothing: never set it in a real run."""


def reported_metrics(job: PlanJob) -> list[str]:
    """The metrics a round reports: loss (and accuracy, but for a regression) always, then the declared ones."""
    always = ["loss"] if job.task == "regression" else ["loss", "accuracy"]
    return list(dict.fromkeys([*always, *job.evaluation.metrics]))


def pooled_metrics(job: PlanJob, evals: dict[str, wire.EvalRes]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(pooled metrics, each domain's metrics) of one round's evaluation sums; a metric undefined on the
    data (NaN: auroc of one class) is left out. Replies without sums (an older daemon) give loss and accuracy."""
    from meshctl.runtime.kernels.metrics import finish

    names = reported_metrics(job)
    if evals and all(m.stats for m in evals.values()):
        pooled = finish(job.task_name, names, [m.stats for m in evals.values()])
        domains = {d: finish(job.task_name, names, [m.stats]) for d, m in sorted(evals.items())}
    else:
        def legacy(ms: list[wire.EvalRes]) -> dict[str, float]:
            n = max(sum(m.examples for m in ms), 1)
            return {"loss": sum(m.loss_sum for m in ms) / n, "accuracy": sum(m.correct for m in ms) / n}
        pooled = legacy(list(evals.values()))
        domains = {d: legacy([m]) for d, m in sorted(evals.items())}

    def defined(values: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in values.items() if math.isfinite(v)}
    return defined(pooled), {d: defined(v) for d, v in domains.items()}


def sample_round(job: PlanJob, active: list[str], rnd: int) -> list[str]:
    """Client sampling: round `rnd`'s sample of the `active` participants (in their order), drawn by
    `random.Random(f"{seed}:{rnd}")` from their sorted names, so the same seed and round and the same
    active domains give the same sample in any process; every one of them when fewer than `per_round`
    are active, or without sampling."""
    s = job.sampling
    if s is None or len(active) <= s.per_round:
        return list(active)
    chosen = set(random.Random(f"{s.seed}:{rnd}").sample(sorted(active), s.per_round))
    return [d for d in active if d in chosen]


def _split_controls(results: dict[str, tuple[Any, wire.Tensors]]) -> tuple[
        dict[str, tuple[Any, wire.Tensors]], dict[str, wire.Tensors]]:
    """(results with the weights alone, each domain's SCAFFOLD control variate changes by tensor name)."""
    if not any(k.startswith(CONTROL) for _, t in results.values() for k in t):
        return results, {}
    plain = {d: (m, {k: v for k, v in t.items() if not k.startswith(CONTROL)}) for d, (m, t) in results.items()}
    return plain, {d: {k.removeprefix(CONTROL): v for k, v in t.items() if k.startswith(CONTROL)}
                   for d, (_, t) in results.items()}


def rejoin_grace(job: PlanJob, heartbeat_timeout: float) -> float:
    """How long a round waits for lost participants to say Hello again before the job fails."""
    return max(job.round_timeout_s, REJOIN_HEARTBEATS * heartbeat_timeout)


class Training:
    """One training job, from its first round (or its resume point) to its model."""

    def __init__(self, plan: Plan, job: PlanJob, members: Members, collector: Collector, sink: Sink,
                 checkpoints: outputs.Checkpoints, run_dir: Path, *, checkpoint: bool = True,
                 resume: tuple[int, wire.Tensors | None] = (0, None), root: Path | None = None):
        self.plan, self.job, self.members, self.collector, self.sink = plan, job, members, collector, sink
        self.root = root
        """The mesh.yaml's directory: entrypoint models are imported from there."""
        self.outputs, self.run_dir, self.checkpoint, self.resume = checkpoints, run_dir, checkpoint, resume
        self.gate: RoundGate | None = None
        self.bytes_out: dict[tuple[str, int], int] = {}
        self.attempts: dict[int, int] = {}
        """Round -> how many times it was started (1 unless it was re-run after a loss)."""
        self.asked: dict[int, set[bytes]] = {}
        self.strategy: Strategy | None = None
        """Round -> the connections its TrainIns went to."""
        self.round_keys: dict[int, dict[str, str]] = {}
        """Secure aggregation: round -> the participants' public keys its TrainIns carried."""
        self.revealed: set[str] = set()
        """Secure aggregation: public keys whose mask key was rebuilt (their domain takes no further part
        with them: the peers would refuse to reveal their seeds)."""
        self.client_clip: float | None = None
        """Client-level DP: the clip norm the next TrainIns carries (adaptive clipping moves it)."""
        self.client_noise: Any = None
        """Client-level DP: the job's `client_dp.Noise`."""
        self.client_gen: torch.Generator | None = None
        """Client-level DP: the coordinator's noise source (seeded from the operating system)."""

    def _initial_model(self, job: PlanJob) -> torch.nn.Module:
        """The job's model as seeded by the plan; its entrypoint code must hash as the plan pins it."""
        root = self.root or Path.cwd()
        reason = check_code(job.architecture, root)
        if reason is None:
            try:
                return build_model(job, root=root, seed=job.training.seed)
            except Exception as err:  # noqa: BLE001 - user code: one line, the job ends
                reason = f"cannot build model {job.architecture.entrypoint}: {type(err).__name__}: {err}"
        raise JobAborted(f"job {job.name}: coordinator: {reason.splitlines()[0][:300]}")

    def run(self, participants: list[str]) -> None:
        """Every round of the job from `participants` on: train, aggregate, evaluate; domains back from
        a loss join at each boundary. Raises JobAborted when the job cannot go on."""
        job = self.job
        self.gate = RoundGate(self.plan, job) or None
        self.collector.gated = self.gate is not None
        self.sink.emit(ev.JobStarted(job=job.name, participants=participants, rounds=job.training.rounds,
                                     parameters=job.parameters, quorum=job.quorum))
        model = self._initial_model(job)
        weights = {t.name: model.state_dict()[t.name].detach().clone() for t in job.tensors}
        version, resumed = self.resume
        if resumed is not None:  # a resumed run: on from the newest checkpoint
            weights = resumed
            outputs.trim_metrics(self.run_dir, job, version)
        started = time.time()
        metrics: dict[str, float] = {}
        domain_metrics: dict[str, dict[str, float]] = {}
        domain_examples: dict[str, int] = {}
        covered: set[str] = set()
        strategy = self.strategy = make_strategy(job.aggregation)
        self._client_dp_start(job)
        if resumed is not None and version > 0 and self._stateful():
            participants = self._restore_state(version, participants)
        evaluations, results = Evaluations(self, pooled_metrics), {}  # (results: the last round's updates, for cross-site)
        norm = {**self._standardization(job, participants), **self._vocabulary(job, participants)}
        first = version + 1
        round_start = {first: time.time()}
        sample, population = self._sample(participants, first), len(participants)
        self._send_train(job, sample, first, version, weights, norm)
        for r in range(first, job.training.rounds + 1):
            self.collector.round = r
            while True:
                try:
                    results = self.collector.collect(job, "train_res", r, sample)
                    break
                except RoundInterrupted as err:
                    if job.sampling is None:
                        participants = sample = self._rerun(r, "train", participants, err, version, weights, norm)
                        continue
                    back = self._readmit(r, "train", sample, err)  # those back and not sampled sit it out
                    participants = self.members.active([d for d in job.participants
                                                        if d in back or d in participants])
                    sample = [d for d in participants if d in sample]
                    self._resend_train(r, sample, version, weights, norm)
            self.collector.bases.pop(r, None)
            asked = list(sample)
            results, deltas = _split_controls(results)
            results = self._gate_round(job, r, results, weights)  # (less the updates a policy excludes)
            contributors = list(results)
            total = sum(msg.examples for msg, _ in results.values())
            try:
                if job.privacy.client_dp is not None:
                    new, note = self._client_dp_round(job, r, asked, results, strategy, weights)
                elif job.privacy.secure_aggregation:
                    new, note = self._secure_sum(job, r, asked, results, strategy, weights), ""
                elif isinstance(strategy, Scaffold):
                    new, note = strategy.aggregate_controlled(
                        [weights[t.name] for t in job.tensors], contributors,
                        [[results[d][1][t.name] for t in job.tensors] for d in contributors],
                        [[deltas[d][t.name] for t in job.tensors] for d in contributors],
                        [results[d][0].examples for d in contributors], population)
                else:
                    new, note = strategy.aggregate(
                        [weights[t.name] for t in job.tensors], contributors,
                        [[results[d][1][t.name] for t in job.tensors] for d in contributors],
                        [results[d][0].examples for d in contributors])
            except ValueError as err:
                raise JobAborted(f"job {job.name} round {r}: {err}") from None
            weights = {t.name: w for t, w in zip(job.tensors, new)}
            version = r
            if self.revealed:  # a domain whose mask key was rebuilt takes part again only with a new key
                participants = [d for d in participants
                                if getattr(self.members.peers.get(d), "secagg", {}).get(job.name) not in self.revealed]
            covered.update(contributors)
            train_loss = sum(m.loss * m.examples for m, _ in results.values()) / max(total, 1)
            participants = self.members.active(participants)
            evaluated = list(participants)
            self._broadcast(job, participants, wire.EvalIns(job=job.name, round=r, version=r), weights, r)
            evaluations.send(r, weights)  # the evaluation product, if the job has one
            if r < job.training.rounds:
                participants = self._boundary(participants, r + 1)
                round_start[r + 1] = time.time()
                sample, population = self._sample(participants, r + 1), len(participants)
                self._send_train(job, sample, r + 1, r, weights, norm)
            need = job.quorum
            while True:
                try:
                    evals = self.collector.collect(job, "eval_res", r, evaluated, need=need)
                    break
                except RoundInterrupted as err:
                    # the new daemons of those back evaluate from the next round on (this round's EvalIns
                    # would reach them before the standardization their first TrainIns brings)
                    back = self._readmit(r, "eval", evaluated, err)
                    evaluated = [d for d in evaluated if d not in back]
                    need = min(job.quorum, len(self.members.active(evaluated)))
                    if r < job.training.rounds:  # round r+1's TrainIns went out early, on the old connection
                        participants = self.members.active(
                            [d for d in job.participants if d in back or d in participants])
                        if job.sampling is None:
                            sample = participants
                        else:  # a sampled domain back takes its place again; one not sampled sits it out
                            sample = [d for d in participants if d in sample]
                        if job.privacy.secure_aggregation:  # a new attempt: fresh seeds, shares and masks
                            self.attempts[r + 1] = self.attempts.get(r + 1, 1) + 1
                        self._resend_train(r + 1, sample, r, weights, norm)
            n = sum(m.examples for m, _ in evals.values())
            metrics, domain_metrics = pooled_metrics(job, {d: m for d, (m, _) in evals.items()})
            domain_examples = {d: m.examples for d, (m, _) in evals.items()}
            held_out = evaluations.collect(r)
            done = ev.RoundCompleted(
                job=job.name, round=r, rounds=job.training.rounds, participants=contributors,
                train_loss=train_loss, metrics=metrics, bytes_in=self.collector.bytes_in.pop((job.name, r), 0),
                bytes_out=self.bytes_out.pop((job.name, r), 0), seconds=time.time() - round_start.pop(r),
                update_bytes=self.collector.update_bytes.pop((job.name, r), 0),
                aggregation=note, epsilon=max((v for (j, _), v in self.collector.job_epsilon.items() if j == job.name),
                                              default=None), domain_metrics=domain_metrics,
                domain_examples=domain_examples)
            try:
                outputs.append_metrics(self.run_dir, job, r, len(contributors), train_loss, metrics,
                                       evaluated=len(evals), eval_examples=n, domain_metrics=domain_metrics,
                                       domain_examples=domain_examples, held_out=held_out,
                                       product_columns=any(j.evaluation.product for j in self.plan.jobs),
                                       wire_bytes=(done.bytes_in, done.bytes_out, done.update_bytes))
            except OSError as err:  # a full disk, say: the run fails with the reason
                raise JobAborted(f"job {job.name} round {r}: cannot write {self.run_dir / 'metrics.csv'}: "
                                 f"{err.strerror or err}") from None
            self.sink.emit(done)  # (after the row: whoever sees the event finds the round in metrics.csv)
            if r == job.training.rounds and job.personalization is not None:
                self._personalized(job, evals)
            if self.checkpoint:
                if self._stateful():  # (before the weights: a round's checkpoint never lacks its state)
                    tensors, scalars = self._state()
                    self.outputs.put(outputs.state_path(self.run_dir, job.name, r), tensors,
                                     outputs.state_meta(self.plan, job, r, scalars))
                path = self.run_dir / "checkpoints" / job.name / f"round-{r:04d}.safetensors"
                self.outputs.put(path, weights, outputs.model_meta(self.plan, job, r, norm))
            self.outputs.report(self.sink)
            if self.outputs.error:
                raise JobAborted(f"job {job.name} round {r}: {self.outputs.error}")
        evaluations.cross_site(version, weights, {d: t for d, (_, t) in results.items()}, participants)
        model_path = self.run_dir / "models" / f"{job.name}.safetensors"
        self.outputs.put(model_path, weights, outputs.model_meta(self.plan, job, version, norm))
        left = self.members.excluded(job)
        self.sink.emit(ev.JobCompleted(
            job=job.name, rounds=version, metrics=metrics, model_path=str(model_path.relative_to(self.run_dir)),
            seconds=time.time() - started, domains=[d for d in job.participants if d in covered],
            left_out={d: left.get(d, f"domain {d} sent no update that was aggregated").removeprefix(f"domain {d} ")
                      for d in job.participants if d not in covered},
            domain_metrics=domain_metrics, domain_examples=domain_examples))

    def _stateful(self) -> bool:
        """Whether the job carries state across rounds on the coordinator, beyond the weights: the
        strategy's, adaptive clipping's clip norm, the round policies' exclusion counts."""
        cdp = self.job.privacy.client_dp
        return bool(self.strategy and self.strategy.stateful) or (cdp is not None and cdp.adaptive is not None) \
            or self.gate is not None

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, scalars) of what crosses rounds now (`_stateful`), for the round's checkpoint."""
        assert self.strategy is not None
        tensors, scalars = self.strategy.state()
        out: dict[str, Any] = {"strategy": scalars}
        if self.client_clip is not None:
            out["client_clip"] = self.client_clip
        if self.gate is not None:
            out["policy_counts"] = [[p, d, n] for (p, d), n in sorted(self.gate.counts.items())]
            out["suspended"] = {d: why for d, why in self.members.dropped.items()
                                if d in self.job.participants and why.startswith("was suspended by policy")}
        return {f"strategy/{k}": v for k, v in tensors.items()}, out

    def _restore_state(self, version: int, participants: list[str]) -> list[str]:
        """A resumed job: take up the state its round-`version` checkpoint kept (`_state`); the participants
        left (a domain a policy suspended stays out). JobAborted when the state cannot be read."""
        job = self.job
        try:
            tensors, scalars = outputs.load_state(self.run_dir, self.plan, job, version)
            assert self.strategy is not None
            self.strategy.restore({k.removeprefix("strategy/"): v for k, v in tensors.items()
                                   if k.startswith("strategy/")}, scalars.get("strategy", {}))
            if "client_clip" in scalars:
                self.client_clip = float(scalars["client_clip"])
            if self.gate is not None:
                self.gate.counts = {(p, d): int(n) for p, d, n in scalars.get("policy_counts", [])}
                self.members.dropped.update(scalars.get("suspended", {}))
        except (ValueError, TypeError, KeyError) as err:
            raise JobAborted(f"job {job.name}: cannot resume after round {version}: {err}") from None
        return [d for d in participants if d not in self.members.dropped]

    def _sample(self, participants: list[str], rnd: int) -> list[str]:
        """Round `rnd`'s trainers (a RoundStarted event): the seeded sample of the active participants
        under client sampling, else all of them."""
        sample = sample_round(self.job, participants, rnd)
        self.sink.emit(ev.RoundStarted(job=self.job.name, round=rnd, participants=sample,
                                       idle=[d for d in participants if d not in sample]))
        return sample

    def _personalized(self, job: PlanJob, evals: dict[str, tuple[Any, wire.Tensors]]) -> None:
        """The final round of a personalised job: each domain's metrics before (its EvalRes's sums) and after
        its fine-tuning (`personal`), and their pooled sums (a Personalized event, personal.csv)."""
        from meshctl.runtime.kernels.metrics import TASK_METRICS, finish

        task, personal = job.task_name, job.personalization
        assert personal is not None
        names = [m for m in job.evaluation.metrics if m in TASK_METRICS[task]] or list(TASK_METRICS[task])
        sums = {d: {"before": msg.stats, **(msg.personal or {})} for d, (msg, _) in sorted(evals.items()) if msg.stats}
        domains = {d: {side: finish(task, names, [stats]) for side, stats in sides.items()} for d, sides in sums.items()}
        pooled = {side: finish(task, names, [s[side] for s in sums.values()])
                  for side in ("before", "after") if sums and all(side in s for s in sums.values())}
        event = ev.Personalized(job=job.name, local=[t.name for t in personal.local_tensors],
                                fine_tune_epochs=personal.fine_tune_epochs, domains=domains,
                                examples={d: int(s["before"]["n"][0]) for d, s in sums.items()}, pooled=pooled)
        self.sink.emit(event)
        try:
            outputs.write_personal(self.run_dir, event)
        except OSError as err:
            raise JobAborted(f"job {job.name}: cannot write {self.run_dir / 'personal.csv'}: "
                             f"{err.strerror or err}") from None

    def _readmit(self, rnd: int, phase: str, participants: list[str], err: RoundInterrupted) -> list[str]:
        """Wait for the lost participants of round `rnd` to come back, re-admit them (a RoundRetried
        event); those back. JobAborted when they are not back within the rejoin grace."""
        job, members = self.job, self.members
        grace = rejoin_grace(job, members.heartbeat_timeout)
        awaited = self.collector.await_back(job, rnd, participants, grace)
        reason = "; ".join(f"domain {d} lost: {members.failed[d]}" for d in awaited if d in members.failed)
        admitted = members.admit(job.name, rnd)  # (with any other domain back by now: it takes part too)
        back = [d for d in job.participants if d in admitted and d not in members.dropped]
        self.attempts[rnd] = attempt = self.attempts.get(rnd, 1) + 1
        self.sink.emit(ev.RoundRetried(job=job.name, round=rnd, attempt=attempt, phase=phase, domains=back,
                                       reason=reason or str(err)))
        return back

    def _rerun(self, rnd: int, phase: str, participants: list[str], err: RoundInterrupted, version: int,
               weights: wire.Tensors, norm: dict[str, list[float]]) -> list[str]:
        """Round `rnd`'s training fell below quorum on a loss: re-run it with those back; its participants."""
        back = self._readmit(rnd, phase, participants, err)
        participants = self.members.active([d for d in self.job.participants if d in back or d in participants])
        self._resend_train(rnd, participants, version, weights, norm)
        return participants

    def _resend_train(self, rnd: int, participants: list[str], version: int,
                      weights: wire.Tensors, norm: dict[str, list[float]]) -> None:
        """Round `rnd`'s TrainIns again after a loss. Plain aggregation: only to the connections that have
        not had it (the other replies answer the same weights and stay). Secure aggregation: to every
        participant with the current keys; each reply still due to the aborted attempt will be refused."""
        job, collector = self.job, self.collector
        if not job.privacy.secure_aggregation:
            todo = [d for d in participants if self.members.peers[d].identity not in self.asked.get(rnd, set())
                    and ("train_res", rnd, d) not in collector.inbox]
            self._send_train(job, todo, rnd, version, weights, norm, everyone=participants)
            return
        collector.attempts[rnd] = self.attempts.get(rnd, 1)  # replies of earlier attempts: superseded
        collector.discard("train_res", rnd)
        self._send_train(job, participants, rnd, version, weights, norm)

    def _boundary(self, participants: list[str], rnd: int) -> list[str]:
        job = self.job
        """Round `rnd` is about to start: re-admit the domains back from a loss; its participants."""
        back = set(self.members.admit(job.name, rnd)) & set(job.participants)
        back -= set(self.members.dropped)
        if not back:
            return participants
        return [d for d in job.participants if d in back or d in participants]

    def _send_train(self, job: PlanJob, participants: list[str], rnd: int, version: int,
                    weights: wire.Tensors, norm: dict[str, list[float]], *, everyone: list[str] | None = None) -> None:
        """TrainIns of round `rnd` to `participants` (the round's are `everyone`, by default the same); a
        daemon new to the job (first round, or back from a loss) also gets the mesh-wide standardization
        and, like any that lacks them, the current weights."""
        everyone = participants if everyone is None else everyone
        keys = self._peer_keys(job, everyone)
        if keys:
            self.round_keys[rnd] = keys
        self.collector.bases[rnd] = weights  # the update norms of round rnd are taken from these
        for d in participants:
            peer = self.members.peers.get(d)
            if peer is None:  # lost since the list was made
                continue
            first = {} if job.name in peer.versions else norm
            msg = wire.TrainIns(job=job.name, round=rnd, version=version, participants=everyone,
                                peer_keys=keys, attempt=self.attempts.get(rnd, 1), clip=self.client_clip, **first)
            self.asked.setdefault(rnd, set()).add(peer.identity)
            self._send_to(job, peer, msg, weights, rnd)

    def _standardization(self, job: PlanJob, participants: list[str]) -> dict[str, list[float]]:
        """Mesh-wide mean/std pooled exactly from the participants' sums; {} if not standardizing."""
        if not job.training.standardize:
            return {}
        d = input_width(job)
        stats = []
        for name in participants:
            s = self.members.peers[name].stats.get(job.name)
            if s is None or len(s.sum) != d or len(s.sumsq) != d:
                raise JobAborted(f"job {job.name}: domain {name} sent no usable feature sums to standardize with")
            stats.append((s.count, s.sum, s.sumsq))
        try:
            mean, std = pooled_mean_std(stats)
        except ValueError as err:
            raise JobAborted(f"job {job.name}: {err}") from None
        at = 0
        for f in job_features(job):  # one-hot slots stay 0/1
            if f.kind == "categorical":
                mean[at:at + f.width], std[at:at + f.width] = [0.0] * f.width, [1.0] * f.width
            at += f.width
        return {"mean": mean, "std": std}

    def _vocabulary(self, job: PlanJob, participants: list[str]) -> dict[str, dict[str, list[str]]]:
        """The vocabulary of each categorical feature, agreed from the participants' counts (each
        holding only values at least k of its rows hold): pooled values with at least k rows, the
        first width - 1 by declared order, else by (count desc, value); {} without categorical features."""
        features = categorical(job)
        if not features:
            return {}
        vocab = {}
        for f in features:
            counts = [self.members.peers[d].category_counts.get(job.name, {}).get(f.name, {}) for d in participants]
            vocab[f.name] = agree_vocabulary(counts, f.min_count or 1, f.width, f.vocabulary or ())
        return {"vocab": vocab}

    def _gate_round(self, job: PlanJob, rnd: int, results: dict[str, tuple[Any, wire.Tensors]],
                    weights: wire.Tensors) -> dict[str, tuple[Any, wire.Tensors]]:
        """Evaluate the job's `scope: round` policies on this round's updates before aggregating them: the
        `effect: exclude` ones on each update (UpdateExcluded; DomainSuspended at a policy's suspend_after),
        then the others on the updates left; the updates left. JobAborted below the quorum."""
        if self.gate is None:
            return results
        updates = [RoundUpdate(d, m.examples, m.loss, self.collector.norms.pop((rnd, d), 0.0)) for d, (m, _) in results.items()]
        spent = max((v for (j, _), v in self.collector.job_epsilon.items() if j == job.name), default=0.0)
        if self.gate.excluders:
            results, updates = self._exclude(job, rnd, results, updates, weights, spent)
        for d in self.gate.evaluate(rnd, list(results), updates, epsilon_spent=spent):
            if d.effect == "allow":
                continue
            self.sink.emit(ev.PolicyDecided(policy=d.policy, scope=d.scope, subject=d.subject, effect=d.effect,
                                            reason=d.reason, at=d.at, stage=d.stage, domain=d.domain))
            if d.effect == "deny":
                raise JobAborted(f"job {job.name} round {rnd}: policy {d.policy} denies aggregating the round: "
                                 f"{d.reason}")
        return results

    def _exclude(self, job: PlanJob, rnd: int, results: dict[str, tuple[Any, wire.Tensors]],
                 updates: list[RoundUpdate], weights: wire.Tensors,
                 spent: float) -> tuple[dict[str, tuple[Any, wire.Tensors]], list[RoundUpdate]]:
        """Round `rnd`'s updates less those an `effect: exclude` policy excludes; a domain that reaches a
        policy's `suspend_after` leaves the job (members.dropped). JobAborted when fewer updates than the
        quorum are left."""
        assert self.gate is not None
        if self.gate.reads_cosine:
            names = [t.name for t in job.tensors]
            cosines = update_cosines([weights[n] for n in names], {d: [t[n] for n in names] for d, (_, t) in results.items()})
            updates = [RoundUpdate(u.domain, u.examples, u.loss, u.update_norm, cosines.get(u.domain, 0.0)) for u in updates]
        norms = {u.domain: u.update_norm for u in updates}
        out: list[str] = []
        for domain, d, suspend in self.gate.exclusions(rnd, list(results), updates, epsilon_spent=spent):
            if d.effect != "exclude":  # the policy failed to evaluate: governance fails closed
                self.sink.emit(ev.PolicyDecided(policy=d.policy, scope=d.scope, subject=d.subject, effect=d.effect,
                                                reason=d.reason, at=d.at, stage=d.stage, domain=d.domain))
                raise JobAborted(f"job {job.name} round {rnd}: policy {d.policy} on the update of {domain}: {d.reason}")
            out.append(domain)
            count = self.gate.counts[(d.policy, domain)]
            self.sink.emit(ev.UpdateExcluded(job=job.name, round=rnd, domain=domain, policy=d.policy, reason=d.reason,
                                             at=d.at, update_norm=norms.get(domain, 0.0), exclusions=count))
            if suspend is not None:
                why = f"was suspended by policy {d.policy} after {count} excluded update(s)"
                self.members.dropped[domain] = why
                self.sink.emit(ev.DomainSuspended(job=job.name, round=rnd, domain=domain, policy=d.policy,
                                                  exclusions=count, reason=d.reason))
        if not out:
            return results, updates
        kept = {d: v for d, v in results.items() if d not in out}
        if len(kept) < job.quorum:
            raise JobAborted(f"job {job.name} round {rnd}: {len(kept)} update(s) left after excluding "
                             f"{', '.join(out)} by policy, below the quorum of {job.quorum}")
        return kept, [u for u in updates if u.domain not in out]

    def _peer_keys(self, job: PlanJob, participants: list[str]) -> dict[str, str]:
        """Secure aggregation: the participants' public keys for `job` (empty without it)."""
        if not job.privacy.secure_aggregation:
            return {}
        missing = [d for d in participants if job.name not in getattr(self.members.peers.get(d), "secagg", {})]
        if missing:
            raise JobAborted(f"job {job.name}: domain {missing[0]} sent no secure aggregation key")
        return {d: self.members.peers[d].secagg[job.name] for d in participants}

    def _client_dp_start(self, job: PlanJob) -> None:
        """Client-level DP: the noise that spends the job's ε over its rounds, and the first clip norm."""
        from meshctl.runtime.kernels import client_dp

        cdp = job.privacy.client_dp
        if cdp is None:
            return
        try:
            self.client_noise = client_dp.job_noise(job)
        except ValueError as err:
            raise JobAborted(f"job {job.name}: client-level DP: {err}") from None
        self.client_clip, self.client_gen = cdp.clip, client_dp.generator()

    def _client_dp_round(self, job: PlanJob, rnd: int, asked: list[str], results: dict[str, Any],
                         strategy: Strategy, weights: wire.Tensors) -> tuple[list[torch.Tensor], str]:
        """Client-level DP (meshctl.runtime.kernels.client_dp): the sum of the clipped updates (from masked
        words under secure aggregation), noised, over the expected count; the strategy's server step from
        that mean; adaptive clipping's next clip norm. (new weights, a note)."""
        from meshctl.runtime.kernels import client_dp, secagg

        cdp, noise, bound = job.privacy.client_dp, self.client_noise, self.client_clip
        assert cdp is not None and bound is not None
        base = [weights[t.name] for t in job.tensors]
        adaptive = cdp.adaptive is not None
        if job.privacy.secure_aggregation:  # (survivors of dropouts: the coordinator adds their noise shares)
            words, survivors = self._unmasked_sum(job, rnd, asked, results)
            parts = secagg.decode(words, [t.shape for t in job.tensors] + ([[1]] if adaptive else []), 1.0)
            total, bits = parts[:len(job.tensors)], float(parts[-1]) if adaptive else 0.0
            shares = len(survivors) if cdp.noise == "domain" else 0
        else:
            contributors = list(results)
            total = [sum((results[d][1][t.name].double() - b.double() for d in contributors),
                         torch.zeros(b.shape, dtype=torch.float64)) for t, b in zip(job.tensors, base)]
            if adaptive and any(results[d][0].clip_bit is None for d in contributors):
                raise ValueError("client-level DP: an update came without its adaptive clipping bit")
            bits, shares = sum(results[d][0].clip_bit or 0.0 for d in contributors), 0
        mean, unclipped, std = client_dp.noised_mean(total, bits, bound, noise,
                                                     noised_shares=shares, gen=self._noise_source(rnd))
        new = strategy.from_mean(base, [(b.double() + m).to(b.dtype) for b, m in zip(base, mean)])
        note = f"client DP: clip {bound:.4g}, noise std {std:.4g} on the sum of {len(results)}"
        if adaptive:
            self.client_clip = client_dp.next_clip(bound, unclipped, cdp.adaptive.target_quantile, cdp.adaptive.lr)
            note += f"; unclipped share {unclipped:.2f}, next clip {self.client_clip:.4g}"
        return new, note

    def _noise_source(self, rnd: int) -> torch.Generator | None:
        """Client-level DP: round `rnd`'s noise source (the job's, seeded by the OS; see NOISE_SEED_ENV)."""
        from meshctl.runtime.kernels import client_dp

        seed = os.environ.get(NOISE_SEED_ENV, "")
        return client_dp.generator(int(seed) * 1_000_003 + rnd) if seed.isdigit() else self.client_gen

    def _secure_sum(self, job: PlanJob, rnd: int, asked: list[str], results: dict[str, Any],
                    strategy: Strategy, weights: wire.Tensors) -> list[torch.Tensor]:
        """The example-weighted mean from the survivors' masked updates (`_unmasked_sum`)."""
        from meshctl.runtime.kernels import secagg

        total, survivors = self._unmasked_sum(job, rnd, asked, results)
        examples = sum(results[d][0].examples for d in survivors)
        mean = secagg.decode(total, [tensor.shape for tensor in job.tensors], float(examples))
        return strategy.from_mean([weights[t.name] for t in job.tensors], mean)

    def _unmasked_sum(self, job: PlanJob, rnd: int, asked: list[str],
                      results: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
        """(the sum of the survivors' masked updates, unmasked; the survivors): an unmasking round asks each
        survivor for its shares of the survivors' self-mask seeds and of the dropped domains' mask keys,
        and at least `threshold` answers rebuild them (kernels.secagg)."""
        from meshctl.runtime.kernels import secagg, shamir

        survivors = [d for d in asked if d in results]
        dropped = [d for d in asked if d not in results]
        attempt = self.attempts.get(rnd, 1)
        t = secagg.threshold(len(asked), job.privacy.secagg_threshold)
        if len(survivors) < t:
            raise ValueError(f"secure aggregation: {len(survivors)} masked updates are below the threshold {t} "
                             f"(none from {', '.join(dropped)})")
        unshared = [d for d in asked if (rnd, attempt, d) not in self.collector.shares]
        if unshared:
            raise ValueError(f"secure aggregation: {unshared[0]} dropped out before it shared its masks, "
                             "so they cannot be removed without it")
        sealed = {d: self.collector.shares[(rnd, attempt, d)].shares for d in asked}
        for d in survivors:
            peer = self.members.peers.get(d)
            if peer is not None:
                self.members.send(peer, wire.SecaggUnmaskIns(
                    job=job.name, round=rnd, attempt=attempt, survivors=survivors, dropped=dropped,
                    shares={u: sealed[u][d] for u in asked if u != d}))
        try:
            answers = self.collector.collect(job, "secagg_unmask_res", rnd, survivors, need=t)
        except JobAborted as err:  # survivors lost while unmasking: fewer than t can answer
            raise ValueError(f"secure aggregation: the unmasking needs {t} of the {len(survivors)} survivors: "
                             f"{str(err).split(': ', 1)[-1]}") from None
        order = sorted(asked)
        points: dict[str, list[tuple[int, int]]] = {u: [] for u in asked}
        for v, (res, _) in answers.items():
            if res.index != order.index(v) + 1 or set(res.seeds) != set(survivors) or set(res.keys) != set(dropped):
                raise ValueError(f"secure aggregation: {v} answered the unmasking with shares of other domains")
            for u, value in [*res.seeds.items(), *res.keys.items()]:
                points[u].append((res.index, int.from_bytes(base64.b64decode(value), "big")))
        seeds = {u: shamir.reconstruct(points[u], t) for u in survivors}
        keys = {d: shamir.reconstruct(points[d], t) for d in dropped}
        public = {d: base64.b64decode(k) for d, k in self.round_keys[rnd].items()}
        total = secagg.add([results[d][1]["masked"].numpy().view(np.uint64) for d in survivors])
        total = secagg.unmask(total, survivors, seeds, keys, public, secagg.context(self.members.run, job.name,
                                                                                  attempt), rnd)
        for key in [k for k in self.collector.shares if k[0] <= rnd]:
            del self.collector.shares[key]
        if dropped:
            self.revealed.update(self.round_keys[rnd][d] for d in dropped)
            self.sink.emit(ev.DropoutsRecovered(job=job.name, round=rnd, dropped=dropped,
                                                survivors=len(survivors), threshold=t))
        return total, survivors

    def _broadcast(self, job: PlanJob, participants: list[str], msg: Any, weights: wire.Tensors, rnd: int) -> None:
        for d in participants:
            peer = self.members.peers.get(d)
            if peer is not None:  # (else lost since the list was made)
                self._send_to(job, peer, msg, weights, rnd)

    def _send_to(self, job: PlanJob, peer: Peer, msg: Any, weights: wire.Tensors, rnd: int) -> None:
        """Send an instruction, with the weights when it is an evaluation or the daemon lacks its version."""
        attach = isinstance(msg, wire.EvalIns) or peer.versions.get(job.name) != msg.version
        if attach and isinstance(self.strategy, Scaffold) and not job.privacy.secure_aggregation and (
                isinstance(msg, wire.TrainIns) or (msg.on == "holdout" and not msg.model)):
            c = self.strategy.controls_for([weights[t.name] for t in job.tensors])  # the server's c beside x
            weights = {**weights, **{CONTROL + t.name: v for t, v in zip(job.tensors, c)}}
        sent = self.members.send(peer, msg, weights if attach else None)
        if attach:
            peer.versions[job.name] = msg.version
        self.bytes_out[(job.name, rnd)] = self.bytes_out.get((job.name, rnd), 0) + sent
