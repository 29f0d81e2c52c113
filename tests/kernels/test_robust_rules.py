"""Multi-Krum, Bulyan, centered clipping and FedAvgM against hand computations (issue 13)."""

from __future__ import annotations

import pytest
import torch

from meshctl.runtime.kernels import fedavg
from meshctl.runtime.kernels.robust import (
    ServerMomentum,
    bulyan,
    centered_clip,
    krum,
    krum_scores,
    multi_krum,
)


def _u(*values: float) -> list[torch.Tensor]:
    return [torch.tensor(values, dtype=torch.float32)]


def _line(*xs: float) -> list[list[torch.Tensor]]:
    return [_u(x) for x in xs]


def test_multi_krum_averages_the_m_lowest_scores_by_examples():
    # Prepare: points 0, 1, 2, 3, 100; f = 1 so each score sums the n - f - 2 = 2 nearest
    # squared distances: 0 -> 1 + 4 = 5, 1 -> 1 + 1 = 2, 2 -> 1 + 1 = 2, 3 -> 1 + 4 = 5,
    # 100 -> 97² + 98² = 19013
    ups = _line(0, 1, 2, 3, 100)
    assert krum_scores(ups, 1) == [5, 2, 2, 5, 19013]
    # Execute: keep 3 -> updates 1, 2 (score 2) and 0 (score 5, the first of the tie with 3)
    mean, chosen = multi_krum(ups, [2, 1, 1, 1, 1], byzantine=1, select=3)
    # Assert: (1·1 + 2·1 + 0·2) / 4
    assert chosen == [1, 2, 0]
    assert mean[0].tolist() == [0.75]


def test_multi_krum_of_one_is_krum_and_of_n_is_fedavg():
    ups = [_u(1.0, 2.0), _u(1.5, 1.0), _u(0.5, 2.5), _u(1.2, 1.8), _u(9.0, -9.0)]
    ex = [10, 20, 30, 40, 50]
    one, chosen = multi_krum(ups, ex, byzantine=1, select=1)
    assert one[0].tolist() == krum(ups, 1)[0][0].tolist() and chosen == [krum(ups, 1)[1]]
    everything, _ = multi_krum(ups, ex, byzantine=1, select=5)
    assert everything[0].tolist() == pytest.approx(fedavg(ups, ex)[0].tolist())
    with pytest.raises(ValueError, match="between 1 and 5"):
        multi_krum(ups, ex, byzantine=1, select=6)


def test_bulyan_selects_by_repeated_krum_then_averages_the_beta_closest_to_the_median():
    # n = 7, f = 1: theta = n - 2f = 5 selected, beta = n - 4f = 3 averaged per coordinate.
    # Round 1 (7 left, 4 nearest): scores 0:30 1:15 2:10 3:15 4:30 -> picks 2.
    # Round 2 (6 left, 3 nearest): 0:26 1:14 3:14 4:26 -> picks 1 (first of the tie).
    # Round 3 (5 left, 2 nearest): 0:25 3:10 4:17 -> picks 3.
    # Round 4 (4 left, 1 nearest): 0:16 4:16 50:2116 -60:3600 -> picks 0 (tie).
    # Round 5 (3 left, max(1, 3 - 1 - 2) = 1 nearest): 4:2116 50:2116 -60:4096 -> picks 4.
    ups = _line(0, 1, 2, 3, 4, 50, -60)
    out, chosen = bulyan(ups, byzantine=1)
    assert chosen == [2, 1, 3, 0, 4]
    # selected {0,1,2,3,4}: median 2, the 3 closest are 1, 2, 3 -> 2
    assert out[0].tolist() == [2.0]


