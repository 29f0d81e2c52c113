"""Local training and evaluation: one domain's work in one round."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from meshctl.runtime.kernels.metrics import eval_stats, loss_function, prediction


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    optimizer: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    shuffle_seed: int = 0,
    prox_mu: float = 0.0,
    loss: str = "cross_entropy",
    huber_delta: float = 1.0,
    control: Sequence[torch.Tensor | None] | None = None,
) -> float:
    """Minibatch training from the model's current weights; returns the last epoch's mean loss.

    `loss` is cross_entropy (y: int64 class indices), bce (y: float 0/1, one logit out),
    mse, mae or huber (y: float values, one output).

    A fresh optimizer every call (no momentum carried across rounds). Epoch `e`
    shuffles with `torch.Generator().manual_seed(shuffle_seed + e)`; the last
    partial batch is kept. `prox_mu > 0` adds FedProx's proximal term
    `(mu/2)·||w - w0||²` (w0: the weights at the call) to every step's gradient as
    `mu·(w - w0)`; the returned loss is the data loss only. `control` (SCAFFOLD,
    kernels/scaffold.py), one tensor or None per parameter in `model.parameters()` order,
    is `c - c_i`, added to every step's gradient; a call takes `local_steps(n, epochs,
    batch_size)` steps.
    """
    anchor = [p.detach().clone() for p in model.parameters()] if prox_mu > 0 else None
    opt = _optimizer(model, optimizer, lr, momentum, weight_decay)
    loss_fn = loss_function(loss, huber_delta=huber_delta)
    task = _task_of(loss)
    model.train()
    n = len(x)
    mean = 0.0
    for e in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed + e))
        total = 0.0
        for s in range(0, n, batch_size):
            b = perm[s:s + batch_size]
            opt.zero_grad()
            batch_loss = loss_fn(prediction(task, model(x[b])), y[b])
            batch_loss.backward()
            if anchor is not None:
                with torch.no_grad():
                    for p, p0 in zip(model.parameters(), anchor):
                        p.grad.add_(p.detach() - p0, alpha=prox_mu)
            if control is not None:
                _controlled(model, control)
            opt.step()
            total += batch_loss.item() * len(b)
        mean = total / max(n, 1)
    return mean


def local_steps(n: int, epochs: int, batch_size: int) -> int:
    """Optimizer steps of one `train_local` or `train_stream` call over n rows (the last partial batch is one)."""
    return epochs * -(-n // batch_size)


@torch.no_grad()
def _controlled(model: nn.Module, control: Sequence[torch.Tensor | None]) -> None:
    """SCAFFOLD's correction: each parameter's gradient plus its `c - c_i`."""
    for p, corr in zip(model.parameters(), control):
        if corr is not None and p.grad is not None:
            p.grad.add_(corr)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, task: str = "classification",
             loss: str = "cross_entropy", classes: int | Sequence[object] | None = None,
             huber_delta: float = 1.0, auroc: bool = True) -> dict[str, list[float]]:
    """Sums over (x, y) that pool exactly across domains (meshctl.runtime.kernels.metrics.eval_stats;
    the score histograms only with `auroc`).

    `classes`: the class count or names (classification); by default the model's output width.
    """
    model.eval()
    out = model(x)
    if task == "classification" and classes is None:
        classes = out.shape[1]
    return eval_stats(task, out, y, classes=classes, loss=loss, huber_delta=huber_delta, auroc=auroc)


class _SGD:
    """SGD with momentum, the update rule of `torch.optim.SGD` (dampening 0, no Nesterov).

    Written out because `torch.optim` imports torch._dynamo (about 1.7 s and
    100 MB per process) on first use; a daemon should be ready in milliseconds.
    """

    def __init__(self, params: list[torch.Tensor], *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params = params
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.bufs: list[torch.Tensor] | None = None

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        if self.momentum:
            if self.bufs is None:
                self.bufs = [g.detach().clone() for g in grads]
            else:
                torch._foreach_mul_(self.bufs, self.momentum)
                torch._foreach_add_(self.bufs, grads)
            grads = self.bufs
        torch._foreach_add_(params, grads, alpha=-self.lr)


def train_stream(
    model: nn.Module,
    chunks: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    *,
    epochs: int = 1,
    batch_size: int = 32,
    buffer_rows: int = 65_536,
    optimizer: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    shuffle_seed: int = 0,
    prox_mu: float = 0.0,
    loss: str = "cross_entropy",
    huber_delta: float = 1.0,
    control: Sequence[torch.Tensor | None] | None = None,
) -> float:
    """`train_local` over data read in chunks (`chunks()` walks the data once per epoch).

    Rows are shuffled within a buffer of `buffer_rows`: epoch `e` draws each buffer's order
    from `torch.Generator().manual_seed(shuffle_seed + e)`, trains on its full batches and
    carries the rows left over (fewer than a batch) into the next buffer; the last partial
    batch is kept. Memory holds one buffer, never the data. With `buffer_rows` at least the
    number of rows this is `train_local` exactly (the same order, the same steps).
    """
    anchor = [p.detach().clone() for p in model.parameters()] if prox_mu > 0 else None
    opt = _optimizer(model, optimizer, lr, momentum, weight_decay)
    loss_fn = loss_function(loss, huber_delta=huber_delta)
    task = _task_of(loss)
    model.train()
    mean = 0.0
    for e in range(epochs):
        g = torch.Generator().manual_seed(shuffle_seed + e)
        total, n = 0.0, 0
        for xb, yb in _shuffled(chunks(), buffer_rows, batch_size, g):
            opt.zero_grad()
            batch_loss = loss_fn(prediction(task, model(xb)), yb)
            batch_loss.backward()
            if anchor is not None:
                with torch.no_grad():
                    for p, p0 in zip(model.parameters(), anchor):
                        p.grad.add_(p.detach() - p0, alpha=prox_mu)
            if control is not None:
                _controlled(model, control)
            opt.step()
            total += batch_loss.item() * len(yb)
            n += len(yb)
        mean = total / max(n, 1)
    return mean


def _shuffled(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], buffer_rows: int, batch_size: int,
              g: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Minibatches from `chunks`, shuffled within buffers of `buffer_rows` rows (see `train_stream`)."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    held = 0
    for x, y in chunks:
        xs.append(x)
        ys.append(y)
        held += len(y)
        if held < buffer_rows:
            continue
        x, y = torch.cat(xs), torch.cat(ys)
        perm = torch.randperm(len(y), generator=g)
        full = len(y) // batch_size * batch_size
        for s in range(0, full, batch_size):
            b = perm[s:s + batch_size]
            yield x[b], y[b]
        rest = perm[full:]
        xs, ys, held = [x[rest]], [y[rest]], len(rest)
    if held:
        x, y = torch.cat(xs), torch.cat(ys)
        perm = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), batch_size):
            b = perm[s:s + batch_size]
            yield x[b], y[b]


def evaluate_stream(model: nn.Module, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    **kwargs: object) -> dict[str, list[float]]:
    """`evaluate` over data read in chunks: the chunks' sums, added (they pool exactly)."""
    from meshctl.runtime.kernels.metrics import pool

    return pool([evaluate(model, x, y, **kwargs) for x, y in chunks])  # type: ignore[arg-type]


def _optimizer(model: nn.Module, optimizer: str, lr: float, momentum: float,
               weight_decay: float) -> torch.optim.Optimizer | _SGD:
    """A fresh optimizer for one call of local training (Adam, else meshctl's SGD)."""
    if optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    return _SGD(list(model.parameters()), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _task_of(loss: str) -> str:
    """The task a loss trains (how `prediction` shapes the model's output)."""
    return "classification" if loss == "cross_entropy" else "binary" if loss == "bce" else "regression"
