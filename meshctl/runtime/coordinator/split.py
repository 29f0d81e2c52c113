"""The split room: one `split_models:` job, beside training and analyses (docs/split-learning.md).

Wait for the parts' domains -> JobStarted -> private set intersection, relayed: each member's
blinded points to the label owner (the leader), its answer back, the member's held positions to
the leader, the leader's agreed order to every member -> IntersectionComputed (fewer than
`min_intersection` fails the job) -> per epoch, per batch: `forward` to every member, their
activations to the leader (`top`), its gradients back (`backward`) -> per epoch the holdout
(`eval`, `eval_top`) -> RoundCompleted and a metrics.csv row -> `finish`: bottom models stay in
their domains, the top model is written to `models/<name>.top.safetensors`. The coordinator only
relays: it never sees a key, a feature value or a label. With `top: {at: coordinator}` it runs the top
model itself: per batch the parts' activations (`forward`, the label owner's too if it has features),
its logits to the label owner (`loss`), d loss / d logits back (`logit_grads`: they reveal the labels,
compile-time warning MESH580), each part's gradient (`backward`); the holdout's logits (`eval_loss`).
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
from meshctl.runtime.coordinator.outputs import (
    DOMAIN_COLUMNS,
    METRIC_COLUMNS,
    append_row,
    trim_metrics,
    write_split_point,
)
from meshctl.runtime.split_rounds import SplitRoundGate
from meshctl.runtime.transport import Clock

SPLIT_MAX_BYTES = 256 * 1024 * 1024
"""Most tensor bytes one split-learning message may carry (about 4M rows of PSI points)."""

Key = tuple[str, str, int, int, str]
"""(domain, step, epoch, batch, peer) of a reply."""


def top_path(run_dir: Path, job: str) -> Path:
    """Where the run keeps a split job's top model."""
    return Path(run_dir) / "models" / f"{job}.top.safetensors"