def test_bulyan_trims_per_coordinate_and_needs_4f_plus_3():
    # five clustered updates and two outliers: Krum selects the five; per coordinate the
    # three values closest to the median are averaged
    # x: 0, .12, .2, .35, .05 -> median .12, closest .12, .05, .2 -> .123333
    # y: 0, .32, .1, .15, .45 -> median .15, closest .15, .1, 0 -> .083333
    ups = [_u(0.0, 0.0), _u(0.12, 0.32), _u(0.2, 0.1), _u(0.35, 0.15), _u(0.05, 0.45),
           _u(8.0, 8.0), _u(-9.0, 9.0)]
    out, chosen = bulyan(ups, byzantine=1)
    assert sorted(chosen) == [0, 1, 2, 3, 4]
    assert out[0].tolist() == pytest.approx([0.37 / 3, 0.25 / 3], abs=1e-6)
    with pytest.raises(ValueError, match="needs at least 7 updates, got 6"):
        bulyan(ups[:6], byzantine=1)


def test_centered_clip_by_hand():
    ups = _line(0, 1, 10)
    # one iteration from 0, radius 2: clips 0, 1, 10 to 0, 1, 2 -> mean 1
    out, r, far = centered_clip(ups, [1, 1, 1], [torch.zeros(1)], radius=2.0, iterations=1)
    assert out[0].tolist() == pytest.approx([1.0]) and r == 2.0 and far == 1
    # a second: differences -1, 0, 9 clip to -1, 0, 2 -> 1 + 1/3
    out, _, _ = centered_clip(ups, [1, 1, 1], [torch.zeros(1)], radius=2.0, iterations=2)
    assert out[0].tolist() == pytest.approx([4 / 3])
    # radius 0: the median distance from the centre, 1 -> clips to 0, 1, 1 -> 2/3
    out, r, far = centered_clip(ups, [1, 1, 1], [torch.zeros(1)], radius=0.0, iterations=1)
    assert r == 1.0 and far == 1 and out[0].tolist() == pytest.approx([2 / 3])
    # weights are example shares: (0·1 + 1·1 + 2·2) / 4
    out, _, _ = centered_clip(ups, [1, 1, 2], [torch.zeros(1)], radius=2.0, iterations=1)
    assert out[0].tolist() == pytest.approx([1.25])


def test_centered_clip_clips_the_whole_update_not_each_coordinate():
    # (3, 4) is 5 from the centre; radius 1 scales it to (0.6, 0.8) across both tensors
    ups = [[torch.tensor([3.0]), torch.tensor([4.0])]]
    out, _, far = centered_clip(ups, [1], [torch.zeros(1), torch.zeros(1)], radius=1.0, iterations=1)
    assert far == 1
    assert [t.item() for t in out] == pytest.approx([0.6, 0.8])
    # a radius wider than every distance is the example-weighted mean in one step
    ups = _line(1, 2, 6)
    out, _, far = centered_clip(ups, [1, 2, 1], [torch.zeros(1)], radius=100.0, iterations=1)
    assert far == 0
    assert out[0].tolist() == pytest.approx(fedavg(ups, [1, 2, 1])[0].tolist())


def test_fedavgm_two_steps_by_hand_and_zero_momentum_is_fedavg():
    opt = ServerMomentum(lr=1.0, momentum=0.9)
    w = [torch.tensor([1.0])]
    w1 = opt.step(w, [torch.tensor([1.5])])  # delta 0.5, v 0.5
    assert w1[0].tolist() == [1.5]
    w2 = opt.step(w1, [torch.tensor([1.7])])  # delta 0.2, v 0.9·0.5 + 0.2 = 0.65
    assert w2[0].tolist() == pytest.approx([2.15])
    half = ServerMomentum(lr=0.5, momentum=0.0)
    assert half.step(w, [torch.tensor([3.0])])[0].tolist() == [2.0]
    plain = ServerMomentum(lr=1.0, momentum=0.0)
    w = [torch.tensor([1.0, 2.0])]
    for target in ([2.0, 0.0], [5.0, 5.0]):
        w = plain.step(w, [torch.tensor(target)])
        assert w[0].tolist() == target
