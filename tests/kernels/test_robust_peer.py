"""meshctl's robust rules against Flower's (the peer), on the same seeded arrays.

Flower is not a meshctl dependency: its outputs are recorded in
tests/fixtures/robust/flower_peer.json by the command in make_flower_peer.py there
(flwr 1.42.0, `flwr.server.strategy.aggregate`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from meshctl.runtime.kernels.robust import bulyan, coordinate_median, krum, multi_krum, trimmed_mean

PEER = json.loads((Path(__file__).parents[1] / "fixtures" / "robust" / "flower_peer.json").read_text())
CASES = PEER["cases"]


def _updates(case: dict) -> list[list[torch.Tensor]]:
    return [[torch.tensor(a, dtype=torch.float32) for a in u] for u in case["updates"]]


def _same(ours: list[torch.Tensor], theirs: list, tol: float = 1e-5) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), torch.tensor(b, dtype=torch.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c['n']}-f{c['f']}")
def test_krum_median_and_trimmed_mean_equal_flower(case):
    ups = _updates(case)
    _same(krum(ups, case["f"])[0], case["krum"])
    _same(coordinate_median(ups), case["median"])
    _same(trimmed_mean(ups, 0.2), case["trimmed_mean_0.2"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c['n']}-f{c['f']}")
def test_multi_krum_equals_flower(case):
    ups = _updates(case)
    for m, expected in case["multi_krum"].items():
        mean, chosen = multi_krum(ups, case["examples"], case["f"], int(m))
        assert not set(chosen) & set(range(case["f"]))  # the far-off updates are never chosen
        _same(mean, expected)


@pytest.mark.parametrize("case", [c for c in CASES if "bulyan" in c], ids=lambda c: f"n{c['n']}-f{c['f']}")
def test_bulyan_equals_flower(case):
    out, chosen = bulyan(_updates(case), case["f"])
    assert len(chosen) == case["n"] - 2 * case["f"]
    _same(out, case["bulyan"])
