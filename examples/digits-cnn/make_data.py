"""The digits-cnn example's data: sklearn's 8x8 digits as an image (tensor) column.

    python examples/digits-cnn/make_data.py

Each of the 4 domains gets a Parquet file with `pixels` (list<float>, the 64 pixel
values row-major, scaled to [0, 1] by dividing by 16), `label` (0-9) and `split`
(`train` or `test`). The 1797 images are shuffled (seed 0); every 5th is a test
row; the rest are dealt round-robin, so the domains are IID and about equal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
DOMAINS = ["clinic-a", "clinic-b", "clinic-c", "clinic-d"]


def tables() -> dict[str, pa.Table]:
    """Each domain's rows."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = (x[order] / 16.0).astype(np.float32), y[order]
    out = {}
    for i, domain in enumerate(DOMAINS):
        rows = np.arange(i, len(y), len(DOMAINS))
        out[domain] = pa.table({
            "pixels": pa.array([r.tolist() for r in x[rows]], type=pa.list_(pa.float32())),
            "label": pa.array(y[rows].astype(np.int32)),
            "split": pa.array(["test" if j % 5 == 0 else "train" for j in rows]),
        })
    return out


def main() -> None:
    (HERE / "data").mkdir(exist_ok=True)
    for domain, table in tables().items():
        pq.write_table(table, HERE / "data" / f"{domain}.parquet")
        print(f"data/{domain}.parquet: {table.num_rows} rows")


if __name__ == "__main__":
    main()
