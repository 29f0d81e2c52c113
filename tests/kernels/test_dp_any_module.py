"""DP-SGD for any module: per-example gradients from torch.func against opacus' GradSampleModule
and against single-example backward passes; clipping; BatchNorm refused; the Linear-stack
shortcut and the general path agree."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from meshctl.runtime.kernels import mlp
from meshctl.runtime.kernels.privacy import (
    NotPrivate,
    _clipped_sum,
    _clipped_sum_func,
    _linear_stack,
    dp_train_local,
    per_example_grads,
)


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3), nn.GroupNorm(2, 6), nn.Tanh(), nn.Flatten(), nn.Linear(24, 5))


class Tokens(nn.Module):
    """An embedding, a layer norm and a head: nothing a Linear stack could do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(30)
        self.head = nn.Linear(30, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(x.long()).flatten(1)))


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def one_by_one(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss=nn.functional.cross_entropy):
    """Per-example gradients the slow and obvious way: one backward pass per example."""
    out = []
    for i in range(len(x)):
        model.zero_grad()
        loss(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        out.append({k: p.grad.clone() for k, p in model.named_parameters()})
    return {k: torch.stack([o[k] for o in out]) for k in out[0]}


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_cnn_per_example_gradients_equal_opacus_and_single_backward_passes():
    x, y = images(7)
    model = small_cnn()
    ours = per_example_grads(model, x, y)
    loop = one_by_one(model, x, y)
    gsm = GradSampleModule(small_cnn(), loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    theirs = {k.removeprefix("_module."): p.grad_sample for k, p in gsm.named_parameters()}
    assert set(ours) == set(loop) == set(theirs)
    for k in ours:
        assert ours[k].shape == (7, *dict(model.named_parameters())[k].shape)
        torch.testing.assert_close(ours[k], loop[k], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=1e-4)


def test_each_cnn_example_gradient_is_clipped_before_summing():
    x, y = images(9, seed=3)
    model, clip = small_cnn(2), 0.3
    loop = one_by_one(model, x, y)
    names = [k for k, _ in model.named_parameters()]
    norms = torch.sqrt(sum(loop[k].double().reshape(9, -1).pow(2).sum(1) for k in names))
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (factor < 1).any()  # the clip binds for some examples
    expect = [(loop[k] * factor.float().reshape(-1, *[1] * (loop[k].dim() - 1))).sum(0) for k in names]
    for got, want in zip(_clipped_sum(model, _linear_stack(model), x, y, clip), expect):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_the_linear_shortcut_and_the_general_path_agree_on_an_mlp():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(40, 6, generator=g) * 2, torch.randint(0, 3, (40,), generator=g)
    model = mlp(6, [8, 5], 3, seed=1)
    assert _linear_stack(model) is not None
    fast = _clipped_sum(model, _linear_stack(model), x, y, 0.7)
    general = _clipped_sum_func(model, x, y, 0.7, "cross_entropy")
    for a, b in zip(fast, general):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("loss", "target"), [("bce", "binary"), ("mse", "real"), ("huber", "real"), ("mae", "real")])
def test_binary_and_regression_losses_clip_per_example(loss, target):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 4, generator=g)
    y = torch.randint(0, 2, (12,), generator=g).float() if target == "binary" else torch.randn(12, generator=g) * 3
    model = mlp(4, [6], 1, seed=2)
    fns = {"bce": nn.functional.binary_cross_entropy_with_logits, "mse": nn.functional.mse_loss,
           "huber": nn.functional.huber_loss, "mae": nn.functional.l1_loss}
    loop = one_by_one(model, x, y, lambda out, t, reduction: fns[loss](out.squeeze(1), t, reduction=reduction))
    general = per_example_grads(model, x, y, loss)
    for k in loop:
        torch.testing.assert_close(general[k], loop[k], atol=1e-5, rtol=1e-4)
    fast = _clipped_sum(model, _linear_stack(model), x, y, 0.5, loss)
    for a, b in zip(fast, _clipped_sum_func(model, x, y, 0.5, loss)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_an_embedding_and_layer_norm_model_trains_privately():
    g = torch.Generator().manual_seed(6)
    x = torch.randint(0, 11, (120, 5), generator=g).float()
    y = (x[:, 0] % 3).long()  # learnable from the first token alone
    model = Tokens()
    with torch.no_grad():
        before = float(nn.functional.cross_entropy(model(x), y))
    for i in range(10):
        dp_train_local(model, x, y, epochs=1, batch_size=30, lr=0.5, clip=1.0, sigma=0.3, seed=i)
    with torch.no_grad():
        after = float(nn.functional.cross_entropy(model(x), y))
    assert after < before * 0.5


def test_a_frozen_parameter_stays_as_it_is():
    x, y = images(20)
    model = small_cnn()
    model[0].weight.requires_grad_(False)
    frozen, head = model[0].weight.clone(), model[7].weight.clone()
    dp_train_local(model, x, y, epochs=1, batch_size=10, lr=0.1, clip=1.0, sigma=1.0, seed=1)
    assert torch.equal(model[0].weight, frozen) and not torch.equal(model[7].weight, head)


def test_batch_norm_is_refused_with_one_line_naming_the_layer():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 3))
    x, y = images(6)
    with pytest.raises(NotPrivate, match=r"layer '1' is BatchNorm2d.*per-example gradients") as err:
        dp_train_local(model, x, y, epochs=1, batch_size=3, lr=0.1, clip=1.0, sigma=1.0, seed=0)
    assert "\n" not in str(err.value)


