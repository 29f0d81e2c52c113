"""Diabetes progression over 3 clinics: the regression example (examples/regression/README.md).

    python examples/regression/make_data.py

scikit-learn's diabetes data (442 patients, ships with scikit-learn, no download),
unscaled (`load_diabetes(scaled=False)`: age in years, sex 1/2, bmi, blood pressure,
six serum measurements), target `progression` (a disease-progression score one year
later, 25-346). `train_test_split(test_size=0.2, random_state=0)` gives 353 train and
89 test rows. The train rows are split by age, non-IID: the youngest third goes to
`clinic-a`, the middle third to `clinic-b`, the oldest to `clinic-c`. Test row i goes
to clinic i mod 3 with `split = 'test'`, so the clinics' holdouts together are exactly
the 89-row test set a centralized baseline is scored on (`baseline()`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
CLINICS = ["clinic-a", "clinic-b", "clinic-c"]
FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, X_test, y_train, y_test) of the fixed split."""
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    x, y = load_diabetes(return_X_y=True, scaled=False)
    return train_test_split(x, y, test_size=0.2, random_state=0)


def baseline() -> dict[str, float]:
    """Centralized scikit-learn LinearRegression on the pooled train rows, scored on the test rows."""
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error

    x_tr, x_te, y_tr, y_te = split()
    pred = LinearRegression().fit(x_tr, y_tr).predict(x_te)
    return {"mae": mean_absolute_error(y_te, pred), "rmse": root_mean_squared_error(y_te, pred),
            "r2": r2_score(y_te, pred)}


def main() -> None:
    x_tr, x_te, y_tr, y_te = split()
    order = np.argsort(x_tr[:, 0], kind="stable")  # by age
    parts = np.array_split(order, len(CLINICS))
    (HERE / "data").mkdir(exist_ok=True)
    for i, clinic in enumerate(CLINICS):
        train = np.sort(parts[i])
        test = np.arange(i, len(y_te), len(CLINICS))
        x = np.concatenate([x_tr[train], x_te[test]]).astype(np.float64)
        y = np.concatenate([y_tr[train], y_te[test]]).astype(np.float64)
        cols = {name: pa.array(x[:, j]) for j, name in enumerate(FEATURES)}
        cols["progression"] = pa.array(y)
        cols["split"] = pa.array(["train"] * len(train) + ["test"] * len(test))
        pq.write_table(pa.table(cols), HERE / "data" / f"{clinic}.parquet", compression="zstd")
        print(f"{clinic}: {len(train)} train, {len(test)} test rows")
    print("centralized LinearRegression baseline:", {k: round(v, 4) for k, v in baseline().items()})


if __name__ == "__main__":
    main()
