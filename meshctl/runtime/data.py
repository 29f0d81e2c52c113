"""Product adapters: the only place a domain's rows exist.

The daemon reads its products through DuckDB, selecting only the columns a job
may use; PII columns are never named in the SQL, so they never leave DuckDB.
What leaves this module is tensors of features and class indices, which stay in
the daemon's process; only model updates and metric sums cross the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from meshctl.compiler.plan import PlanJob, PlanProduct
from meshctl.errors import UserError


@dataclass(frozen=True)
class JobData:
    """One domain's tensors for one job."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    rows: int
    """Rows read (after dropping rows with NULLs in used columns)."""
    skipped: int
    """Rows skipped because a used column was NULL."""


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _reader(product: PlanProduct) -> str:
    return {"csv": "read_csv_auto(?, header=true)", "parquet": "read_parquet(?)"}[product.format]


def source_path(product: PlanProduct, base_dir: Path) -> Path:
    return (base_dir / product.source).resolve()


def job_columns(job: PlanJob) -> list[str]:
    """Columns a job may read: features, target, holdout column."""
    cols = [*job.features, job.target]
    if job.evaluation.holdout_column:
        cols.append(job.evaluation.holdout_column)
    return cols


def count_rows(product: PlanProduct, base_dir: Path) -> int:
    """Row count of a product (a count, never a row)."""
    import duckdb

    path = _existing(product, base_dir)
    try:
        with duckdb.connect() as con:
            return int(con.execute(f"SELECT count(*) FROM {_reader(product)}", [str(path)]).fetchone()[0])
    except duckdb.Error as err:
        raise UserError(f"cannot read product {product.id}: {_first_line(err)}", where=str(path)) from None


def load_job_data(job: PlanJob, product: PlanProduct, base_dir: Path, client_id: int) -> JobData:
    """Read `product` for `job`: the allowed columns only, PII excluded in the SQL itself."""
    import duckdb

    by_name = {c.name: c for c in product.columns}
    cols = job_columns(job)
    for c in cols:
        col = by_name.get(c)
        if col is None:
            raise UserError(f"product {product.id} has no column {c!r} that job {job.name} needs")
        if col.pii != "none":
            raise UserError(f"job {job.name} asks for PII column {product.id}.{c}; refused")
    path = _existing(product, base_dir)
    select = ", ".join(
        f"CAST({_ident(c)} AS VARCHAR) AS {_ident(c)}" if c in (job.target, job.evaluation.holdout_column)
        else f"CAST({_ident(c)} AS FLOAT) AS {_ident(c)}" for c in cols)
    not_null = " AND ".join(f"{_ident(c)} IS NOT NULL" for c in cols)
    sql = f"SELECT {select} FROM {_reader(product)}"
    try:
        with duckdb.connect() as con:
            total = int(con.execute(f"SELECT count(*) FROM {_reader(product)}", [str(path)]).fetchone()[0])
            arrays = con.execute(f"SELECT * FROM ({sql}) WHERE {not_null}", [str(path)]).fetchnumpy()
    except duckdb.Error as err:
        raise UserError(f"cannot read product {product.id}: {_first_line(err)}", where=str(path)) from None
    n = len(arrays[job.target])
    x = np.stack([np.asarray(arrays[f], dtype=np.float32) for f in job.features], axis=1) if n else \
        np.zeros((0, len(job.features)), dtype=np.float32)
    index = {v: i for i, v in enumerate(job.classes)}
    labels = [str(v) for v in arrays[job.target]]
    bad = sorted({v for v in labels if v not in index})
    if bad:
        raise UserError(f"product {product.id}: column {job.target!r} holds {bad[:3]} outside the "
                        f"declared values {job.classes}", where=str(path))
    y = np.fromiter((index[v] for v in labels), dtype=np.int64, count=n)
    test = _holdout_mask(job, arrays, n, client_id)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    mask = torch.from_numpy(test)
    x_train, x_test = xt[~mask], xt[mask]
    return JobData(x_train.contiguous(), yt[~mask], x_test.contiguous(), yt[mask], n, total - n)


def _holdout_mask(job: PlanJob, arrays: dict, n: int, client_id: int) -> np.ndarray:
    ev = job.evaluation
    if ev.holdout_column:
        return np.asarray([str(v) == ev.holdout_value for v in arrays[ev.holdout_column]], dtype=bool)
    mask = np.zeros(n, dtype=bool)
    k = int(round(n * ev.holdout))
    if k:
        g = torch.Generator().manual_seed(job.training.seed * 1_000_003 + client_id)
        mask[torch.randperm(n, generator=g)[:k].numpy()] = True
    return mask


def _existing(product: PlanProduct, base_dir: Path) -> Path:
    path = source_path(product, base_dir)
    if not path.exists():
        raise UserError(f"data file of product {product.id} not found", where=str(path))
    return path


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def feature_sums(x: torch.Tensor) -> tuple[int, list[float], list[float]]:
    """(count, per-feature sum, per-feature sum of squares) of a feature matrix, in float64."""
    xd = x.double()
    return len(x), xd.sum(0).tolist(), xd.pow(2).sum(0).tolist()


def pooled_mean_std(stats: list[tuple[int, list[float], list[float]]]) -> tuple[list[float], list[float]]:
    """Mesh-wide mean and population standard deviation from per-domain sums (exact)."""
    n = sum(c for c, _, _ in stats)
    if n == 0:
        raise ValueError("no training rows to standardize with")
    s = torch.tensor([x for _, x, _ in stats], dtype=torch.float64).sum(0)
    q = torch.tensor([x for _, _, x in stats], dtype=torch.float64).sum(0)
    mean = s / n
    std = (q / n - mean.pow(2)).clamp_min(0).sqrt()
    std[std < 1e-12] = 1.0
    return mean.tolist(), std.tolist()
