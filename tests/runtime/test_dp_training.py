"""DP training through real processes: each domain calibrates DP-SGD to its own data, charges
every round's ε to its product's ledger before training it, and refuses what the budget cannot pay."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meshctl.compiler.plan import PlanDp, PlanPrivacy
from meshctl.runtime import events as ev
from meshctl.runtime.launcher import start_run
from meshctl.runtime.ledger import Ledger, ledger_path


def _dp_plan(make_plan, epsilon: float, budget: float | None = None, rounds: int = 3):
    plan = make_plan(n=2, rounds=rounds)
    job = plan.jobs[0].model_copy(update={"privacy": PlanPrivacy(dp=PlanDp(epsilon=epsilon, delta=1e-5, clip=1.0))})
    products = [p.model_copy(update={"epsilon_budget": budget}) for p in plan.products]
    return plan.model_copy(update={"jobs": [job], "products": products}).with_hash()


def _events(mesh_file: Path, plan) -> tuple[list[ev.Event], object]:
    run = start_run(mesh_file, plan)
    events = list(run.follow())
    return events, run.finish()


def test_each_round_charges_its_epsilon_and_the_job_spends_at_most_its_own(mesh_file, make_plan):
    events, result = _events(mesh_file, _dp_plan(make_plan, epsilon=4.0))
    assert result.ok, result.reason
    spent = [e for e in events if isinstance(e, ev.BudgetSpent)]
    assert len(spent) == 3 * 2 and {e.subject for e in spent} == {"model.digits"}
    ledger = Ledger(ledger_path(mesh_file.parent))
    for product in ("client-0.digits", "client-1.digits"):
        mine = [e for e in spent if e.product == product]
        assert all(e.epsilon > 0 for e in mine)
        total = sum(e.epsilon for e in mine)
        assert 3.9 < total <= 4.0 + 1e-9  # calibrated to spend the job's ε, never more
        assert ledger.spent(product) == pytest.approx(total) == pytest.approx(mine[-1].total)
    rounds = [e for e in events if isinstance(e, ev.RoundCompleted)]
    assert len(rounds) == 3 and rounds[-1].metrics["accuracy"] > 0.3  # noisy, but it learns


def test_a_product_whose_ledger_cannot_pay_refuses_the_job(mesh_file, make_plan):
    events, result = _events(mesh_file, _dp_plan(make_plan, epsilon=4.0, budget=6.0, rounds=2))
    assert result.ok, result.reason
    events, result = _events(mesh_file, _dp_plan(make_plan, epsilon=4.0, budget=6.0, rounds=2))
    assert not result.ok
    denied = [e for e in events if isinstance(e, ev.PolicyDecided) and e.effect == "deny"]
    assert denied and all("budget" in e.reason or "ε" in e.reason for e in denied), [e.reason for e in denied]
    assert not [e for e in events if isinstance(e, ev.BudgetSpent)]  # nothing charged the second time
    assert Ledger(ledger_path(mesh_file.parent)).spent("client-0.digits") <= 4.0 + 1e-9


def test_meshctl_up_trains_the_digits_mesh_with_dp_and_the_ledger_shows_it(tmp_path):
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2] / "examples" / "digits"
    shutil.copytree(root, tmp_path / "digits")
    mesh = tmp_path / "digits" / "mesh.yaml"
    mesh.write_text(mesh.read_text().replace(
        "    aggregation: {strategy: fedavg}\n",
        "    aggregation: {strategy: fedavg}\n    privacy: {dp: {epsilon: 3.0, delta: 1.0e-5, clip: 1.0}}\n"))

    def meshctl(*args):
        return subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=mesh.parent, capture_output=True,
                              text=True, timeout=180, check=False)

    out = meshctl("up", "--headless", "--address", "tcp://127.0.0.1:0")
    assert out.returncode == 0, out.stderr + out.stdout
    last = [ln for ln in out.stdout.splitlines() if "round  20/20" in ln]
    eps = re.search(r" ε (\d+\.\d+) ", last[0] if last else "")
    assert eps and 2.9 < float(eps.group(1)) <= 3.0 and "Traceback" not in out.stderr
    ledger = meshctl("ledger")
    rows = [ln.split() for ln in ledger.stdout.splitlines() if ln.startswith("client-")]
    assert len(rows) == 4 and all(2.9 < float(r[1]) <= 3.0 for r in rows), ledger.stdout
