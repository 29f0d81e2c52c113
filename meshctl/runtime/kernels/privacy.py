"""Differentially private local training (DP-SGD) and its accountant.

DP-SGD (Abadi et al. 2016) with Poisson sampling: each step includes every example
with probability `q`, clips each example's gradient to L2 norm `clip`, sums, adds
Gaussian noise of standard deviation `sigma * clip`, divides by the expected batch
size `q * n` and steps. Per-example gradients of any module come from `torch.func`
(`vmap` over `grad` of a `functional_call`), so conv, embedding and layer-norm models
train privately as well as an MLP; a module whose output for one example depends on
the others in the batch (BatchNorm) has no per-example gradient and is refused, as
opacus refuses it. A stack of Linear layers and elementwise activations (the built-in
MLP) takes a shortcut with the same result: its per-example weight gradient is `g aᵀ`,
whose norm is `|g| |a|` (g: gradient at the layer's output, a: its input), so the
per-example gradients are never materialised.

The accountant is Rényi DP of the Poisson-subsampled Gaussian mechanism (Mironov,
Talwar and Zhang 2019; integer orders, exact), composed over steps and converted
to (ε, δ) with the bound of Balle et al. 2020, as opacus does; the tests check it
against opacus' own accountant.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

ORDERS: tuple[int, ...] = (*range(2, 65), 80, 96, 128, 160, 192, 256)


def _log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def rdp(q: float, sigma: float, order: int) -> float:
    """Rényi DP of one step of the Poisson-subsampled Gaussian mechanism at an integer order."""
    if q <= 0:
        return 0.0
    if q >= 1:
        return order / (2 * sigma**2)
    log_a = -math.inf
    for k in range(order + 1):
        log_coef = math.lgamma(order + 1) - math.lgamma(k + 1) - math.lgamma(order - k + 1)
        term = log_coef + k * math.log(q) + (order - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
        log_a = _log_add(log_a, term)
    return log_a / (order - 1)


def epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """ε of `steps` compositions at `delta` (the best order wins)."""
    return composed_epsilon(q, [(sigma, steps)], delta)


def composed_epsilon(q: float, parts: list[tuple[float, int]], delta: float) -> float:
    """ε at `delta` of composing, for each (sigma, steps) of `parts`, that many steps at that sigma."""
    parts = [(sigma, steps) for sigma, steps in parts if steps > 0]
    if not parts or q <= 0:
        return 0.0
    best = math.inf
    for a in ORDERS:
        r = sum(steps * rdp(q, sigma, a) for sigma, steps in parts)
        eps = r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return max(best, 0.0)


def noise_multiplier(q: float, steps: int, target_epsilon: float, delta: float,
                     done: tuple[float, int] = (0.0, 0)) -> float:
    """The smallest sigma (to 0.1 %) such that `steps` more steps at it, after the `done`
    (sigma, steps) already taken, stay within `target_epsilon`.

    Raises ValueError when even sigma = 1000 cannot meet it.
    """
    def eps(sigma: float) -> float:
        return composed_epsilon(q, [done, (sigma, steps)], delta)

    lo, hi = 0.05, 1000.0
    if eps(hi) > target_epsilon:
        raise ValueError(f"ε {target_epsilon:g} at δ {delta:g} is out of reach in {steps} more steps")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Expected steps in one pass over `n` examples (at least one)."""
    return max(1, round(n / batch_size))


class NotPrivate(ValueError):
    """A module DP-SGD cannot train: per-example gradients are undefined for one of its layers."""


NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
"""Layers that mix the examples of a batch (their per-example gradient is undefined)."""

_ELEMENTWISE: tuple[type[nn.Module], ...] = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.ELU,
                                            nn.SiLU, nn.Identity)
CHUNK = 256
"""Examples whose per-example gradients are materialised at once (bounds memory on big batches)."""


def check_private(model: nn.Module) -> None:
    """Raise NotPrivate, naming the layer, when DP-SGD cannot train `model`."""
    for name, m in model.named_modules():
        if isinstance(m, NORM_LAYERS):
            raise NotPrivate(f"layer {name or type(m).__name__!r} is {type(m).__name__}, which mixes the examples "
                             "of a batch: per-example gradients (DP-SGD) are undefined for it; use GroupNorm or "
                             "LayerNorm")


def loss_sum(loss: str, out: torch.Tensor, y: torch.Tensor, huber_delta: float = 1.0) -> torch.Tensor:
    """The summed loss `loss` (cross_entropy, bce, mse, mae, huber) of outputs `out` on targets `y`."""
    from meshctl.runtime.kernels.metrics import loss_function

    pred = out if loss == "cross_entropy" else out.reshape(y.shape)
    return loss_function(loss, huber_delta=huber_delta)(pred, y, reduction="sum")


