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

import torch

from meshctl.compiler.entrypoint import check_code
from meshctl.compiler.plan import Plan, PlanArchitecture, PlanSplit
from meshctl.runtime import psi, wire
from meshctl.runtime.data import DataError, load_keyed
from meshctl.runtime.features import FeatureError, _finite
from meshctl.runtime.kernels.split import (
    BottomWorker,
    TopWorker,
    batch_order,
    build_bottom,
    build_top,
    holdout_split,
)

LEADER_STEPS = ("psi_answer", "psi_held", "top", "eval_top")
"""Steps only the label owner serves."""
MEMBER_STEPS = ("psi_reply", "forward", "backward", "eval")
"""Steps only the other parts serve."""


class SplitError(ValueError):
    """An instruction this domain cannot serve (one line, safe to send)."""


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
    labels: list[str] | None
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
    norm: tuple[list[float], list[float]] | None = None
    batches: dict[int, list[list[int]]] = field(default_factory=dict)

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

    def handle(self, ins: wire.SplitIns, tensors: wire.Tensors) -> list[tuple[wire.SplitRes, wire.Tensors | None]]:
        """The replies to one instruction (none for a backward step). Raises SplitError or DataError."""
        if ins.step == "psi_start":
            return [self._start(ins)]
        job = self.jobs.get(ins.job)
        if job is None:
            raise SplitError(f"split job {ins.job!r} has not started here")
        if ins.step in (LEADER_STEPS if not job.leader else MEMBER_STEPS):
            raise SplitError(f"step {ins.step} is not for the {'label owner' if job.leader else 'other parts'}")
        if ins.step == "psi_answer" and (ins.peer in job.answered or ins.peer not in job.split.participants
                                         or ins.peer == self.domain):
            raise SplitError(f"a second or unknown intersection request (from {ins.peer!r})")
        step = getattr(self, f"_{ins.step}")
        return step(job, ins, tensors)

    # -- private set intersection ---------------------------------------------------------
    def _start(self, ins: wire.SplitIns) -> tuple[wire.SplitRes, wire.Tensors | None]:
        split = next((s for s in self.plan.split_models if s.name == ins.job), None)
        if split is None or self.domain not in split.participants:
            raise SplitError(f"this domain takes no part in split job {ins.job!r}")
        index = split.participants.index(self.domain)
        part = split.parts[index]
        leader = self.domain == split.label_domain
        for arch in (part.architecture, split.top_architecture if leader else None):
            reason = check_code(arch, self.base_dir) if arch is not None else None
            if reason is not None:  # before any row is read: this host runs no code the plan did not pin
                raise SplitError(f"refused: {reason}")
        columns = [*part.features, *([split.label_column] if leader else [])]
        ids, values = load_keyed(self.plan.product(part.product), self.base_dir, part.key, columns)
        try:
            x = torch.tensor([[float(v) for v in values[f]] for f in part.features],
                             dtype=torch.float32).T.reshape(len(ids), -1)
        except (TypeError, ValueError):
            raise DataError(f"product {part.product}: a feature of split job {split.name} is not numeric") from None
        problems = []
        for j, name in enumerate(part.features):  # as federated jobs refuse them (data.py, features._finite)
            try:
                _finite(name, x[:, j].numpy())
            except FeatureError as err:
                problems.append(str(err))
        if problems:
            raise DataError(f"{part.product}: {'; '.join(problems)}",
                            hint="remove or impute them; a model cannot train on them")
        seen: dict[str, int] = {}
        for row, key in enumerate(ids):  # a join key must be unique (1-based data rows, as a user counts them)
            if key in seen:
                raise DataError(f"{part.product}: key column {part.key}: value at data row {row + 1} appears twice "
                                f"(first at data row {seen[key] + 1})")
            seen[key] = row
        labels = [str(v) for v in values[split.label_column]] if leader else None
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
        if split.standardize and job.train:
            x, mean, std = standardize(x, job.train)
            job.norm = (mean, std)
        job.x = x
        part = split.parts[job.index]
        optimizer = {"name": split.optimizer, "lr": split.lr}
        model = self._build(part.architecture, lambda arch: build_bottom(
            arch or {"kind": "mlp", "hidden": part.hidden, "out": part.out}, len(part.features),
            split.seed + job.index, root=self.base_dir.resolve()))
        if part.architecture is not None:  # the plan's cut width (learned at compile time)
            with torch.no_grad():
                model.eval()
                try:
                    shape = list(model(torch.zeros(2, len(part.features))).shape)
                except Exception as err:  # noqa: BLE001 - user code
                    raise SplitError(f"model {part.architecture.entrypoint}: forward failed: {type(err).__name__}") from None
                model.train()
            if shape != [2, part.out]:
                raise SplitError(f"model {part.architecture.entrypoint} gives {shape[1:]}-wide activations here, "
                                 f"the plan says {part.out}")
        # the noise comes from a secret seed (BottomWorker's default): one from the plan would let
        # the label owner regenerate it and subtract it from the activations
        job.bottom = BottomWorker(model, optimizer, noise=split.noise or 0.0, clip=split.clip)
        if job.leader:
            assert job.labels is not None
            index = {c: i for i, c in enumerate(split.classes)}
            unknown = sorted({job.labels[r] for r in job.rows} - set(index))
            if unknown:
                raise DataError(f"product {split.label_product}: label column {split.label_column} holds "
                                f"{len(unknown)} value{'s' if len(unknown) > 1 else ''} not declared in its values")
            job.y = torch.tensor([index[job.labels[r]] for r in job.rows], dtype=torch.int64)
            width = sum(p.out for p in split.parts)
            top = self._build(split.top_architecture, lambda arch: build_top(
                arch or {"kind": "mlp", "hidden": split.top_hidden}, width, len(split.classes),
                split.seed + len(split.parts), root=self.base_dir.resolve()))
            job.top = TopWorker(top, "classification", "cross_entropy", optimizer)
        job.ids, job.labels = [], None  # keys and labels are not needed past this point

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
        return out

    def _top(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        assert job.bottom is not None and job.top is not None and job.y is not None
        idx = job.batch(ins.epoch, ins.batch)
        own = job.bottom.forward(job.x[idx])
        acts = self._acts(job, ins, tensors, len(idx), own)
        loss, grads = job.top.step(acts, job.y[idx])
        if not math.isfinite(loss):
            raise SplitError(f"training diverged: the loss of epoch {ins.epoch + 1} batch {ins.batch + 1} is {loss}"
                             " (lower training.lr)")
        mine = job.index
        job.bottom.backward(grads[mine])
        out = {p.domain: g for i, (p, g) in enumerate(zip(job.split.parts, grads)) if i != mine}
        return [(wire.SplitRes(job=job.split.name, step="grads", epoch=ins.epoch, batch=ins.batch, loss=loss,
                               examples=len(idx)), out)]

    def _backward(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        assert job.bottom is not None
        grad = tensors.get("grad")
        if grad is None or grad.dtype != torch.float32:
            raise SplitError("a backward step without a float32 `grad` tensor")
        job.bottom.backward(grad)
        return []

    def _eval(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        assert job.bottom is not None
        acts = job.bottom.forward(job.x[job.test], train=False)
        return [(wire.SplitRes(job=job.split.name, step="eval_acts", epoch=ins.epoch), {"acts": acts})]

    def _eval_top(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        assert job.bottom is not None and job.top is not None and job.y is not None
        own = job.bottom.forward(job.x[job.test], train=False)
        out = job.top.predict(self._acts(job, ins, tensors, len(job.test), own))
        y = job.y[job.test]
        metrics = {"loss": float(torch.nn.functional.cross_entropy(out, y)),
                   "accuracy": float((out.argmax(dim=1) == y).float().mean())} if len(y) else {}
        metrics = {m: v for m, v in metrics.items() if m in job.split.metrics and math.isfinite(v)}
        return [(wire.SplitRes(job=job.split.name, step="metrics", epoch=ins.epoch, examples=len(y),
                               metrics=metrics), None)]

    def _finish(self, job: _Job, ins: wire.SplitIns, tensors: wire.Tensors) -> list:
        assert job.bottom is not None
        self._save(job)
        top = None
        if job.top is not None:
            top = {k: v.detach().contiguous() for k, v in job.top.model.state_dict().items()}
        del self.jobs[job.split.name]
        return [(wire.SplitRes(job=job.split.name, step="saved"), top)]

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
