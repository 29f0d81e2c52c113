"""Streamed job data: a domain re-reads its rows in Arrow batches instead of holding them.

A job whose training says `data: stream` (or `auto` on a product of more than
`STREAM_ABOVE` rows) keeps no tensors in the daemon. `StreamData.open` makes one pass
over the job's rows at load time, through the same masked view and the same per-row
conversion as the in-memory path (`features.feature_matrix`, `data.targets`), to count them, check them (a bad value
anywhere gives the DataError the in-memory path gives, with the whole table's counts) and
sum the training features for `standardize`. After that, each epoch and each evaluation
opens a DuckDB connection, registers the view again and reads the job's columns as Arrow
record batches of `FETCH_ROWS` rows: memory holds one batch and the shuffle buffer
(`buffer_rows`, default `BUFFER_ROWS`), never the table.

The holdout is a per-row rule computed in SQL: a row is held out when
`hash(row_number, seed * 1000003 + client_id) % 1000000 < holdout * 1000000` (row numbers
count the rows left after dropping NULLs, in the source's order), or by the holdout column.
Unlike the in-memory path's exact `round(n * holdout)` rows, the held-out share is then
`holdout` in expectation.

Arrow batches need pyarrow (a dependency of meshctl); should an environment lack it, `auto`
reads into memory and `data: stream` is refused with one line.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meshctl.compiler.plan import PlanJob, PlanProduct
from meshctl.errors import UserError
from meshctl.runtime.data import (
    DataError,
    _read_as,
    _where,
    ident,
    job_columns,
    literal,
    product_view,
    read_error,
    targets,
)

if TYPE_CHECKING:
    import duckdb
    import torch

STREAM_ABOVE = 1_000_000
"""`data: auto` streams a product of more rows than this (a non-DP job on a parquet, csv or duckdb source)."""

BUFFER_ROWS = 65_536
"""Rows shuffled together when the job declares no `buffer_rows`."""

FETCH_ROWS = 16_384
"""Rows of one Arrow batch read from DuckDB (at most `buffer_rows`)."""

DUCKDB_MEMORY = "128MB"
"""DuckDB's memory limit on a streamed read's connection: a scan needs little, and without a limit
its buffer pool keeps what it read (some 150 MB more at a few million rows)."""

STREAMED_FORMATS = ("csv", "parquet", "duckdb")
"""Sources DuckDB reads as a stream (sqlite and postgresql rows are copied into memory first)."""

BAD_VALUES = "remove or impute them; a model cannot train on them"
"""The hint of a feature's bad values (the in-memory path's, `data._tensors`)."""

TEST = "__meshctl_holdout"
"""The column the streamed query adds: whether a row is held out."""


def have_arrow() -> bool:
    """Whether pyarrow (the record batches) is importable."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def streams(job: PlanJob, product: PlanProduct, rows: int) -> bool:
    """Whether this domain streams `job`'s rows of `product` (holding `rows` rows)."""
    data = job.training.data
    if data == "stream":
        if not have_arrow():
            raise UserError(f"job {job.name} streams its data (`data: stream`), which needs pyarrow",
                            hint="pip install 'pyarrow>=15,<27', or use `data: memory`")
        return True
    return (data is None and rows > STREAM_ABOVE and job.privacy.dp is None
            and product.format in STREAMED_FORMATS and have_arrow())


