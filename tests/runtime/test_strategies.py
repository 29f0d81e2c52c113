"""Aggregation strategies in the plan and the coordinator: a mesh with a poisoned domain, run
through real processes, where the robust rules keep the model and FedAvg does not."""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path

import duckdb
import pytest
import torch

from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import PlanAggregation
from meshctl.runtime import events as ev
from meshctl.runtime.coordinator.strategy import make_strategy as Strategy
from meshctl.runtime.launcher import start_run

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


def _u(*values: float) -> list[torch.Tensor]:
    return [torch.tensor(values, dtype=torch.float32)]


def test_strategy_refuses_a_round_below_its_minimum():
    s = Strategy(PlanAggregation(strategy="krum", byzantine=1))
    with pytest.raises(ValueError, match="krum needs at least 5 updates per round, got 3"):
        s.aggregate(_u(0, 0), ["a", "b", "c"], [_u(1, 1)] * 3, [1, 1, 1])


def test_the_plan_carries_every_setting_of_its_strategy(tmp_path):
    mesh = Path(__file__).resolve().parents[2] / "mesh.yaml"
    text = mesh.read_text()
    cases = {"fedavg": {}, "fedprox, mu: 0.5": {"mu": 0.5},
             "fedyogi": {"server_lr": 0.03, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
             "trimmed_mean": {"trim": 0.1, "bucketing": 1, "server_momentum": 0.9},
             "krum, byzantine: 0": {"byzantine": 0, "bucketing": 1, "server_momentum": 0.9}}
    for setting, expect in cases.items():
        spec = tmp_path / "mesh.yaml"
        spec.write_text(text.replace("aggregation: {strategy: fedavg}", f"aggregation: {{strategy: {setting}}}"))
        shutil.copytree(mesh.parent / "examples", tmp_path / "examples", dirs_exist_ok=True)
        plan = compile_mesh(spec).plan
        assert plan is not None
        agg = plan.jobs[0].aggregation
        assert agg.model_dump(exclude_none=True) == {"strategy": setting.split(",")[0], **expect}
        assert ("[jobs.aggregation]" in plan.to_toml()) and (("mu = 0.5" in plan.to_toml()) == ("mu" in expect))


@pytest.fixture
def poisoned_mesh(tmp_path: Path) -> Path:
    """Five digits domains; client-4 trains on client-0's rows with its features scaled 8x
    and its training labels shifted by 3 (its holdout stays honest)."""
    (tmp_path / "data").mkdir()
    for i in range(4):
        (tmp_path / "data" / f"client-{i}.parquet").symlink_to(DIGITS / "data" / f"client-{i}.parquet")
    cols = ", ".join(f"px{i} * 8 AS px{i}" for i in range(64))
    duckdb.sql(f"COPY (SELECT {cols}, CASE WHEN split = 'train' THEN (label + 3) % 10 ELSE label END AS label, "
               f"split FROM '{DIGITS}/data/client-0.parquet') "
               f"TO '{tmp_path}/data/client-4.parquet' (FORMAT parquet)")
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("# plans in these tests are built directly\n")
    return mesh


def _run(mesh: Path, make_plan, agg: PlanAggregation) -> tuple[float, set[str]]:
    plan = make_plan(n=5, rounds=5)
    plan = plan.model_copy(update={"jobs": [plan.jobs[0].model_copy(update={"aggregation": agg})]}).with_hash()
    run = start_run(mesh, plan)
    rounds = [e for e in run.follow() if isinstance(e, ev.RoundCompleted)]
    result = run.finish()
    assert result.ok, result.reason
    assert len(rounds) == 5
    return rounds[-1].metrics["accuracy"], {e.aggregation for e in rounds}


def test_robust_strategies_hold_against_a_poisoned_domain(poisoned_mesh, make_plan):
    fedavg, _ = _run(poisoned_mesh, make_plan, PlanAggregation())
    median, _ = _run(poisoned_mesh, make_plan, PlanAggregation(strategy="median"))
    trimmed, notes = _run(poisoned_mesh, make_plan, PlanAggregation(strategy="trimmed_mean", trim=0.2))
    assert notes == {"trimmed 1 from each end per coordinate"}
    _, chosen = _run(poisoned_mesh, make_plan, PlanAggregation(strategy="krum", byzantine=1))
    assert chosen and all(n.startswith("krum chose client-") for n in chosen)
    assert "krum chose client-4's update" not in chosen
    assert median > fedavg + 0.1 and trimmed > fedavg + 0.1, (fedavg, median, trimmed)


def test_policies_see_the_same_aggregation_at_compile_and_run_time(tmp_path):
    from meshctl.runtime.governance import evaluate_job, job_activation

    mesh = Path(__file__).resolve().parents[2] / "mesh.yaml"
    shutil.copytree(mesh.parent / "examples", tmp_path / "examples")
    robust = ("  - name: robust-aggregation\n    scope: model\n"
              "    require: model.aggregation.strategy in ['median', 'fedadam'] && "
              "(model.aggregation.strategy != 'fedadam' || model.aggregation.server_lr <= 0.05)\n"
              "    message: models aggregate robustly\n")
    for setting, effect in {"fedavg": "deny", "median": "allow", "fedadam": "allow",
                            "fedadam, server_lr: 0.1": "deny"}.items():
        text = mesh.read_text().replace("aggregation: {strategy: fedavg}", f"aggregation: {{strategy: {setting}}}")
        text = text.replace("policies:\n", "policies:\n" + robust, 1)
        (tmp_path / "mesh.yaml").write_text(text)
        result = compile_mesh(tmp_path / "mesh.yaml")
        if effect == "deny":
            assert result.plan is None and "policy 'robust-aggregation' denies" in result.render_diagnostics()
            continue
        plan = result.plan
        assert {d.policy: d.effect for d in plan.decisions}["robust-aggregation"] == "allow"
        decided = {d.policy: d.effect for d in evaluate_job(plan, plan.jobs[0], "charite", date(2026, 11, 24))}
        assert decided["robust-aggregation"] == "allow"
        assert job_activation(plan, plan.jobs[0])["aggregation"]["strategy"] == setting.split(",")[0]
