"""A domain's side of split learning (`split_models:`, docs/split-learning.md).

The daemon hands every SplitIns to `SplitDomain.handle`, which answers with SplitRes messages.
Keys are read (meshctl.runtime.data.load_keyed) only to be hashed and blinded for the private set
intersection (meshctl.runtime.psi); the agreed rows are ordered by key inside each domain (every
domain holds the same keys for them, so the orders agree) and split into a seeded holdout. What
leaves: blinded points, positions in the leader's shuffled list, activations (clipped and noised
as declared), gradients, the label owner's metrics and, at the end, the top model's weights. The
bottom models stay in `.meshctl/split/<run>/<domain>/<job>.safetensors` beside the mesh.yaml.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meshctl.compiler.entrypoint import check_code
from meshctl.compiler.plan import Plan, PlanArchitecture, PlanSplit, PlanSplitPart
from meshctl.runtime import psi, wire
from meshctl.runtime.data import DataError, load_keyed
from meshctl.runtime.domain import split_state
from meshctl.runtime.features import FeatureError, _finite, _text
from meshctl.runtime.kernels.metrics import TASK_METRICS, eval_stats, finish
from meshctl.runtime.kernels.split import (
    BottomWorker,
    LossWorker,
    TopWorker,
    batch_order,
    build_bottom,
    build_top,
    holdout_split,
)
from meshctl.runtime.split_rounds import SplitRoundGate

LEADER_STEPS = ("psi_answer", "psi_held", "top", "eval_top")
"""Steps only the label owner serves."""
MEMBER_STEPS = ("psi_reply", "forward", "backward", "eval")
"""Steps only the other parts serve."""
LOSS_STEPS = ("loss", "eval_loss")
"""Steps only the label owner serves, when the coordinator runs the top model (`top_at`): it then
serves no `top` or `eval_top`, and the bottom model's `forward`, `backward` and `eval` if it has features."""


class SplitError(ValueError):
    """An instruction this domain cannot serve (one line, safe to send)."""


class SplitDenied(SplitError):
    """This domain's own round policy denied what it was about to send or apply (meshctl.runtime.split_rounds):
    the daemon answers `policy:<name>` with this line, and the job fails."""

    def __init__(self, policy: str, epoch: int, line: str):
        super().__init__(line)
        self.policy, self.epoch = policy, epoch


class SplitResumeRefused(SplitError):
    """A resumed job whose state after its resume point this domain cannot take up (missing, damaged, of another
    plan or job, other rows or values): the daemon answers `split-refused` with this line; the domain is alive."""


class SplitFailed(SplitError):
    """A step this domain served but whose numbers diverged (a non-finite loss, activations or gradients):
    the job fails in this line (`split-failed`); the domain is alive, not lost."""


def _diverged(job: _Job, what: str, ins: wire.SplitIns) -> SplitFailed:
    """`the loss at clinic diverged at epoch 3 batch 5 (lr 10.0 too high?)` (epochs and batches from 1)."""
    at = f"epoch {ins.epoch + 1} batch {ins.batch + 1}" if ins.step in ("top", "forward", "backward", "loss") \
        else f"epoch {ins.epoch + 1} (holdout)"
    return SplitFailed(f"{what} diverged at {at} (lr {job.split.lr} too high?)")


def to_points(points: list[bytes]) -> torch.Tensor:
    """32-byte points as an [n, 32] int8 tensor (the wire carries raw bytes, never pickles)."""
    raw = b"".join(points)
    return torch.frombuffer(bytearray(raw), dtype=torch.int8).reshape(len(points), psi.POINT_BYTES).clone() \
        if points else torch.zeros((0, psi.POINT_BYTES), dtype=torch.int8)


def from_points(t: torch.Tensor) -> list[bytes]:
    """The inverse of `to_points`."""
    if t.dtype != torch.int8 or t.dim() != 2 or t.shape[1] != psi.POINT_BYTES:
        raise SplitError(f"points must be an [n, {psi.POINT_BYTES}] int8 tensor")
    raw = t.contiguous().numpy().tobytes()
    return [raw[i:i + psi.POINT_BYTES] for i in range(0, len(raw), psi.POINT_BYTES)]


