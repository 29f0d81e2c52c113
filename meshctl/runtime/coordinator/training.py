"""The training room: the round template of one job (Flower's `Strategy.start` is the model).

Per round: send TrainIns to every participant (weights attached only to daemons that lack
the current version) -> collect TrainRes -> aggregate (the job's `Strategy`, or the secure
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

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meshctl.compiler.plan import Plan, PlanJob
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.coordinator import outputs
from meshctl.runtime.coordinator.collector import Collector, JobAborted, RoundInterrupted
from meshctl.runtime.coordinator.members import Members, Peer, Sink
from meshctl.runtime.coordinator.strategy import Strategy, make_strategy
from meshctl.runtime.data import pooled_mean_std
from meshctl.runtime.governance import RoundGate, RoundUpdate
from meshctl.runtime.kernels import mlp

REJOIN_HEARTBEATS = 3
"""A lost domain has max(round_timeout_s, REJOIN_HEARTBEATS x heartbeat timeout) to come back."""


def rejoin_grace(job: PlanJob, heartbeat_timeout: float) -> float:
    """How long a round waits for lost participants to say Hello again before the job fails."""
    return max(job.round_timeout_s, REJOIN_HEARTBEATS * heartbeat_timeout)


class Training:
    """One training job, from its first round (or its resume point) to its model."""

    def __init__(self, plan: Plan, job: PlanJob, members: Members, collector: Collector, sink: Sink,
                 checkpoints: outputs.Checkpoints, run_dir: Path, *, checkpoint: bool = True,
                 resume: tuple[int, wire.Tensors | None] = (0, None)):
        self.plan, self.job, self.members, self.collector, self.sink = plan, job, members, collector, sink
        self.outputs, self.run_dir, self.checkpoint, self.resume = checkpoints, run_dir, checkpoint, resume
        self.gate: RoundGate | None = None
        self.bytes_out: dict[tuple[str, int], int] = {}
        self.attempts: dict[int, int] = {}
        """Round -> how many times it was started (1 unless it was re-run after a loss)."""
        self.asked: dict[int, set[bytes]] = {}
        """Round -> the connections its TrainIns went to."""

    def run(self, participants: list[str]) -> None:
        """Every round of the job from `participants` on: train, aggregate, evaluate; domains back from
        a loss join at each boundary. Raises JobAborted when the job cannot go on."""
        job = self.job
        self.gate = RoundGate(self.plan, job) or None
        self.collector.gated = self.gate is not None
        self.sink.emit(ev.JobStarted(job=job.name, participants=participants, rounds=job.training.rounds,
                                     parameters=job.parameters, quorum=job.quorum))
        arch = job.architecture
        model = mlp(arch.input_dim, arch.hidden, arch.output_dim, seed=job.training.seed)
        weights = {t.name: model.state_dict()[t.name].detach().clone() for t in job.tensors}
        version, resumed = self.resume
        if resumed is not None:  # a resumed run: on from the newest checkpoint
            weights = resumed
            outputs.trim_metrics(self.run_dir, job, version)
        started = time.time()
        metrics: dict[str, float] = {}
        covered: set[str] = set()
        strategy = make_strategy(job.aggregation)
        norm = self._standardization(job, participants)
        first = version + 1
        round_start = {first: time.time()}
        self.sink.emit(ev.RoundStarted(job=job.name, round=first, participants=participants))
        self._send_train(job, participants, first, version, weights, norm)
        for r in range(first, job.training.rounds + 1):
            self.collector.round = r
            while True:
                try:
                    results = self.collector.collect(job, "train_res", r, participants)
                    break
                except RoundInterrupted as err:
                    participants = self._rerun(r, "train", participants, err, version, weights, norm)
            self.collector.bases.pop(r, None)
            asked = list(participants)
            contributors = list(results)
            self._gate_round(job, r, results)
            total = sum(msg.examples for msg, _ in results.values())
            try:
                if job.privacy.secure_aggregation:
                    new, note = self._secure_sum(job, r, asked, results, strategy, weights), ""
                else:
                    new, note = strategy.aggregate(
                        [weights[t.name] for t in job.tensors], contributors,
                        [[results[d][1][t.name] for t in job.tensors] for d in contributors],
                        [results[d][0].examples for d in contributors])
            except ValueError as err:
                raise JobAborted(f"job {job.name} round {r}: {err}") from None
            weights = {t.name: w for t, w in zip(job.tensors, new)}
            version = r
            covered.update(contributors)
            train_loss = sum(m.loss * m.examples for m, _ in results.values()) / max(total, 1)
            participants = self.members.active(participants)
            evaluated = list(participants)
            self._broadcast(job, participants, wire.EvalIns(job=job.name, round=r, version=r), weights, r)
            if r < job.training.rounds:
                participants = self._boundary(participants, r + 1)
                round_start[r + 1] = time.time()
                self.sink.emit(ev.RoundStarted(job=job.name, round=r + 1, participants=participants))
                self._send_train(job, participants, r + 1, r, weights, norm)
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
                        self._resend_train(r + 1, participants, r, weights, norm)
            n = sum(m.examples for m, _ in evals.values())
            metrics = {"loss": sum(m.loss_sum for m, _ in evals.values()) / max(n, 1),
                       "accuracy": sum(m.correct for m, _ in evals.values()) / max(n, 1)}
            self.sink.emit(ev.RoundCompleted(
                job=job.name, round=r, rounds=job.training.rounds, participants=contributors,
                train_loss=train_loss, metrics=metrics, bytes_in=self.collector.bytes_in.pop((job.name, r), 0),
                bytes_out=self.bytes_out.pop((job.name, r), 0), seconds=time.time() - round_start.pop(r),
                aggregation=note, epsilon=max((v for (j, _), v in self.collector.job_epsilon.items() if j == job.name),
                                              default=None)))
            try:
                outputs.append_metrics(self.run_dir, job, r, len(contributors), train_loss, metrics,
                                       evaluated=len(evals), eval_examples=n)
            except OSError as err:  # a full disk, say: the run fails with the reason
                raise JobAborted(f"job {job.name} round {r}: cannot write {self.run_dir / 'metrics.csv'}: "
                                 f"{err.strerror or err}") from None
            if self.checkpoint:
                path = self.run_dir / "checkpoints" / job.name / f"round-{r:04d}.safetensors"
                self.outputs.put(path, weights, outputs.model_meta(self.plan, job, r, norm))
            self.outputs.report(self.sink)
            if self.outputs.error:
                raise JobAborted(f"job {job.name} round {r}: {self.outputs.error}")
        model_path = self.run_dir / "models" / f"{job.name}.safetensors"
        self.outputs.put(model_path, weights, outputs.model_meta(self.plan, job, version, norm))
        left = self.members.excluded(job)
        self.sink.emit(ev.JobCompleted(
            job=job.name, rounds=version, metrics=metrics, model_path=str(model_path.relative_to(self.run_dir)),
            seconds=time.time() - started, domains=[d for d in job.participants if d in covered],
            left_out={d: left.get(d, f"domain {d} sent no update that was aggregated").removeprefix(f"domain {d} ")
                      for d in job.participants if d not in covered}))

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
        self.collector.bases[rnd] = weights  # the update norms of round rnd are taken from these
        for d in participants:
            peer = self.members.peers.get(d)
            if peer is None:  # lost since the list was made
                continue
            first = {} if job.name in peer.versions else norm
            msg = wire.TrainIns(job=job.name, round=rnd, version=version, participants=everyone,
                                peer_keys=keys, attempt=self.attempts.get(rnd, 1), **first)
            self.asked.setdefault(rnd, set()).add(peer.identity)
            self._send_to(job, peer, msg, weights, rnd)

    def _standardization(self, job: PlanJob, participants: list[str]) -> dict[str, list[float]]:
        """Mesh-wide mean/std pooled exactly from the participants' sums; {} if not standardizing."""
        if not job.training.standardize:
            return {}
        d = len(job.features)
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
        return {"mean": mean, "std": std}

    def _gate_round(self, job: PlanJob, rnd: int, results: dict[str, tuple[Any, wire.Tensors]]) -> None:
        """Evaluate the job's `scope: round` policies on this round's updates before aggregating them."""
        if self.gate is None:
            return
        updates = [RoundUpdate(d, m.examples, m.loss, self.collector.norms.pop((rnd, d), 0.0)) for d, (m, _) in results.items()]
        spent = max((v for (j, _), v in self.collector.job_epsilon.items() if j == job.name), default=0.0)
        for d in self.gate.evaluate(rnd, list(results), updates, epsilon_spent=spent):
            if d.effect == "allow":
                continue
            self.sink.emit(ev.PolicyDecided(policy=d.policy, scope=d.scope, subject=d.subject, effect=d.effect,
                                            reason=d.reason, at=d.at, stage=d.stage, domain=d.domain))
            if d.effect == "deny":
                raise JobAborted(f"job {job.name} round {rnd}: policy {d.policy} denies aggregating the round: "
                                 f"{d.reason}")

    def _peer_keys(self, job: PlanJob, participants: list[str]) -> dict[str, str]:
        """Secure aggregation: the participants' public keys for `job` (empty without it)."""
        if not job.privacy.secure_aggregation:
            return {}
        missing = [d for d in participants if job.name not in getattr(self.members.peers.get(d), "secagg", {})]
        if missing:
            raise JobAborted(f"job {job.name}: domain {missing[0]} sent no secure aggregation key")
        return {d: self.members.peers[d].secagg[job.name] for d in participants}

    def _secure_sum(self, job: PlanJob, rnd: int, asked: list[str], results: dict[str, Any],
                    strategy: Strategy, weights: wire.Tensors) -> list[torch.Tensor]:
        """The example-weighted mean from masked updates: their sum unmasks only when all are there."""
        from meshctl.runtime.kernels import secagg

        missing = [d for d in asked if d not in results]
        if missing:
            raise ValueError(f"secure aggregation: {missing[0]} sent no update, and its pairwise masks "
                             "cannot be removed without it")
        total = secagg.add([results[d][1]["masked"].numpy().view(np.uint64) for d in asked])
        examples = sum(results[d][0].examples for d in asked)
        mean = secagg.decode(total, [t.shape for t in job.tensors], float(examples))
        return strategy.from_mean([weights[t.name] for t in job.tensors], mean)

    def _broadcast(self, job: PlanJob, participants: list[str], msg: Any, weights: wire.Tensors, rnd: int) -> None:
        for d in participants:
            peer = self.members.peers.get(d)
            if peer is not None:  # (else lost since the list was made)
                self._send_to(job, peer, msg, weights, rnd)

    def _send_to(self, job: PlanJob, peer: Peer, msg: Any, weights: wire.Tensors, rnd: int) -> None:
        """Send an instruction, with the weights when it is an evaluation or the daemon lacks its version."""
        attach = isinstance(msg, wire.EvalIns) or peer.versions.get(job.name) != msg.version
        sent = self.members.send(peer, msg, weights if attach else None)
        if attach:
            peer.versions[job.name] = msg.version
        self.bytes_out[(job.name, rnd)] = self.bytes_out.get((job.name, rnd), 0) + sent