def test_meshctl_up_trains_a_dp_cnn_and_the_ledger_charges_what_the_accountant_says(tmp_path):
    """A real run of the user-written CNN of examples/digits-cnn under DP: every domain's ledger holds
    ε(q, sigma, steps) of the accountant (and opacus' own), for its own q and the calibrated sigma."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import duckdb
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from meshctl.runtime.kernels.privacy import ORDERS, epsilon, noise_multiplier, steps_per_epoch
    from meshctl.runtime.ledger import Ledger, ledger_path

    root = Path(__file__).resolve().parents[2] / "examples" / "digits-cnn"
    shutil.copytree(root, tmp_path / "m", ignore=shutil.ignore_patterns(".meshctl", "__pycache__"))
    mesh = tmp_path / "m" / "mesh.yaml"
    text = mesh.read_text().replace("rounds: 15,", "rounds: 2,").replace("channels: 16", "channels: 4").replace(
        "    aggregation: {strategy: fedavg}\n",
        "    aggregation: {strategy: fedavg}\n    privacy: {dp: {epsilon: 2.0, delta: 1.0e-5, clip: 1.0}}\n")
    mesh.write_text(text)
    out = subprocess.run([sys.executable, "-m", "meshctl", "up", "--headless", "--address", "tcp://127.0.0.1:0"],
                         cwd=mesh.parent, capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    ledger = Ledger(ledger_path(mesh.parent))
    for d in "abcd":
        with duckdb.connect() as con:
            (n,), = con.execute(f"SELECT count(*) FROM '{mesh.parent}/data/clinic-{d}.parquet' "
                                "WHERE split <> 'test'").fetchall()
        q, steps = min(1.0, 32 / n), 2 * steps_per_epoch(n, 32)
        sigma = noise_multiplier(q, steps, 2.0, 1e-5)
        rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(ORDERS))
        theirs, _ = get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=1e-5)
        charged = ledger.spent(f"clinic-{d}.images")
        assert charged == pytest.approx(epsilon(q, sigma, steps, 1e-5), rel=1e-9)
        assert charged == pytest.approx(float(theirs), rel=1e-9) and 1.9 < charged <= 2.0


def test_a_dp_model_with_batch_norm_is_refused_at_compile_time(tmp_path):
    """BatchNorm without running statistics has only float32 state (MESH517 does not see it); the
    compiler's introspection names the layer and refuses DP on it in one line (MESH534)."""
    import shutil
    from pathlib import Path

    from meshctl.compiler.compile import compile_mesh

    root = Path(__file__).resolve().parents[2] / "examples" / "digits-cnn"
    shutil.copytree(root, tmp_path / "m", ignore=shutil.ignore_patterns(".meshctl", "__pycache__"))
    mesh = tmp_path / "m" / "mesh.yaml"
    (mesh.parent / "digits_cnn" / "model.py").write_text(
        "from torch import nn\n\n\ndef build(input_shape, output_dim, channels=4):\n"
        "    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels, "
        "track_running_stats=False),\n                         nn.Flatten(), nn.Linear(channels * 64, output_dim))\n")
    text = mesh.read_text().replace("model.architecture.code_hash in [", "true || model.architecture.code_hash in [")
    mesh.write_text(text)
    assert compile_mesh(mesh).plan is not None  # without DP it is a fine model
    mesh.write_text(text.replace("    aggregation: {strategy: fedavg}\n",
                                 "    aggregation: {strategy: fedavg}\n    privacy: {dp: {epsilon: 2.0}}\n"))
    errors = [(d.code, d.message) for d in compile_mesh(mesh).errors]
    says = ("model 'digits-cnn' trains with DP, but its layer '1' is a BatchNorm, which mixes the examples of "
            "a batch: per-example gradients (DP-SGD) are undefined for it")
    assert errors == [("MESH534", says)]
