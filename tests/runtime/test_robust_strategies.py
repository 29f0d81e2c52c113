"""Issue 13: multi_krum, bulyan, centered_clip and fedavgm in the coordinator, over real daemon
processes (ZeroMQ, Curve), with one poisoned domain out of seven."""

from __future__ import annotations

import sys
from pathlib import Path

import duckdb
import pytest
import torch

from meshctl.compiler.plan import PlanAggregation
from meshctl.runtime import events as ev
from meshctl.runtime.coordinator.strategy import make_strategy as Strategy
from meshctl.runtime.launcher import start_run

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
N = 7
POISONED = f"client-{N - 1}"


pytestmark = pytest.mark.xdist_group("robust-poisoned7")  # one worker builds the module's mesh


@pytest.fixture(scope="module")
def poisoned7(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seven digits domains (Dirichlet(0.5) over 7); client-6 trains with its features scaled 8x
    and its training labels shifted by 3 (its holdout stays honest)."""
    sys.path.insert(0, str(DIGITS))
    from make_data import write_mesh

    root = tmp_path_factory.mktemp("poisoned7")
    write_mesh(root, N, rounds=5)
    src = root / "data" / f"{POISONED}.parquet"
    honest = root / "data" / "honest.parquet"
    src.rename(honest)
    cols = ", ".join(f"px{i} * 8 AS px{i}" for i in range(64))
    duckdb.sql(f"COPY (SELECT {cols}, CASE WHEN split = 'train' THEN (label + 3) % 10 ELSE label END AS label, "
               f"split FROM '{honest}') TO '{src}' (FORMAT parquet)")
    mesh = root / "run" / "mesh.yaml"
    mesh.parent.mkdir()
    (mesh.parent / "data").symlink_to(root / "data")
    mesh.write_text("# plans in these tests are built directly\n")
    return mesh


def _run(mesh: Path, make_plan, agg: PlanAggregation) -> tuple[float, list[str]]:
    plan = make_plan(n=N, rounds=5)
    plan = plan.model_copy(update={"jobs": [plan.jobs[0].model_copy(update={"aggregation": agg})]}).with_hash()
    run = start_run(mesh, plan)
    rounds = [e for e in run.follow() if isinstance(e, ev.RoundCompleted)]
    result = run.finish()
    assert result.ok, result.reason
    assert len(rounds) == 5
    return rounds[-1].metrics["accuracy"], [e.aggregation for e in rounds]


def test_new_robust_rules_leave_out_the_poisoned_domain(poisoned7, make_plan):
    fedavg, _ = _run(poisoned7, make_plan, PlanAggregation())
    mk, mk_notes = _run(poisoned7, make_plan, PlanAggregation(strategy="multi_krum", byzantine=1))
    assert all(n == f"multi_krum averaged 6 of 7; left out {POISONED}" for n in mk_notes), mk_notes
    bu, bu_notes = _run(poisoned7, make_plan, PlanAggregation(strategy="bulyan", byzantine=1))
    assert all(n.startswith("bulyan selected 5 of 7; left out ") and POISONED in n for n in bu_notes), bu_notes
    cc, cc_notes = _run(poisoned7, make_plan, PlanAggregation(strategy="centered_clip", server_momentum=0.9))
    assert all(n.startswith("centered_clip radius ") for n in cc_notes), cc_notes
    # bulyan averages only n - 4f = 3 values per coordinate: on 7 non-IID domains it leaves
    # the poisoned one out but learns slowly (benchmarks/robustness.py has it at 0.78 on 16)
    assert min(mk, cc) > fedavg + 0.1 and bu > 0.5, (fedavg, mk, bu, cc)


def test_fedavgm_is_the_mean_plus_momentum_across_rounds():
    # Prepare: two rounds of two updates around w
    s = Strategy(PlanAggregation(strategy="fedavgm", server_lr=1.0, server_momentum=0.5))
    w = [torch.tensor([0.0, 0.0])]
    # Execute: mean of (1, 2)·1 and (3, 0)·3 is (2.5, 0.5); then a round whose mean is w1 + (1, 1)
    w1, note = s.aggregate(w, ["a", "b"], [[torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 0.0])]], [1, 3])
    w2, _ = s.aggregate(w1, ["a", "b"], [[w1[0] + 1], [w1[0] + 1]], [1, 1])
    # Assert: v1 = (2.5, 0.5); v2 = 0.5 v1 + (1, 1) = (2.25, 1.25)
    assert note == "" and w1[0].tolist() == [2.5, 0.5]
    assert w2[0].tolist() == pytest.approx([4.75, 1.75])
    # the secure-aggregation path (only the mean) takes the same step
    t = Strategy(PlanAggregation(strategy="fedavgm", server_lr=1.0, server_momentum=0.5))
    assert t.from_mean(w, [torch.tensor([2.5, 0.5])])[0].tolist() == [2.5, 0.5]


def test_robust_rules_refuse_a_round_below_their_minimum():
    s = Strategy(PlanAggregation(strategy="bulyan", byzantine=1))
    with pytest.raises(ValueError, match="bulyan needs at least 7 updates per round, got 6"):
        s.aggregate([torch.zeros(1)], list("abcdef"), [[torch.ones(1)]] * 6, [1] * 6)
    s = Strategy(PlanAggregation(strategy="multi_krum", byzantine=2))
    with pytest.raises(ValueError, match="multi_krum needs at least 7 updates per round, got 6"):
        s.aggregate([torch.zeros(1)], list("abcdef"), [[torch.ones(1)]] * 6, [1] * 6)


def test_multi_krum_in_a_short_round_still_leaves_f_out():
    # select 5 of a round that has 4 (a quorum below the participants): n - f = 3, the far one out
    s = Strategy(PlanAggregation(strategy="multi_krum", byzantine=1, select=5))
    ups = [[torch.tensor([x])] for x in (0.0, 1.0, 2.0, 90.0)]
    with pytest.raises(ValueError, match="at least 5 updates"):
        s.aggregate([torch.zeros(1)], list("abcd"), ups, [1] * 4)
    s = Strategy(PlanAggregation(strategy="multi_krum", byzantine=0, select=5))
    out, note = s.aggregate([torch.zeros(1)], list("abcd"), ups, [1] * 4)
    assert note == "multi_krum averaged 4 of 4; left out none" and out[0].item() == pytest.approx(23.25)
    s = Strategy(PlanAggregation(strategy="multi_krum", byzantine=1, select=6))
    ups = [[torch.tensor([x])] for x in (0.0, 1.0, 2.0, 3.0, 90.0)]
    out, note = s.aggregate([torch.zeros(1)], list("abcde"), ups, [1] * 5)
    assert note == "multi_krum averaged 4 of 5; left out e" and out[0].item() == pytest.approx(1.5)


def test_server_momentum_on_a_robust_rule_and_centered_clip_centre():
    # centered_clip with a radius wider than any update: the example-weighted mean, so with
    # momentum 0.5 the second step adds half the first
    s = Strategy(PlanAggregation(strategy="centered_clip", radius=100.0, iterations=1, server_momentum=0.5))
    w = [torch.tensor([0.0])]
    w1, note = s.aggregate(w, ["a", "b"], [[torch.tensor([1.0])], [torch.tensor([3.0])]], [1, 1])
    assert w1[0].tolist() == [2.0] and note == "centered_clip radius 100: 0 of 2 updates clipped at first"
    w2, _ = s.aggregate(w1, ["a", "b"], [[torch.tensor([2.0])], [torch.tensor([2.0])]], [1, 1])
    assert w2[0].tolist() == [3.0]  # rule step 0, momentum 0.5 x 2
    # the centre of round 2 is w1 plus the rule's last step (2, not the momentum's): radius 1
    # around 2 + 2 = 4 clips an update at 0 to 3
    c = Strategy(PlanAggregation(strategy="centered_clip", radius=1.0, iterations=1))
    c.last_step = [torch.tensor([2.0], dtype=torch.float64)]
    out, _ = c.aggregate([torch.tensor([2.0])], ["a"], [[torch.tensor([0.0])]], [1])
    assert out[0].tolist() == [3.0]
