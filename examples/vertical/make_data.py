"""Write the data files of examples/vertical (split learning: three domains, different columns
of the same patients).

    python examples/vertical/make_data.py

Source: scikit-learn's Wisconsin diagnostic breast-cancer data (``load_breast_cancer``,
569 biopsies, 30 measurements). Its columns are split over three domains, each keyed by a
synthetic ``patient_id`` (``P-`` + 6 digits, unique, seeded):

* ``lab``: the ten ``mean *`` measurements (``radius_mean`` ... ``fractal_dimension_mean``);
* ``imaging``: the ten ``worst *`` measurements (``radius_worst`` ...);
* ``clinic``: the label ``diagnosis`` (``malignant`` / ``benign``) and five ``* error``
  measurements (``radius_se``, ``texture_se``, ``perimeter_se``, ``area_se``, ``smoothness_se``).

``OVERLAP`` (85%) of the patients are in all three domains; each of the others is in one or
two domains only (a uniformly drawn non-empty proper subset), so the domains must intersect
their ids before they can train. Each domain's rows are in its own shuffled order.

Outputs:
    examples/vertical/data/lab.parquet
    examples/vertical/data/imaging.parquet
    examples/vertical/data/clinic.csv

Deterministic: a fixed seed and a single DuckDB thread, so re-running rewrites identical bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from sklearn.datasets import load_breast_cancer

SEED = 20261206
OVERLAP = 0.85

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"

MEASURES = [
    "radius", "texture", "perimeter", "area", "smoothness", "compactness",
    "concavity", "concave points", "symmetry", "fractal dimension",
]
CLINIC_SE = ["radius", "texture", "perimeter", "area", "smoothness"]

# (domain, file name, [(sklearn feature name, column name)], holds the label)
DOMAINS = [
    ("lab", "lab.parquet", [(f"mean {m}", m.replace(" ", "_") + "_mean") for m in MEASURES], False),
    ("imaging", "imaging.parquet", [(f"worst {m}", m.replace(" ", "_") + "_worst") for m in MEASURES], False),
    ("clinic", "clinic.csv", [(f"{m} error", m.replace(" ", "_") + "_se") for m in CLINIC_SE], True),
]


def membership(n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, 3] booleans: which domains hold each patient (all three for OVERLAP of them)."""
    held = np.ones((n, len(DOMAINS)), dtype=bool)
    partial = rng.permutation(n)[: n - round(OVERLAP * n)]
    subsets = list(range(1, 2 ** len(DOMAINS) - 1))  # bitmasks: non-empty, not all
    for i, pick in zip(partial, rng.integers(0, len(subsets), size=len(partial))):
        held[i] = [(subsets[pick] >> d) & 1 == 1 for d in range(len(DOMAINS))]
    return held


def main(out_dir: Path = DATA) -> int:
    """Write the three files into `out_dir` (examples/vertical/data by default)."""
    ds = load_breast_cancer()
    X = np.asarray(ds.data, dtype=np.float64)
    y = np.asarray(ds.target, dtype=np.int64)  # 0 = malignant, 1 = benign
    names = list(ds.feature_names)
    diagnosis = np.where(y == 0, "malignant", "benign")
    n = len(y)

    rng = np.random.default_rng(SEED)
    ids = [f"P-{k:06d}" for k in rng.choice(1_000_000, size=n, replace=False)]
    held = membership(n, rng)

    out_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute("SET threads TO 1")
    con.execute("SET preserve_insertion_order TO true")
    print(f"{'domain':<9} {'file':<17} {'rows':>5} {'columns':>8}")
    for d, (domain, fname, features, label) in enumerate(DOMAINS):
        rows = rng.permutation(np.flatnonzero(held[:, d]))
        cols: dict[str, pa.Array] = {"patient_id": pa.array([ids[i] for i in rows], pa.string())}
        for sk_name, col in features:
            cols[col] = pa.array(X[rows, names.index(sk_name)], pa.float64())
        if label:
            cols["diagnosis"] = pa.array(diagnosis[rows].tolist(), pa.string())
        con.register("domain_rows", pa.table(cols))
        out = out_dir / fname
        fmt = "(FORMAT parquet, COMPRESSION zstd)" if fname.endswith(".parquet") else "(FORMAT csv, HEADER true)"
        con.execute(f"COPY (SELECT * FROM domain_rows) TO '{out.as_posix()}' {fmt}")
        con.unregister("domain_rows")
        print(f"{domain:<9} {fname:<17} {len(rows):>5} {len(cols):>8}")
    print(f"in all three: {int(held.all(axis=1).sum())} of {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