class SplitRoom:
    """One split-learning job: from its parts' joining to its top model file."""

    def __init__(self, plan: Plan, split: PlanSplit, members: Members, sink: Sink, clock: Clock,
                 pump: Callable[[], None], run_dir: Path, *, join_timeout_s: float, checkpoint: bool = False,
                 resume: tuple[int, dict[str, float]] = (0, {}), root: Path | None = None):
        self.plan, self.split, self.members, self.sink, self.clock = plan, split, members, sink, clock
        self.pump, self.run_dir, self.join_timeout_s = pump, Path(run_dir), join_timeout_s
        self.checkpoint = checkpoint
        """After each epoch every part keeps its state (`keep`) and the run records the epoch as a resume point."""
        self.resume = resume
        """(epoch, its metrics) of a resumed run's newest resume point (outputs.newest_split_point); 0: none."""
        self.inbox: dict[Key, tuple[wire.SplitRes, wire.Tensors]] = {}
        self.root = Path(root) if root is not None else Path.cwd()
        """The mesh.yaml's directory: an `entrypoint:` top model's code, when the coordinator runs it."""
        self.top: Any = None
        """The top model (kernels.split.TopWorker) when the coordinator runs it (`top_at`); None: the label owner does."""
        self.leader = split.label_domain
        self.others = [d for d in split.participants if d != self.leader]
        self.bytes_out = 0
        self.bytes_in = 0
        self.tensor_bytes_in = 0
        """Of `bytes_in`: activations and gradients (a RoundCompleted's `update_bytes` in a split job)."""
        self.refused: dict[str, str] = {}
        self.denied: dict[str, str] = {}
        """Part domains whose own round policy denied a batch (their one line), as `policy_refused` got them."""
        self.gate = SplitRoundGate(plan, split) or None
        """The global round policies that judge this job's relays (split_rounds), if any."""
        """Part domains that refused their own data at run time (a `data` denial, as at join)."""
        self.diverged: str | None = None
        """A part's `split-failed` line (a non-finite loss, activations or gradients): the job fails with it."""

    # -- the workflow --------------------------------------------------------------------------
    def run(self) -> None:
        """Intersect, train, evaluate, save. Raises JobAborted (after JobFailed) when it cannot finish."""
        split, started = self.split, time.time()
        # (JobFailed's round: the epoch that runs; 0 before the first. A resumed job runs epoch k+1 from its restore)
        epoch = min(self.resume[0] + 1, split.epochs) if self.resume[0] else 0
        try:
            self._await(lambda: [d for d in split.participants if d not in self.members.peers],
                        self.join_timeout_s, f"did not join within {self.join_timeout_s:.0f}s", prefix="domains ")
            refused = [(d, self.members.peers[d].refused[split.name]) for d in split.participants
                       if split.name in self.members.peers[d].refused]
            if refused:  # a part's domain decided against it at Hello (its policies or invariants)
                raise JobAborted(f"split job {split.name}: " + "; ".join(
                    f"domain {d} refused the job: {why}" for d, why in refused))
            parameters = sum(sum(_size(t.shape) for t in p.tensors) for p in split.parts) \
                + sum(_size(t.shape) for t in split.top_tensors)
            self.sink.emit(ev.JobStarted(job=split.name, participants=list(split.participants), rounds=split.epochs,
                                         parameters=parameters, quorum=len(split.participants)))
            if split.top_at == "coordinator":  # before any data is read: a top model that cannot be built ends here
                self.top = self._build_top()
            n = self._intersect()
            metrics: dict[str, float] = {}
            if self.resume[0]:  # the parts take up their state of the resume point's epoch
                metrics = self._restore()
            trim_metrics(self.run_dir, split, self.resume[0])  # (rows after it: a resumed run trains them again)
            for epoch in range(self.resume[0] + 1, split.epochs + 1):
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
        holdout = min(max(1, round(split.holdout * n)), n - 1)  # kernels.split.holdout_split's, in every domain
        batches = -(-(n - holdout) // split.batch_size)
        total, examples = 0.0, 0
        for k in range(batches):
            if self.top is not None:  # the coordinator runs the top model, the label owner the loss
                loss, count = self._step_here(e, k, min(split.batch_size, n - holdout - k * split.batch_size))
                total, examples = total + loss * count, examples + count
                continue
            for m in self.others:
                self._send(m, wire.SplitIns(job=name, step="forward", epoch=e, batch=k))
            acts = {m: self._wait(m, "acts", e, k)[1]["acts"] for m in self.others}
            self._gate(epoch, k + 1, acts, {})  # (round policies, before the relay)
            self._send(self.leader, wire.SplitIns(job=name, step="top", epoch=e, batch=k, parts=self.others), acts)
            res, grads = self._wait(self.leader, "grads", e, k)
            self._gate(epoch, k + 1, acts, grads)
            total += (res.loss or 0.0) * res.examples
            examples += res.examples
            for m in self.others:
                self._send(m, wire.SplitIns(job=name, step="backward", epoch=e, batch=k), {"grad": grads[m]})
        res = self._eval_here(e, holdout) if self.top is not None else self._eval_at_owner(e)
        self._keep(e)
        train_loss = total / max(examples, 1)
        seconds = time.time() - start
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
        # (after the row: whoever sees the event finds the round in metrics.csv)
        self.sink.emit(ev.RoundCompleted(job=name, round=epoch, rounds=split.epochs,
                                         participants=list(split.participants), train_loss=train_loss,
                                         metrics=dict(res.metrics), bytes_in=self.bytes_in - in0,
                                         bytes_out=self.bytes_out - out0, seconds=seconds,
                                         update_bytes=self.tensor_bytes_in - acts0))
        self._record(epoch, dict(res.metrics))
        return dict(res.metrics)

    def _eval_at_owner(self, e: int) -> wire.SplitRes:
        """The holdout's metrics from the label owner, which runs the top model."""
        name = self.split.name
        for m in self.others:
            self._send(m, wire.SplitIns(job=name, step="eval", epoch=e))
        acts = {m: self._wait(m, "eval_acts", e)[1]["acts"] for m in self.others}
        self._gate(e + 1, 0, acts, {})
        self._send(self.leader, wire.SplitIns(job=name, step="eval_top", epoch=e, parts=self.others), acts)
        return self._wait(self.leader, "metrics", e)[0]

    # -- the top model here (`top_at: coordinator`) -------------------------------------------------
    @property
    def senders(self) -> list[str]:
        """The parts whose bottom models send activations, in part order (not a label-only part)."""
        return [p.domain for p in self.split.parts if p.features]

    def _build_top(self) -> Any:
        """The top model, initialised as the label owner would (seed + number of parts); an `entrypoint:`
        top's code is checked against the plan's pin first, as a domain checks its own."""
        from meshctl.compiler.entrypoint import check_code
        from meshctl.runtime.kernels.split import TopWorker, build_top

        split, arch = self.split, self.split.top_architecture
        reason = check_code(arch, self.root) if arch is not None else None
        if reason is not None:
            raise JobAborted(f"split job {split.name}: the coordinator refused the top model: {reason}")
        spec = ({"kind": "custom", "entrypoint": arch.entrypoint, "args": arch.args} if arch is not None
                else {"kind": "mlp", "hidden": split.top_hidden})
        try:
            model = build_top(spec, sum(p.out for p in split.parts), len(split.classes) or 1,
                              split.seed + len(split.parts), root=self.root.resolve())
        except Exception as err:  # noqa: BLE001 - user code: the job fails in one line
            line = (f"{type(err).__name__}: {err}".splitlines() or [""])[0][:300]
            raise JobAborted(f"split job {split.name}: cannot build the top model: {line}") from None
        task, loss = ("regression", split.loss or "mse") if split.task == "regression" else (
            "classification", "cross_entropy")  # (the label owner computes the loss; forward/backward need none)
        return TopWorker(model, task, loss, {"name": split.optimizer, "lr": split.lr})

    def _activations(self, domain: str, tensors: wire.Tensors, rows: int, where: str) -> Any:
        import torch

        out = self.split.part(domain).out
        a = tensors.get("acts")
        if a is None or a.dtype != torch.float32 or list(a.shape) != [rows, out]:
            raise JobAborted(f"split job {self.split.name}: domain {domain} sent activations that are not "
                             f"[{rows}, {out}] float32")
        if not bool(torch.isfinite(a).all()):  # alive, but its numbers diverged (as the label owner says it)
            raise JobAborted(f"split job {self.split.name}: the activations of {domain} diverged at {where} "
                             f"(lr {self.split.lr} too high?)")
        return a

    def _step_here(self, e: int, k: int, rows: int) -> tuple[float, int]:
        """One batch: the parts' activations, the top model's logits to the label owner, its d loss / d logits
        back through the top model (stepped), each part's gradient to it. (the loss, the rows)"""
        import torch

        name = self.split.name
        for d in self.senders:
            self._send(d, wire.SplitIns(job=name, step="forward", epoch=e, batch=k))
        where = f"epoch {e + 1} batch {k + 1}"
        acts = [self._activations(d, self._wait(d, "acts", e, k)[1], rows, where) for d in self.senders]
        self._gate(e + 1, k + 1, dict(zip(self.senders, acts)), {})
        logits = self.top.forward(acts)
        if not bool(torch.isfinite(logits).all()):
            raise JobAborted(f"split job {name}: the top model at the coordinator diverged at {where} "
                             f"(lr {self.split.lr} too high?)")
        self._send(self.leader, wire.SplitIns(job=name, step="loss", epoch=e, batch=k), {"logits": logits})
        res, back = self._wait(self.leader, "logit_grads", e, k)
        grad = back.get("grad")
        if grad is None or grad.dtype != torch.float32 or grad.shape != logits.shape \
                or not bool(torch.isfinite(grad).all()):
            raise JobAborted(f"split job {name}: the label owner {self.leader} sent a logits gradient that is not "
                             f"{list(logits.shape)} finite float32")
        grads = dict(zip(self.senders, self.top.backward(grad)))
        self._gate(e + 1, k + 1, dict(zip(self.senders, acts)), grads)
        for d, g in grads.items():
            self._send(d, wire.SplitIns(job=name, step="backward", epoch=e, batch=k), {"grad": g})
        return res.loss or 0.0, res.examples

    def _eval_here(self, e: int, holdout: int) -> wire.SplitRes:
        """The holdout's logits from the top model here; the label owner reports the metrics."""
        name = self.split.name
        for d in self.senders:
            self._send(d, wire.SplitIns(job=name, step="eval", epoch=e))
        acts = [self._activations(d, self._wait(d, "eval_acts", e)[1], holdout, f"epoch {e + 1} (holdout)")
                for d in self.senders]
        self._gate(e + 1, 0, dict(zip(self.senders, acts)), {})
        logits = self.top.predict(acts)
        if not bool(logits.isfinite().all()):
            raise JobAborted(f"split job {name}: the top model at the coordinator diverged at epoch {e + 1} (holdout) "
                             f"(lr {self.split.lr} too high?)")
        self._send(self.leader, wire.SplitIns(job=name, step="eval_loss", epoch=e), {"logits": logits})
        return self._wait(self.leader, "metrics", e)[0]

    # -- round policies over the relays (meshctl.runtime.split_rounds) ----------------------------
    def _gate(self, epoch: int, batch: int, acts: dict[str, Any], grads: dict[str, Any]) -> None:
        """The global round policies that judge split jobs, on what is about to be relayed: a warn is a
        PolicyDecided (once per policy and epoch); a deny is a PolicyDecided and fails the job in one line."""
        if self.gate is None:
            return
        for d, line in self.gate.decide(epoch, batch, acts, grads):
            self.sink.emit(ev.PolicyDecided(policy=d.policy, scope="round", subject=d.subject, effect=d.effect,
                                            reason=line, at=d.at, stage="runtime"))
            if d.effect == "deny":
                raise JobAborted(f"split job {self.split.name}: {line}")

    def policy_refused(self, domain: str, reason: str) -> None:
        """A part's domain denied a batch by its own round policy (a `policy:` ErrorReply): the job ends."""
        if domain in self.split.participants:
            self.denied.setdefault(domain, reason)

    # -- resume points ----------------------------------------------------------------------------
    def _keep(self, e: int) -> None:
        """With checkpoints: every part keeps its state after epoch index `e` before the epoch is recorded."""
        if not self.checkpoint:
            return
        for d in self.split.participants:
            self._send(d, wire.SplitIns(job=self.split.name, step="keep", epoch=e))
        for d in self.split.participants:
            self._wait(d, "kept", e)
        if self.top is not None:  # the coordinator's own part of the state: the top model and its optimizer
            self._keep_top(e + 1)

    def _record(self, epoch: int, metrics: dict[str, float]) -> None:
        """The epoch's resume point (after its metrics row and RoundCompleted), and its CheckpointWritten."""
        if not self.checkpoint:
            return
        try:
            path = write_split_point(self.run_dir, self.plan, self.split.name, epoch, metrics)
        except OSError as err:
            raise JobAborted(f"split job {self.split.name}: cannot record epoch {epoch}: {err.strerror or err}") \
                from None
        self.sink.emit(ev.CheckpointWritten(job=self.split.name, round=epoch, path=str(path.relative_to(self.run_dir))))

    def _restore(self) -> dict[str, float]:
        """A resumed run: every part loads its state after the resume point's epoch k (a part whose state is
        missing or not this job's refuses, in one line); metrics.csv rows after k are dropped. Returns epoch
        k's metrics."""
        k, metrics = self.resume
        for d in self.split.participants:
            self._send(d, wire.SplitIns(job=self.split.name, step="restore", epoch=k - 1))
        for d in self.split.participants:
            self._wait(d, "restored", k - 1)
        if self.top is not None:
            self._restore_top(k)
        return dict(metrics)

    def _top_dir(self) -> Path:
        """Where the coordinator keeps the top model's epochs (`top_at`), in the run directory."""
        return self.run_dir / "split" / self.split.name

    def _keep_top(self, epoch: int) -> None:
        """The top model, its optimizer's state and the torch RNG state after `epoch` (domain.split_state's format)."""
        import torch

        from meshctl.runtime.domain import split_state

        state, rest = split_state.optimizer_state(self.top.opt)
        out = {**{f"top/{k}": v for k, v in self.top.model.state_dict().items()},
               **{f"top_opt/{k}": v for k, v in state.items()}, "rng": torch.get_rng_state()}
        meta = {"job": self.split.name, "plan_hash": self.plan.plan.hash, "top_opt": split_state.dumps(rest)}
        try:
            split_state.save(self._top_dir(), epoch, out, meta)
        except OSError as err:
            raise JobAborted(f"split job {self.split.name}: cannot keep the top model of epoch {epoch}: "
                             f"{err.strerror or err}") from None

    def _restore_top(self, epoch: int) -> None:
        import json

        import torch

        from meshctl.runtime.domain import split_state

        try:
            kept, meta = split_state.load(self._top_dir(), epoch)
            if meta.get("job") != self.split.name or meta.get("plan_hash") != self.plan.plan.hash:
                raise ValueError(f"the state of epoch {epoch} is of another plan or job")
            self.top.model.load_state_dict(split_state.prefixed(kept, "top/"))
            split_state.load_optimizer(self.top.opt, split_state.prefixed(kept, "top_opt/"),
                                       json.loads(meta.get("top_opt", "{}")))
            torch.set_rng_state(kept["rng"])
        except (ValueError, KeyError, RuntimeError, TypeError) as err:
            line = (str(err).splitlines() or [type(err).__name__])[0][:300]
            raise JobAborted(f"split job {self.split.name}: the coordinator cannot resume the top model after "
                             f"epoch {epoch}: {line}; the run cannot be resumed again: start a new one with "
                             "`meshctl up`") from None

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
        if self.top is not None:  # the coordinator ran it
            top = {k: v.detach().contiguous() for k, v in self.top.model.state_dict().items()}
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
        self._drop_top_epochs()

    def _drop_top_epochs(self) -> None:
        """The job completed (a resume skips it): the top model's epoch files go; models/ keeps the top model."""
        import contextlib
        import shutil

        shutil.rmtree(self._top_dir(), ignore_errors=True)
        with contextlib.suppress(OSError):  # `split/`, once no job has any
            self._top_dir().parent.rmdir()

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
                    f"to step {step.replace('_', ' ')} within {_seconds(self.split.round_timeout_s)} (round_timeout_s)",
                    prefix="no reply from ")
        return self.inbox.pop(key)

    def _await(self, missing: Callable[[], list[str]], timeout_s: float, late: str, *, prefix: str) -> None:
        """Pump until `missing()` is empty; a refused or lost participant or the timeout aborts."""
        pump_until(missing, timeout_s, clock=self.clock, pump=self.pump, check=self._abort_if_lost,
                   aborted=lambda left: f"split job {self.split.name}: {prefix}{', '.join(left)} {late}")

    def _abort_if_lost(self) -> None:
        name = self.split.name
        if self.diverged is not None:  # a live domain's numbers diverged: the job fails, no domain is lost
            raise JobAborted(self.diverged)
        denied = [d for d in self.split.participants if d in self.denied]
        if denied:
            raise JobAborted(f"split job {name}: domain {denied[0]} refused: {self.denied[denied[0]]}")
        refused = [d for d in self.split.participants if d in self.refused]
        if refused:
            raise JobAborted(f"split job {name}: domain {refused[0]} refused the job: data: {self.refused[refused[0]]}")
        failed = self.members.failed
        lost = [d for d in self.split.participants if d in failed]
        if lost:  # a daemon's own "split job NAME: " prefix is not said twice; a refusal is not called lost
            reason = failed[lost[0]].removeprefix(f"split job {name}: ")
            raise JobAborted(f"split job {name}: domain {lost[0]} {'' if reason.startswith('refused: ') else 'lost: '}"
                             f"{reason}")

    def step_failed(self, domain: str, reason: str) -> None:
        """A part served a step whose numbers diverged (a `split-failed` ErrorReply, one line that names the
        domain and what: `split job malignancy: the loss at clinic diverged at epoch 3 batch 5 (lr 10.0 too
        high?)`): the job fails with it; the domain is alive and stays joined (not lost)."""
        if domain in self.split.participants and self.diverged is None:
            self.diverged = reason if reason.startswith(f"split job {self.split.name}: ") \
                else f"split job {self.split.name}: domain {domain}: {reason}"

    def resume_refused(self, domain: str, reason: str) -> None:
        """A part's domain cannot take up its state of the resume point (a `split-refused` ErrorReply, `cannot
        resume after epoch k: ...`): a `resume` denial of the domain (refused, not lost); the job fails, and the
        run ends with it for good (its run_completed is final: it is not resumed again)."""
        if domain not in self.split.participants or domain in self.denied:
            return
        self.denied[domain] = f"{reason}; the run cannot be resumed again: start a new one with `meshctl up`"
        self.sink.emit(ev.PolicyDecided(policy="resume", scope="model", subject=f"model.{self.split.name}",
                                        effect="deny", reason=reason, stage="runtime", domain=domain))

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
        if msg.step in ("acts", "grads", "eval_acts", "logit_grads"):
            self.tensor_bytes_in += size
        self.inbox[(domain, msg.step, msg.epoch, msg.batch, msg.peer)] = (msg, tensors)
        return True


def _seconds(s: float) -> str:
    """A deadline as written in mesh.yaml: `0.01 s`, `300 s` (never rounded to `0s`)."""
    return f"{s:g} s"


def _size(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
