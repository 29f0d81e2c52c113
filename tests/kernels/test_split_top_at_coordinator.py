"""The top model at the coordinator (`top: {at: coordinator}`, issue 15): `TopWorker.step` cut in two around
the loss (`TopWorker.forward`, `LossWorker.grad` at the label owner, `TopWorker.backward`) trains the same
model, bit for bit; and the gradient the label owner returns reveals each row's label (MESH580)."""

from __future__ import annotations

import pytest
import torch

from meshctl.runtime.kernels import split

torch.set_num_threads(1)


def _workers(opt: dict, loss: str, n_out: int):
    bottoms = [split.BottomWorker(split.build_bottom({"kind": "mlp", "hidden": [8], "out": 4}, 5, seed=1), opt),
               split.BottomWorker(split.build_bottom({"kind": "linear", "out": 2}, 3, seed=2), opt)]
    task = "regression" if loss == "mse" else None
    top = split.TopWorker(split.build_top({"kind": "mlp", "hidden": [7]}, 6, n_out, seed=4), task, loss, opt)
    return bottoms, top, split.LossWorker(task, loss)


@pytest.mark.parametrize("opt", [{"name": "sgd", "lr": 0.1, "momentum": 0.9}, {"name": "adam", "lr": 0.01}],
                         ids=["sgd-momentum", "adam"])
@pytest.mark.parametrize(("loss", "n_out"), [("cross_entropy", 3), ("bce", 1), ("mse", 1)])
def test_the_step_cut_around_the_loss_trains_the_same_model(opt: dict, loss: str, n_out: int) -> None:
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(90, 5, generator=g), torch.randn(90, 3, generator=g)]
    signal = parts[0][:, 0] - parts[1][:, 1]
    y = {"cross_entropy": torch.bucketize(signal, torch.tensor([-1.0, 1.0])), "bce": (signal > 0).float(),
         "mse": signal}[loss]
    here, there = _workers(opt, loss, n_out), _workers(opt, loss, n_out)
    for epoch in range(2):
        for b in split.batch_order(90, 16, 0, epoch):
            acts = [w.forward(x[b]) for w, x in zip(here[0], parts)]
            owner_loss, grads = here[1].step(acts, y[b])
            for w, gr in zip(here[0], grads):
                w.backward(gr)
            acts = [w.forward(x[b]) for w, x in zip(there[0], parts)]
            coordinator_loss, d_logits = there[2].grad(there[1].forward(acts), y[b])
            for w, gr in zip(there[0], there[1].backward(d_logits)):
                w.backward(gr)
            assert coordinator_loss == owner_loss
    for a, b in zip([*here[1].model.parameters(), *(p for w in here[0] for p in w.model.parameters())],
                    [*there[1].model.parameters(), *(p for w in there[0] for p in w.model.parameters())]):
        assert torch.equal(a, b)


def test_the_logit_gradient_of_cross_entropy_reveals_every_label() -> None:
    logits = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) * 5
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))
    _, d_logits = split.LossWorker(None, "cross_entropy").grad(logits, y)
    assert torch.equal(d_logits.argmin(dim=1), y)  # (softmax - onehot) / batch: negative only at the label
    assert torch.allclose(d_logits, (logits.softmax(1) - torch.nn.functional.one_hot(y, 3)) / 64, atol=1e-7)


def test_a_gradient_of_the_wrong_shape_or_without_a_forward_is_refused() -> None:
    _, top, _ = _workers({"name": "sgd", "lr": 0.1}, "cross_entropy", 3)
    with pytest.raises(RuntimeError, match="backward without a forward"):
        top.backward(torch.zeros(4, 3))
    top.forward([torch.zeros(4, 4), torch.zeros(4, 2)])
    with pytest.raises(ValueError, match=r"a logits gradient of shape \[4, 2\]"):
        top.backward(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"logits of shape \[4, 3\] for 5 rows"):
        split.LossWorker(None, "cross_entropy").grad(torch.zeros(4, 3), torch.zeros(5, dtype=torch.int64))
