"""The split room: one `split_models:` job, beside training and analyses (docs/split-learning.md).

Wait for the parts' domains -> JobStarted -> private set intersection, relayed: each member's
blinded points to the label owner (the leader), its answer back, the member's held positions to
the leader, the leader's agreed order to every member -> IntersectionComputed (fewer than
`min_intersection` fails the job) -> per epoch, per batch: `forward` to every member, their
activations to the leader (`top`), its gradients back (`backward`) -> per epoch the holdout
(`eval`, `eval_top`) -> RoundCompleted and a metrics.csv row -> `finish`: bottom models stay in
their domains, the top model is written to `models/<name>.top.safetensors`. The coordinator only
relays: it never sees a key, a feature value or a label.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshctl.compiler.plan import Plan, PlanSplit
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.coordinator.collector import JobAborted, pump_until
from meshctl.runtime.coordinator.members import Members, Sink
from meshctl.runtime.coordinator.outputs import DOMAIN_COLUMNS, METRIC_COLUMNS, append_row
from meshctl.runtime.transport import Clock

SPLIT_MAX_BYTES = 256 * 1024 * 1024
"""Most tensor bytes one split-learning message may carry (about 4M rows of PSI points)."""

Key = tuple[str, str, int, int, str]
"""(domain, step, epoch, batch, peer) of a reply."""


def unfinished_split(run_dir: Path) -> str | None:
    """The first split job of the run's plan that has not completed, if any: such a run is not resumed
    (a split job keeps no checkpoints, so a restart would train its epochs again, docs/split-learning.md)."""
    from meshctl.runtime.run import EVENTS_FILE, read_run_events

    try:
        plan = Plan.read(Path(run_dir) / "plan.toml")
    except (OSError, ValueError):
        return None
    if not plan.split_models:
        return None
    done = {e.job for e in read_run_events(Path(run_dir) / EVENTS_FILE) if isinstance(e, ev.JobCompleted)}
    return next((s.name for s in plan.split_models if s.name not in done), None)


def top_path(run_dir: Path, job: str) -> Path:
    """Where the run keeps a split job's top model."""
    return Path(run_dir) / "models" / f"{job}.top.safetensors"


