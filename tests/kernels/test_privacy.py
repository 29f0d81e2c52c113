"""DP-SGD: the accountant against opacus' own, the noise calibration, and per-example clipping
against per-example gradients computed one by one."""

from __future__ import annotations

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from torch import nn

from meshctl.runtime.kernels import mlp
from meshctl.runtime.kernels.privacy import (
    ORDERS,
    _clipped_sum,
    dp_train_local,
    epsilon,
    noise_multiplier,
)


@pytest.mark.parametrize(("q", "sigma", "steps", "delta"), [
    (0.01, 1.1, 1000, 1e-5), (256 / 60000, 1.1, 60 * 234, 1e-5), (0.1, 0.8, 50, 1e-5),
    (1.0, 5.0, 20, 1e-5), (0.07, 2.0, 300, 1e-6), (0.5, 10.0, 3, 1e-3)])
def test_the_accountant_agrees_with_opacus(q, sigma, steps, delta):
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(ORDERS))
    theirs, _ = get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    assert epsilon(q, sigma, steps, delta) == pytest.approx(float(theirs), rel=1e-9)


def test_noise_multiplier_is_the_smallest_that_meets_the_target():
    q, steps, delta = 32 / 350, 220, 1e-5
    for target in (0.5, 2.0, 8.0):
        sigma = noise_multiplier(q, steps, target, delta)
        assert epsilon(q, sigma, steps, delta) <= target
        assert epsilon(q, sigma * 0.99, steps, delta) > target
    with pytest.raises(ValueError, match="out of reach"):
        noise_multiplier(1.0, 10_000, 1e-4, 1e-5)


def test_each_example_gradient_is_clipped_before_summing():
    model = mlp(5, [7, 4], 3, seed=2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 5, generator=g) * 3, torch.randint(0, 3, (9,), generator=g)
    clip = 0.5
    expect = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(x)):  # one example at a time, the slow and obvious way
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        grads = [p.grad.clone() for p in model.parameters()]
        norm = torch.sqrt(sum(gr.double().pow(2).sum() for gr in grads))
        for e, gr in zip(expect, grads):
            e += gr * min(1.0, clip / (float(norm) + 1e-6))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    got = _clipped_sum(model, linears, x, y, clip)
    for a, b in zip(got, expect):
        assert torch.allclose(a, b, atol=1e-5)


def test_without_noise_or_clipping_a_full_batch_step_is_gradient_descent():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=g), torch.randint(0, 2, (20,), generator=g)
    a, b = mlp(4, [6], 2, seed=3), mlp(4, [6], 2, seed=3)
    dp_train_local(a, x, y, epochs=1, batch_size=20, lr=0.1, clip=1e9, sigma=0.0)  # q = 1: one step, every row
    nn.functional.cross_entropy(b(x), y).backward()
    with torch.no_grad():
        for p in b.parameters():
            p -= 0.1 * p.grad
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_the_noise_is_fresh_unless_a_test_seeds_it():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 4, generator=g), torch.randint(0, 2, (50,), generator=g)

    def trained(seed):
        model = mlp(4, [6], 2, seed=3)
        dp_train_local(model, x, y, epochs=1, batch_size=10, lr=0.1, clip=1.0, sigma=1.0, seed=seed)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    assert torch.equal(trained(7), trained(7))
    assert not torch.equal(trained(None), trained(None))  # nobody can regenerate and subtract it


def test_after_steps_already_taken_the_rest_gets_what_epsilon_is_left():
    from meshctl.runtime.kernels.privacy import composed_epsilon

    q, delta, target = 0.1, 1e-5, 3.0
    planned = noise_multiplier(q, 100, target, delta)
    done = (planned, 60)  # 60 of the 100 steps were taken, then 50 more are needed (10 again)
    sigma = noise_multiplier(q, 50, target, delta, done=done)
    assert sigma > planned  # more steps in the same ε: more noise
    assert composed_epsilon(q, [done, (sigma, 50)], delta) <= target
    assert composed_epsilon(q, [done, (sigma * 0.99, 50)], delta) > target
    assert composed_epsilon(q, [(planned, 60), (planned, 40)], delta) == pytest.approx(epsilon(q, planned, 100, delta))
