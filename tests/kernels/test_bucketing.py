"""Bucketing (Karimireddy, He and Jaggi 2022) against hand computations, its seeded
determinism, the strategies over bucket means, and its compile checks (MESH555, MESH556)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from meshctl.cli import main
from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import PlanAggregation
from meshctl.runtime.coordinator.strategy import make_strategy
from meshctl.runtime.kernels.robust import bucket_means, buckets

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


def _u(*values: float) -> list[torch.Tensor]:
    return [torch.tensor(values, dtype=torch.float32)]


def test_buckets_are_a_seeded_shuffle_cut_into_runs_of_s():
    # Prepare: random.Random("bucketing:1") shuffles 0..5 to [4, 3, 2, 0, 5, 1]
    order = list(range(6))
    random.Random("bucketing:1").shuffle(order)
    assert order == [4, 3, 2, 0, 5, 1]
    # Act / Assert: runs of 2, of 4 (the last holds the rest), of 1 and of n
    assert buckets(6, 2, "bucketing:1") == [[4, 3], [2, 0], [5, 1]]
    assert buckets(6, 4, "bucketing:1") == [[4, 3, 2, 0], [5, 1]]
    assert buckets(6, 1, "bucketing:1") == [[4], [3], [2], [0], [5], [1]]
    assert buckets(6, 6, "bucketing:1") == [[4, 3, 2, 0, 5, 1]]


def test_buckets_are_the_same_for_the_same_seed_and_differ_between_rounds():
    first = [buckets(16, 2, f"bucketing:{r}") for r in range(1, 6)]
    again = [buckets(16, 2, f"bucketing:{r}") for r in range(1, 6)]
    assert first == again
    assert len({str(b) for b in first}) == 5
    for b in first:
        assert sorted(i for bucket in b for i in bucket) == list(range(16))


def test_bucket_means_are_example_weighted_means_of_each_bucket():
    # Prepare: 6 updates 0, 10, 20, 30, 40, 50 (two tensors each), examples 1..6; the
    # buckets of 2 under "bucketing:1" are [4, 3], [2, 0], [5, 1]
    updates = [[torch.tensor([10.0 * i]), torch.tensor([[float(i)]])] for i in range(6)]
    examples = [1, 2, 3, 4, 5, 6]
    # Act
    means, counts, parts = bucket_means(updates, examples, 2, "bucketing:1")
    # Assert: bucket [4, 3]: (40·5 + 30·4) / 9 = 320/9; [2, 0]: (20·3 + 0·1) / 4 = 15;
    # [5, 1]: (50·6 + 10·2) / 8 = 40; the second tensor is a tenth of the first
    assert parts == [[4, 3], [2, 0], [5, 1]]
    assert counts == [9.0, 4.0, 8.0]
    assert [m[0].item() for m in means] == pytest.approx([320 / 9, 15.0, 40.0])
    assert [m[1].item() for m in means] == pytest.approx([32 / 9, 1.5, 4.0])
    assert means[0][1].shape == (1, 1) and means[0][0].dtype == torch.float32


def test_bucket_means_of_s_1_are_the_updates_and_of_s_n_the_weighted_mean():
    updates = [_u(1.0), _u(3.0), _u(5.0), _u(7.0)]
    means, counts, _ = bucket_means(updates, [1, 1, 2, 2], 1, 7)
    assert sorted(m[0].item() for m in means) == [1.0, 3.0, 5.0, 7.0]
    assert sorted(counts) == [1.0, 1.0, 2.0, 2.0]
    [mean], [count], _ = bucket_means(updates, [1, 1, 2, 2], 4, 7)
    assert mean[0].item() == pytest.approx((1 + 3 + 10 + 14) / 6)
    assert count == 6.0
    # a bucket whose examples sum to zero takes the plain mean
    [mean], _, _ = bucket_means(updates, [0, 0, 0, 0], 4, 7)
    assert mean[0].item() == pytest.approx(4.0)


def test_bucket_means_refuse_what_is_not_a_bucketing():
    with pytest.raises(ValueError, match="at least 1 update"):
        bucket_means([_u(1.0)], [1], 0, 1)
    with pytest.raises(ValueError, match="example counts"):
        bucket_means([_u(1.0), _u(2.0)], [1], 1, 1)
    with pytest.raises(ValueError, match="at least one update"):
        bucket_means([], [], 2, 1)


def test_median_over_buckets_of_2_by_hand_and_independent_of_arrival_order():
    # Prepare: 6 domains d0..d5 with updates 0, 10, 20, 30, 40, 50 and equal examples; round 1's
    # buckets (domain-name order) are [d4, d3], [d2, d0], [d5, d1]: means 35, 10, 30
    strategy = make_strategy(PlanAggregation(strategy="median", bucketing=2))
    domains = [f"d{i}" for i in range(6)]
    updates = [_u(10.0 * i) for i in range(6)]
    # Act
    new, note = strategy.aggregate(_u(0.0), domains, updates, [1] * 6)
    # Assert: the median of 35, 10, 30
    assert new[0].item() == pytest.approx(30.0)
    assert note == "3 buckets of 2"
    # the same round with the updates arriving in another order gives the same weights
    again = make_strategy(PlanAggregation(strategy="median", bucketing=2))
    back, _ = again.aggregate(_u(0.0), domains[::-1], updates[::-1], [1] * 6)
    assert torch.equal(back[0], new[0])


def test_multi_krum_over_buckets_names_the_buckets_it_left_out():
    # Prepare: 10 updates near 0 and one attacker at 1000, buckets of 2 -> 6 buckets, f = 1
    strategy = make_strategy(PlanAggregation(strategy="multi_krum", byzantine=1, bucketing=2))
    domains = [f"d{i:02d}" for i in range(11)]
    updates = [_u(float(i % 3)) for i in range(10)] + [_u(1000.0)]
    # Act
    new, note = strategy.aggregate(_u(0.0), domains, updates, [1] * 11)
    # Assert: the attacker's bucket is the one left out; the weights stay near the honest ones
    assert abs(new[0].item()) < 3
    assert note.startswith("6 buckets of 2; multi_krum averaged 5 of 6; left out ")
    assert "d10" in note.split("left out ")[1]


def test_a_short_round_under_bucketing_says_how_many_updates_it_needs():
    strategy = make_strategy(PlanAggregation(strategy="multi_krum", byzantine=1, bucketing=2))
    with pytest.raises(ValueError, match=r"multi_krum over buckets of 2 needs at least 5 buckets \(9 updates\) "
                                         r"per round, got 8 updates"):
        strategy.aggregate(_u(0.0), [f"d{i}" for i in range(8)], [_u(float(i)) for i in range(8)], [1] * 8)


# The language: `bucketing` in the plan, MESH555, MESH556, MESH510 and explain.

@pytest.fixture(scope="module")
def digits8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmark's digits mesh over 8 domains."""
    sys.path.insert(0, str(DIGITS))
    from make_data import write_mesh

    return write_mesh(tmp_path_factory.mktemp("digits8b"), 8, rounds=2)