def positions(t: torch.Tensor) -> list[int]:
    if t.dtype != torch.int64 or t.dim() != 1:
        raise SplitError("positions must be a 1-d int64 tensor")
    return [int(v) for v in t.tolist()]


def _feature_matrix(split: PlanSplit, part: PlanSplitPart, values: dict[str, list], n: int) -> torch.Tensor:
    """The part's features as float32 [n, part.input_width]: a numeric feature's value (NaN or infinite
    refused, as federated jobs refuse them: features._finite), a categorical one's one-hot slots over its
    declared values (an undeclared value refused, as the label's is). DataError names product and column."""
    slots = {f.name: f for f in part.inputs or []}
    blocks, problems = [], []
    for name in part.features:
        spec = slots.get(name)
        if spec is not None and spec.kind == "categorical":
            index = {v: i for i, v in enumerate(spec.vocabulary or [])}
            words = [_text(v) for v in values[name]]
            unknown = sorted(set(words) - set(index))
            if unknown:
                problems.append(f"feature column {name} holds {len(unknown)} value{'s' if len(unknown) > 1 else ''} "
                                "not declared in its values")
                continue
            block = torch.zeros((n, len(index)), dtype=torch.float32)
            block[torch.arange(n), torch.tensor([index[w] for w in words], dtype=torch.int64)] = 1.0
            blocks.append(block)
            continue
        try:
            col = np.asarray([float(v) for v in values[name]], dtype=np.float32)
        except (TypeError, ValueError):
            raise DataError(f"product {part.product}: feature {name} of split job {split.name} is not numeric") from None
        try:
            _finite(name, col)
        except FeatureError as err:
            problems.append(str(err))
            continue
        blocks.append(torch.from_numpy(col).reshape(n, 1))
    if problems:
        raise DataError(f"{part.product}: {'; '.join(problems)}",
                        hint="remove or impute them (or declare the values); a model cannot train on them")
    return torch.cat(blocks, dim=1) if blocks else torch.zeros((n, 0))  # none: the label owner's label-only part


def _labels(split: PlanSplit, values: list) -> list[str] | list[float]:
    """The label owner's labels: text (a classification's, checked against the declared values once
    aligned), or finite floats (a regression's: NaN or infinite values are refused as features' are)."""
    if split.task != "regression":
        return [str(v) for v in values]
    try:
        y = [float(v) for v in values]
    except (TypeError, ValueError):
        raise DataError(f"product {split.label_product}: label column {split.label_column} is not numeric") from None
    try:
        with np.errstate(over="ignore"):  # beyond float32: infinite, refused
            _finite(split.label_column, np.asarray(y, dtype=np.float32))
    except FeatureError as err:
        raise DataError(f"{split.label_product}: label column: {err}",
                        hint="remove or impute them; a model cannot train on them") from None
    return y


def standardize(x: torch.Tensor, train: list[int]) -> tuple[torch.Tensor, list[float], list[float]]:
    """x scaled with the train rows' mean and (population) std; a constant column keeps std 1."""
    mean = x[train].mean(dim=0)
    std = x[train].std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x - mean) / std, mean.tolist(), std.tolist()


@dataclass
class _Job:
    split: PlanSplit
    index: int
    """This domain's part index."""
    ids: list[str]
    x: torch.Tensor
    labels: list[str] | list[float] | None
    party: psi.PsiLeader | psi.PsiMember
    held: dict[str, list[int]] = field(default_factory=dict)
    answered: set[str] = field(default_factory=set)
    """Members whose intersection request the leader answered: once each, so the relay is no oracle."""
    rows: list[int] = field(default_factory=list)
    train: list[int] = field(default_factory=list)
    test: list[int] = field(default_factory=list)
    y: torch.Tensor | None = None
    bottom: BottomWorker | None = None
    top: TopWorker | None = None
    loss: LossWorker | None = None
    """The label owner's loss when the coordinator runs the top model (`top_at`)."""
    norm: tuple[list[float], list[float]] | None = None
    batches: dict[int, list[list[int]]] = field(default_factory=dict)
    keys_hash: str = ""
    """sha256 of the aligned rows' keys (split_state.rows_hash): a resumed job's intersection must be the same."""

    @property
    def leader(self) -> bool:
        return self.split.parts[self.index].domain == self.split.label_domain

    def batch(self, epoch: int, k: int) -> list[int]:
        """Positions (into `train`) of batch k of `epoch`; every domain draws the same."""
        if epoch not in self.batches:
            self.batches = {epoch: batch_order(len(self.train), self.split.batch_size, self.split.seed, epoch)}
        order = self.batches[epoch]
        if k >= len(order):
            raise SplitError(f"epoch {epoch} has {len(order)} batches, not {k + 1}")
        return [self.train[i] for i in order[k]]


