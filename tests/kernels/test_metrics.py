"""Pooled evaluation metrics equal scikit-learn's on the same predictions, over several domains."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn import metrics as skm

from meshctl.runtime.kernels.metrics import BINS, TASK_METRICS, eval_stats, finish, stat_lengths

torch.set_num_threads(1)


def _split(n: int, parts: int, seed: int) -> list[torch.Tensor]:
    """Row indices of `parts` uneven domains."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cuts = sorted(torch.randint(1, n, (parts - 1,), generator=torch.Generator().manual_seed(seed + 1)).tolist())
    return list(torch.tensor_split(perm, cuts))


def _pooled(task, out, y, classes, loss, metrics, seed=0):
    stats = [eval_stats(task, out[i], y[i], classes=classes, loss=loss) for i in _split(len(y), 4, seed)]
    for st in stats:
        assert {k: len(v) for k, v in st.items()} == stat_lengths(task, classes)
    return finish(task, metrics, stats)


@pytest.mark.parametrize(("seed", "scale"), [(0, 1.0), (1, 2.0), (2, 12.0)])
def test_classification_matches_sklearn(seed, scale):
    """scale 12: a confident model, whose probabilities crowd at 0 and 1 (finer bins there)."""
    g = torch.Generator().manual_seed(seed)
    k, n = 5, 3000
    y = torch.randint(0, k, (n,), generator=g)
    out = torch.randn(n, k, generator=g) * scale
    out[torch.arange(n), y] += 1.5 * scale  # a model better than chance
    got = _pooled("classification", out, y, k, "cross_entropy", TASK_METRICS["classification"], seed)
    probs = torch.softmax(out.double(), 1).numpy()
    pred = out.argmax(1).numpy()
    yn = y.numpy()
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(yn, pred), abs=1e-12)
    for name, fn in (("f1", skm.f1_score), ("precision", skm.precision_score), ("recall", skm.recall_score)):
        assert got[name] == pytest.approx(fn(yn, pred, average="macro"), abs=1e-12), name
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(yn, probs, multi_class="ovr", average="macro"), abs=1e-3)
    assert got["loss"] == pytest.approx(torch.nn.functional.cross_entropy(out.double(), y).item(), rel=1e-9)
    if scale < 4:  # log_loss clips probabilities at 2.2e-16: a confident model's wrong answers cost more here
        assert got["loss"] == pytest.approx(skm.log_loss(yn, probs, labels=list(range(k))), rel=1e-9)


def test_classification_macro_skips_classes_never_seen_like_sklearn():
    y = torch.tensor([0, 0, 1, 1, 2])
    out = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0], [0, 0, 3.0, 0]])
    got = finish("classification", ["f1", "precision", "recall"], [eval_stats("classification", out, y, classes=4)])
    pred = out.argmax(1).numpy()
    for name, fn in (("f1", skm.f1_score), ("precision", skm.precision_score), ("recall", skm.recall_score)):
        assert got[name] == pytest.approx(fn(y.numpy(), pred, average="macro", zero_division=0), abs=1e-12), name


@pytest.mark.parametrize(("seed", "scale"), [(0, 1.0), (1, 12.0)])
def test_binary_matches_sklearn(seed, scale):
    g = torch.Generator().manual_seed(seed)
    n = 2500
    y = (torch.rand(n, generator=g) < 0.3).float()
    logit = (torch.randn(n, 1, generator=g) * 1.5 + (y.unsqueeze(1) * 1.2)) * scale
    got = _pooled("binary", logit, y, ["no", "yes"], "bce", TASK_METRICS["binary"], seed)
    p = torch.sigmoid(logit.double()).squeeze(1).numpy()
    pred = (logit.squeeze(1) > 0).long().numpy()
    yn = y.long().numpy()
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(yn, pred), abs=1e-12)
    for name, fn in (("f1", skm.f1_score), ("precision", skm.precision_score), ("recall", skm.recall_score)):
        assert got[name] == pytest.approx(fn(yn, pred, average="binary"), abs=1e-12), name
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(yn, p), abs=1e-3)
    exact = torch.nn.functional.binary_cross_entropy_with_logits(logit.double().squeeze(1), y.double())
    assert got["loss"] == pytest.approx(exact.item(), rel=1e-9)
    if scale < 4:
        assert got["loss"] == pytest.approx(skm.log_loss(yn, p), rel=1e-9)


@pytest.mark.parametrize("loss", ["mse", "mae", "huber"])
def test_regression_matches_sklearn(loss):
    g = torch.Generator().manual_seed(3)
    n = 1000
    y = torch.randn(n, generator=g) * 50 + 150
    out = (y + torch.randn(n, generator=g) * 20).unsqueeze(1)
    got = _pooled("regression", out, y, None, loss, TASK_METRICS["regression"])
    yn, pn = y.double().numpy(), out.squeeze(1).double().numpy()
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(yn, pn), rel=1e-12)
    assert got["rmse"] == pytest.approx(skm.root_mean_squared_error(yn, pn), rel=1e-12)
    assert got["r2"] == pytest.approx(skm.r2_score(yn, pn), abs=1e-9)
    want = {"mse": skm.mean_squared_error(yn, pn), "mae": skm.mean_absolute_error(yn, pn),
            "huber": torch.nn.functional.huber_loss(out.squeeze(1).double(), y.double()).item()}[loss]
    assert got["loss"] == pytest.approx(want, rel=1e-9)


def test_pooling_is_exact_and_order_free():
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 3, (600,), generator=g)
    out = torch.randn(600, 3, generator=g)
    parts = [eval_stats("classification", out[i], y[i], classes=3, loss="cross_entropy") for i in _split(600, 3, 4)]
    whole = eval_stats("classification", out, y, classes=3, loss="cross_entropy")
    m = TASK_METRICS["classification"]
    a, b, c = finish("classification", m, parts), finish("classification", m, parts[::-1]), finish("classification", m, [whole])
    for key in m:
        assert a[key] == pytest.approx(c[key], rel=1e-12) and a[key] == pytest.approx(b[key], rel=1e-12)


def test_undefined_metrics_are_nan_and_misfits_refused():
    empty = eval_stats("binary", torch.zeros(0, 1), torch.zeros(0), classes=2, loss="bce")
    assert all(math.isnan(v) for v in finish("binary", TASK_METRICS["binary"], [empty]).values())
    one_class = eval_stats("binary", torch.randn(5, 1), torch.ones(5), classes=2)
    assert math.isnan(finish("binary", ["auroc"], [one_class])["auroc"])
    assert len(one_class["score_hist"]) == 2 * BINS
    with pytest.raises(ValueError, match="does not fit"):
        finish("regression", ["auroc"], [eval_stats("regression", torch.zeros(2, 1), torch.zeros(2), classes=None)])


def test_the_score_histograms_travel_only_when_auroc_is_declared():
    """k x BINS numbers per histogram: a 10-class job that does not declare auroc sends n, loss and the
    confusion matrix only (an evaluation reply of ~79 KB cost a round trip over a 200 ms link)."""
    out, y = torch.randn(50, 10), torch.randint(0, 10, (50,))
    lean = eval_stats("classification", out, y, classes=10, loss="cross_entropy", auroc=False)
    assert {k: len(v) for k, v in lean.items()} == stat_lengths("classification", 10, auroc=False) == {
        "n": 1, "loss": 1, "confusion": 100}
    full = eval_stats("classification", out, y, classes=10, loss="cross_entropy")
    assert finish("classification", ["loss", "accuracy", "f1"], [lean]) == \
        finish("classification", ["loss", "accuracy", "f1"], [full])
