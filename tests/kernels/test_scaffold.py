"""SCAFFOLD (issue 13): the kernel by hand, the runtime's steps against a plain sequential reference
loop (Karimireddy et al. 2020, algorithm 1 with option II), the compile checks, and `meshctl up
--headless` with scaffold on the non-IID digits mesh (real daemons, ZeroMQ, Curve)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.diagnostics import render_all
from meshctl.compiler.plan import PlanAggregation
from meshctl.runtime.coordinator.strategy import Scaffold, make_strategy
from meshctl.runtime.kernels.scaffold import client_control, server_step
from meshctl.runtime.kernels.train import local_steps, train_local

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


def test_client_control_is_option_two_by_hand():
    # c_i = 1, c = 3, x = 10, y = 4 after K = 2 steps at lr 0.5: c_i+ = 1 - 3 + (10 - 4) / 1 = 4
    new, delta = client_control([torch.tensor([1.0])], [torch.tensor([3.0])], [torch.tensor([10.0])],
                                [torch.tensor([4.0])], 2, 0.5)
    assert new[0].tolist() == [4.0] and delta[0].tolist() == [3.0]


def test_server_step_moves_x_by_the_weighted_mean_and_c_by_s_over_n_of_the_plain_mean():
    # x = 0, y = (2 with 1 example, 6 with 3): mean 5, server_lr 0.5 -> 2.5; c = 1, deltas (1, 3): mean 2,
    # 2 of N = 4 sampled -> c + 0.5 * 2 = 2
    x, c = server_step([torch.tensor([0.0])], [torch.tensor([1.0])], [[torch.tensor([2.0])], [torch.tensor([6.0])]],
                       [[torch.tensor([1.0])], [torch.tensor([3.0])]], [1, 3], 0.5, 4)
    assert x[0].tolist() == [2.5] and c[0].tolist() == [2.0]


def test_without_control_changes_scaffold_is_fedavg_with_a_server_lr():
    s = make_strategy(PlanAggregation(strategy="scaffold"))
    w = [torch.zeros(2)]
    new, _ = s.aggregate(w, ["a", "b"], [[torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 0.0])]], [1, 3])
    assert new[0].tolist() == [2.5, 0.5] and s.control[0].tolist() == [0.0, 0.0]


def _reference(data, w0, rounds: int, lr: float, batch: int) -> list[torch.Tensor]:
    """SCAFFOLD written out: a linear model, plain SGD, every client each round, uniform mean of delta c."""
    n = len(data)
    x = [t.clone().double() for t in w0]
    c = [torch.zeros_like(t) for t in x]
    ci = [[torch.zeros_like(t) for t in x] for _ in range(n)]
    for r in range(1, rounds + 1):
        ys, dcs, ex = [], [], []
        for i, (xs, target) in enumerate(data):
            y = [t.clone().requires_grad_(True) for t in x]
            perm = torch.randperm(len(target), generator=torch.Generator().manual_seed(1000 * r + i))
            steps = 0
            for s in range(0, len(target), batch):
                b = perm[s:s + batch]
                out = xs[b].double() @ y[0].T + y[1]
                loss = nn.functional.cross_entropy(out, target[b])
                grads = torch.autograd.grad(loss, y)
                with torch.no_grad():
                    y = [(t - lr * (g + cc - cl)).requires_grad_(True) for t, g, cc, cl in zip(y, grads, c, ci[i])]
                steps += 1
            y = [t.detach() for t in y]
            new = [cl - cc + (a - b) / (steps * lr) for cl, cc, a, b in zip(ci[i], c, x, y)]
            dcs.append([a - b for a, b in zip(new, ci[i])])
            ci[i] = new
            ys.append(y)
            ex.append(len(target))
        total = sum(ex)
        x = [sum(e / total * y[k] for y, e in zip(ys, ex)) for k in range(len(x))]
        c = [cc + sum(d[k] for d in dcs) / n for k, cc in enumerate(c)]
    return x


def test_the_runtimes_scaffold_steps_give_the_reference_loops_weights():
    # Prepare: 3 clients with skewed labels, a linear model, 4 rounds of 1 epoch at lr 0.1
    torch.manual_seed(0)
    data = []
    for i in range(3):
        xs = torch.randn(40, 5)
        target = (torch.arange(40) % 2 + i) % 3  # each client sees two of three classes
        xs[:, 0] += target.float()
        data.append((xs, target))
    model = nn.Linear(5, 3)
    w0 = [p.detach().clone() for p in model.parameters()]
    # Execute: the daemon's calls (train_local with control, client_control) and the coordinator's strategy
    strategy = make_strategy(PlanAggregation(strategy="scaffold"))
    assert isinstance(strategy, Scaffold)
    x = [t.clone() for t in w0]
    ci = [[torch.zeros_like(t) for t in x] for _ in data]
    for r in range(1, 5):
        c = strategy.controls_for(x)
        ys, dcs = [], []
        for i, (xs, target) in enumerate(data):
            with torch.no_grad():
                for p, t in zip(model.parameters(), x):
                    p.copy_(t)
            train_local(model, xs, target, epochs=1, batch_size=16, lr=0.1, shuffle_seed=1000 * r + i,
                        control=[a - b for a, b in zip(c, ci[i])])
            y = [p.detach().clone() for p in model.parameters()]
            ci[i], dc = client_control(ci[i], c, x, y, local_steps(len(target), 1, 16), 0.1)
            ys.append(y)
            dcs.append(dc)
        x, _ = strategy.aggregate_controlled(x, ["a", "b", "c"], ys, dcs, [len(t) for _, t in data], 3)
    # Assert: the same weights as the reference loop (float32 against float64: to float precision)
    ref = _reference(data, w0, 4, 0.1, 16)
    assert all(torch.allclose(a.double(), b, atol=1e-5) for a, b in zip(x, ref))
    assert any(float(t.abs().max()) > 0 for t in strategy.control)  # c moved


def _compile(tmp_path: Path, model_extra: str, training: str = "") -> str:
    sys.path.insert(0, str(DIGITS))
    from make_data import write_mesh

    mesh = write_mesh(tmp_path / "m", 4, rounds=2)
    text = mesh.read_text().replace("aggregation: {strategy: fedavg}", f"aggregation: {{strategy: scaffold}}\n{model_extra}")
    if training:
        text = text.replace("optimizer: sgd", training)
    mesh.write_text(text)
    result = compile_mesh(mesh)
    return render_all(result.diagnostics, result.source)


def test_scaffold_is_refused_with_secure_aggregation_and_with_adam(tmp_path):
    out = _compile(tmp_path, "    privacy: {secure_aggregation: true}", "optimizer: adam")
    assert "MESH549" in out and "control variate change travels unmasked" in out
    assert "MESH550" in out and "optimizer adam" in out and "Traceback" not in out
    explain = subprocess.run([sys.executable, "-m", "meshctl", "explain", "MESH549"], capture_output=True,
                             text=True, timeout=60, check=False)
    assert explain.returncode == 0 and "scaffold" in explain.stdout


def test_up_headless_trains_scaffold_on_non_iid_digits_with_three_of_four_sampled(tmp_path):
    sys.path.insert(0, str(DIGITS))
    from make_data import write_mesh

    mesh = write_mesh(tmp_path / "m", 4, rounds=4)
    mesh.write_text(mesh.read_text().replace("aggregation: {strategy: fedavg}", "aggregation: {strategy: scaffold}\n"
                                             "    sampling: {per_round: 3, seed: 1}"))
    out = subprocess.run([sys.executable, "-m", "meshctl", "up", "--headless", "--address", "tcp://127.0.0.1:0",
                          str(mesh)], capture_output=True, text=True, cwd=mesh.parent, timeout=170, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run = Path(out.stdout.strip().splitlines()[-1].rsplit(": ", 1)[-1])
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    rounds = [e for e in events if e["type"] == "round_completed"]
    assert len(rounds) == 4 and all(e["aggregation"].startswith("scaffold: c moved by 3/4") for e in rounds)
    assert rounds[-1]["metrics"]["accuracy"] > 0.75, [e["metrics"]["accuracy"] for e in rounds]
    assert not [e for e in events if e["type"] == "message_rejected"]
    started = [e for e in events if e["type"] == "round_started"]
    assert [(len(e["participants"]), len(e["idle"])) for e in started] == [(3, 1)] * 4
    assert [sorted(e["participants"]) for e in rounds] == [sorted(e["participants"]) for e in started]
    # each update carries its control variate change: twice the bytes of the weights alone
    assert all(e["bytes_in"] > 2 * 3 * 9610 * 4 for e in rounds)
