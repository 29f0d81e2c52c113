"""Split learning kernels (issue 15): with no noise the split protocol trains exactly the
centralised network (the bottoms concatenated into the top, one optimizer over all
parameters, same seeds, same batches); noise and clipping do what they declare."""

from __future__ import annotations

import copy

import pytest
import torch

from meshctl.runtime.kernels import split

torch.set_num_threads(1)

OPTIMIZERS = {
    "sgd-momentum": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "adam": {"name": "adam", "lr": 0.01},
}


def _data(loss: str, n: int = 150):
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g), torch.randn(n, 4, generator=g)]
    signal = parts[0][:, 0] + parts[1][:, 1] - parts[2][:, 2]
    if loss == "bce":
        return parts, (signal > 0).float(), 1
    return parts, torch.bucketize(signal, torch.tensor([-1.0, 1.0])), 3


def _models(parts, n_out):
    bottoms = [split.build_bottom({"kind": "mlp", "hidden": [8], "out": 4}, parts[0].shape[1], seed=1),
               split.build_bottom({"kind": "linear", "out": 2}, parts[1].shape[1], seed=2),
               split.build_bottom({"kind": "mlp", "hidden": [6, 5], "out": 3}, parts[2].shape[1], seed=3)]
    top = split.build_top({"kind": "mlp", "hidden": [7]}, 4 + 2 + 3, n_out, seed=4)
    return bottoms, top


