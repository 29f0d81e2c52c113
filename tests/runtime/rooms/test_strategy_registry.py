"""The strategy room: every strategy the language accepts has a registered class, and no other.

The compiler stays torch-free, so it never imports the registry: these tests compare the
compiler's names (plan.STRATEGY_SETTINGS, the plan's and the spec's Literal,
ROBUST_STRATEGIES) with `STRATEGIES`, and run each class on the same updates.
"""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import pytest
import torch

from meshctl.compiler.plan import ROBUST_STRATEGIES, STRATEGY_SETTINGS, PlanAggregation
from meshctl.compiler.spec import Aggregation
from meshctl.runtime.coordinator.strategy import STRATEGIES, Strategy, make_strategy
from meshctl.runtime.kernels import fedavg


def _names(model: type) -> set[str]:
    return set(get_args(model.model_fields["strategy"].annotation))


def test_the_language_and_the_registry_name_the_same_strategies() -> None:
    assert set(STRATEGIES) == set(STRATEGY_SETTINGS)
    assert set(STRATEGIES) == _names(PlanAggregation)
    assert set(STRATEGIES) == _names(Aggregation)


def test_every_registered_class_is_a_strategy_under_its_own_name() -> None:
    for name, cls in STRATEGIES.items():
        assert issubclass(cls, Strategy) and cls.name == name
        made = make_strategy(PlanAggregation(strategy=name))
        assert type(made) is cls


def test_the_rules_that_need_every_update_are_the_compilers_robust_ones() -> None:
    assert {n for n, cls in STRATEGIES.items() if cls.needs_every_update} == set(ROBUST_STRATEGIES)


def _round(n: int, seed: int) -> tuple[list[list[torch.Tensor]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(3, 2, generator=g), torch.randn(2, generator=g)] for _ in range(n)], list(range(5, 5 + n))


@pytest.mark.parametrize("name", sorted(STRATEGY_SETTINGS))
def test_each_strategy_aggregates_seven_updates_into_weights_of_the_same_shapes(name: str) -> None:
    s = make_strategy(PlanAggregation(strategy=name))
    weights = [torch.zeros(3, 2), torch.zeros(2)]
    for r in range(3):
        updates, examples = _round(7, r)
        new, note = s.aggregate(weights, [f"d{i}" for i in range(7)], updates, examples)
        assert [w.shape for w in new] == [w.shape for w in weights] and isinstance(note, str)
        assert all(torch.isfinite(w).all() for w in new)
        weights = new


@pytest.mark.parametrize("name", sorted(set(STRATEGY_SETTINGS) - set(ROBUST_STRATEGIES)))
def test_a_mean_strategy_gives_the_same_weights_from_secure_aggregations_mean(name: str) -> None:
    one, two = make_strategy(PlanAggregation(strategy=name)), make_strategy(PlanAggregation(strategy=name))
    weights = [torch.zeros(3, 2), torch.zeros(2)]
    for r in range(3):
        updates, examples = _round(4, r)
        a, _ = one.aggregate(weights, list("abcd"), updates, examples)
        b = two.from_mean(weights, fedavg(updates, examples))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        weights = a


@pytest.mark.parametrize("name", sorted(ROBUST_STRATEGIES))
def test_a_robust_strategy_refuses_secure_aggregations_mean_in_one_line(name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} needs every single update, so it cannot run with secure"):
        make_strategy(PlanAggregation(strategy=name)).from_mean([torch.zeros(2)], [torch.ones(2)])


def test_the_compiler_still_imports_without_torch() -> None:
    code = ("import sys; import meshctl.compiler.compile, meshctl.compiler.plan; "
            "assert 'torch' not in sys.modules, 'torch'; assert 'meshctl.runtime' not in sys.modules, 'runtime'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def test_a_second_class_under_a_taken_name_is_refused_and_the_first_stays() -> None:
    with pytest.raises(TypeError, match="strategy 'krum' registered twice"):
        type("Krum2", (Strategy,), {"name": "krum", "rule": lambda *a: ([], "")})
    assert STRATEGIES["krum"].__name__ == "Krum"
