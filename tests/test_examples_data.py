"""The example data under examples/: hospital files of the root mesh.yaml, and the
digits benchmark mesh (which must reproduce /work/shared/bench/workload.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HOSPITALS = ROOT / "examples" / "hospitals" / "data"
DIGITS = ROOT / "examples" / "digits"
WORKLOAD = Path("/work/shared/bench/workload.py")

HOSPITAL_FILES = ["charite.parquet", "karolinska.parquet", "amsterdam-umc.csv"]
HOSPITAL_COLUMNS = {
    "patient_name": "VARCHAR",
    "mrn": "VARCHAR",
    "date_of_birth": "DATE",
    **{
        f"{f}_mean": "DOUBLE"
        for f in ["radius", "texture", "perimeter", "area", "smoothness", "compactness",
                  "concavity", "concave_points", "symmetry", "fractal_dimension"]
    },
    "diagnosis": "VARCHAR",
}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return _load("examples_digits_make_data", DIGITS / "make_data.py")


@pytest.fixture(scope="module")
def workload():
    if not WORKLOAD.exists():
        pytest.skip(f"{WORKLOAD} not present")
    pytest.importorskip("sklearn")
    pytest.importorskip("torch")
    return _load("bench_workload", WORKLOAD)


def _scan(path: Path) -> str:
    return f"read_parquet('{path}')" if path.suffix == ".parquet" else f"read_csv('{path}')"


# -- hospitals -----------------------------------------------------------------


def test_root_mesh_declares_the_hospital_files():
    spec = yaml.safe_load((ROOT / "mesh.yaml").read_text())
    sources = sorted(Path(p["source"]).name for p in spec["products"])
    assert sources == sorted(HOSPITAL_FILES)
    declared = [c["name"] for c in spec["products"][0]["columns"]]
    assert declared == list(HOSPITAL_COLUMNS)


@pytest.mark.parametrize("fname", HOSPITAL_FILES)
def test_hospital_file_columns_rows_classes(fname):
    path = HOSPITALS / fname
    assert path.exists(), f"run python examples/hospitals/make_data.py ({path} missing)"
    con = duckdb.connect()
    schema = con.execute(f"DESCRIBE SELECT * FROM {_scan(path)}").fetchall()
    assert {r[0]: r[1] for r in schema} == HOSPITAL_COLUMNS
    assert [r[0] for r in schema] == list(HOSPITAL_COLUMNS)
    n, n_mrn, n_null = con.execute(
        f"SELECT count(*), count(DISTINCT mrn), count(*) - count(diagnosis) FROM {_scan(path)}"
    ).fetchone()
    assert n >= 120
    assert n_mrn == n and n_null == 0
    classes = dict(con.execute(
        f"SELECT diagnosis, count(*) FROM {_scan(path)} GROUP BY 1").fetchall())
    assert set(classes) == {"benign", "malignant"}
    assert min(classes.values()) > 0
    lo, hi = con.execute(
        f"SELECT min(date_of_birth), max(date_of_birth) FROM {_scan(path)}").fetchone()
    assert lo.year >= 1930 and hi.year <= 2000


def test_hospitals_cover_the_dataset_once():
    con = duckdb.connect()
    union = " UNION ALL ".join(f"SELECT mrn FROM {_scan(HOSPITALS / f)}" for f in HOSPITAL_FILES)
    n, n_mrn = con.execute(f"SELECT count(*), count(DISTINCT mrn) FROM ({union})").fetchone()
    assert n == n_mrn == 569


# -- digits --------------------------------------------------------------------


def _read_client(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    con = duckdb.connect()
    cols = con.execute(f"SELECT * FROM read_parquet('{path}')").fetchnumpy()
    X = np.stack([np.asarray(cols[f"px{j}"]) for j in range(64)], axis=1)
    return X, np.asarray(cols["label"]), np.asarray(cols["split"]).astype(str)


def test_committed_digits_example(digits):
    X_tr, y_tr, X_te, y_te = digits.load_data()
    parts = digits.dirichlet_partition(4)
    spec = yaml.safe_load((DIGITS / "mesh.yaml").read_text())
    assert spec["mesh"]["name"] == "digits-benchmark"
    assert [d["name"] for d in spec["domains"]] == [f"client-{i}" for i in range(4)]
    assert spec["models"][0]["architecture"]["hidden"] == [128]
    n_test = 0
    test_X = []
    for i in range(4):
        path = DIGITS / spec["products"][i]["source"]
        X, y, split = _read_client(path)
        assert X.dtype == np.float32
        tr = split == "train"
        idx = np.asarray(parts[i])
        assert tr.sum() == len(idx)
        np.testing.assert_array_equal(X[tr], X_tr[idx])
        np.testing.assert_array_equal(y[tr], y_tr[idx])
        n_test += int((~tr).sum())
        test_X.append(X[~tr])
        np.testing.assert_array_equal(y[~tr], y_te[i::4])
    assert n_test == 360
    # The union of the clients' test rows is exactly the global test set.
    got = np.concatenate(test_X)
    want = np.concatenate([X_te[i::4] for i in range(4)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n", [4, 8, 16])
def test_partition_matches_workload(digits, workload, n):
    assert digits.dirichlet_partition(n) == workload.dirichlet_partition(n)


def test_data_matches_workload(digits, workload):
    for a, b in zip(digits.load_data(), workload.load_data()):
        np.testing.assert_array_equal(a, b)


def test_write_mesh_eight_clients(digits, tmp_path):
    mesh = digits.write_mesh(tmp_path, 8, rounds=5, hidden=[3000, 3000])
    assert mesh == tmp_path / "mesh.yaml"
    files = sorted((tmp_path / "data").glob("client-*.parquet"))
    assert len(files) == 8
    con = duckdb.connect()
    n_train = n_test = 0
    for i in range(8):
        tr, te = con.execute(
            "SELECT count(*) FILTER (split = 'train'), count(*) FILTER (split = 'test') "
            f"FROM read_parquet('{tmp_path / 'data' / f'client-{i}.parquet'}')"
        ).fetchone()
        assert tr >= 10
        n_train += tr
        n_test += te
    assert n_train == 1437
    assert n_test == 360
    spec = yaml.safe_load(mesh.read_text())
    assert len(spec["domains"]) == len(spec["products"]) == 8
    assert spec["models"][0]["architecture"]["hidden"] == [3000, 3000]
    assert spec["models"][0]["training"]["rounds"] == 5
    assert len(spec["contracts"][0]["columns"]) == 66


# -- vertical (split learning, issue 15) ---------------------------------------

VERTICAL = ROOT / "examples" / "vertical"
VERTICAL_FILES = {"lab.parquet": "_mean", "imaging.parquet": "_worst", "clinic.csv": "_se"}


@pytest.fixture(scope="module")
def vertical():
    pytest.importorskip("sklearn")
    return _load("examples_vertical_make_data", VERTICAL / "make_data.py")


def test_vertical_files_are_what_make_data_writes(vertical, tmp_path):
    vertical.main(tmp_path)
    con = duckdb.connect()
    for fname in VERTICAL_FILES:
        committed = VERTICAL / "data" / fname
        assert committed.exists(), f"run python examples/vertical/make_data.py ({committed} missing)"
        got = con.execute(f"SELECT * FROM {_scan(committed)}").fetchall()
        assert got == con.execute(f"SELECT * FROM {_scan(tmp_path / fname)}").fetchall(), fname


def test_vertical_columns_overlap_and_values():
    from sklearn.datasets import load_breast_cancer

    con = duckdb.connect()
    ids = {}
    for fname, suffix in VERTICAL_FILES.items():
        path = VERTICAL / "data" / fname
        cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {_scan(path)}").fetchall()]
        assert cols[0] == "patient_id"
        assert all(c.endswith(suffix) for c in cols[1:] if c != "diagnosis")
        assert ("diagnosis" in cols) == (fname == "clinic.csv")
        n, distinct = con.execute(f"SELECT count(*), count(DISTINCT patient_id) FROM {_scan(path)}").fetchone()
        assert n == distinct
        ids[fname] = {r[0] for r in con.execute(f"SELECT patient_id FROM {_scan(path)}").fetchall()}
    everyone = set.union(*ids.values())
    common = set.intersection(*ids.values())
    assert len(everyone) == 569
    assert 0.8 < len(common) / len(everyone) < 0.9
    assert all(len(s - common) > 0 for s in ids.values()), "each domain holds rows the others lack"
    # the joined table is the original data: every sklearn row appears once, with its label
    lab, img, cli = (_scan(VERTICAL / "data" / f) for f in VERTICAL_FILES)
    joined = con.execute(
        f"SELECT l.radius_mean, i.radius_worst, c.radius_se, c.diagnosis FROM {lab} l "
        f"JOIN {img} i USING (patient_id) JOIN {cli} c USING (patient_id)").fetchall()
    ds = load_breast_cancer()
    names = list(ds.feature_names)
    want = {(r[names.index("mean radius")], r[names.index("worst radius")], r[names.index("radius error")],
             "malignant" if t == 0 else "benign") for r, t in zip(ds.data, ds.target)}
    assert len(joined) == len(common)
    assert set(joined) <= want


# -- vertical-regression (split learning with a numeric label, issue 15) ---------

VERTICAL_REGRESSION = ROOT / "examples" / "vertical-regression"


def test_each_example_directory_holds_one_mesh():
    """Two meshes in one directory share its mesh.plan.toml, .meshctl/runs and cache: `meshctl plan`
    of one overwrote the other's plan and `meshctl runs` mixed their runs."""
    for d in sorted(p for p in (ROOT / "examples").iterdir() if p.is_dir()):
        meshes = sorted(p.name for p in d.iterdir() if p.suffix in (".yaml", ".yml"))
        assert meshes in ([], ["mesh.yaml"]), (d.name, meshes)
    assert "## vertical-regression:" in (ROOT / "examples" / "README.md").read_text()


def test_vertical_regression_files_are_what_make_data_writes(tmp_path):
    pytest.importorskip("sklearn")
    make = _load("examples_vertical_regression_make_data", VERTICAL_REGRESSION / "make_data.py")
    make.main(tmp_path)
    con = duckdb.connect()
    for fname in ("progression_clinic.parquet", "progression_lab.parquet"):
        committed = VERTICAL_REGRESSION / "data" / fname
        got = con.execute(f"SELECT * FROM {_scan(committed)}").fetchall()
        assert got == con.execute(f"SELECT * FROM {_scan(tmp_path / fname)}").fetchall(), fname