class SplitRoom:
    """One split-learning job: from its parts' joining to its top model file."""

    def __init__(self, plan: Plan, split: PlanSplit, members: Members, sink: Sink, clock: Clock,
                 pump: Callable[[], None], run_dir: Path, *, join_timeout_s: float):
        self.plan, self.split, self.members, self.sink, self.clock = plan, split, members, sink, clock
        self.pump, self.run_dir, self.join_timeout_s = pump, Path(run_dir), join_timeout_s
        self.inbox: dict[Key, tuple[wire.SplitRes, wire.Tensors]] = {}
        self.leader = split.label_domain
        self.others = [d for d in split.participants if d != self.leader]
        self.bytes_out = 0
        self.bytes_in = 0
        self.tensor_bytes_in = 0
        """Of `bytes_in`: activations and gradients (a RoundCompleted's `update_bytes` in a split job)."""
        self.refused: dict[str, str] = {}
        """Part domains that refused their own data at run time (a `data` denial, as at join)."""

    # -- the workflow --------------------------------------------------------------------------
    def run(self) -> None:
        """Intersect, train, evaluate, save. Raises JobAborted (after JobFailed) when it cannot finish."""
        split, started = self.split, time.time()
        epoch = 0
        try:
            self._await(lambda: [d for d in split.participants if d not in self.members.peers],
                        self.join_timeout_s, "did not join within", prefix="domains ")
            refused = [(d, self.members.peers[d].refused[split.name]) for d in split.participants
                       if split.name in self.members.peers[d].refused]
            if refused:  # a part's domain decided against it at Hello (its policies or invariants)
                raise JobAborted(f"split job {split.name}: " + "; ".join(
                    f"domain {d} refused the job: {why}" for d, why in refused))
            parameters = sum(sum(_size(t.shape) for t in p.tensors) for p in split.parts) \
                + sum(_size(t.shape) for t in split.top_tensors)
            self.sink.emit(ev.JobStarted(job=split.name, participants=list(split.participants), rounds=split.epochs,
                                         parameters=parameters, quorum=len(split.participants)))
            n = self._intersect()
            metrics: dict[str, float] = {}
            for epoch in range(1, split.epochs + 1):
                metrics = self._epoch(epoch, n)
            self._finish(metrics, started)
        except JobAborted as err:
            self.sink.emit(ev.JobFailed(job=split.name, round=epoch, reason=str(err)))
            raise

    def _intersect(self) -> int:
        split = self.split
        salt = os.urandom(16).hex()  # per run: blinded points of two runs cannot be linked
        for d in split.participants:
            self._send(d, wire.SplitIns(job=split.name, step="psi_start", salt=salt))
        self._wait(self.leader, "ready")
        for m in self.others:
            _, points = self._wait(m, "psi_request")
            self._send(self.leader, wire.SplitIns(job=split.name, step="psi_answer", peer=m), points)
            _, answer = self._wait(self.leader, "psi_answer", peer=m)
            self._send(m, wire.SplitIns(job=split.name, step="psi_reply"), answer)
            _, held = self._wait(m, "psi_held")
            self._send(self.leader, wire.SplitIns(job=split.name, step="psi_held", peer=m), held)
        self._send(self.leader, wire.SplitIns(job=split.name, step="psi_order"))
        res, order = self._wait(self.leader, "psi_order")
        size = res.size
        self.sink.emit(ev.IntersectionComputed(job=split.name, size=size, parties=list(split.participants),
                                               min_intersection=split.min_intersection))
        if size < max(split.min_intersection, 2):
            raise JobAborted(f"split job {split.name}: the parts share {size} entities, fewer than "
                             f"min_intersection {max(split.min_intersection, 2)}")
        for m in self.others:
            self._send(m, wire.SplitIns(job=split.name, step="psi_order"), order)
        for m in self.others:
            res, _ = self._wait(m, "aligned")
            if res.size != size:
                raise JobAborted(f"split job {split.name}: {m} aligned {res.size} rows, the leader {size}")
        return size

    def _epoch(self, epoch: int, n: int) -> dict[str, float]:
        split, name = self.split, self.split.name
        e = epoch - 1  # batch_order's epoch index
        self.sink.emit(ev.RoundStarted(job=name, round=epoch, participants=list(split.participants)))
        start, out0, in0, acts0 = time.time(), self.bytes_out, self.bytes_in, self.tensor_bytes_in
        holdout = round(split.holdout * n)  # kernels.split.holdout_split's, in every domain
        batches = -(-(n - holdout) // split.batch_size)
        total, examples = 0.0, 0
        for k in range(batches):
            for m in self.others:
                self._send(m, wire.SplitIns(job=name, step="forward", epoch=e, batch=k))
            acts = {m: self._wait(m, "acts", e, k)[1]["acts"] for m in self.others}
            self._send(self.leader, wire.SplitIns(job=name, step="top", epoch=e, batch=k, parts=self.others), acts)
            res, grads = self._wait(self.leader, "grads", e, k)
            total += (res.loss or 0.0) * res.examples
            examples += res.examples
            for m in self.others:
                self._send(m, wire.SplitIns(job=name, step="backward", epoch=e, batch=k), {"grad": grads[m]})
        for m in self.others:
            self._send(m, wire.SplitIns(job=name, step="eval", epoch=e))
        acts = {m: self._wait(m, "eval_acts", e)[1]["acts"] for m in self.others}
        self._send(self.leader, wire.SplitIns(job=name, step="eval_top", epoch=e, parts=self.others), acts)
        res, _ = self._wait(self.leader, "metrics", e)
        train_loss = total / max(examples, 1)
        seconds = time.time() - start
        self.sink.emit(ev.RoundCompleted(job=name, round=epoch, rounds=split.epochs,
                                         participants=list(split.participants), train_loss=train_loss,
                                         metrics=dict(res.metrics), bytes_in=self.bytes_in - in0,
                                         bytes_out=self.bytes_out - out0, seconds=seconds,
                                         update_bytes=self.tensor_bytes_in - acts0))
        header = ["job", "round", "participants", "train_loss", "test_loss", "test_accuracy", "evaluated",
                  "eval_examples", *(f"test_{m}" for m in METRIC_COLUMNS), "bytes_in", "bytes_out", "update_bytes"]
        row: dict[str, object] = {"job": name, "round": epoch, "participants": len(split.participants),
                                  "train_loss": f"{train_loss:.6f}", "evaluated": len(split.participants),
                                  "eval_examples": res.examples, "bytes_in": self.bytes_in - in0,
                                  "bytes_out": self.bytes_out - out0, "update_bytes": self.tensor_bytes_in - acts0}
        row.update({f"test_{m}": f"{res.metrics[m]:.6f}" for m in DOMAIN_COLUMNS if m in res.metrics})
        try:
            append_row(self.run_dir / "metrics.csv", header, row)
        except OSError as err:
            raise JobAborted(f"split job {name}: cannot write metrics.csv: {err.strerror or err}") from None
        return dict(res.metrics)

    def _finish(self, metrics: dict[str, float], started: float) -> None:
        from safetensors.torch import save_file

        split = self.split
        for d in split.participants:
            self._send(d, wire.SplitIns(job=split.name, step="finish"))
        top: wire.Tensors = {}
        for d in split.participants:
            _, tensors = self._wait(d, "saved")
            if d == self.leader:
                top = tensors
        expected = {t.name: t.shape for t in split.top_tensors}
        if {k: list(v.shape) for k, v in top.items()} != expected:
            raise JobAborted(f"split job {split.name}: the top model from {self.leader} is not the planned one")
        path = top_path(self.run_dir, split.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"job": split.name, "plan_hash": self.plan.plan.hash, "classes": ",".join(split.classes),
                "parts": ",".join(f"{p.domain}:{p.product}@{p.contract}" for p in split.parts)}
        tmp = path.with_suffix(".tmp")
        try:
            save_file({k: v.contiguous() for k, v in top.items()}, str(tmp), metadata=meta)
            tmp.replace(path)
        except OSError as err:
            raise JobAborted(f"split job {split.name}: cannot write {path.name}: {err.strerror or err}") from None
        self.sink.emit(ev.JobCompleted(job=split.name, rounds=split.epochs, metrics=metrics,
                                       model_path=str(path.relative_to(self.run_dir)),
                                       seconds=time.time() - started, domains=list(split.participants)))

    # -- messages ----------------------------------------------------------------------------
    def _send(self, domain: str, msg: wire.SplitIns, tensors: wire.Tensors | None = None) -> None:
        peer = self.members.peers.get(domain)
        if peer is None:
            self._abort_if_lost()
            raise JobAborted(f"split job {self.split.name}: domain {domain} is not connected")
        self.bytes_out += self.members.send(peer, msg, tensors)

    def _wait(self, domain: str, step: str, epoch: int = 0, batch: int = 0, peer: str = ""
              ) -> tuple[wire.SplitRes, wire.Tensors]:
        key = (domain, step, epoch, batch, peer)
        self._await(lambda: [] if key in self.inbox else [domain], self.split.round_timeout_s,
                    f"within (step {step})", prefix="no reply from ")
        return self.inbox.pop(key)

    def _await(self, missing: Callable[[], list[str]], timeout_s: float, late: str, *, prefix: str) -> None:
        """Pump until `missing()` is empty; a refused or lost participant or the timeout aborts."""
        pump_until(missing, timeout_s, clock=self.clock, pump=self.pump, check=self._abort_if_lost,
                   aborted=lambda left: f"split job {self.split.name}: {prefix}{', '.join(left)} {late} {timeout_s:.0f}s")

    def _abort_if_lost(self) -> None:
        name = self.split.name
        refused = [d for d in self.split.participants if d in self.refused]
        if refused:
            raise JobAborted(f"split job {name}: domain {refused[0]} refused the job: data: {self.refused[refused[0]]}")
        failed = self.members.failed
        lost = [d for d in self.split.participants if d in failed]
        if lost:  # a daemon's own "split job NAME: " prefix is not said twice; a refusal is not called lost
            reason = failed[lost[0]].removeprefix(f"split job {name}: ")
            raise JobAborted(f"split job {name}: domain {lost[0]} {'' if reason.startswith('refused: ') else 'lost: '}"
                             f"{reason}")

    def data_refused(self, domain: str, reason: str) -> None:
        """A part's domain cannot train on its data (a `split-data` ErrorReply): a `data` denial of
        the domain, as a federated job's at join (the dashboard shows it refused, data); the job ends."""
        if domain not in self.split.participants or domain in self.refused:
            return
        self.refused[domain] = reason
        self.sink.emit(ev.PolicyDecided(policy="data", scope="product", subject=f"model.{self.split.name}",
                                        effect="deny", reason=reason, stage="runtime", domain=domain))

    def receive(self, domain: str, msg: Any, tensors: wire.Tensors) -> bool:
        """Take one SplitRes of this job (False: not this room's message)."""
        if not isinstance(msg, wire.SplitRes) or msg.job != self.split.name:
            return False
        if domain not in self.split.participants:
            self.sink.emit(ev.MessageRejected(sender=domain, reason=f"split reply from {domain}, not a part"))
            return True
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        self.bytes_in += size
        if msg.step in ("acts", "grads", "eval_acts"):
            self.tensor_bytes_in += size
        self.inbox[(domain, msg.step, msg.epoch, msg.batch, msg.peer)] = (msg, tensors)
        return True


def _size(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