def _compile(mesh: Path, aggregation: str):
    spec = mesh.parent / "variant.yaml"
    spec.write_text(mesh.read_text().replace("aggregation: {strategy: fedavg}", f"aggregation: {{{aggregation}}}"))
    return compile_mesh(spec)


def test_the_plan_carries_bucketing(digits8):
    result = _compile(digits8, "strategy: median, bucketing: 2")
    assert result.errors == [], result.render_diagnostics()
    assert result.plan.jobs[0].aggregation.bucketing == 2
    assert "bucketing = 2" in result.plan.to_toml()


@pytest.mark.parametrize(("aggregation", "message"), [
    ("strategy: median, bucketing: 0",
     "bucketing 0 of model 'digits-mlp': a bucket holds at least 1 update"),
    ("strategy: median, bucketing: 4",
     ("bucketing 4 of model 'digits-mlp' makes ceil(8 / 4) = 2 buckets per round (8 participants); "
     "median needs 3 (over 2 it is a mean)")),
    ("strategy: multi_krum, bucketing: 2",
     ("bucketing 2 of model 'digits-mlp' makes ceil(8 / 2) = 4 buckets per round (8 participants); "
     "multi_krum tolerating 1 needs 2f + 3 = 5")),
    ("strategy: multi_krum, byzantine: 0, bucketing: 2, select: 5",
     "multi_krum selects 5 of the 4 buckets per round of model 'digits-mlp' (bucketing 2, 8 participants)"),
])
def test_mesh555_refuses_a_bucketing_the_rule_cannot_use(digits8, aggregation, message):
    result = _compile(digits8, aggregation)
    assert result.plan is None
    [err] = [d for d in result.errors if d.code == "MESH555"]
    assert err.message == message


def test_mesh556_warns_when_trimmed_mean_cuts_no_bucket(digits8):
    result = _compile(digits8, "strategy: trimmed_mean, bucketing: 2")
    assert result.errors == []
    [warn] = [d for d in result.warnings if d.code == "MESH556"]
    assert warn.message.startswith("trimmed_mean with trim 0.1 over 4 buckets (bucketing 2) cuts floor(0.1 x 4) = 0")
    assert "raise trim to 0.25 or more" in (warn.hint or "")
    assert not [d for d in result.warnings if d.code == "MESH515"]
    ok = _compile(digits8, "strategy: trimmed_mean, trim: 0.25, bucketing: 2")
    assert ok.errors == [] and not [d for d in ok.warnings if d.code == "MESH556"]


def test_bucketing_belongs_to_the_robust_rules(digits8):
    [err] = _compile(digits8, "strategy: fedavg, bucketing: 2").errors
    assert err.code == "MESH510"
    assert "'bucketing' does not apply to strategy fedavg" in err.message


def test_explain_mesh555_and_mesh556():
    for code in ("MESH555", "MESH556"):
        out = CliRunner().invoke(main, ["explain", code])
        assert out.exit_code == 0 and "bucket" in out.output
