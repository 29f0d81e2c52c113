"""Write the data files of the root mesh.yaml (the three-hospital oncology network).

    python examples/hospitals/make_data.py

Source: scikit-learn's Wisconsin diagnostic breast-cancer data (``load_breast_cancer``,
569 biopsies, ships with scikit-learn). The ten ``mean *`` nucleus measurements and the
diagnosis are kept; patient names, MRNs and birth dates are synthetic. The rows are
split non-IID over the hospitals: per-class Dirichlet proportions (label skew and size
skew), redrawn until every hospital has at least ``MIN_ROWS`` rows and
``MIN_PER_CLASS`` rows of each class.

Outputs (paths as declared in the root mesh.yaml):
    examples/hospitals/data/charite.parquet
    examples/hospitals/data/karolinska.parquet
    examples/hospitals/data/amsterdam-umc.csv

Deterministic: a fixed seed, rows in original-index order, a single DuckDB thread, so
re-running rewrites identical bytes.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from sklearn.datasets import load_breast_cancer

SEED = 20240
ALPHA = 1.0
MIN_ROWS = 120
MIN_PER_CLASS = 15

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"

# (domain, file name, MRN prefix)
HOSPITALS = [
    ("charite", "charite.parquet", "CH"),
    ("karolinska", "karolinska.parquet", "KS"),
    ("amsterdam-umc", "amsterdam-umc.csv", "AU"),
]

FEATURES = [
    "radius", "texture", "perimeter", "area", "smoothness", "compactness",
    "concavity", "concave points", "symmetry", "fractal dimension",
]
"""sklearn names without the 'mean ' prefix; column = name with '_' for ' ' + '_mean'."""

FIRST_NAMES = [
    "Anna", "Maria", "Sofia", "Emma", "Laura", "Julia", "Lena", "Sara", "Eva", "Clara",
    "Ingrid", "Astrid", "Elin", "Karin", "Freja", "Sanne", "Fleur", "Lotte", "Femke",
    "Noor", "Hanna", "Greta", "Marta", "Ida", "Nora", "Elena", "Irene", "Helga",
    "Johanna", "Petra", "Lukas", "Jonas", "Erik", "Lars", "Daan", "Bram", "Felix",
    "Paul", "Jan", "Olof",
]
LAST_NAMES = [
    "Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Wagner", "Becker", "Hoffmann",
    "Andersson", "Johansson", "Karlsson", "Nilsson", "Eriksson", "Larsson", "Olsson",
    "Persson", "de Jong", "Jansen", "de Vries", "van den Berg", "van Dijk", "Bakker",
    "Visser", "Smit", "Meijer", "de Boer", "Mulder", "Bos", "Vos", "Peters", "Lindqvist",
    "Berg", "Koch", "Richter", "Klein", "Wolf",
]

DOB_FIRST = dt.date(1930, 1, 1)
DOB_LAST = dt.date(2000, 12, 31)


def column_name(feature: str) -> str:
    return feature.replace(" ", "_") + "_mean"


def partition(y: np.ndarray, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Per-class Dirichlet(ALPHA) split, redrawn until the size/class minimums hold."""
    while True:
        parts: list[list[int]] = [[] for _ in range(n)]
        for c in (0, 1):
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            p = rng.dirichlet([ALPHA] * n)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].extend(chunk.tolist())
        ok = all(
            len(p_) >= MIN_ROWS and all((y[p_] == c).sum() >= MIN_PER_CLASS for c in (0, 1))
            for p_ in parts
        )
        if ok:
            return [np.array(sorted(p_), dtype=np.int64) for p_ in parts]


def main() -> int:
    ds = load_breast_cancer()
    X = np.asarray(ds.data, dtype=np.float64)
    y = np.asarray(ds.target, dtype=np.int64)  # 0 = malignant, 1 = benign
    names = list(ds.feature_names)
    feat_idx = [names.index(f"mean {f}") for f in FEATURES]
    diagnosis = np.where(y == 0, "malignant", "benign")

    rng = np.random.default_rng(SEED)
    parts = partition(y, rng, len(HOSPITALS))

    # Synthetic identities for every one of the 569 patients, drawn once.
    n_all = len(y)
    first = rng.choice(FIRST_NAMES, size=n_all)
    last = rng.choice(LAST_NAMES, size=n_all)
    mrn_numbers = rng.choice(10_000_000, size=n_all, replace=False)  # unique 7-digit numbers
    span = (DOB_LAST - DOB_FIRST).days
    dob_days = rng.integers(0, span + 1, size=n_all)

    DATA.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute("SET threads TO 1")
    con.execute("SET preserve_insertion_order TO true")

    print(f"{'hospital':<15} {'file':<22} {'rows':>5} {'benign':>7} {'malignant':>10} {'% malig':>8}")
    for (domain, fname, prefix), idx in zip(HOSPITALS, parts):
        cols: dict[str, pa.Array] = {
            "patient_name": pa.array([f"{first[i]} {last[i]}" for i in idx], pa.string()),
            "mrn": pa.array([f"{prefix}-{mrn_numbers[i]:07d}" for i in idx], pa.string()),
            "date_of_birth": pa.array(
                [DOB_FIRST + dt.timedelta(days=int(dob_days[i])) for i in idx], pa.date32()
            ),
        }
        for f, j in zip(FEATURES, feat_idx):
            cols[column_name(f)] = pa.array(X[idx, j], pa.float64())
        cols["diagnosis"] = pa.array(diagnosis[idx].tolist(), pa.string())
        con.register("hospital_rows", pa.table(cols))

        out = DATA / fname
        fmt = "(FORMAT parquet, COMPRESSION zstd)" if fname.endswith(".parquet") \
            else "(FORMAT csv, HEADER true)"
        con.execute(f"COPY (SELECT * FROM hospital_rows) TO '{out.as_posix()}' {fmt}")

        n_mal = int((y[idx] == 0).sum())
        n_ben = len(idx) - n_mal
        print(f"{domain:<15} {fname:<22} {len(idx):>5} {n_ben:>7} {n_mal:>10} "
              f"{100 * n_mal / len(idx):>7.1f}%")
        con.unregister("hospital_rows")
    print(f"{'total':<15} {'':<22} {n_all:>5} {int((y == 1).sum()):>7} {int((y == 0).sum()):>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
