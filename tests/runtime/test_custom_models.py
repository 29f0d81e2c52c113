"""Entrypoint models over real processes: a domain refuses code that hashes otherwise than the
plan pins; meshctl's training of a user's module equals the plain sequential FedAvg loop;
the built-ins' state matches what the torch-free compiler records (issue 12)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import PlanArchitecture, PlanJob, cnn_tensors, mlp_tensors
from meshctl.runtime import events as ev
from meshctl.runtime.data import load_job_data
from meshctl.runtime.kernels import fedavg, train_local
from meshctl.runtime.kernels.models import build_model
from meshctl.runtime.launcher import start_run

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits-cnn"


def _mesh(tmp_path: Path, rounds: int = 2, domains: int = 4) -> Path:
    """examples/digits-cnn copied to tmp, `rounds` rounds, the first `domains` domains, no allow-list."""
    root = tmp_path / "m"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns(".meshctl", "__pycache__"))
    text = (root / "mesh.yaml").read_text().replace("rounds: 15,", f"rounds: {rounds},")
    text = text[:text.index("  - name: approved-model-code")] + text[text.index("  - name: small-models"):]
    for gone in ["clinic-d", "clinic-c"][:4 - domains]:
        text = "\n".join(line for line in text.splitlines() if gone not in line) + "\n"
    (root / "mesh.yaml").write_text(text)
    return root / "mesh.yaml"


def test_a_domain_refuses_model_code_that_differs_from_the_plan(tmp_path):
    mesh = _mesh(tmp_path, rounds=1, domains=2)
    plan = compile_mesh(mesh).plan
    model = mesh.parent / "digits_cnn" / "model.py"
    model.write_text(model.read_text() + "\nprint('exfiltrate')\n")  # edited after the plan was reviewed
    run = start_run(mesh, plan)
    events = list(run.follow())
    result = run.finish()
    assert not result.ok
    denied = [e for e in events if isinstance(e, ev.PolicyDecided) and e.policy == "invariant:model-code"]
    assert {e.domain for e in denied} == {"clinic-a", "clinic-b"} and {e.effect for e in denied} == {"deny"}
    assert all(e.reason.startswith("model code file digits_cnn/model.py differs from the plan's") for e in denied)
    failed = [e for e in events if isinstance(e, ev.JobFailed)]
    assert "refused the job: invariant:model-code: model code file digits_cnn/model.py differs" in failed[0].reason
    assert not any(isinstance(e, ev.RoundStarted) for e in events)
    (mesh.parent / "digits_cnn" / "extra.py").write_text("")
    model.unlink()
    from meshctl.compiler.entrypoint import check_code

    reason = check_code(plan.jobs[0].architecture, mesh.parent)
    assert reason is not None and "model code file digits_cnn/model.py is missing here" in reason


def _reference(job: PlanJob, plan, base: Path) -> dict[str, torch.Tensor]:
    """The plain sequential FedAvg loop: the user's factory called directly (no meshctl model
    code), seeded as the plan says; each domain trains from the global weights in turn."""
    sys.path.insert(0, str(base))
    try:
        from digits_cnn.model import build
    finally:
        sys.path.remove(str(base))
    t = job.training
    torch.manual_seed(t.seed)
    model = build([1, 8, 8], 10, channels=16)
    glob = [v.detach().clone() for v in model.state_dict().values()]
    data = [load_job_data(job, plan.product(r.product), base, r.client_id) for r in job.reads]
    for r in range(1, t.rounds + 1):
        updates, examples = [], []
        for read, d in zip(job.reads, data):
            model.load_state_dict(dict(zip(model.state_dict(), glob)))
            train_local(model, d.x_train.view(-1, 1, 8, 8), d.y_train, epochs=t.local_epochs,
                        batch_size=t.batch_size, lr=t.lr, momentum=t.momentum,
                        shuffle_seed=1000 * r + read.client_id)
            updates.append([v.detach().clone() for v in model.state_dict().values()])
            examples.append(len(d.y_train))
        glob = fedavg(updates, examples)
    return dict(zip(model.state_dict(), glob))


def test_meshctl_trains_the_users_module_as_the_sequential_fedavg_loop_does(tmp_path):
    mesh = _mesh(tmp_path, rounds=3, domains=2)  # kept short; the full example reaches 0.975 (README)
    plan = compile_mesh(mesh).plan
    run = start_run(mesh, plan)
    rounds = [e for e in run.follow() if isinstance(e, ev.RoundCompleted)]
    result = run.finish()
    assert result.ok, result.reason
    assert len(rounds) == 3 and rounds[-1].metrics["accuracy"] > rounds[0].metrics["accuracy"]
    from safetensors.torch import load_file

    got = load_file(result.run_dir / "models" / "digits-cnn.safetensors")
    want = _reference(plan.jobs[0], plan, mesh.parent)
    assert sorted(got) == sorted(want)
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= 1e-6, worst


def test_builtin_state_is_what_the_compiler_records():
    shape, out = [1, 8, 8], 10
    for arch, tensors in [
        (PlanArchitecture(kind="cnn", input_dim=64, hidden=[32], output_dim=out, channels=[4, 8, 8], kernel=5),
         cnn_tensors(shape, [4, 8, 8], 5, [32], out)),
        (PlanArchitecture(kind="logistic", input_dim=64, hidden=[], output_dim=out), mlp_tensors(64, [], out)),
    ]:
        job = PlanJob.model_construct(architecture=arch, input_shape=shape)
        model = build_model(job, seed=0)
        assert [(n, list(v.shape)) for n, v in model.state_dict().items()] == [(t.name, t.shape) for t in tensors]
        assert model(torch.zeros(3, 64)).shape == (3, out)  # flat rows are viewed as [n, 1, 8, 8]
