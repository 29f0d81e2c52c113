"""Every source kind end to end, through the real CLI (issue 11).

One mesh of four domains, each reading the same kind of hospitals data from a different
source: a csv file, a parquet file, a `sqlite:` database and a `duckdb:` database (real
files, made here). `meshctl contract test` passes, `meshctl up --headless` trains on all
four and `meshctl analyze` gives exactly the aggregates (and `up` exactly the model) of
a twin mesh whose every domain reads the same rows from parquet. A sqlite source needs
no pyarrow (it is a test-only extra): `contract test` runs with pyarrow unimportable.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from meshctl.compiler.compile import compile_mesh
from meshctl.runtime.data import count_rows, load_job_data, register_source

ROOT = Path(__file__).resolve().parents[2]
HOSPITALS = ROOT / "examples" / "hospitals" / "data"
FREE = ["--address", "tcp://127.0.0.1:0"]
COLS = "patient_name, date_of_birth, radius_mean, texture_mean, area_mean, diagnosis"
SITES = {"csv-site": "data/csv-site.csv", "parquet-site": "data/parquet-site.parquet",
         "sqlite-site": "sqlite:data/sqlite-site.db", "duckdb-site": "duckdb:data/duckdb-site.duckdb"}

MESH = """\
apiVersion: meshctl/v1
mesh:
  name: NAME
  description: One product per source kind.
  coordinator: {address: tcp://127.0.0.1:7799, jurisdiction: eu}
domains:
DOMAINS
products:
PRODUCTS
contracts:
  - name: tumor-biopsy
    version: 1.0.0
    description: Biopsies.
    purposes: [research]
    columns:
      - {name: radius_mean, type: float, range: [0, 40]}
      - {name: texture_mean, type: float}
      - {name: area_mean, type: float}
      - {name: diagnosis, type: category, values: [benign, malignant]}
    quality:
      - {metric: rowCount, mustBeGreaterThan: 50}
      - {column: diagnosis, metric: nullValues, mustBe: 0}
models:
  - name: malignancy
    purpose: research
    inputs: {contract: tumor-biopsy, features: [radius_mean, texture_mean, area_mean], target: diagnosis}
    participants: all
    architecture: {kind: mlp, hidden: [8]}
    training: {rounds: 2, local_epochs: 1, batch_size: 32, optimizer: sgd, lr: 0.05, seed: 0, standardize: true}
    aggregation: {strategy: fedavg}
    evaluation: {holdout: 0.2, metrics: [loss, accuracy]}
analyses:
  - name: sizes
    purpose: research
    inputs: {contract: tumor-biopsy}
    group_by: [diagnosis]
    metrics: [count, mean(radius_mean), variance(area_mean), sum(texture_mean)]
    min_group_size: 1
"""
COLUMNS = """\
    columns:
      - {name: patient_name, type: string, pii: direct}
      - {name: date_of_birth, type: date, pii: indirect, masking: generalize, generalize: year}
      - {name: radius_mean, type: float, range: [0, 40]}
      - {name: texture_mean, type: float}
      - {name: area_mean, type: float}
      - {name: diagnosis, type: category, values: [benign, malignant]}
"""


def _mesh(name: str, sources: dict[str, str]) -> str:
    domains = "\n".join(f"  - {{name: {d}, owner: data@{d}.example, jurisdiction: eu, address: local}}"
                        for d in sources)
    products = "".join(
        f"  - name: biopsies\n    domain: {d}\n    source: \"{src}\"\n"
        + ("    table: biopsies\n" if ":" in src else "")
        + f"    description: {d}\n    classification: restricted\n    contract: tumor-biopsy@1\n{COLUMNS}"
        for d, src in sources.items())
    return MESH.replace("NAME", name).replace("DOMAINS", domains).replace("PRODUCTS\n", products)


def _make_data(data: Path) -> None:
    """Each site's rows in its own kind of file, and the same rows in data/twin-<site>.parquet.

    The sqlite and duckdb sites hold NULLs (a feature, a date) and the sqlite one stores
    its dates as text and its reals as sqlite REAL, as a sqlite application would."""
    data.mkdir()
    charite = duckdb.sql(f"SELECT {COLS} FROM '{HOSPITALS / 'charite.parquet'}'").fetchall()
    for i in (3, 40):  # NULLs that must stay NULL (skipped by training, ignored by means)
        charite[i] = (*charite[i][:2], None, *charite[i][3:])
    charite[7] = (charite[7][0], None, *charite[7][2:])
    con = duckdb.connect()
    con.execute("CREATE TABLE rows (patient_name VARCHAR, date_of_birth DATE, radius_mean DOUBLE, "
                "texture_mean DOUBLE, area_mean DOUBLE, diagnosis VARCHAR)")
    con.executemany("INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?)", charite)
    twins = {
        "csv-site": f"SELECT {COLS} FROM read_csv_auto('{HOSPITALS / 'amsterdam-umc.csv'}')",
        "parquet-site": f"SELECT {COLS} FROM '{HOSPITALS / 'karolinska.parquet'}'",
        "sqlite-site": "SELECT * FROM rows LIMIT 130",
        "duckdb-site": "SELECT * FROM rows OFFSET 130",
    }
    for site, query in twins.items():
        con.execute(f"COPY ({query}) TO '{data / f'twin-{site}.parquet'}' (FORMAT parquet)")
    con.execute(f"COPY ({twins['csv-site']}) TO '{data / 'csv-site.csv'}' (HEADER)")
    con.execute(f"COPY ({twins['parquet-site']}) TO '{data / 'parquet-site.parquet'}' (FORMAT parquet)")
    db = sqlite3.connect(data / "sqlite-site.db")
    db.execute("CREATE TABLE biopsies (patient_name TEXT, date_of_birth TEXT, radius_mean REAL, "
               "texture_mean REAL, area_mean REAL, diagnosis TEXT)")
    db.executemany("INSERT INTO biopsies VALUES (?, ?, ?, ?, ?, ?)",
                   [(r[0], None if r[1] is None else str(r[1]), *r[2:]) for r in charite[:130]])
    db.commit()
    db.close()
    with duckdb.connect(str(data / "duckdb-site.duckdb")) as own:
        own.execute(f"CREATE TABLE biopsies AS SELECT * FROM '{data / 'twin-duckdb-site.parquet'}'")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Path:
    """tmp with mesh.yaml (four source kinds), twins.yaml (the same rows, all parquet) and data/."""
    tmp = tmp_path_factory.mktemp("sources")
    _make_data(tmp / "data")
    (tmp / "mesh.yaml").write_text(_mesh("sources", SITES))
    (tmp / "twins.yaml").write_text(_mesh("twins", {d: f"data/twin-{d}.parquet" for d in SITES}))
    return tmp


def meshctl(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})}, check=False)


def test_contract_test_passes_on_every_source_kind(mesh):
    out = meshctl("contract", "test", cwd=mesh)
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.splitlines()[-1] == "40 checks on 4 products: 40 passed, 0 failed (0 errors, 0 warnings), 0 skipped"  # 6 type(column) each
    assert re.search(r"^sqlite-site\.biopsies +rowCount +130 ", out.stdout, re.MULTILINE)
    assert re.search(r"^duckdb-site\.biopsies +rowCount +129 ", out.stdout, re.MULTILINE)


def _model(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "models" / "malignancy.safetensors")


def test_up_trains_on_every_source_kind_exactly_as_on_parquet(mesh):
    out = meshctl("up", "--headless", *FREE, "mesh.yaml", cwd=mesh)
    assert out.returncode == 0, out.stderr + out.stdout
    rounds = [ln for ln in out.stdout.splitlines() if re.match(r"malignancy +round", ln)]
    assert len(rounds) == 2 and all("participants 4 " in ln for ln in rounds), out.stdout
    run = Path(out.stdout.strip().splitlines()[-1].rsplit(": ", 1)[-1])
    twin = meshctl("up", "--headless", *FREE, "twins.yaml", cwd=mesh)
    assert twin.returncode == 0, twin.stderr + twin.stdout
    twin_run = Path(twin.stdout.strip().splitlines()[-1].rsplit(": ", 1)[-1])
    got, want = _model(run), _model(twin_run)
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in got)


def test_analyze_gives_every_source_kind_the_aggregates_of_parquet(mesh):
    results = {}
    for name in ("mesh", "twins"):
        out = meshctl("analyze", "sizes", f"{name}.yaml", "--headless", *FREE, "-o", f"{name}.json", cwd=mesh)
        assert out.returncode == 0, out.stderr + out.stdout
        results[name] = json.loads((mesh / f"{name}.json").read_text())["groups"]
    assert results["mesh"] == results["twins"]
    assert sum(g["count"] for g in results["mesh"]) == 164 + 146 + 259 - 2  # rows with a NULL are dropped
    union = " UNION ALL ".join(f"SELECT * FROM '{mesh / 'data' / f'twin-{d}.parquet'}'" for d in SITES)
    for g in results["mesh"]:
        n, mean = duckdb.sql(f"SELECT count(*), avg(radius_mean) FROM ({union}) WHERE diagnosis = ? "
                             "AND radius_mean IS NOT NULL", params=[g["key"]["diagnosis"]]).fetchall()[0]
        assert g["count"] == n
        assert g["values"]["mean(radius_mean)"] == pytest.approx(mean, rel=1e-12)


def test_contract_test_on_sqlite_needs_no_pyarrow(mesh, tmp_path):
    blocked = tmp_path / "pyarrow"
    blocked.mkdir()
    (blocked / "__init__.py").write_text("raise ImportError('pyarrow is not installed')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    probe = subprocess.run([sys.executable, "-c", "import pyarrow"], env={**os.environ, **env},
                           capture_output=True, text=True, check=False)
    assert probe.returncode == 1 and "pyarrow is not installed" in probe.stderr
    out = meshctl("contract", "test", "sqlite-site.biopsies", cwd=mesh, env=env)
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.splitlines()[-1].startswith("10 checks on 1 product: 10 passed")


def _sqlite_product(tmp: Path, columns: list[dict], rows: list[tuple], decl: str = ""):
    db = sqlite3.connect(tmp / "t.db")
    db.execute(f"CREATE TABLE t ({decl or ', '.join(c['name'] for c in columns)})")
    db.executemany(f"INSERT INTO t VALUES ({', '.join('?' * len(columns))})", rows)
    db.commit()
    db.close()
    spec = _mesh("one", {"sqlite-site": "sqlite:t.db"}).replace("table: biopsies", "table: t")
    (tmp / "mesh.yaml").write_text(spec)
    product = compile_mesh(tmp / "mesh.yaml").plan.products[0]
    from meshctl.compiler.plan import PlanColumn

    return product.model_copy(update={"columns": [PlanColumn(**c) for c in columns]})


def test_sqlite_values_keep_their_types_and_nulls(tmp_path):
    columns = [{"name": "i", "type": "int"}, {"name": "f", "type": "float"}, {"name": "b", "type": "bool"},
               {"name": "s", "type": "string"}, {"name": "d", "type": "date"}, {"name": "loose", "type": "int"},
               {"name": "frac", "type": "int"}, {"name": "blob", "type": "string"}, {"name": "none", "type": "float"}]
    rows = [(1, 2, 1, "a", "2020-01-02", 5, 1.5, b"\x00x", None),
            (None, 2.5, 0, None, None, "six", 2, None, None),
            (2**62, None, None, "c", "2021-03-04", None, None, b"y", None)]
    product = _sqlite_product(tmp_path, columns, rows)
    with duckdb.connect() as con:
        src = register_source(con, product, tmp_path)
        types = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
        got = con.execute(f"SELECT * FROM {src}").fetchall()
    assert types == {"i": "BIGINT", "f": "DOUBLE", "b": "BOOLEAN", "s": "VARCHAR", "d": "VARCHAR",
                     "loose": "VARCHAR", "frac": "VARCHAR", "blob": "BLOB", "none": "DOUBLE"}
    assert got == [(1, 2.0, True, "a", "2020-01-02", "5", "1.5", b"\x00x", None),
                   (None, 2.5, False, None, None, "six", "2", None, None),
                   (2**62, None, None, "c", "2021-03-04", None, None, b"y", None)]


def test_a_sqlite_source_reads_again_after_a_count_on_the_same_connection(mesh):
    plan = compile_mesh(mesh / "mesh.yaml").plan
    job = plan.jobs[0]
    read = next(r for r in job.reads if r.domain == "sqlite-site")
    product = plan.product(read.product)
    with duckdb.connect() as con:  # as a daemon does: count, then read for the job
        assert count_rows(product, mesh, con) == 130
        con.execute("SELECT * FROM range(10)").fetchone()  # a result left open by someone else
        data = load_job_data(job, product, mesh, read.client_id, con)
        assert count_rows(product, mesh, con) == 130
    assert (data.rows, data.skipped) == (128, 2)
