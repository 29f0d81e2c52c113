"""Tasks, losses and evaluation metrics that pool exactly across domains.

A domain scores the model on its holdout and sends *sums* (`eval_stats`): a
confusion matrix, per-class probability histograms, regression moments and the
summed loss. Sums from several domains pool by adding, so `finish` gives the
same value for one domain's stats or for the stats of ten domains added up.

Stats keys (every value a list of floats, lengths fixed by task and classes):

- all tasks: `n` [examples], `loss` [sum of the task's loss] (when a loss is given)
- classification (k classes) and binary (k = 2): `confusion` [k*k, row = true
  class, column = predicted], `score_hist` [k*BINS: class c's probability over all
  rows], `pos_hist` [k*BINS: class c's probability over rows whose class is c]
- regression: `moments` [Σe, Σ|e|, Σe², Σy, Σy²] with e = prediction - y

Probabilities fall into BINS bins (`score_bin`: about 1/BINS wide in the middle,
much finer near 0 and 1); AUROC counts two scores in one bin as a tie (half a
correctly ordered pair), so it equals the exact AUROC within half the share of
positive/negative pairs that share a bin.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

BINS = 1000
LOGIT = 40.0
TASKS = ("classification", "binary", "regression")
DEFAULT_LOSS = {"classification": "cross_entropy", "binary": "bce", "regression": "mse"}
TASK_LOSSES = {"classification": ("cross_entropy",), "binary": ("bce",), "regression": ("mse", "mae", "huber")}
TASK_METRICS = {
    "classification": ("loss", "accuracy", "auroc", "f1", "precision", "recall"),
    "binary": ("loss", "accuracy", "auroc", "f1", "precision", "recall"),
    "regression": ("loss", "mae", "rmse", "r2"),
}
_MOMENTS = 5


def n_classes(task: str, classes: int | Sequence[object] | None) -> int:
    """How many classes the output scores (0 for regression, 2 for binary)."""
    if task == "regression":
        return 0
    if task == "binary":
        return 2
    if classes is None:
        raise ValueError("a classification job needs its classes")
    return classes if isinstance(classes, int) else len(classes)


def stat_lengths(task: str, classes: int | Sequence[object] | None, *, with_loss: bool = True,
                 auroc: bool = True) -> dict[str, int]:
    """The keys `eval_stats` gives for this task, and each value's length (the wire validates against this);
    the score histograms only with `auroc` (they are k x BINS numbers: sent only when auroc is declared)."""
    out = {"n": 1}
    if with_loss:
        out["loss"] = 1
    if task == "regression":
        out["moments"] = _MOMENTS
    else:
        k = n_classes(task, classes)
        out.update(confusion=k * k)
        if auroc:
            out.update(score_hist=k * BINS, pos_hist=k * BINS)
    return out


def prediction(task: str, output: torch.Tensor) -> torch.Tensor:
    """The model's output as the loss sees it: [n, k] scores for classification, [n] otherwise."""
    if task == "classification":
        return output
    return output.flatten(1)[:, 0] if output.dim() > 1 else output


def loss_function(loss: str, *, huber_delta: float = 1.0) -> Callable[..., torch.Tensor]:
    """`f(pred, y, reduction=...)` for a loss name; pred as `prediction` returns it."""
    if loss == "cross_entropy":
        return nn.functional.cross_entropy
    if loss == "bce":
        return nn.functional.binary_cross_entropy_with_logits
    if loss == "mse":
        return nn.functional.mse_loss
    if loss == "mae":
        return nn.functional.l1_loss
    if loss == "huber":
        return lambda pred, y, reduction="mean": nn.functional.huber_loss(pred, y, reduction=reduction, delta=huber_delta)
    raise ValueError(f"unknown loss {loss!r}")


@torch.no_grad()
def eval_stats(
    task: str,
    output: torch.Tensor,
    y: torch.Tensor,
    *,
    classes: int | Sequence[object] | None,
    loss: str | None = None,
    huber_delta: float = 1.0,
    auroc: bool = True,
) -> dict[str, list[float]]:
    """Sums over one domain's holdout that `finish` turns into metric values (the score histograms
    that auroc needs only with `auroc`).

    `output` is the model's raw output ([n, k] logits for classification, [n, 1]
    or [n] logit for binary, prediction for regression); `y` the targets (int64
    class index, float 0/1, float value). With `loss`, the summed loss is included.
    """
    n = len(y)
    out: dict[str, list[float]] = {"n": [float(n)]}
    pred = prediction(task, output).to(torch.float64) if task != "classification" else output.to(torch.float64)
    if loss is not None:
        target = y.to(torch.float64) if task != "classification" else y
        out["loss"] = [float(loss_function(loss, huber_delta=huber_delta)(pred, target, reduction="sum")) if n else 0.0]
    if task == "regression":
        yy = y.to(torch.float64)
        e = pred - yy
        out["moments"] = [float(v) for v in (e.sum(), e.abs().sum(), (e * e).sum(), yy.sum(), (yy * yy).sum())]
        return out
    k = n_classes(task, classes)
    if task == "binary":
        logp = torch.stack([nn.functional.logsigmoid(-pred), nn.functional.logsigmoid(pred)], 1)
        guess = (pred > 0).to(torch.int64)
    else:
        logp = torch.log_softmax(pred, 1)
        guess = pred.argmax(1)
    truth = y.to(torch.int64)
    out["confusion"] = torch.bincount(truth * k + guess, minlength=k * k).to(torch.float64).tolist()
    if not auroc:
        return out
    b = score_bin(logp)
    cls = torch.arange(k).expand(n, k)
    out["score_hist"] = torch.bincount((cls * BINS + b).reshape(-1), minlength=k * BINS).to(torch.float64).tolist()
    pos = truth.unsqueeze(1) == cls
    out["pos_hist"] = torch.bincount((cls * BINS + b)[pos], minlength=k * BINS).to(torch.float64).tolist()
    return out