@dataclass
class StreamData:
    """What a daemon keeps of a streamed job: how to read it again, its counts and its sums."""

    job: PlanJob
    product: PlanProduct
    base_dir: Path
    client_id: int
    rows: int
    """Rows read (after dropping rows with NULLs in used columns)."""
    skipped: int
    """Rows skipped because a used column was NULL."""
    n_train: int
    n_test: int
    sums: tuple[int, list[float], list[float]] = (0, [], [])
    """(count, per-slot sum, per-slot sum of squares) of the training features, in float64."""
    threads: int = 1
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    """Standardization, applied to every batch once set (`standardized`)."""
    vocab: dict[str, list[str]] | None = None
    """The agreed vocabulary of categorical features, once set (`with_vocabulary`)."""
    counts: dict[str, Counter] = field(default_factory=dict)
    """Categorical features: each value's count over the training rows (stays in the domain)."""

    # -- load -------------------------------------------------------------------
    @classmethod
    def open(cls, job: PlanJob, product: PlanProduct, base_dir: Path, client_id: int,
             threads: int = 1) -> StreamData:
        """Check `job`'s rows of `product` in one streamed pass and keep what re-reading them needs
        (on a connection of its own, with its memory limit)."""
        import duckdb

        with duckdb.connect() as con:
            return cls._open(job, product, base_dir, client_id, con, threads)

    @classmethod
    def _open(cls, job: PlanJob, product: PlanProduct, base_dir: Path, client_id: int,
              con: duckdb.DuckDBPyConnection, threads: int) -> StreamData:
        import duckdb

        stream = cls(job, product, base_dir, client_id, 0, 0, 0, 0, threads=threads)
        where = _where(product, base_dir)
        view = stream._view(con)
        try:
            total = int(con.execute(f"SELECT count(*) FROM {view}").fetchall()[0][0])
        except duckdb.Error as err:
            raise read_error(con, product, base_dir, err, job_columns(job)) from None
        from meshctl.runtime.features import categorical

        cats = [f.name for f in categorical(job)]
        n_train = n_test = 0
        s = q = None
        problems: dict[str, list[DataError]] = {"features": [], "target": []}
        for arrays, target, test in stream._arrays(con, view, "all"):
            data = stream._convert(arrays, target, where)
            if isinstance(data, tuple) and isinstance(data[1], DataError):
                problems[data[0]].append(data[1])
                continue
            x = data[0].double()
            train = ~test
            xt = x[train]
            n_train += len(xt)
            n_test += int(test.sum())
            s = xt.sum(0) if s is None else s + xt.sum(0)
            q = xt.pow(2).sum(0) if q is None else q + xt.pow(2).sum(0)
            for name in cats:
                stream.counts.setdefault(name, Counter()).update(str(v) for v in arrays[name][train.numpy()])
        if problems["features"] or problems["target"]:  # features first, as the in-memory path
            raise merged(problems["features"] or problems["target"], job_columns(job))
        n = n_train + n_test
        if n == 0:
            skipped = f" ({total} with a NULL in a column job {job.name} reads)" if total else ""
            raise DataError(f"{product.id}: 0 rows{skipped}", where=str(where))
        if n_train == 0:
            raise DataError(f"{product.id}: 0 rows to train job {job.name} on (all {n} are held out)",
                            where=str(where))
        stream.rows, stream.skipped, stream.n_train, stream.n_test = n, total - n, n_train, n_test
        stream.sums = (n_train, s.tolist(), q.tolist())
        return stream

    # -- what the daemon asks of its job data -------------------------------------
    def standardized(self, mean: torch.Tensor, std: torch.Tensor) -> StreamData:
        """This stream with every batch's features standardized as `(x - mean) / std`."""
        return replace(self, mean=mean, std=std)

    def with_vocabulary(self, job: PlanJob, vocab: dict[str, list[str]]) -> StreamData:
        """This stream with every categorical feature one-hot over the agreed `vocab`."""
        return replace(self, vocab=vocab)

    def category_counts(self, job: PlanJob) -> dict[str, dict[str, int]]:
        """Per categorical feature, counts of the values at least `min_count` training rows hold."""
        from meshctl.runtime.features import categorical

        return {f.name: {v: c for v, c in sorted(self.counts.get(f.name, Counter()).items())
                         if c >= (f.min_count or 1)} for f in categorical(job)}

    def batches(self, part: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) of the `train` or `test` rows, one Arrow batch at a time, in the source's order."""
        import duckdb

        where = _where(self.product, self.base_dir)
        empty = True
        with duckdb.connect() as con:
            view = self._view(con)
            for arrays, target, _ in self._arrays(con, view, part):
                empty = False
                data = self._convert(arrays, target, where)
                if isinstance(data[1], DataError):  # the source changed since the load's check
                    raise data[1]
                x, y = data
                if self.mean is not None and self.std is not None:
                    x = (x - self.mean) / self.std
                yield x, y
        if empty:  # no rows (a holdout of none): one empty batch, so sums of nothing have their keys
            import torch

            from meshctl.runtime.features import input_width

            dtype = torch.int64 if self.job.task_name == "classification" else torch.float32
            yield torch.zeros((0, input_width(self.job))), torch.zeros(0, dtype=dtype)

    # -- reading ----------------------------------------------------------------
    def _view(self, con: duckdb.DuckDBPyConnection) -> str:
        con.execute(f"SET threads TO {max(1, self.threads)}")
        con.execute("SET preserve_insertion_order = true")  # row numbers, hence the holdout, follow the source
        con.execute(f"SET memory_limit = '{DUCKDB_MEMORY}'")  # else its buffer pool keeps what it read
        return product_view(con, self.product, self.base_dir, columns=job_columns(self.job))

    def query(self, view: str, part: str) -> str:
        """The SQL reading the job's columns (cast as the in-memory path casts them) and the holdout flag."""
        job, cols = self.job, job_columns(self.job)
        select = ", ".join(f"CAST({ident(c)} AS {_read_as(job, c)}) AS {ident(c)}" for c in cols)
        not_null = " AND ".join(f"{ident(c)} IS NOT NULL" for c in cols)
        ev = job.evaluation
        if ev.holdout_column:
            test = f"{ident(ev.holdout_column)} = {literal(ev.holdout_value)}"
        elif round(ev.holdout * 1_000_000):
            key = job.training.seed * 1_000_003 + self.client_id
            test = f"hash(row_number() OVER (), {key}::BIGINT) % 1000000 < {round(ev.holdout * 1_000_000)}"
        else:
            test = "false"
        rows = f"SELECT *, {test} AS {TEST} FROM (SELECT {select} FROM {view}) WHERE {not_null}"
        if part == "all":
            return rows
        keep = f"NOT {TEST}" if part == "train" else TEST
        return f"SELECT * FROM ({rows}) WHERE {keep}"

    def _arrays(self, con: duckdb.DuckDBPyConnection, view: str,
                part: str) -> Iterator[tuple[dict[str, np.ndarray], Any, torch.Tensor]]:
        """Each Arrow batch: its features as numpy arrays (one per column), its target (an Arrow
        array) and its holdout flags."""
        import duckdb
        import pyarrow as pa
        import torch

        cols = job_columns(self.job)
        try:
            fetch = min(FETCH_ROWS, self.job.training.buffer_rows or BUFFER_ROWS)
            reader = con.sql(self.query(view, part)).to_arrow_reader(fetch)
            for batch in reader:
                if batch.num_rows == 0:
                    continue
                arrays = {c: _numpy(batch.column(c)) for c in dict.fromkeys(self.job.features)}
                test = torch.from_numpy(batch.column(TEST).to_numpy(zero_copy_only=False).astype(bool))
                yield arrays, batch.column(self.job.target), test
        except (duckdb.Error, OSError, pa.ArrowException) as err:
            raise read_error(con, self.product, self.base_dir, _duckdb_error(err), cols) from None

    def _convert(self, arrays: dict[str, np.ndarray], target: Any,
                 where: Path | str) -> tuple[torch.Tensor, torch.Tensor] | tuple[str, DataError]:
        """One batch as (x, y), converted as the in-memory path converts its rows (`feature_matrix`,
        `data.targets`), or (which, the DataError) where a feature or the target holds a bad value."""
        import torch

        from meshctl.runtime.features import FeatureError, feature_matrix

        try:
            x = feature_matrix(self.job, arrays, self.vocab)
        except FeatureError as err:
            return "features", DataError(f"{self.product.id}: {err}", where=str(where), hint=BAD_VALUES)
        try:
            y = self._targets(target, where)
        except DataError as err:
            return "target", err
        return torch.from_numpy(x), torch.from_numpy(y)

    def _targets(self, column: Any, where: Path | str) -> np.ndarray:
        """`data.targets` of an Arrow column; class labels are looked up in Arrow (the batch's labels
        never become Python strings unless one is outside the declared values)."""
        job = self.job
        if job.task != "regression":
            import pyarrow as pa
            import pyarrow.compute as pc

            idx = pc.index_in(column.cast(pa.string()), value_set=pa.array(job.classes, pa.string()))
            if idx.null_count == 0:
                y = idx.to_numpy(zero_copy_only=False).astype(np.int64)
                return y.astype(np.float32) if job.task == "binary" else y
        return targets(job, _numpy(column), self.product.id, where)


