"""PostgreSQL sources against a real, throwaway PostgreSQL server (tests/runtime/pg_server.py):
typed values, schema-qualified tables, one-line errors, and the CLI end to end (contract test,
training, analysis) with one hospital's biopsies in PostgreSQL and the others in files."""

from __future__ import annotations

import csv
import datetime
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from pg_server import PASSWORD

from meshctl.compiler.plan import PlanColumn, PlanProduct
from meshctl.errors import UserError
from meshctl.runtime import data
from meshctl.runtime.data import count_rows, product_view, register_source

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.xdist_group("postgres")  # one worker starts one PostgreSQL (pg_server)
FREE = ["--address", "tcp://127.0.0.1:0"]


def _products(uri: str, table: str = "other.products") -> PlanProduct:
    cols = [PlanColumn(name="id", type="int"), PlanColumn(name="code", type="string"),
            PlanColumn(name="note", type="string"), PlanColumn(name="active", type="bool"),
            PlanColumn(name="price", type="float"), PlanColumn(name="weight", type="float"),
            PlanColumn(name="made", type="date")]
    return PlanProduct(id="shop.products", domain="shop", name="products", source=uri, format="postgresql",
                       table=table, columns=cols)


@pytest.mark.parametrize("table", ["products", "other.products"])
def test_values_arrive_as_the_server_holds_them(pg_server, tmp_path, table):
    con = duckdb.connect()
    src = register_source(con, _products(pg_server.uri(), table), tmp_path)
    rows = con.execute(f"SELECT id, code, note, active, price, weight, made FROM {src} ORDER BY id").fetchall()
    assert rows == [
        (1, "00123", "first", True, 12.5, 1.5, datetime.date(2024, 1, 2)),
        (2, "0042", None, False, None, None, None),  # NULL stays NULL, '0042' stays text
        (3, "", "", None, 3.0, 2.25, datetime.date(2023, 12, 31)),  # '' stays '' (not NULL)
    ]
    types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE {src})").fetchall())
    assert types == {"id": "INTEGER", "code": "VARCHAR", "note": "VARCHAR", "active": "BOOLEAN",
                     "price": "DOUBLE", "weight": "FLOAT", "made": "DATE"}


def test_rows_fetched_in_chunks_keep_the_table_order(pg_server, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PG_CHUNK", 2)  # 3 rows: two fetches, two inserts on one DuckDB connection
    con = duckdb.connect()
    src = register_source(con, _products(pg_server.uri()), tmp_path)
    assert con.execute(f"SELECT id, code FROM {src}").fetchall() == [(1, "00123"), (2, "0042"), (3, "")]
    assert count_rows(_products(pg_server.uri()), tmp_path, con) == 3  # registered again on the same connection


def test_the_masked_view_of_a_postgres_table_equals_the_parquet_file(pg_server, tmp_path):
    parquet = ROOT / "examples" / "hospitals" / "data" / "charite.parquet"
    cols = [PlanColumn(name="mrn", type="string", pii="direct"), PlanColumn(name="radius_mean", type="float"),
            PlanColumn(name="date_of_birth", type="date"), PlanColumn(name="diagnosis", type="category",
                                                                      values=["benign", "malignant"])]
    product = PlanProduct(id="charite.biopsies", domain="charite", name="biopsies", source=pg_server.uri(),
                          format="postgresql", table="biopsies", columns=cols)
    con = duckdb.connect()
    view = product_view(con, product, tmp_path)
    got = con.execute(f"SELECT * FROM {view}").fetchall()
    want = duckdb.sql(f"SELECT radius_mean, date_of_birth, diagnosis FROM '{parquet}'").fetchall()
    assert got == want and len(got) == count_rows(product, tmp_path)
    assert [r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()] == ["radius_mean", "date_of_birth",
                                                                          "diagnosis"]


@pytest.mark.parametrize("case, words", [
    ("password", "the postgresql server refused the login"),
    ("table", "no table 'other.nosuch' in the postgresql database"),
    ("column", "declared column price2 not in the data"),
    ("database", "the postgresql server refused the login"),
])
def test_postgres_errors_are_one_line_without_password_or_host_path(pg_server, tmp_path, case, words):
    uri = {"password": pg_server.uri("wrong-pass-9X"), "database": pg_server.uri(database="nosuchdb")}.get(
        case, pg_server.uri())
    product = _products(uri, "other.nosuch" if case == "table" else "other.products")
    if case == "column":
        product = product.model_copy(update={"columns": [*product.columns, PlanColumn(name="price2", type="float")]})
    with pytest.raises(UserError) as err:
        count_rows(product, tmp_path)
    text, message = err.value.render(), err.value.message
    assert words in message and "\n" not in text
    assert PASSWORD not in text and "wrong-pass-9X" not in text and "***" in text
    assert pg_server.socket_dir not in text and "127.0.0.1" not in message


# -- the CLI end to end: one hospital in PostgreSQL, the others in files ----------------------------


def _meshctl(*args: str, cwd: Path, password: str = PASSWORD) -> subprocess.CompletedProcess[str]:
    # the password reaches libpq through PGPASSWORD, never the mesh.yaml
    return subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "PGPASSWORD": password}, check=False)