def score_bin(logp: torch.Tensor) -> torch.Tensor:
    """The histogram bin of each probability p, given as log p ([n, k], float64): equal bins of
    u = (p + (clip(logit p, ±LOGIT) + LOGIT) / (2·LOGIT)) / 2, an increasing map of p onto [0, 1]
    that is about as fine as 1/BINS-wide bins of p in the middle and far finer near 0 and 1, where a
    confident model's probabilities crowd. logit p = log p - log(1 - p), with log(1 - p) summed over
    the other classes for the one class a row may give p >= 1/2 (1 - p would round to 0)."""
    p = logp.exp()
    log1m = torch.log1p(-p.clamp(max=0.5))
    top = logp.argmax(1, keepdim=True)
    others = logp.scatter(1, top, -math.inf).logsumexp(1, keepdim=True)
    log1m = log1m.scatter(1, top, others)
    logit = (logp - log1m).clamp(-LOGIT, LOGIT)
    u = 0.5 * p + 0.5 * (logit + LOGIT) / (2 * LOGIT)
    return (u * BINS).to(torch.int64).clamp_(0, BINS - 1)


def pool(stats_list: Sequence[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Element-wise sum of several domains' stats (same keys, same lengths)."""
    total: dict[str, list[float]] = {}
    for stats in stats_list:
        for key, values in stats.items():
            if key not in total:
                total[key] = [float(v) for v in values]
                continue
            if len(total[key]) != len(values):
                raise ValueError(f"stats {key!r}: length {len(values)} != {len(total[key])}")
            total[key] = [a + float(v) for a, v in zip(total[key], values)]
    return total


def finish(task: str, metrics: Sequence[str], stats_list: Sequence[dict[str, list[float]]]) -> dict[str, float]:
    """Metric values from one or more domains' stats; NaN where undefined (no examples, one class only)."""
    s = pool(stats_list)
    n = s.get("n", [0.0])[0]
    return {m: _metric(task, m, s, n) for m in metrics}


def _metric(task: str, metric: str, s: dict[str, list[float]], n: float) -> float:
    if metric not in TASK_METRICS.get(task, ()):
        raise ValueError(f"metric {metric!r} does not fit task {task!r}")
    if n <= 0:
        return math.nan
    if metric == "loss":
        return s["loss"][0] / n if "loss" in s else math.nan
    if task == "regression":
        _, sae, se2, sy, sy2 = s["moments"]
        if metric == "mae":
            return sae / n
        if metric == "rmse":
            return math.sqrt(max(se2, 0.0) / n)
        sst = sy2 - sy * sy / n
        if sst <= 1e-12 * max(sy2, 1.0):  # constant targets: scikit-learn's convention
            return 1.0 if se2 == 0 else 0.0
        return 1.0 - se2 / sst
    conf = s["confusion"]
    k = math.isqrt(len(conf))
    rows = [conf[i * k:(i + 1) * k] for i in range(k)]
    tp = [rows[c][c] for c in range(k)]
    true_n = [sum(rows[c]) for c in range(k)]
    pred_n = [sum(rows[r][c] for r in range(k)) for c in range(k)]
    if metric == "accuracy":
        return sum(tp) / n
    if metric == "auroc":
        return _auroc(task, s, k)
    if task == "binary":
        labels = [1]
    else:  # scikit-learn's macro average: the classes seen as truth or prediction
        labels = [c for c in range(k) if true_n[c] or pred_n[c]]
    vals = []
    for c in labels:
        if metric == "precision":
            vals.append(tp[c] / pred_n[c] if pred_n[c] else 0.0)
        elif metric == "recall":
            vals.append(tp[c] / true_n[c] if true_n[c] else 0.0)
        else:
            den = pred_n[c] + true_n[c]
            vals.append(2 * tp[c] / den if den else 0.0)
    return sum(vals) / len(vals) if vals else math.nan


def _auroc(task: str, s: dict[str, list[float]], k: int) -> float:
    """One-vs-rest AUROC per class from the histograms (ties count half); macro mean, or class 1's for binary."""
    aucs = []
    for c in range(1, 2) if task == "binary" else range(k):
        allh = s["score_hist"][c * BINS:(c + 1) * BINS]
        posh = s["pos_hist"][c * BINS:(c + 1) * BINS]
        negh = [a - p for a, p in zip(allh, posh)]
        npos, nneg = sum(posh), sum(negh)
        if npos <= 0 or nneg <= 0:
            continue
        below = 0.0
        ordered = 0.0
        for p, q in zip(posh, negh):
            ordered += p * (below + 0.5 * q)
            below += q
        aucs.append(ordered / (npos * nneg))
    return sum(aucs) / len(aucs) if aucs else math.nan