class SplitDomain:
    """The split-learning jobs of one daemon."""

    def __init__(self, plan: Plan, domain: str, base_dir: Path, run: str):
        self.plan, self.domain, self.base_dir, self.run = plan, domain, Path(base_dir), run
        self.jobs: dict[str, _Job] = {}
        self.gates: dict[str, SplitRoundGate] = {}
        """Split job -> this domain's round policies over what it sends and receives (split_rounds)."""

    def answer(self, ins: wire.SplitIns, tensors: wire.Tensors, log: Any = print
               ) -> list[tuple[wire.SplitRes | wire.ErrorReply, wire.Tensors | None]]:
        """What the daemon sends for one instruction (daemon._split): `handle`'s replies, or one ErrorReply
        whose code says what failed (the coordinator's split room reads it: split-data a data refusal,
        policy:<name> a round policy's deny, split-refused a state it cannot take up, split-failed diverged
        numbers, split anything else); a job that fails leaves this domain. `log` gets the detail that stays
        in the domain's own log."""
        try:
            try:
                return self.handle(ins, tensors)
            except Exception:  # the job fails with this step: this domain is in it no longer (idle)
                self.jobs.pop(ins.job, None)
                raise
        except DataError as err:  # a `data` denial, as a federated job's at join (coordinator/split.data_refused)
            log(f"split job {ins.job}: {err.local()}")
            return [(wire.ErrorReply(code="split-data", reason=err.message[:4096], job=ins.job), None)]
        except SplitDenied as err:  # its own round policy (runtime.split_rounds): the job fails, as a federated round's
            log(f"refused: split job {ins.job}: {err}")
            return [(wire.ErrorReply(code=f"policy:{err.policy}"[:64], reason=str(err)[:4096], job=ins.job,
                                     round=err.epoch), None)]
        except SplitResumeRefused as err:  # its state cannot be taken up: a refusal (coordinator/split), not lost
            return [(wire.ErrorReply(code="split-refused", reason=str(err)[:4096], job=ins.job), None)]
        except SplitFailed as err:  # its numbers diverged: the job fails (coordinator/split.step_failed), not lost
            return [(wire.ErrorReply(code="split-failed", reason=f"split job {ins.job}: {err}", job=ins.job), None)]
        except (SplitError, psi.PsiError, ValueError, RuntimeError, KeyError) as err:  # malformed or out of order
            return [(wire.ErrorReply(code="split", reason=f"split job {ins.job}: {err}", job=ins.job), None)]

    def handle(self, ins: wire.SplitIns, tensors: wire.Tensors) -> list[tuple[wire.SplitRes, wire.Tensors | None]]:
        """The replies to one instruction (none for a backward step). Raises SplitError or DataError."""
        if ins.step == "psi_start":
            return [self._start(ins)]
        job = self.jobs.get(ins.job)
        if job is None:
            raise SplitError(f"split job {ins.job!r} has not started here")
        if not self._serves(job, ins.step):
            raise SplitError(f"step {ins.step} is not for the {'label owner' if job.leader else 'other parts'}")
        if ins.step == "psi_answer" and (ins.peer in job.answered or ins.peer not in job.split.participants
                                         or ins.peer == self.domain):
            raise SplitError(f"a second or unknown intersection request (from {ins.peer!r})")
        step = getattr(self, f"_{ins.step}")
        return step(job, ins, tensors)

    @staticmethod
    def _serves(job: _Job, step: str) -> bool:
        """Whether this domain's role in the job serves `step` (a deviating relay gets an error, not an answer)."""
        if not job.leader:
            return step not in LEADER_STEPS and step not in LOSS_STEPS
        if job.split.top_at != "coordinator":
            return step not in MEMBER_STEPS and step not in LOSS_STEPS
        if step in ("forward", "backward", "eval"):  # its own bottom model, as a member's
            return bool(job.split.parts[job.index].features)
        return step not in ("top", "eval_top", "psi_reply")

    # -- private set intersection ---------------------------------------------------------
    def _start(self, ins: wire.SplitIns) -> tuple[wire.SplitRes, wire.Tensors | None]:
        split = next((s for s in self.plan.split_models if s.name == ins.job), None)
        if split is None or self.domain not in split.participants:
            raise SplitError(f"this domain takes no part in split job {ins.job!r}")
        index = split.participants.index(self.domain)
        part = split.parts[index]
        leader = self.domain == split.label_domain
        for arch in (part.architecture, split.top_architecture if leader and split.top_at is None else None):
            reason = check_code(arch, self.base_dir) if arch is not None else None
            if reason is not None:  # before any row is read: this host runs no code the plan did not pin
                raise SplitError(f"refused: {reason}")
        columns = [*part.features, *([split.label_column] if leader else [])]
        ids, values = load_keyed(self.plan.product(part.product), self.base_dir, part.key, columns)
        x = _feature_matrix(split, part, values, len(ids))
        seen: dict[str, int] = {}
        for row, key in enumerate(ids):  # a join key must be unique (1-based data rows, as a user counts them)
            if key in seen:
                raise DataError(f"{part.product}: key column {part.key}: value at data row {row + 1} appears twice "
                                f"(first at data row {seen[key] + 1})")
            seen[key] = row
        labels = _labels(split, values[split.label_column]) if leader else None
        salt = bytes.fromhex(ins.salt)
        try:
            party = psi.PsiLeader(ids, salt) if leader else psi.PsiMember(ids, salt)
        except psi.PsiError as err:
            raise DataError(f"product {part.product}, key column {part.key}: {err}") from None
        job = self.jobs[split.name] = _Job(split, index, ids, x, labels, party)
        if leader:
            return wire.SplitRes(job=split.name, step="ready"), None
        assert isinstance(job.party, psi.PsiMember)
        return wire.SplitRes(job=split.name, step="psi_request"), {"points": to_points(job.party.request())}

    def _psi_answer(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        assert isinstance(job.party, psi.PsiLeader)
        job.answered.add(ins.peer)
        mine, theirs = job.party.answer(from_points(tensors["points"]))
        return [(wire.SplitRes(job=job.split.name, step="psi_answer", peer=ins.peer),
                 {"mine": to_points(mine), "theirs": to_points(theirs)})]

    def _psi_reply(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        assert isinstance(job.party, psi.PsiMember)
        held = job.party.respond(from_points(tensors["mine"]), from_points(tensors["theirs"]))
        return [(wire.SplitRes(job=job.split.name, step="psi_held"), {"held": torch.tensor(held, dtype=torch.int64)})]

    def _psi_held(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        job.held[ins.peer] = positions(tensors["held"])
        return []

    def _psi_order(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        if job.leader:
            assert isinstance(job.party, psi.PsiLeader)
            members = [d for d in job.split.participants if d != self.domain]
            missing = [d for d in members if d not in job.held]
            if missing:
                raise SplitError(f"no intersection positions from {', '.join(missing)}")
            order = job.party.order({d: job.held[d] for d in members})
            self._align(job, job.party.rows(order))
            return [(wire.SplitRes(job=job.split.name, step="psi_order", size=len(order)),
                     {"order": torch.tensor(order, dtype=torch.int64)})]
        assert isinstance(job.party, psi.PsiMember)
        self._align(job, job.party.rows(positions(tensors["order"])))
        return [(wire.SplitRes(job=job.split.name, step="aligned", size=len(job.rows)), None)]

    def _align(self, job: _Job, rows: list[int]) -> None:
        """Order the agreed rows by key (the same order in every domain), split, standardize, build the models."""
        split = job.split
        job.rows = sorted(rows, key=lambda r: job.ids[r])
        x = job.x[job.rows]
        job.train, job.test = holdout_split(len(job.rows), split.holdout, split.seed)
        if split.standardize and job.train and x.shape[1]:  # (a label-only part has no feature to scale)
            x, mean, std = standardize(x, job.train)
            job.norm = (mean, std)
        job.x = x
        part = split.parts[job.index]
        optimizer = {"name": split.optimizer, "lr": split.lr}
        if part.features:  # the label owner's label-only part (top at the coordinator) has no bottom model
            job.bottom = self._bottom(job, optimizer)
        if job.leader and split.task == "regression":  # a numeric label (checked finite in _labels): one output
            assert job.labels is not None
            job.y = torch.tensor([job.labels[r] for r in job.rows], dtype=torch.float32)
        elif job.leader:
            assert job.labels is not None
            index = {c: i for i, c in enumerate(split.classes)}
            unknown = sorted({job.labels[r] for r in job.rows} - set(index))
            if unknown:
                raise DataError(f"product {split.label_product}: label column {split.label_column} holds "
                                f"{len(unknown)} value{'s' if len(unknown) > 1 else ''} not declared in its values")
            job.y = torch.tensor([index[job.labels[r]] for r in job.rows], dtype=torch.int64)
        if job.leader and split.top_at == "coordinator":  # the coordinator runs the top model; here only the loss
            job.loss = LossWorker("regression", split.loss or "mse", split.huber_delta or 1.0) \
                if split.task == "regression" else LossWorker("classification", "cross_entropy")
        elif job.leader:
            width = sum(p.out for p in split.parts)
            top = self._build(split.top_architecture, lambda arch: build_top(
                arch or {"kind": "mlp", "hidden": split.top_hidden}, width, len(split.classes) or 1,
                split.seed + len(split.parts), root=self.base_dir.resolve()))
            if split.task == "regression":
                job.top = TopWorker(top, "regression", split.loss or "mse", optimizer,
                                    huber_delta=split.huber_delta or 1.0)
            else:
                job.top = TopWorker(top, "classification", "cross_entropy", optimizer)
        job.keys_hash = split_state.rows_hash([job.ids[r] for r in job.rows])
        job.ids, job.labels = [], None  # keys and labels are not needed past this point

    def _bottom(self, job: _Job, optimizer: dict) -> BottomWorker:
        """This part's bottom model (its plan's width checked), with its activation clipping and noise."""
        split = job.split
        part = split.parts[job.index]
        model = self._build(part.architecture, lambda arch: build_bottom(
            arch or {"kind": "mlp", "hidden": part.hidden, "out": part.out}, part.input_width,
            split.seed + job.index, root=self.base_dir.resolve()))
        if part.architecture is not None:  # the plan's cut width (learned at compile time)
            with torch.no_grad():
                model.eval()
                try:
                    shape = list(model(torch.zeros(2, part.input_width)).shape)
                except Exception as err:  # noqa: BLE001 - user code
                    raise SplitError(f"model {part.architecture.entrypoint}: forward failed: {type(err).__name__}") from None
                model.train()
            if shape != [2, part.out]:
                raise SplitError(f"model {part.architecture.entrypoint} gives {shape[1:]}-wide activations here, "
                                 f"the plan says {part.out}")
        # the noise comes from a secret seed (BottomWorker's default): one from the plan would let
        # the label owner regenerate it and subtract it from the activations
        return BottomWorker(model, optimizer, noise=split.noise or 0.0, clip=split.clip)

    @staticmethod
    def _build(arch: PlanArchitecture | None, build: Any) -> torch.nn.Module:
        """`build(None)` for the built-in mlp, else `build({kind: custom, entrypoint, args})`; a failing
        factory (user code) is one line."""
        if arch is None:
            return build(None)
        try:
            return build({"kind": "custom", "entrypoint": arch.entrypoint, "args": arch.args})
        except Exception as err:  # noqa: BLE001 - user code: the job fails in one line
            line = (f"{type(err).__name__}: {err}".splitlines() or [""])[0][:300]
            raise SplitError(f"cannot build model {arch.entrypoint}: {line}") from None

    # -- training ----------------------------------------------------------------------------
    def _forward(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        assert job.bottom is not None
        acts = job.bottom.forward(job.x[job.batch(ins.epoch, ins.batch)])
        if not bool(torch.isfinite(acts).all()):
            raise _diverged(job, f"the activations of {self.domain}", ins)
        self._judge(job, ins, {self.domain: acts}, {})  # (its own round policies, before they leave)
        return [(wire.SplitRes(job=job.split.name, step="acts", epoch=ins.epoch, batch=ins.batch), {"acts": acts})]

    def _acts(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors, n: int, own: torch.Tensor
              ) -> list[torch.Tensor]:
        """Every part's activations in part order: this domain's own and the relayed ones, shapes checked."""
        out = []
        for p in job.split.parts:
            if p.domain == self.domain:
                out.append(own)
                continue
            a = tensors.get(p.domain) if p.domain in ins.parts else None
            if a is None or a.dtype != torch.float32 or list(a.shape) != [n, p.out]:
                raise SplitError(f"activations of {p.domain} missing or not [{n}, {p.out}] float32")
            out.append(a)
        for p, a in zip(job.split.parts, out):
            if not bool(torch.isfinite(a).all()):
                raise _diverged(job, f"the activations of {p.domain}", ins)
        return out

    def _top(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        assert job.bottom is not None and job.top is not None and job.y is not None
        idx = job.batch(ins.epoch, ins.batch)
        own = job.bottom.forward(job.x[idx])
        acts = self._acts(job, ins, tensors, len(idx), own)
        received = {p.domain: a for p, a in zip(job.split.parts, acts) if p.domain != self.domain}
        self._judge(job, ins, received, {})
        loss, grads = job.top.step(acts, job.y[idx])
        if not math.isfinite(loss):
            raise _diverged(job, f"the loss at {self.domain}", ins)
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            raise _diverged(job, f"the gradients at {self.domain}", ins)
        mine = job.index
        job.bottom.backward(grads[mine])
        out = {p.domain: g for i, (p, g) in enumerate(zip(job.split.parts, grads)) if i != mine}
        self._judge(job, ins, received, out)
        return [(wire.SplitRes(job=job.split.name, step="grads", epoch=ins.epoch, batch=ins.batch, loss=loss,
                               examples=len(idx)), out)]

    def _backward(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        assert job.bottom is not None
        grad = tensors.get("grad")
        if grad is None or grad.dtype != torch.float32:
            raise SplitError("a backward step without a float32 `grad` tensor")
        if not bool(torch.isfinite(grad).all()):
            raise _diverged(job, f"the gradients for {self.domain}", ins)
        self._judge(job, ins, {}, {self.domain: grad})  # (before it is applied)
        job.bottom.backward(grad)
        return []

    def _eval(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        assert job.bottom is not None
        acts = job.bottom.forward(job.x[job.test], train=False)
        self._judge(job, ins, {self.domain: acts}, {}, holdout=True)
        return [(wire.SplitRes(job=job.split.name, step="eval_acts", epoch=ins.epoch), {"acts": acts})]

    def _eval_top(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        assert job.bottom is not None and job.top is not None and job.y is not None
        own = job.bottom.forward(job.x[job.test], train=False)
        acts = self._acts(job, ins, tensors, len(job.test), own)
        self._judge(job, ins, {p.domain: a for p, a in zip(job.split.parts, acts) if p.domain != self.domain}, {},
                    holdout=True)
        out = job.top.predict(acts)
        return self._metrics(job, ins, out)

    def _judge(self, job: _Job, ins: wire.SplitIns, acts: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
               *, holdout: bool = False) -> None:
        """This domain's round policies (the global and its own local ones that judge split jobs) on what it is
        about to send or apply: a warn goes to its log, a deny raises SplitDenied (the job fails)."""
        gate = self.gates.get(job.split.name)
        if gate is None:
            gate = self.gates[job.split.name] = SplitRoundGate(self.plan, job.split, self.domain)
        if not gate:
            return
        for d, line in gate.decide(ins.epoch + 1, 0 if holdout else ins.batch + 1, acts, grads):
            if d.effect == "deny":
                raise SplitDenied(d.policy, ins.epoch + 1, line)
            print(f"warning: split job {job.split.name}: {line}", flush=True)

    def _metrics(self, job: _Job, ins: wire.SplitIns, out: torch.Tensor) -> list:
        """The holdout's metrics of the top model's output `out` (here, or the coordinator's logits)."""
        assert job.y is not None
        y = job.y[job.test]
        if job.split.task == "regression":  # the federated models' metric code (exact sums, then finish)
            stats = eval_stats("regression", out, y, classes=None, loss=job.split.loss or "mse",
                               huber_delta=job.split.huber_delta or 1.0)
            metrics = finish("regression", [m for m in job.split.metrics if m in TASK_METRICS["regression"]],
                             [stats]) if len(y) else {}
        else:
            metrics = {"loss": float(torch.nn.functional.cross_entropy(out, y)),
                       "accuracy": float((out.argmax(dim=1) == y).float().mean())} if len(y) else {}
        metrics = {m: v for m, v in metrics.items() if m in job.split.metrics and math.isfinite(v)}
        return [(wire.SplitRes(job=job.split.name, step="metrics", epoch=ins.epoch, examples=len(y),
                               metrics=metrics), None)]

    def _loss(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        """The top model runs at the coordinator: the loss of its logits for this batch, and d loss / d logits."""
        assert job.loss is not None and job.y is not None
        idx = job.batch(ins.epoch, ins.batch)
        logits = self._logits(job, tensors, len(idx))
        loss, grad = job.loss.grad(logits, job.y[idx])
        if not math.isfinite(loss) or not bool(torch.isfinite(grad).all()):
            raise _diverged(job, f"the loss at {self.domain}", ins)
        return [(wire.SplitRes(job=job.split.name, step="logit_grads", epoch=ins.epoch, batch=ins.batch, loss=loss,
                               examples=len(idx)), {"grad": grad})]

    def _eval_loss(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        return self._metrics(job, ins, self._logits(job, tensors, len(job.test)))

    @staticmethod
    def _logits(job: _Job, tensors: wire.Tensors, n: int) -> torch.Tensor:
        width = len(job.split.classes) or 1
        logits = tensors.get("logits")
        if logits is None or logits.dtype != torch.float32 or list(logits.shape) != [n, width] \
                or not bool(torch.isfinite(logits).all()):
            raise SplitError(f"logits from the coordinator missing, non-finite or not [{n}, {width}] float32")
        return logits

    def _finish(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        if job.bottom is not None:  # (a label-only part has none)
            self._save(job)
        top = None
        if job.top is not None:
            top = {k: v.detach().contiguous() for k, v in job.top.model.state_dict().items()}
        del self.jobs[job.split.name]
        return [(wire.SplitRes(job=job.split.name, step="saved"), top)]

    # -- resume (domain/split_state.py) ---------------------------------------------------------
    def _keep(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        """Keep this domain's state after epoch `ins.epoch + 1` (its file is written before the reply, so the
        coordinator records the epoch only once every part has kept it)."""
        if not job.rows:
            raise SplitError("keep before the intersection")
        out: dict[str, torch.Tensor] = {"rng": torch.get_rng_state()}
        meta = {"job": job.split.name, "plan_hash": self.plan.plan.hash, "domain": self.domain,
                "rows": str(len(job.rows)), "keys": job.keys_hash, "standardize": split_state.dumps(job.norm)}
        if job.bottom is not None:  # (a label-only part has none: it keeps its rows' hash)
            state, rest = split_state.optimizer_state(job.bottom.opt)
            out.update({f"bottom/{k}": v for k, v in job.bottom.model.state_dict().items()})
            out.update({f"bottom_opt/{k}": v for k, v in state.items()})
            meta["bottom_opt"] = split_state.dumps(rest)
        if job.top is not None:
            state, rest = split_state.optimizer_state(job.top.opt)
            out.update({f"top/{k}": v for k, v in job.top.model.state_dict().items()})
            out.update({f"top_opt/{k}": v for k, v in state.items()})
            meta["top_opt"] = split_state.dumps(rest)
        directory = split_state.job_dir(self.base_dir, self.run, self.domain, job.split.name)
        try:
            split_state.save(directory, ins.epoch + 1, out, meta)
        except OSError as err:
            raise SplitError(f"cannot keep the state of epoch {ins.epoch + 1}: {err.strerror or err}") from None
        return [(wire.SplitRes(job=job.split.name, step="kept", epoch=ins.epoch), None)]

    def _restore(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        """A resumed job: take up this domain's state after epoch `ins.epoch + 1`, once the intersection is
        computed again. A state missing, damaged, of another plan or job, or of other rows refuses (one line)."""
        if not job.rows:
            raise SplitError("restore before the intersection")
        epoch = ins.epoch + 1
        directory = split_state.job_dir(self.base_dir, self.run, self.domain, job.split.name)
        try:
            kept, meta = split_state.load(directory, epoch)
            if meta.get("job") != job.split.name or meta.get("plan_hash") != self.plan.plan.hash:
                raise ValueError(f"the state of epoch {epoch} is of another plan or job")
            if meta.get("keys") != job.keys_hash or meta.get("rows") != str(len(job.rows)):
                raise ValueError(f"the intersection is not the one of epoch {epoch} ({meta.get('rows')} rows then, "
                                 f"{len(job.rows)} now)")
            if meta.get("standardize") != split_state.dumps(job.norm):
                raise ValueError(f"the data changed since epoch {epoch} (its standardization differs)")
            if job.bottom is not None:  # (a label-only part has none)
                job.bottom.model.load_state_dict(split_state.prefixed(kept, "bottom/"))
                split_state.load_optimizer(job.bottom.opt, split_state.prefixed(kept, "bottom_opt/"),
                                           json.loads(meta.get("bottom_opt", "{}")))
            if job.top is not None:
                job.top.model.load_state_dict(split_state.prefixed(kept, "top/"))
                split_state.load_optimizer(job.top.opt, split_state.prefixed(kept, "top_opt/"),
                                           json.loads(meta.get("top_opt", "{}")))
            torch.set_rng_state(kept["rng"])
        except (ValueError, KeyError, RuntimeError, TypeError) as err:
            line = (str(err).splitlines() or [type(err).__name__])[0][:300]
            print(f"split job {job.split.name}: cannot resume from {directory}: {line}", flush=True)  # its own log
            raise SplitResumeRefused(f"cannot resume after epoch {epoch}: {line}") from None
        return [(wire.SplitRes(job=job.split.name, step="restored", epoch=ins.epoch), None)]

    def _save(self, job: _Job) -> None:
        """The bottom model (and this part's standardization) into the domain's own directory, atomically."""
        from safetensors.torch import save_file

        assert job.bottom is not None
        path = bottom_path(self.base_dir, self.run, self.domain, job.split.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        part = job.split.parts[job.index]
        meta = {"job": job.split.name, "product": part.product, "contract": part.contract,
                "features": ",".join(part.features), "plan_hash": self.plan.plan.hash}
        if job.norm is not None:
            meta["standardize"] = json.dumps({"mean": job.norm[0], "std": job.norm[1]})
        if part.architecture is not None and part.architecture.code is not None:  # which code the weights fit
            meta["entrypoint"] = part.architecture.entrypoint or ""
            meta["code_hash"] = part.architecture.code.hash
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().contiguous() for k, v in job.bottom.model.state_dict().items()}, str(tmp),
                  metadata=meta)
        tmp.replace(path)


def bottom_path(base_dir: Path, run: str, domain: str, job: str) -> Path:
    """Where a domain keeps its final bottom model of split job `job`: it never leaves the domain."""
    return Path(base_dir) / ".meshctl" / "split" / (run or "no-run") / domain / f"{job}.safetensors"
