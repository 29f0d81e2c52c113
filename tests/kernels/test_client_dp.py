"""Client-level DP (DP-FedAvg): the accountant against opacus', the noise calibration, whole-update
clipping, the noise's standard deviation (server-side and split among domains), adaptive clipping."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from meshctl.runtime.kernels import client_dp
from meshctl.runtime.kernels.privacy import ORDERS


def _opacus(q: float, sigma: float, steps: int, delta: float) -> float:
    orders = [float(a) for a in ORDERS]
    eps, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                                              orders=orders), delta=delta)
    return float(eps)


@pytest.mark.parametrize(("epsilon", "rounds", "participants", "per_round"),
                         [(8.0, 20, 16, None), (1.0, 50, 10, None), (4.0, 100, 100, 10), (8.0, 20, 16, 4)])
def test_the_job_spends_its_epsilon_as_opacus_counts_it(epsilon, rounds, participants, per_round):
    noise = client_dp.plan_noise(epsilon, 1e-5, rounds, participants, per_round=per_round)
    assert noise.q == 1.0  # fixed-size sampling is not Poisson: no amplification claimed
    assert noise.expected == (per_round or participants)
    ours = noise.epsilon(rounds)
    assert ours == pytest.approx(_opacus(noise.q, noise.z, rounds, 1e-5), rel=0.01)
    assert epsilon * 0.99 <= ours <= epsilon  # calibrated: spends ε, never more
    assert noise.epsilon(rounds // 2) < ours  # and grows with the rounds


def test_adaptive_clipping_splits_the_noise_as_andrew_et_al():
    fixed = client_dp.plan_noise(8.0, 1e-5, 20, 16)
    adaptive = client_dp.plan_noise(8.0, 1e-5, 20, 16, adaptive=True)
    assert adaptive.z == pytest.approx(fixed.z)
    # Theorem 1: the two releases are one Gaussian mechanism of z = (z_Δ⁻² + (2σ_b)⁻²)^(-1/2)
    assert (adaptive.z_delta ** -2 + (2 * adaptive.sigma_bit) ** -2) ** -0.5 == pytest.approx(adaptive.z)
    assert adaptive.z_delta > fixed.z_delta and fixed.sigma_bit == 0


def test_an_unreachable_epsilon_is_a_value_error():
    with pytest.raises(ValueError, match="out of reach"):
        client_dp.plan_noise(1e-6, 1e-10, 10_000, 4)


def test_clipping_bounds_the_whole_update_and_keeps_a_small_one():
    big = [torch.full((3, 4), 1.0), torch.full((5,), 2.0)]  # norm sqrt(12 + 20)
    clipped, size = client_dp.clip(big, 1.5)
    assert size == pytest.approx(math.sqrt(32))
    assert client_dp.norm(clipped) == pytest.approx(1.5)
    assert torch.allclose(clipped[1] / clipped[0][0, 0], torch.full((5,), 2.0))  # direction kept
    small, _ = client_dp.clip([t / 100 for t in big], 1.5)
    assert all(torch.equal(a, b / 100) for a, b in zip(small, big))


def test_a_domain_sends_its_clipped_delta_and_bit():
    noise = client_dp.plan_noise(8.0, 1e-5, 20, 4, adaptive=True)
    base = [torch.zeros(10)]
    delta, bit, size = client_dp.domain_update(base, [torch.full((10,), 1.0)], 1.0, noise, domain_noise=False,
                                               gen=client_dp.generator(0))
    assert size == pytest.approx(math.sqrt(10)) and bit == -0.5 and client_dp.norm(delta) == pytest.approx(1.0)
    _, bit, _ = client_dp.domain_update(base, [torch.full((10,), 0.1)], 1.0, noise, domain_noise=False,
                                        gen=client_dp.generator(0))
    assert bit == 0.5


@pytest.mark.parametrize("where", ["server", "domain"])
def test_the_sum_carries_noise_of_std_z_delta_times_clip(where):
    """Server: the coordinator adds N(0, z_Δ² C²); domain: m shares of N(0, z_Δ² C² / m) sum to it."""
    m, bound = 8, 0.5
    noise = client_dp.plan_noise(2.0, 1e-5, 10, m, adaptive=True)
    gen = client_dp.generator(7)
    base = [torch.zeros(20_000)]
    local = [[torch.ones(20_000) * (1e-4 * (i + 1))] for i in range(m)]  # tiny: unclipped, known sum
    parts = [client_dp.domain_update(base, lo, bound, noise, domain_noise=where == "domain", gen=gen)
             for lo in local]
    total = [sum(p[0][0] for p in parts)]
    bits = sum(p[1] for p in parts)
    mean, unclipped, std = client_dp.noised_mean(total, bits, bound, noise,
                                                 noised_shares=m if where == "domain" else 0, gen=gen)
    exact = sum(1e-4 * (i + 1) for i in range(m)) / m
    err = mean[0] * m - exact * m  # the noise on the sum
    assert std == pytest.approx(noise.z_delta * bound)
    assert float(err.mean()) == pytest.approx(0.0, abs=4 * std / math.sqrt(20_000))
    assert float(err.std()) == pytest.approx(std, rel=0.03)
    assert abs(unclipped - 1.0) < 6 * noise.sigma_bit / m  # every update unclipped, up to the count's noise


def test_missing_domain_shares_are_topped_up_by_the_coordinator():
    m, bound = 10, 1.0
    noise = client_dp.plan_noise(4.0, 1e-5, 10, m)
    mean, _, std = client_dp.noised_mean([torch.zeros(50_000, dtype=torch.float64)], 0.0, bound, noise,
                                         noised_shares=4, gen=client_dp.generator(3))
    assert float((mean[0] * m).std()) == pytest.approx(std * math.sqrt(6 / 10), rel=0.03)


def test_adaptive_clipping_moves_toward_the_target_quantile():
    assert client_dp.next_clip(1.0, 0.5, 0.5, 0.2) == 1.0
    assert client_dp.next_clip(1.0, 1.0, 0.5, 0.2) == pytest.approx(math.exp(-0.1))  # all unclipped: shrink
    assert client_dp.next_clip(1.0, 0.0, 0.5, 0.2) == pytest.approx(math.exp(0.1))  # all clipped: grow
    # driven by noiseless bits, C converges to the median of the norms
    norms, bound = [0.1 * (i + 1) for i in range(9)], 5.0
    for _ in range(300):
        share = sum(n <= bound for n in norms) / len(norms)
        bound = client_dp.next_clip(bound, share, 0.5, 0.2)
    assert 0.4 <= bound <= 0.6
