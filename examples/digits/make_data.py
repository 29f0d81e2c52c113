"""The benchmark workload (bench/WORKLOAD.md) as a meshctl mesh: digits over N domains.

    python examples/digits/make_data.py        # writes the 4-client example here

Data and partition reproduce the benchmark definition exactly:
  * sklearn ``load_digits`` (1797 x 64), ``train_test_split(test_size=0.2,
    random_state=0, shuffle=True)`` -> 1437 train / 360 test;
  * ``StandardScaler`` fit on the train split only, applied to both, float32;
  * per-class Dirichlet(0.5) over N clients with ``numpy.random.default_rng(0)``,
    classes ascending, each class's (ascending) indices shuffled, cut at
    ``floor(cumsum(p) * n_c)``; the whole draw is repeated with the continuing
    generator while any client has fewer than 10 samples; indices sorted.

Client i's file holds its train partition (``split = 'train'``, in ascending train
index) followed by the test rows whose test-set index is i mod N (``split = 'test'``),
so the clients' test rows together are exactly the 360-sample global test set and the
example-weighted accuracy over domains equals the global test accuracy.

``write_mesh(out_dir, n_clients, rounds, hidden)`` is what the benchmark calls.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

SEED = 0
TEST_SIZE = 0.2
ALPHA = 0.5
MIN_CLIENT_SIZE = 10
NUM_FEATURES = 64
NUM_CLASSES = 10

HERE = Path(__file__).resolve().parent
FEATURES = [f"px{j}" for j in range(NUM_FEATURES)]


@functools.lru_cache(maxsize=1)
def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, y_train, X_test, y_test): float32 standardized features, int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(
        X, y, test_size=TEST_SIZE, random_state=SEED, shuffle=True
    )
    scaler = StandardScaler().fit(X_tr)
    X_tr = scaler.transform(X_tr).astype(np.float32)
    X_te = scaler.transform(X_te).astype(np.float32)
    return X_tr, y_tr.astype(np.int64), X_te, y_te.astype(np.int64)


@functools.lru_cache(maxsize=8)
def dirichlet_partition(
    num_clients: int, alpha: float = ALPHA, seed: int = SEED,
    min_size: int = MIN_CLIENT_SIZE,
) -> tuple[tuple[int, ...], ...]:
    """Per-class Dirichlet label partition of the train split (train-set indices)."""
    _, y, _, _ = load_data()
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    while True:
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            p = rng.dirichlet([alpha] * num_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].extend(chunk.tolist())
        if min(len(p_) for p_ in parts) >= min_size:
            return tuple(tuple(sorted(p_)) for p_ in parts)


def holdout_indices(client_id: int, num_clients: int) -> np.ndarray:
    """Test-set indices that client `client_id` holds: those ≡ client_id (mod N)."""
    _, _, _, y_te = load_data()
    return np.arange(client_id, len(y_te), num_clients, dtype=np.int64)


def _client_table(client_id: int, num_clients: int) -> pa.Table:
    X_tr, y_tr, X_te, y_te = load_data()
    tr = np.asarray(dirichlet_partition(num_clients)[client_id], dtype=np.int64)
    te = holdout_indices(client_id, num_clients)
    X = np.concatenate([X_tr[tr], X_te[te]]).astype(np.float32)
    y = np.concatenate([y_tr[tr], y_te[te]]).astype(np.int32)
    split = ["train"] * len(tr) + ["test"] * len(te)
    cols: dict[str, pa.Array] = {f: pa.array(X[:, j], pa.float32()) for j, f in enumerate(FEATURES)}
    cols["label"] = pa.array(y, pa.int32())
    cols["split"] = pa.array(split, pa.string())
    return pa.table(cols)


def _flow_list(items: list[str], indent: int, per_line: int) -> str:
    """A YAML flow sequence, `per_line` items a line, continuation lines indented."""
    pad = " " * indent
    lines = [", ".join(items[s:s + per_line]) for s in range(0, len(items), per_line)]
    return "[\n" + ",\n".join(pad + ln for ln in lines) + "]"


def mesh_yaml(n_clients: int, rounds: int = 20, hidden: list[int] | tuple[int, ...] = (128,)) -> str:
    """The mesh.yaml text for `n_clients` domains (sources `data/client-{i}.parquet`)."""
    labels = ", ".join(str(c) for c in range(NUM_CLASSES))
    col_items = [f"{{name: {f}, type: float}}" for f in FEATURES]
    col_items += [
        f"{{name: label, type: category, values: [{labels}]}}",
        "{name: split, type: string}",
    ]
    hidden_s = ", ".join(str(int(h)) for h in hidden)
    out: list[str] = []
    w = out.append
    w("# The meshctl benchmark workload (bench/WORKLOAD.md): sklearn digits, standardized,")
    w(f"# split non-IID (per-class Dirichlet(0.5), seed 0) over {n_clients} domains. Each domain")
    w("# also holds every N-th row of the 360-sample test set (split = 'test'), so the")
    w("# domains' holdouts together are exactly the global test set.")
    w("# Generated by examples/digits/make_data.py -- do not edit by hand.")
    w("apiVersion: meshctl/v1")
    w("mesh:")
    w("  name: digits-benchmark")
    w(f"  description: Handwritten digits over {n_clients} domains, the federated-learning benchmark.")
    w("  coordinator: {address: tcp://127.0.0.1:7710}")
    w("")
    w("domains:")
    for i in range(n_clients):
        w(f"  - {{name: client-{i}, owner: client-{i}@digits.example, jurisdiction: eu, address: local}}")
    w("")
    w("products:")
    for i in range(n_clients):
        w("  - name: digits")
        w(f"    domain: client-{i}")
        w(f"    source: data/client-{i}.parquet")
        w("    description: A train partition and every N-th test row (column split).")
        w("    classification: internal")
        w("    contract: digits@1")
        if i == 0:
            w("    columns: &digits-columns " + _flow_list(col_items, 6, 4))
        else:
            w("    columns: *digits-columns")
    w("")
    w("contracts:")
    w("  - name: digits")
    w("    version: 1.0.0")
    w("    description: 8x8 digit images, standardized pixels, label and train/test split.")
    w("    purposes: [benchmark]")
    w("    columns: *digits-columns")
    w("")
    w("policies:")
    w("  - name: minimum-cohort")
    w("    scope: model")
    w("    require: size(model.participants) >= 2")
    w("    message: a model needs at least two domains")
    w("")
    w("models:")
    w("  - name: digits-mlp")
    w("    purpose: benchmark")
    w("    inputs: {contract: digits, features: [\"px*\"], target: label}")
    w("    participants: all")
    w(f"    architecture: {{kind: mlp, hidden: [{hidden_s}]}}")
    w(f"    training: {{rounds: {int(rounds)}, local_epochs: 1, batch_size: 32, optimizer: sgd, lr: 0.05,")
    w("               momentum: 0.9, seed: 0}")
    w("    aggregation: {strategy: fedavg}")
    w("    evaluation: {holdout_column: split, holdout_value: test, metrics: [loss, accuracy]}")
    return "\n".join(out) + "\n"


def write_mesh(out_dir: Path, n_clients: int, rounds: int = 20,
               hidden: list[int] = [128]) -> Path:  # noqa: B006 (never mutated)
    """Write `out_dir/data/client-{i}.parquet` (i < n_clients) and `out_dir/mesh.yaml`.

    Returns the mesh.yaml path. Deterministic: same arguments, same bytes.
    """
    out_dir = Path(out_dir)
    data = out_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute("SET threads TO 1")
    con.execute("SET preserve_insertion_order TO true")
    try:
        for i in range(n_clients):
            con.register("client_rows", _client_table(i, n_clients))
            path = (data / f"client-{i}.parquet").as_posix().replace("'", "''")
            con.execute(
                f"COPY (SELECT * FROM client_rows) TO '{path}' (FORMAT parquet, COMPRESSION zstd)"
            )
            con.unregister("client_rows")
    finally:
        con.close()
    mesh = out_dir / "mesh.yaml"
    mesh.write_text(mesh_yaml(n_clients, rounds, hidden), encoding="utf-8")
    return mesh


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 4
    out = HERE if not argv[1:] else Path(argv[1])
    mesh = write_mesh(out, n)
    _, y_tr, _, _ = load_data()
    parts = dirichlet_partition(n)
    sizes = [len(p) for p in parts]
    print(f"wrote {mesh} and {n} client files under {mesh.parent / 'data'}")
    print(f"N={n} train sizes={sizes} sum={sum(sizes)}")
    for i, p in enumerate(parts):
        counts = np.bincount(y_tr[list(p)], minlength=NUM_CLASSES).tolist()
        print(f"  client-{i}: train {len(p):4d}  test {len(holdout_indices(i, n)):3d}  labels {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
