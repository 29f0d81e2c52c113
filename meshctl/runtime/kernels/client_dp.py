"""Client-level differential privacy: DP-FedAvg with fixed or adaptive clipping.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models") protects each domain's participation rather than each record: every domain
clips its whole update Δ = w_local - w_global to L2 norm C, the round's clipped
updates are summed, Gaussian noise N(0, z_Δ² C²) is added to the sum and the sum is
divided by the *expected* number of updates m (the paper's fixed-denominator estimator
with uniform weights: the sensitivity of the mean is then C / m whatever the others sent).

    mean Δ = (Σ_i clip(Δ_i, C) + N(0, z_Δ² C² I)) / m

The noise is added by the coordinator (`noise: server`), or split among the domains
(`noise: domain`): each adds N(0, z_Δ² C² / m), so the sum of m shares carries the
whole noise and secure aggregation hides each share's update (a round with k < m
updates gets the missing (m - k) / m of the variance from the coordinator).

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping") moves C toward the `target_quantile` γ of the update norms: each domain
also sends b_i - 1/2, b_i = [||Δ_i|| <= C] (sensitivity 1/2), the sum is noised with
N(0, σ_b²) and C <- C · exp(-η (b̄ - γ)), b̄ = (Σ (b_i - 1/2) + noise) / m + 1/2.
Both releases together are a Gaussian mechanism of noise multiplier
z = (z_Δ⁻² + (2 σ_b)⁻²)^(-1/2) (the paper's Theorem 1); the count takes `BIT_SHARE` of it.

The accountant is privacy.py's: RDP of the Gaussian mechanism of multiplier z at q = 1,
one step per round; z is the smallest that spends the job's ε over its rounds. Client
sampling claims no amplification: meshctl samples exactly `per_round` domains without
replacement, which the Poisson-subsampled bound does not cover, so ε is counted as if
every domain took part each round (an upper bound).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from meshctl.runtime.kernels import privacy

BIT_SHARE = 0.1
"""Share of the privacy cost (of 1 / z²) adaptive clipping's noised count spends."""


@dataclass(frozen=True)
class Noise:
    """The noise of one job's client-level DP, from its ε, δ and rounds."""

    z: float
    """Noise multiplier of the combined mechanism: what the accountant charges."""
    z_delta: float
    """Of the sum of clipped updates (std z_delta · C)."""
    sigma_bit: float
    """Std of the noise on the count of unclipped updates (0 without adaptive clipping)."""
    q: float
    """Chance a participant takes part in a round."""
    expected: int
    """m: updates a round expects; the mean's fixed denominator."""
    delta: float

    def epsilon(self, rounds: int) -> float:
        """ε after `rounds` rounds at δ (the accountant)."""
        return privacy.epsilon(self.q, self.z, rounds, self.delta)


def plan_noise(epsilon: float, delta: float, rounds: int, participants: int, *, per_round: int | None = None,
               adaptive: bool = False) -> Noise:
    """The noise that spends `epsilon` at `delta` over `rounds` rounds of `participants` domains (`per_round`
    of them sampled each round, else all). ValueError when ε is out of reach."""
    expected = min(per_round or participants, participants)
    q = 1.0  # no amplification by sampling claimed (fixed-size sampling is not Poisson): an upper bound
    z = privacy.noise_multiplier(q, rounds, epsilon, delta)
    if not adaptive:
        return Noise(z, z, 0.0, q, expected, delta)
    return Noise(z, z / math.sqrt(1 - BIT_SHARE), z / (2 * math.sqrt(BIT_SHARE)), q, expected, delta)


def job_noise(job: object) -> Noise:
    """`plan_noise` of a plan job with `privacy.client_dp`."""
    cdp = job.privacy.client_dp  # type: ignore[attr-defined]
    sampling = getattr(job, "sampling", None)
    return plan_noise(cdp.epsilon, cdp.delta, job.training.rounds, len(job.participants),  # type: ignore[attr-defined]
                      per_round=sampling.per_round if sampling is not None else None,
                      adaptive=cdp.adaptive is not None)


def extra_words(job: object) -> int:
    """Words a masked update carries after the shared parameters: adaptive clipping's bit, else none."""
    cdp = job.privacy.client_dp  # type: ignore[attr-defined]
    return int(cdp is not None and cdp.adaptive is not None)


def norm(tensors: Sequence[torch.Tensor]) -> float:
    """The L2 norm of `tensors` taken as one vector."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def clip(delta: Sequence[torch.Tensor], bound: float) -> tuple[list[torch.Tensor], float]:
    """(`delta` scaled to L2 norm at most `bound`, its norm before)."""
    size = norm(delta)
    factor = min(1.0, bound / size) if size > 0 else 1.0
    return [t * factor for t in delta], size


def generator(seed: int | None = None) -> torch.Generator:
    """Noise source: seeded from the operating system unless a test gives `seed` (regenerable noise
    can be subtracted, and then there is no privacy)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else seed)


def gaussian(like: Sequence[torch.Tensor], std: float, gen: torch.Generator) -> list[torch.Tensor]:
    """N(0, std²) noise of each tensor's shape (float64)."""
    return [torch.randn(t.shape, generator=gen, dtype=torch.float64) * std for t in like]


def domain_update(base: Sequence[torch.Tensor], local: Sequence[torch.Tensor], bound: float, noise: Noise, *,
                  domain_noise: bool, gen: torch.Generator) -> tuple[list[torch.Tensor], float, float]:
    """A domain's contribution: (its clipped update Δ, plus its noise share under `domain_noise`;
    b - 1/2, plus its share of the count's noise; ||Δ|| before clipping)."""
    delta = [lo.double() - b.double() for b, lo in zip(base, local)]
    clipped, size = clip(delta, bound)
    bit = (1.0 if size <= bound else 0.0) - 0.5
    if domain_noise:
        share = 1 / math.sqrt(noise.expected)
        clipped = [c + n for c, n in zip(clipped, gaussian(clipped, noise.z_delta * bound * share, gen))]
        bit += float(torch.randn((), generator=gen, dtype=torch.float64)) * noise.sigma_bit * share
    return clipped, bit, size


def noised_mean(total: Sequence[torch.Tensor], bits: float, bound: float, noise: Noise, *,
                noised_shares: int, gen: torch.Generator) -> tuple[list[torch.Tensor], float, float]:
    """(the noised mean update, the noised share of unclipped updates b̄, the std of the noise the sum
    carries) from the sum `total` of a round's clipped updates and their summed bits, over the expected
    count m whatever the updates received (McMahan et al.'s fixed estimator); `noised_shares` of the
    updates already carry a domain's noise share, the coordinator adds the rest of the variance."""
    m = noise.expected
    rest = max(0.0, 1 - noised_shares / m)
    std = noise.z_delta * bound
    mean = [(t.double() + n) / m for t, n in zip(total, gaussian(total, std * math.sqrt(rest), gen))]
    counted = bits + float(torch.randn((), generator=gen, dtype=torch.float64)) * noise.sigma_bit * math.sqrt(rest)
    return mean, counted / m + 0.5, std


def next_clip(bound: float, unclipped: float, target_quantile: float, lr: float) -> float:
    """Andrew et al.'s geometric update: C · exp(-lr · (b̄ - γ))."""
    return bound * math.exp(-lr * (unclipped - target_quantile))
