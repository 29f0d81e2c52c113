"""Split learning: bottom models in the domains, a top model at the label owner.

Per batch, each domain runs its bottom model on its aligned rows and sends the
activations (`BottomWorker.forward`); the top model concatenates them in party order,
computes the loss and returns one gradient per part (`TopWorker.step`); each domain
applies its gradient and steps its own optimizer (`BottomWorker.backward`). With the top
model at the coordinator (`top.at: coordinator`) `TopWorker.step` is cut in two around the
loss: `TopWorker.forward` (logits), `LossWorker.grad` at the label owner (d loss / d logits),
`TopWorker.backward` (the parts' gradients); the result is the same. Only
activations and gradients cross. Every party draws the same batches from the same seed
(`batch_order`).

With no noise and no clipping this is exactly the centralised network (`SplitNet`: the
bottoms concatenated into the top, one optimizer over all parameters): the optimizers
here are per-parameter (SGD with momentum, Adam), so one optimizer per part steps each
parameter as the single one would. `train_centralised` is that reference;
`train_split_in_process` runs the split protocol without a network.

API CHANGE: `BottomWorker(..., seed=None)` is the default now (was 0): None draws the noise
from a secret seed; a seed from the plan is public and lets the top subtract the noise.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from meshctl.runtime.kernels.metrics import loss_function, prediction
from meshctl.runtime.kernels.models import load_factory, mlp
from meshctl.runtime.kernels.train import _optimizer, _task_of


def build_bottom(arch: dict, n_in: int, seed: int, root: str | Path | None = None) -> nn.Module:
    """A domain's bottom model: `{"kind": "mlp", "hidden": [..], "out": k}`, `{"kind": "linear", "out": k}`
    or `{"kind": "custom", "entrypoint": "pkg.mod:factory", "args": {..}}`, called as
    `factory([n_in], None, **args)` with `root` first on sys.path (the caller checks its code first:
    compiler.entrypoint.check_code).

    PyTorch default init after `torch.manual_seed(seed)` (kernels.models.mlp).
    """
    kind = arch.get("kind", "mlp")
    if kind == "custom":
        return _custom(arch, [n_in], None, seed, root)
    if kind not in ("mlp", "linear"):
        raise ValueError(f"unknown bottom model kind {kind!r} (mlp, linear or custom)")
    hidden = list(arch.get("hidden") or []) if kind == "mlp" else []
    return mlp(n_in, hidden, int(arch["out"]), seed=seed)


def build_top(arch: dict, n_in: int, n_out: int, seed: int, root: str | Path | None = None) -> nn.Module:
    """The top model over the concatenated activations: `{"kind": "mlp", "hidden": [..]}`, `{"kind": "linear"}`
    or `{"kind": "custom", "entrypoint", "args"}` (called as `factory([n_in], n_out, **args)`)."""
    kind = arch.get("kind", "mlp")
    if kind == "custom":
        return _custom(arch, [n_in], n_out, seed, root)
    if kind not in ("mlp", "linear"):
        raise ValueError(f"unknown top model kind {kind!r} (mlp, linear or custom)")
    hidden = list(arch.get("hidden") or []) if kind == "mlp" else []
    return mlp(n_in, hidden, n_out, seed=seed)


def _custom(arch: dict, shape: list[int], n_out: int | None, seed: int, root: str | Path | None) -> nn.Module:
    """An entrypoint factory's module after `torch.manual_seed(seed)`; `args` a dict or canonical JSON."""
    args = arch.get("args") or {}
    if isinstance(args, str):
        args = json.loads(args)
    factory = load_factory(str(arch["entrypoint"]), str(root) if root is not None else None)
    torch.manual_seed(seed)
    model = factory(shape, n_out, **args)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{arch['entrypoint']} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _opt(model: nn.Module, optimizer: dict) -> Any:
    """kernels.train's optimizer for a `{"name", "lr", "momentum", "weight_decay"}` dict."""
    return _optimizer(model, optimizer.get("name", "sgd"), float(optimizer.get("lr", 0.05)),
                      float(optimizer.get("momentum", 0.0)), float(optimizer.get("weight_decay", 0.0)))


def clip_rows(h: Tensor, clip: float | None) -> Tensor:
    """Each row of `h` scaled down to L2 norm at most `clip` (differentiable; identity without clip)."""
    if clip is None:
        return h
    norms = h.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (clip / norms).clamp(max=1.0)
    return h * scale.view(-1, *([1] * (h.dim() - 1)))


