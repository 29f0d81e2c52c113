"""A row's features as one flat float32 vector: what every model reads.

`feature_matrix` turns the columns a job reads (as numpy arrays, one per column, from a
DuckDB fetch or an Arrow batch) into a float32 matrix [n, D]. Each feature fills a fixed
run of slots, in the plan's order:

- numeric (int, float, bool): 1 slot, the value;
- categorical (category, string): `width` slots, one-hot over the agreed vocabulary
  (at most width - 1 values); the last slot is "other" (any value not in the vocabulary);
- tensor: prod(shape) slots, the row's list of floats as stored (row-major).

The function is pure and batch-safe: the same rows give the same slots whichever batch
they come in. Values never leave it except as the matrix the daemon trains on; the
vocabulary counts a domain may share come from `category_counts`, which keeps only
values held by at least k rows.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from meshctl.compiler.plan import PlanFeature, PlanJob


def job_features(job: PlanJob) -> list[PlanFeature]:
    """The job's features as the plan records them; an older (all-numeric) plan has none: one slot each."""
    from meshctl.compiler.plan import PlanFeature

    inputs = getattr(job, "inputs", None)
    if inputs:
        return list(inputs)
    return [PlanFeature(name=f, kind="numeric", width=1) for f in job.features]


def input_width(job: PlanJob) -> int:
    """D: the number of float slots a row's features fill."""
    return sum(f.width for f in job_features(job))


def categorical(job: PlanJob) -> list[PlanFeature]:
    """The job's categorical features (one-hot, with an agreed vocabulary)."""
    return [f for f in job_features(job) if f.kind == "categorical"]


def feature_matrix(job: PlanJob, arrays: Mapping[str, np.ndarray],
                   vocab: Mapping[str, Sequence[str]] | None = None) -> np.ndarray:
    """The rows' features as float32 [n, D], in the plan's feature order.

    `arrays` maps each feature column to its values (numbers; text for categorical
    columns; for a tensor column, one sequence of floats per row, or a 2-d [n, width]
    array). `vocab` maps a categorical feature to its agreed vocabulary; a feature
    missing from it uses the plan's declared values (a string column: every value is
    "other"). Raises FeatureError naming the column and the count when a numeric or
    tensor value is not finite, or a tensor row does not hold prod(shape) values.
    """
    features = job_features(job)
    n = _rows(features, arrays)
    out = np.zeros((n, sum(f.width for f in features)), dtype=np.float32)
    at, problems = 0, []
    for f in features:
        values = arrays[f.name]
        try:
            if f.kind == "numeric":
                col = np.asarray(values, dtype=np.float32)
                _finite(f.name, col)
                out[:, at] = col
            elif f.kind == "categorical":
                words = vocab.get(f.name) if vocab is not None and f.name in vocab else f.vocabulary or []
                out[np.arange(n), at + one_hot_index(values, words, f.width)] = 1.0
            else:
                out[:, at:at + f.width] = tensor_rows(f.name, values, f.width)
        except FeatureError as err:
            problems.append(str(err))
        at += f.width
    if problems:
        raise FeatureError("; ".join(problems))
    return out


def one_hot_index(values: Iterable, words: Sequence[str], width: int) -> np.ndarray:
    """Each value's slot (int64): its place in `words` (first width - 1 only), else width - 1 ("other")."""
    index = {w: i for i, w in enumerate(list(words)[:width - 1])}
    return np.fromiter((index.get(_text(v), width - 1) for v in values), dtype=np.int64)


def tensor_rows(name: str, values, width: int) -> np.ndarray:
    """A tensor column as float32 [n, width]: every row must hold `width` finite values."""
    if isinstance(values, np.ndarray) and values.dtype != object and values.ndim == 2:
        if values.shape[1] != width:
            raise FeatureError(f"{len(values)} rows of tensor column {name} hold {values.shape[1]} values, "
                               f"not {width}")
        flat = values.astype(np.float32, copy=False)
        _finite(name, flat, rows=True)
        return flat
    rows = list(values)
    wrong = sum(1 for r in rows if r is None or len(r) != width)
    if wrong:
        raise FeatureError(f"{wrong} rows of tensor column {name} do not hold {width} values")
    flat = np.empty((len(rows), width), dtype=np.float32)
    missing = 0
    for i, r in enumerate(rows):
        if isinstance(r, np.ma.MaskedArray):
            missing += int(r.mask.any()) if r.mask is not np.ma.nomask else 0
            r = r.filled(np.nan)
        flat[i] = np.asarray(r, dtype=np.float32)
    if missing:
        raise FeatureError(f"{missing} rows of tensor column {name} hold a NULL value")
    _finite(name, flat, rows=True)
    return flat


def category_counts(values: Iterable, k: int) -> dict[str, int]:
    """Counts of the values held by at least `k` of these rows: what a domain may share.

    A value held by fewer than k rows is left out entirely (its count and its text).
    """
    counts = Counter(_text(v) for v in values)
    return {v: c for v, c in sorted(counts.items()) if c >= k}


def agree_vocabulary(counts: Sequence[Mapping[str, int]], k: int, width: int,
                     declared: Sequence[str] = ()) -> list[str]:
    """The vocabulary every domain uses: values whose pooled count is >= k, at most width - 1.

    Ordered by declared order when the column declares its values, else by (count desc,
    value). A value below k in the pool is folded into "other".
    """
    pooled: Counter[str] = Counter()
    for c in counts:
        pooled.update({str(v): int(n) for v, n in c.items()})
    kept = [v for v, n in pooled.items() if n >= k]
    if declared:
        keep = set(kept)
        return [v for v in declared if v in keep][:width - 1]
    return sorted(kept, key=lambda v: (-pooled[v], v))[:width - 1]


class FeatureError(ValueError):
    """A feature column's values cannot feed the model; the text holds names and counts only."""


def _rows(features: Sequence[PlanFeature], arrays: Mapping[str, np.ndarray]) -> int:
    if not features:
        return 0
    return len(arrays[features[0].name])


def _finite(name: str, values: np.ndarray, rows: bool = False) -> None:
    if rows:
        nan = int(np.isnan(values).any(axis=1).sum())
        inf = int((np.isinf(values).any(axis=1) & ~np.isnan(values).any(axis=1)).sum())
        what = "rows of tensor column"
    else:
        nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        what = "values in"
    problems = [f"{count} {kind} {what} {name}" for kind, count in (("NaN", nan), ("infinite", inf)) if count]
    if problems:
        raise FeatureError("; ".join(problems))


def _text(value) -> str:
    """A categorical value as the text the vocabulary holds (numbers as written, e.g. 3 not 3.0)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)
