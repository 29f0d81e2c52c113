"""Write the data files of examples/vertical-regression/mesh.yaml (split learning with a numeric label:
a regression over two domains holding different columns of the same patients).

    python examples/vertical-regression/make_data.py

Source: scikit-learn's diabetes data (``load_diabetes(scaled=False)``, 442 patients, 10 baseline
measurements, the disease progression one year later). Its columns are split over two domains,
each keyed by a synthetic ``patient_id`` (``D-`` + 6 digits, unique, seeded):

* ``clinic``: ``age``, ``sex`` (1 or 2), ``bmi``, ``bp`` and the label ``progression``;
* ``lab``: the six blood serum measurements ``tc, ldl, hdl, tch, ltg, glu`` (sklearn's s1 ... s6).

``OVERLAP`` (85%) of the patients are in both domains; each of the others is in one of them only.
Each domain's rows are in its own shuffled order.

Outputs:
    examples/vertical-regression/data/progression_clinic.parquet
    examples/vertical-regression/data/progression_lab.parquet

Deterministic: a fixed seed and a single DuckDB thread, so re-running rewrites identical bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from sklearn.datasets import load_diabetes

SEED = 20261207
OVERLAP = 0.85

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"

# (file name, [(sklearn feature name, column name, arrow type)], holds the label)
DOMAINS = [
    ("progression_clinic.parquet", [("age", "age", pa.float64()), ("sex", "sex", pa.int64()),
                                    ("bmi", "bmi", pa.float64()), ("bp", "bp", pa.float64())], True),
    ("progression_lab.parquet", [(f"s{i}", name, pa.float64())
                                 for i, name in enumerate(["tc", "ldl", "hdl", "tch", "ltg", "glu"], 1)], False),
]


def main(out_dir: Path = DATA) -> int:
    """Write the two files into `out_dir` (examples/vertical-regression/data by default)."""
    ds = load_diabetes(scaled=False)
    X = np.asarray(ds.data, dtype=np.float64)
    y = np.asarray(ds.target, dtype=np.float64)
    names = list(ds.feature_names)
    n = len(y)

    rng = np.random.default_rng(SEED)
    ids = [f"D-{k:06d}" for k in rng.choice(1_000_000, size=n, replace=False)]
    held = np.ones((n, len(DOMAINS)), dtype=bool)
    partial = rng.permutation(n)[: n - round(OVERLAP * n)]
    for i, d in zip(partial, rng.integers(0, len(DOMAINS), size=len(partial))):
        held[i] = False
        held[i, d] = True

    out_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute("SET threads TO 1")
    con.execute("SET preserve_insertion_order TO true")
    for d, (fname, features, label) in enumerate(DOMAINS):
        rows = rng.permutation(np.flatnonzero(held[:, d]))
        cols: dict[str, pa.Array] = {"patient_id": pa.array([ids[i] for i in rows], pa.string())}
        for sk_name, col, kind in features:
            values = X[rows, names.index(sk_name)]
            cols[col] = pa.array(values.round().astype(np.int64) if kind == pa.int64() else values, kind)
        if label:
            cols["progression"] = pa.array(y[rows], pa.float64())
        con.register("domain_rows", pa.table(cols))
        out = out_dir / fname
        con.execute(f"COPY (SELECT * FROM domain_rows) TO '{out.as_posix()}' (FORMAT parquet, COMPRESSION zstd)")
        con.unregister("domain_rows")
        print(f"{fname:<28} {len(rows):>5} rows {len(cols):>3} columns")
    print(f"in both: {int(held.all(axis=1).sum())} of {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