class BottomWorker:
    """One domain's bottom model, its optimizer and its activation noise.

    `seed` seeds the noise generator. Leave it None in a run: the noise is then drawn from
    a secret seed (os.urandom). A seed anyone else knows (one from the plan) lets the top
    model's owner regenerate the noise and subtract it; an int is for tests and benchmarks.
    """

    def __init__(self, model: nn.Module, optimizer: dict, noise: float = 0.0,
                 clip: float | None = None, seed: int | None = None):
        if noise < 0 or not math.isfinite(noise):
            raise ValueError(f"activation noise must be a finite sigma >= 0, not {noise}")
        if clip is not None and not clip > 0:
            raise ValueError(f"activation clip must be > 0, not {clip}")
        self.model = model
        self.opt = _opt(model, optimizer)
        self.noise = float(noise)
        self.clip = clip
        secret = int.from_bytes(os.urandom(8), "little") >> 1
        self.gen = torch.Generator().manual_seed(secret if seed is None else seed)
        self._out: Tensor | None = None

    def forward(self, x: Tensor, train: bool = True) -> Tensor:
        """Activations to send (detached): bottom(x), rows clipped to `clip`, plus N(0, noise²).

        With `train`, the graph is kept for the next `backward`; otherwise eval mode, no graph.
        """
        if not train:
            self.model.eval()
            with torch.no_grad():
                return self._noised(clip_rows(self.model(x), self.clip))
        self.model.train()
        self.opt.zero_grad()
        self._out = clip_rows(self.model(x), self.clip)
        return self._noised(self._out.detach())

    def _noised(self, h: Tensor) -> Tensor:
        if self.noise <= 0:
            return h.detach().clone()
        return h.detach() + torch.randn(h.shape, generator=self.gen, dtype=h.dtype) * self.noise

    def backward(self, grad: Tensor) -> None:
        """Apply the top's gradient for the last `forward(train=True)` and step the optimizer."""
        if self._out is None:
            raise RuntimeError("backward without a training forward")
        if grad.shape != self._out.shape:
            raise ValueError(f"gradient of shape {list(grad.shape)} for activations of shape {list(self._out.shape)}")
        if not bool(torch.isfinite(grad).all()):
            raise ValueError("gradient holds a non-finite value")
        self._out.backward(grad.to(self._out.dtype))
        self._out = None
        self.opt.step()


class TopWorker:
    """The top model at the label owner: the loss, its step, one gradient per part."""

    def __init__(self, model: nn.Module, task: str | None, loss: str, optimizer: dict, huber_delta: float = 1.0):
        self.model = model
        self.task = task or _task_of(loss)
        self.loss_fn: Callable[..., Tensor] = loss_function(loss, huber_delta=huber_delta)
        self.opt = _opt(model, optimizer)
        self._leaves: list[Tensor] = []
        self._logits: Tensor | None = None
        """`forward`'s graph (the coordinator's top model), until `backward`."""

    def step(self, acts: list[Tensor], y: Tensor) -> tuple[float, list[Tensor]]:
        """(the batch's mean loss, the gradient for each part's activations, in `acts` order)."""
        for i, a in enumerate(acts):
            if a.dim() != 2 or len(a) != len(y) or not bool(torch.isfinite(a).all()):
                raise ValueError(f"activations of part {i}: shape {list(a.shape)} for {len(y)} rows, or non-finite")
        leaves = [a.detach().requires_grad_(True) for a in acts]
        self.model.train()
        self.opt.zero_grad()
        loss = self.loss_fn(prediction(self.task, self.model(torch.cat(leaves, dim=1))), y)
        loss.backward()
        self.opt.step()
        return loss.item(), [a.grad for a in leaves]  # type: ignore[misc]

    @torch.no_grad()
    def predict(self, acts: list[Tensor]) -> Tensor:
        """The top model's output on the concatenated activations (eval mode)."""
        self.model.eval()
        return self.model(torch.cat(acts, dim=1))

    def forward(self, acts: list[Tensor]) -> Tensor:
        """The top model at the coordinator (`top.at: coordinator`), first half of `step`: the logits of
        the concatenated activations (detached, to send to the label owner); the graph waits for `backward`."""
        for i, a in enumerate(acts):
            if a.dim() != 2 or len(a) != len(acts[0]) or not bool(torch.isfinite(a).all()):
                raise ValueError(f"activations of part {i}: shape {list(a.shape)}, or non-finite")
        self._leaves = [a.detach().requires_grad_(True) for a in acts]
        self.model.train()
        self.opt.zero_grad()
        self._logits = self.model(torch.cat(self._leaves, dim=1))
        return self._logits.detach().clone()

    def backward(self, grad: Tensor) -> list[Tensor]:
        """The second half: the label owner's d loss / d logits through the top model; steps it and
        returns the gradient of each part's activations (in `forward`'s order). As `step` on the same batch."""
        logits = self._logits
        if logits is None:
            raise RuntimeError("backward without a forward")
        if grad.shape != logits.shape or grad.dtype != logits.dtype or not bool(torch.isfinite(grad).all()):
            raise ValueError(f"a logits gradient of shape {list(grad.shape)} {grad.dtype} for logits "
                             f"{list(logits.shape)} {logits.dtype}, or non-finite")
        logits.backward(grad)
        self._logits = None
        self.opt.step()
        return [a.grad for a in self._leaves]  # type: ignore[misc]


