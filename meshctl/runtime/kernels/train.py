"""Local training and evaluation: one domain's work in one round."""

from __future__ import annotations

import torch
from torch import nn


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
) -> float:
    """Minibatch training from the model's current weights; returns the last epoch's mean loss.

    A fresh optimizer every call (no momentum carried across rounds). Epoch `e`
    shuffles with `torch.Generator().manual_seed(shuffle_seed + e)`; the last
    partial batch is kept. `prox_mu > 0` adds FedProx's proximal term
    `(mu/2)·||w - w0||²` (w0: the weights at the call) to every step's gradient as
    `mu·(w - w0)`; the returned loss is the data loss only.
    """
    anchor = [p.detach().clone() for p in model.parameters()] if prox_mu > 0 else None
    if optimizer == "adam":
        opt: torch.optim.Optimizer | _SGD = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = _SGD(list(model.parameters()), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    n = len(x)
    mean = 0.0
    for e in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed + e))
        total = 0.0
        for s in range(0, n, batch_size):
            b = perm[s:s + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[b]), y[b])
            loss.backward()
            if anchor is not None:
                with torch.no_grad():
                    for p, p0 in zip(model.parameters(), anchor):
                        p.grad.add_(p.detach() - p0, alpha=prox_mu)
            opt.step()
            total += loss.item() * len(b)
        mean = total / max(n, 1)
    return mean


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
    """(sum of cross-entropy losses, correct predictions, examples) on (x, y).

    Sums, not means, so that results from several domains pool exactly.
    """
    if len(x) == 0:
        return 0.0, 0, 0
    model.eval()
    out = model(x)
    loss_sum = nn.functional.cross_entropy(out, y, reduction="sum").item()
    correct = int((out.argmax(1) == y).sum().item())
    return loss_sum, correct, len(y)


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