def _charite_in_postgres(mesh: Path, uri: str, old: str) -> None:
    text = mesh.read_text()
    assert text.count(old) == 1
    mesh.write_text(text.replace(old, f"{uri}\n    table: biopsies"))


@pytest.fixture
def hospitals(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "mesh.yaml", tmp_path / "mesh.yaml")
    shutil.copytree(ROOT / "examples" / "hospitals" / "data", tmp_path / "examples" / "hospitals" / "data")
    shutil.copytree(ROOT / "examples" / "analytics", tmp_path / "examples" / "analytics",
                    ignore=shutil.ignore_patterns(".meshctl"))
    return tmp_path


def _metrics(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stderr + out.stdout
    run = Path(out.stdout.strip().splitlines()[-1].rsplit(": ", 1)[-1])
    rows = list(csv.reader((run / "metrics.csv").open()))
    assert len(rows) == 16  # the header and 15 rounds
    wire = [i for i, h in enumerate(rows[0]) if h in ("bytes_in", "bytes_out", "update_bytes")]
    # what was learned, not the bytes its messages took (a JSON header's number may be a digit longer)
    return "\n".join(",".join(c for i, c in enumerate(r) if i not in wire) for r in rows)


QUALITY = """\
    purposes: [cancer-research]
    quality:
      - {metric: rowCount, mustBeGreaterThan: 100}
      - {column: radius_mean, metric: nullValues, mustBe: 0}
      - {column: diagnosis, metric: missingValues, missingValues: [null, ''], mustBe: 0}
"""


def test_contract_test_training_and_analysis_read_a_postgres_product(pg_server, hospitals):
    mesh = hospitals / "mesh.yaml"
    mesh.write_text(mesh.read_text().replace("    purposes: [cancer-research]\n", QUALITY, 1))
    files = _metrics(_meshctl("up", "--headless", *FREE, cwd=hospitals))
    _charite_in_postgres(hospitals / "mesh.yaml", pg_server.uri(password=None),
                         "examples/hospitals/data/charite.parquet")
    (hospitals / "examples" / "hospitals" / "data" / "charite.parquet").unlink()  # only PostgreSQL has it now

    checked = _meshctl("contract", "test", "charite.biopsies", cwd=hospitals)
    assert checked.returncode == 0, checked.stderr + checked.stdout
    assert checked.stdout.splitlines()[-1] == ("18 checks on 1 product: 18 passed, 0 failed (0 errors, 0 warnings), "
                                               "0 skipped")  # 4 rules, 14 type(column) checks
    assert re.search(r"^charite\.biopsies +rowCount +\d+ +mustBeGreaterThan +100 +pass", checked.stdout,
                     re.MULTILINE)
    refused = _meshctl("contract", "test", "charite.biopsies", cwd=hospitals, password="wrong-pass-9X")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].endswith(
        "error: cannot read product charite.biopsies: the postgresql server refused the login "
        "(user, password or database)"), refused.stderr
    assert "wrong-pass-9X" not in refused.stderr + refused.stdout
    assert _metrics(_meshctl("up", "--headless", *FREE, cwd=hospitals)) == files, "same data, same model"

    analytics = hospitals / "examples" / "analytics" / "mesh.yaml"
    _charite_in_postgres(analytics, pg_server.uri(password=None), "../hospitals/data/charite.parquet")
    out = _meshctl("analyze", "nucleus-size-by-diagnosis", str(analytics), "--headless", *FREE, cwd=hospitals)
    assert out.returncode == 0, out.stderr + out.stdout
    lines = out.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("diagnosis"))
    assert lines[head + 1].startswith("benign     357") and lines[head + 2].startswith("malignant  212")