def dp_train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    clip: float,
    sigma: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    prox_mu: float = 0.0,
    seed: int | None = None,
    loss: str = "cross_entropy",
    huber_delta: float = 1.0,
) -> float:
    """DP-SGD over `x, y` from the model's current weights; returns the mean loss of the sampled batches.

    `model` is any module whose forward `torch.func.vmap` can batch (no BatchNorm:
    NotPrivate). Sampling and
    noise come from one generator seeded with `seed`, which only tests should give:
    by default it is seeded from the operating system, because noise that someone
    can regenerate can be subtracted, and then there is no privacy. Weight decay and FedProx's
    proximal term depend on the weights only, so they are added after the noise at
    no privacy cost. Parameters with `requires_grad` off are left as they are.
    """
    check_private(model)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if prox_mu > 0 else None
    n = len(x)
    if n == 0:
        return 0.0
    q = min(1.0, batch_size / n)
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else seed)
    linears = _linear_stack(model)
    bufs = [torch.zeros_like(p) for p in params] if momentum else None
    losses, seen = 0.0, 0
    model.train()
    for _ in range(epochs * steps_per_epoch(n, batch_size)):
        idx = (torch.rand(n, generator=gen) < q).nonzero().squeeze(1)
        grads = _clipped_sum(model, linears, x[idx], y[idx], clip, loss, huber_delta) if len(idx) else \
            [torch.zeros_like(p) for p in params]
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                noisy = (g + torch.randn(g.shape, generator=gen) * (sigma * clip)) / (q * n)
                if weight_decay:
                    noisy = noisy + weight_decay * p
                if anchor is not None:
                    noisy = noisy + prox_mu * (p - anchor[i])
                if bufs is not None:
                    bufs[i].mul_(momentum).add_(noisy)
                    noisy = bufs[i]
                p.add_(noisy, alpha=-lr)
        if len(idx):
            with torch.no_grad():
                losses += float(loss_sum(loss, model(x[idx]), y[idx], huber_delta))
            seen += len(idx)
    return losses / max(seen, 1)


def _linear_stack(model: nn.Module) -> list[nn.Linear] | None:
    """The Linear layers of a Sequential of Linear layers and elementwise activations, all trainable;
    None for any other module (it takes the torch.func path)."""
    if not isinstance(model, nn.Sequential) or not all(isinstance(m, (nn.Linear, *_ELEMENTWISE)) for m in model):
        return None
    linears = [m for m in model if isinstance(m, nn.Linear)]
    if any(m.bias is None for m in linears) or not all(p.requires_grad for p in model.parameters()):
        return None
    return linears


def _clipped_sum(model: nn.Module, linears: list[nn.Linear] | None, xb: torch.Tensor, yb: torch.Tensor,
                 clip: float, loss: str = "cross_entropy", huber_delta: float = 1.0) -> list[torch.Tensor]:
    """Sum over the batch of each example's gradient clipped to L2 norm `clip`, per trainable parameter.

    `linears` (from `_linear_stack`) takes the Linear-stack shortcut; None, per-example gradients.
    """
    if linears is None:
        return _clipped_sum_func(model, xb, yb, clip, loss, huber_delta)
    inputs, outputs = [], []
    h = xb
    for m in model:
        if isinstance(m, nn.Linear):
            inputs.append(h.detach())
            h = m(h)
            outputs.append(h)
        else:
            h = m(h)
    g_out = torch.autograd.grad(loss_sum(loss, h, yb, huber_delta), outputs)
    sq = torch.zeros(len(xb), dtype=torch.float64)
    for a, g in zip(inputs, g_out):
        gn = g.double().pow(2).sum(1)
        sq += gn * a.double().pow(2).sum(1) + gn  # weight: |g|²|a|², bias: |g|²
    factor = (clip / (sq.sqrt() + 1e-6)).clamp(max=1.0).to(xb.dtype)
    by_layer = {}
    for m, a, g in zip(linears, inputs, g_out):
        gs = g * factor[:, None]
        by_layer[id(m.weight)] = gs.T @ a
        by_layer[id(m.bias)] = gs.sum(0)
    return [by_layer[id(p)] for p in model.parameters()]


def per_example_grads(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, loss: str = "cross_entropy",
                      huber_delta: float = 1.0) -> dict[str, torch.Tensor]:
    """Each example's gradient of its own loss, per trainable parameter name: [len(xb), *shape]."""
    from torch.func import functional_call, grad, vmap

    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def one(theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (theta, frozen, buffers), (x.unsqueeze(0),))
        return loss_sum(loss, out, y.unsqueeze(0), huber_delta)

    return vmap(grad(one), in_dims=(None, 0, 0), randomness="different")(params, xb, yb)


def _clipped_sum_func(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, clip: float,
                      loss: str, huber_delta: float = 1.0) -> list[torch.Tensor]:
    """`_clipped_sum` of any module, from per-example gradients, `CHUNK` examples at a time."""
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
    for s in range(0, len(xb), CHUNK):
        g = per_example_grads(model, xb[s:s + CHUNK], yb[s:s + CHUNK], loss, huber_delta)
        flat = [g[k].reshape(len(g[k]), -1) for k in names]
        sq = sum(f.double().pow(2).sum(1) for f in flat)
        factor = (clip / (sq.sqrt() + 1e-6)).clamp(max=1.0).to(xb.dtype)
        for t, f, k in zip(total, flat, names):
            t += (factor @ f).reshape(g[k].shape[1:])
    return total