@pytest.mark.parametrize("opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
@pytest.mark.parametrize("loss", ["bce", "cross_entropy"])
def test_split_training_equals_the_centralised_network(loss, opt):
    parts, y, n_out = _data(loss)
    bottoms, top = _models(parts, n_out)
    ref_bottoms, ref_top = copy.deepcopy(bottoms), copy.deepcopy(top)
    ref_losses = split.train_centralised(ref_bottoms, ref_top, parts, y, epochs=4, batch_size=16,
                                         optimizer=opt, loss=loss, seed=7)
    workers = [split.BottomWorker(b, opt, seed=i) for i, b in enumerate(bottoms)]
    top_worker = split.TopWorker(top, None, loss, opt)
    losses = split.train_split_in_process(workers, top_worker, parts, y, epochs=4, batch_size=16, seed=7)
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    assert ref_losses[-1] < ref_losses[0]
    ref = split.SplitNet(ref_bottoms, ref_top).state_dict()
    got = split.SplitNet(bottoms, top).state_dict()
    moved = split.SplitNet(*_models(parts, n_out)).state_dict()
    for name, t in ref.items():
        assert torch.allclose(got[name], t, atol=1e-6), name
        assert not torch.equal(moved[name], t), f"{name} did not train"
    out = split.predict_split(workers, top_worker, parts)
    with torch.no_grad():
        assert torch.allclose(out, split.SplitNet(ref_bottoms, ref_top)(parts), atol=1e-6)


def test_clipped_split_equals_the_clipped_centralised_network():
    parts, y, n_out = _data("bce")
    bottoms, top = _models(parts, n_out)
    ref_bottoms, ref_top = copy.deepcopy(bottoms), copy.deepcopy(top)
    opt = OPTIMIZERS["sgd-momentum"]
    split.train_centralised(ref_bottoms, ref_top, parts, y, epochs=2, batch_size=32, optimizer=opt,
                            loss="bce", clip=0.5)
    workers = [split.BottomWorker(b, opt, clip=0.5) for b in bottoms]
    split.train_split_in_process(workers, split.TopWorker(top, "binary", "bce", opt), parts, y, epochs=2,
                                 batch_size=32)
    for a, b in zip(split.SplitNet(bottoms, top).parameters(), split.SplitNet(ref_bottoms, ref_top).parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_noise_has_the_declared_sigma_and_clip_bounds_each_row():
    x = torch.randn(4000, 5, generator=torch.Generator().manual_seed(0))
    bottom = split.build_bottom({"kind": "linear", "out": 8}, 5, seed=0)
    clean = split.BottomWorker(bottom, {"name": "sgd"}).forward(x, train=False)
    for sigma in (0.1, 1.5):
        noisy = split.BottomWorker(bottom, {"name": "sgd"}, noise=sigma, seed=1).forward(x, train=False)
        diff = noisy - clean
        assert abs(diff.std().item() - sigma) < 0.02 * sigma
        assert abs(diff.mean().item()) < 0.01 * sigma
    a = split.BottomWorker(bottom, {"name": "sgd"}, noise=1.0, seed=5).forward(x)
    b = split.BottomWorker(bottom, {"name": "sgd"}, noise=1.0, seed=5).forward(x)
    assert torch.equal(a, b), "the noise is not drawn from the seeded generator"
    clipped = split.BottomWorker(bottom, {"name": "sgd"}, clip=0.3).forward(x * 100)
    assert clipped.norm(dim=1).max().item() <= 0.3 + 1e-5
    small = split.BottomWorker(bottom, {"name": "sgd"}, clip=1e6).forward(x)
    assert torch.allclose(small, clean)


def test_batch_order_is_train_locals_and_covers_every_row():
    batches = split.batch_order(103, 10, seed=5, epoch=2)
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert sorted(i for b in batches for i in b) == list(range(103))
    perm = torch.randperm(103, generator=torch.Generator().manual_seed(7)).tolist()
    assert batches[0] == perm[:10]
    assert split.batch_order(103, 10, seed=5, epoch=2) == batches
    assert split.batch_order(103, 10, seed=5, epoch=3) != batches


def test_bad_architectures_and_gradients_are_refused():
    with pytest.raises(ValueError, match="unknown bottom model kind 'cnn'"):
        split.build_bottom({"kind": "cnn", "out": 2}, 3, seed=0)
    with pytest.raises(ValueError, match="unknown top model kind"):
        split.build_top({"kind": "tree"}, 3, 1, seed=0)
    w = split.BottomWorker(split.build_bottom({"kind": "linear", "out": 2}, 3, seed=0), {"name": "sgd"})
    with pytest.raises(RuntimeError, match="backward without a training forward"):
        w.backward(torch.zeros(4, 2))
    w.forward(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="gradient of shape"):
        w.backward(torch.zeros(4, 3))


def test_holdout_split_is_seeded_disjoint_and_bounded():
    train, hold = split.holdout_split(100, 0.2, seed=3)
    assert len(hold) == 20 and sorted(train + hold) == list(range(100))
    assert split.holdout_split(100, 0.2, seed=3) == (train, hold)
    assert split.holdout_split(100, 0.2, seed=4) != (train, hold)
    assert len(split.holdout_split(10, 0.0, seed=0)[1]) == 1
    assert len(split.holdout_split(10, 1.0, seed=0)[0]) == 1
    assert split.holdout_split(1, 0.2, seed=0) == ([0], [])


def test_noise_is_secret_by_default_and_peers_inputs_are_checked():
    bottom = split.build_bottom({"kind": "linear", "out": 4}, 3, seed=0)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    a = split.BottomWorker(bottom, {"name": "sgd"}, noise=1.0).forward(x, train=False)
    b = split.BottomWorker(bottom, {"name": "sgd"}, noise=1.0).forward(x, train=False)
    assert not torch.equal(a, b), "without a seed the noise must come from a fresh secret seed"
    with pytest.raises(ValueError, match="finite sigma >= 0"):
        split.BottomWorker(bottom, {"name": "sgd"}, noise=-1.0)
    with pytest.raises(ValueError, match="clip must be > 0"):
        split.BottomWorker(bottom, {"name": "sgd"}, clip=0.0)
    w = split.BottomWorker(bottom, {"name": "sgd"})
    w.forward(x)
    with pytest.raises(ValueError, match="non-finite"):
        w.backward(torch.full((50, 4), float("nan")))
    top = split.TopWorker(split.build_top({"kind": "linear"}, 4, 2, seed=0), None, "cross_entropy", {"name": "sgd"})
    with pytest.raises(ValueError, match="activations of part 0"):
        top.step([torch.full((50, 4), float("inf"))], torch.zeros(50, dtype=torch.int64))
    with pytest.raises(ValueError, match="for 49 rows"):
        top.step([torch.zeros(50, 4)], torch.zeros(49, dtype=torch.int64))