class LossWorker:
    """The label owner's half when the coordinator runs the top model: the loss of the logits it is
    sent and d loss / d logits, returned to the coordinator. That gradient reveals the labels to
    whoever holds the logits (cross entropy's is (softmax - onehot) / batch: negative only at each
    row's class), which the compiler warns about (MESH580)."""

    def __init__(self, task: str | None, loss: str, huber_delta: float = 1.0):
        self.task = task or _task_of(loss)
        self.loss_fn: Callable[..., Tensor] = loss_function(loss, huber_delta=huber_delta)

    def grad(self, logits: Tensor, y: Tensor) -> tuple[float, Tensor]:
        """(the batch's mean loss, d loss / d logits)."""
        if logits.dim() != 2 or len(logits) != len(y) or not bool(torch.isfinite(logits).all()):
            raise ValueError(f"logits of shape {list(logits.shape)} for {len(y)} rows, or non-finite")
        leaf = logits.detach().requires_grad_(True)
        loss = self.loss_fn(prediction(self.task, leaf), y)
        loss.backward()
        return loss.item(), leaf.grad  # type: ignore[return-value]


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Epoch `epoch`'s batches of row positions: `randperm(n)` from `seed + epoch`, last partial batch kept
    (the order kernels.train.train_local draws). Every party computes the same list."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [perm[s:s + batch_size] for s in range(0, n, batch_size)]


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, holdout) positions of the agreed row order: `randperm(n)` from `seed`, its first
    `round(fraction * n)` (at least 1, at most n - 1) held out; both in that permutation's order.
    Every party computes the same."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = min(max(1, round(n * fraction)), n - 1) if n > 1 else 0
    return perm[k:], perm[:k]


class SplitNet(nn.Module):
    """The centralised network: the bottoms on their column blocks, concatenated into the top."""

    def __init__(self, bottoms: Sequence[nn.Module], top: nn.Module, clip: float | None = None):
        super().__init__()
        self.bottoms = nn.ModuleList(bottoms)
        self.top = top
        self.clip = clip

    def forward(self, parts: Sequence[Tensor]) -> Tensor:
        return self.top(torch.cat([clip_rows(b(x), self.clip) for b, x in zip(self.bottoms, parts)], dim=1))


def train_centralised(bottoms: Sequence[nn.Module], top: nn.Module, parts: list[Tensor], y: Tensor, *,
                      epochs: int = 1, batch_size: int = 32, optimizer: dict | None = None,
                      loss: str = "cross_entropy", task: str | None = None, seed: int = 0,
                      clip: float | None = None) -> list[float]:
    """The reference: `SplitNet(bottoms, top)` trained on the joined rows, one optimizer over all
    parameters, the batches of `batch_order`. Trains the modules in place; returns each epoch's mean loss."""
    net = SplitNet(bottoms, top, clip)
    opt = _opt(net, optimizer or {})
    loss_fn = loss_function(loss)
    task = task or _task_of(loss)
    net.train()
    losses = []
    for e in range(epochs):
        total = 0.0
        for b in batch_order(len(y), batch_size, seed, e):
            opt.zero_grad()
            batch_loss = loss_fn(prediction(task, net([x[b] for x in parts])), y[b])
            batch_loss.backward()
            opt.step()
            total += batch_loss.item() * len(b)
        losses.append(total / max(len(y), 1))
    return losses


def train_split_in_process(bottoms: Sequence[BottomWorker], top: TopWorker, parts: list[Tensor], y: Tensor, *,
                           epochs: int = 1, batch_size: int = 32, seed: int = 0,
                           on_batch: Callable[[list[Tensor], list[Tensor]], Any] | None = None) -> list[float]:
    """The split protocol without a network: per batch, every bottom's forward, the top's step, every
    bottom's backward. `on_batch(acts, grads)` sees what would cross (the benchmark counts its bytes).
    Returns each epoch's mean loss."""
    if len(bottoms) != len(parts):
        raise ValueError(f"{len(bottoms)} bottom workers for {len(parts)} parts")
    losses = []
    for e in range(epochs):
        total = 0.0
        for b in batch_order(len(y), batch_size, seed, e):
            acts = [w.forward(x[b]) for w, x in zip(bottoms, parts)]
            batch_loss, grads = top.step(acts, y[b])
            if on_batch is not None:
                on_batch(acts, grads)
            for w, g in zip(bottoms, grads):
                w.backward(g)
            total += batch_loss * len(b)
        losses.append(total / max(len(y), 1))
    return losses


def predict_split(bottoms: Sequence[BottomWorker], top: TopWorker, parts: list[Tensor]) -> Tensor:
    """The split model's output on aligned rows. The declared noise is drawn here too: it covers
    every activation that crosses, evaluation included."""
    return top.predict([w.forward(x, train=False) for w, x in zip(bottoms, parts)])
