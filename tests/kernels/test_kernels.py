"""Kernels against hand-computed tensors (Prepare / Execute / Assert)."""

import math

import pytest
import torch

from meshctl.compiler.plan import mlp_tensors
from meshctl.runtime.kernels import evaluate, fedavg, mlp, train_local


def test_fedavg_weights_by_examples():
    # Prepare
    a = [torch.tensor([1.0, 2.0]), torch.tensor([0.0])]
    b = [torch.tensor([3.0, 6.0]), torch.tensor([4.0])]
    # Execute
    out = fedavg([a, b], [1, 3])
    # Assert: (1*a + 3*b) / 4
    assert torch.allclose(out[0], torch.tensor([2.5, 5.0]))
    assert torch.allclose(out[1], torch.tensor([3.0]))
    assert out[0].dtype == torch.float32


def test_fedavg_rejects_empty_or_zero_weights():
    with pytest.raises(ValueError):
        fedavg([], [])
    with pytest.raises(ValueError):
        fedavg([[torch.zeros(1)]], [0])


def test_mlp_state_matches_the_compilers_tensor_list():
    model = mlp(10, [32, 16], 2)
    state = model.state_dict()
    spec = mlp_tensors(10, [32, 16], 2)
    assert [t.name for t in spec] == list(state)
    assert [t.shape for t in spec] == [list(v.shape) for v in state.values()]
    assert sum(math.prod(t.shape) for t in spec) == sum(p.numel() for p in model.parameters())


def test_mlp_init_is_seeded():
    a, b = mlp(4, [8], 3, seed=7), mlp(4, [8], 3, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_sgd_kernel_matches_torch_optim_sgd_exactly():
    # Prepare: same data, same order, same init
    x, y = torch.randn(70, 5, generator=torch.Generator().manual_seed(1)), torch.arange(70) % 3
    ours, ref = mlp(5, [8], 3, seed=0), mlp(5, [8], 3, seed=0)
    # Execute
    train_local(ours, x, y, batch_size=16, lr=0.1, momentum=0.9, weight_decay=0.01, shuffle_seed=5)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    perm = torch.randperm(70, generator=torch.Generator().manual_seed(5))
    for s in range(0, 70, 16):
        b = perm[s:s + 16]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x[b]), y[b]).backward()
        opt.step()
    # Assert
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_training_reduces_loss_and_evaluate_returns_sums():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    model = mlp(4, [16], 2)
    first = train_local(model, x, y, lr=0.1, momentum=0.9)
    last = first
    for r in range(10):
        last = train_local(model, x, y, lr=0.1, momentum=0.9, shuffle_seed=r)
    assert last < first
    stats = evaluate(model, x, y)
    n, correct, loss_sum = stats["n"][0], sum(stats["confusion"][::3]), stats["loss"][0]
    assert n == 200 and correct > 180 and loss_sum > 0
    empty = evaluate(model, x[:0], y[:0])
    assert empty["n"] == [0.0] and empty["loss"] == [0.0] and sum(empty["confusion"]) == 0