def _numpy(column) -> np.ndarray:
    """An Arrow column as the numpy array DuckDB's `fetchnumpy` gives: numbers as numbers, text as
    objects, a list (tensor) column as one float32 array per row (masked where an element is NULL)."""
    import pyarrow as pa

    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        return column.to_numpy(zero_copy_only=False)
    rows = np.empty(len(column), dtype=object)
    for i, v in enumerate(column.to_pylist()):
        if v is not None and any(e is None for e in v):
            rows[i] = np.ma.array([0.0 if e is None else e for e in v], mask=[e is None for e in v],
                                  dtype=np.float32)
        else:
            rows[i] = v if v is None else np.asarray(v, dtype=np.float32)
    return rows


def _duckdb_error(err: Exception) -> Exception:
    """DuckDB's own error behind one the Arrow reader raised (an OSError whose text starts with
    e.g. `Conversion Error:`), so the DataError names the kind the in-memory read names."""
    import duckdb

    m = re.match(r"\s*((?:[A-Z][a-z]+ )+)Error:", str(err))
    cls = getattr(duckdb, m.group(1).replace(" ", "") + "Exception", None) if m else None
    if isinstance(cls, type) and issubclass(cls, duckdb.Error) and not isinstance(err, duckdb.Error):
        return cls(str(err))
    return err


_COUNTED = re.compile(r"(\d+) (.+)")


def merged(problems: list[DataError], columns: list[str]) -> DataError:
    """One DataError for the whole stream from the batches' own problems of one kind (features, or
    else the target, as the in-memory path tells them for the table): each problem's count summed
    over the batches, in the order of `columns`."""
    told = problems
    counts: dict[str, int] = {}
    for p in told:
        text = p.message.split(": ", 1)[1] if ": " in p.message else p.message
        for clause in text.split("; "):
            m = _COUNTED.fullmatch(clause)
            key, n = (m.group(2), int(m.group(1))) if m else (clause, 0)
            counts[key] = counts.get(key, 0) + n
    order = {name: i for i, name in enumerate(columns)}
    keys = sorted(counts, key=lambda k: order.get(k.rsplit(" ", 1)[-1], len(order)))
    prefix = told[0].message.split(": ", 1)[0]
    text = "; ".join(f"{counts[k]} {k}" if counts[k] else k for k in keys)
    return DataError(f"{prefix}: {text}", detail=told[0].detail, where=told[0].where, hint=told[0].hint)
