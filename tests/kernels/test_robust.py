"""Robust aggregation and server optimizers, against hand computations; FedProx's proximal term."""

from __future__ import annotations

import pytest
import torch

from meshctl.runtime.kernels import mlp, train_local
from meshctl.runtime.kernels.robust import (
    ServerOptimizer,
    coordinate_median,
    krum,
    krum_scores,
    trimmed_mean,
)


def _u(*values: float) -> list[torch.Tensor]:
    return [torch.tensor(values, dtype=torch.float32)]


def test_coordinate_median_odd_and_even():
    assert coordinate_median([_u(1, 9), _u(5, 2), _u(100, 3)])[0].tolist() == [5, 3]
    assert coordinate_median([_u(1, 9), _u(5, 2), _u(100, 3), _u(7, -4)])[0].tolist() == [6, 2.5]


def test_trimmed_mean_drops_each_end_per_coordinate():
    ups = [_u(1, 50), _u(2, 40), _u(3, 30), _u(4, 20), _u(1000, -1000)]
    assert trimmed_mean(ups, 0.2)[0].tolist() == [3, 30]  # (2+3+4)/3, (20+30+40)/3
    assert trimmed_mean(ups, 0.0)[0].tolist() == pytest.approx([202, -172])
    with pytest.raises(ValueError):
        trimmed_mean(ups, 0.5)


def test_krum_picks_from_the_honest_cluster_and_needs_2f_plus_3():
    honest = [_u(1.0, 1.0), _u(1.1, 0.9), _u(0.9, 1.2), _u(1.05, 1.0)]
    ups = [*honest, _u(50.0, -50.0)]
    scores = krum_scores(ups, byzantine=1)
    # the score of update 0: its n - f - 2 = 2 nearest squared distances
    d = sorted(float(((ups[0][0] - o[0]) ** 2).sum()) for o in ups[1:])
    assert scores[0] == pytest.approx(d[0] + d[1])
    chosen, i = krum(ups, byzantine=1)
    assert i != 4 and chosen[0].tolist() == ups[i][0].tolist()
    with pytest.raises(ValueError, match="needs at least 5 updates, got 4"):
        krum(honest, byzantine=1)


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_server_optimizer_two_steps_by_hand(kind):
    opt = ServerOptimizer(kind, lr=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    w = [torch.tensor([1.0, -2.0])]
    w1 = opt.step(w, [torch.tensor([1.5, -2.0])])
    d = torch.tensor([0.5, 0.0], dtype=torch.float64)
    m = 0.1 * d
    v = 0.01 * d * d  # both rules, from v = 0
    expect = w[0].double() + 0.1 * m / (v.sqrt() + 1e-3)
    assert w1[0].tolist() == pytest.approx(expect.tolist(), rel=1e-6)
    w2 = opt.step(w1, [w1[0] + torch.tensor([0.0, 1.0])])
    d2 = torch.tensor([0.0, 1.0], dtype=torch.float64)
    m = 0.9 * m + 0.1 * d2
    v = 0.99 * v + 0.01 * d2 * d2 if kind == "fedadam" else v - 0.01 * d2 * d2 * torch.sign(v - d2 * d2)
    expect = w1[0].double() + 0.1 * m / (v.sqrt() + 1e-3)
    assert w2[0].tolist() == pytest.approx(expect.tolist(), rel=1e-6)


def test_fedprox_pulls_local_training_toward_the_global_weights():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g)
    start = mlp(8, [16], 3, seed=1)
    anchor = [p.detach().clone() for p in start.parameters()]

    def drift(mu: float | None) -> float:
        model = mlp(8, [16], 3, seed=1)
        kwargs = {} if mu is None else {"prox_mu": mu}
        train_local(model, x, y, epochs=5, lr=0.1, shuffle_seed=3, **kwargs)
        return sum(float((p.detach() - a).pow(2).sum()) for p, a in zip(model.parameters(), anchor))

    assert drift(0.0) == drift(None)  # mu = 0 is plain local training, bit for bit
    assert drift(1.0) < 0.8 * drift(0.0)
    assert drift(10.0) < drift(1.0)
