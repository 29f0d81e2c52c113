"""SCAFFOLD (Karimireddy et al. 2020): control variates that correct client drift.

Each domain i keeps a control variate c_i (zero at first); the server keeps c (zero at
first) and sends it with the global weights x. Local training takes K SGD steps of
`g + c - c_i` (train.py's `control=`). After them, option II of the paper's equation 4:

    c_i+ = c_i - c + (x - y_i) / (K lr)      delta c_i = c_i+ - c_i

The domain sends y_i and delta c_i. The server (sample S of N participants):

    x+ = x + server_lr (mean_S y_i - x)      c+ = c + |S|/N mean_S delta c_i

mean_S y_i is the example-weighted mean (so scaffold with c = 0 and server_lr 1 is
FedAvg's step); mean_S delta c_i is the plain mean of the paper and of fl4health's
`Scaffold` strategy. Every sum is taken in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshctl.runtime.kernels.fedavg import fedavg

Tensors = Sequence[torch.Tensor]


def client_control(c_i: Tensors, c: Tensors, x: Tensors, y: Tensors, steps: int,
                   lr: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(c_i+, delta c_i) after `steps` local SGD steps at `lr` took x to y (option II)."""
    if steps <= 0 or lr <= 0:
        raise ValueError("scaffold needs at least one local step at a positive learning rate")
    scale = 1.0 / (steps * lr)
    new = [(ci.to(torch.float64) - cc.to(torch.float64)
            + scale * (xx.to(torch.float64) - yy.to(torch.float64))).to(ci.dtype)
           for ci, cc, xx, yy in zip(c_i, c, x, y)]
    return new, [(n.to(torch.float64) - ci.to(torch.float64)).to(ci.dtype) for n, ci in zip(new, c_i)]


def server_step(x: Tensors, c: Tensors, updates: Sequence[Tensors], deltas: Sequence[Tensors],
                examples: Sequence[int], server_lr: float, population: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(x+, c+) from the round's updates y_i, their delta c_i and example counts; `population` is N,
    the participants the sample was drawn from (|S|/N scales c's step)."""
    if not updates or len(updates) != len(deltas):
        raise ValueError("scaffold needs one control variate change per update")
    mean = fedavg(updates, examples)
    share = len(updates) / max(population, len(updates))
    new_x = [(xx.to(torch.float64) + server_lr * (m.to(torch.float64) - xx.to(torch.float64))).to(xx.dtype)
             for xx, m in zip(x, mean)]
    new_c = []
    for k, cc in enumerate(c):
        acc = torch.zeros(cc.shape, dtype=torch.float64)
        for d in deltas:
            acc.add_(d[k].to(torch.float64))
        new_c.append((cc.to(torch.float64) + share * acc / len(deltas)).to(cc.dtype))
    return new_x, new_c
