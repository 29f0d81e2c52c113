"""Every source format reads through the same masked view: csv, parquet, sqlite and
duckdb database files (real files made from the hospitals data), and postgresql."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import duckdb
import pytest

from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import Plan, PlanProduct
from meshctl.errors import UserError
from meshctl.runtime.data import JobData, count_rows, load_job_data, product_view

ROOT = Path(__file__).resolve().parents[2]
PARQUET = ROOT / "examples" / "hospitals" / "data" / "charite.parquet"

BASELINE = {  # load_job_data on the root mesh.yaml, recorded before the reads went through product_view
    "charite.biopsies": ("a80a03a57f9d4309d257283bc208b4e0c90e80c37058c27d4695e9cedb739063", 259, 207),
    "karolinska.biopsies": ("d7bf9aedf4f3d5d256f0fead653806b95c766bdd301957979a7cf49887f3f500", 146, 117),
    "amsterdam-umc.biopsies": ("91481570d3497d9a78f327eca9c5e1404a8b84216f497c3fd977c6377ec5c19f", 164, 131),
}


def digest(data: JobData) -> str:
    h = hashlib.sha256()
    for t in (data.x_train, data.y_train, data.x_test, data.y_test):
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def root_plan():
    return compile_mesh(ROOT / "mesh.yaml").plan


def test_training_tensors_of_the_root_mesh_are_unchanged(root_plan):
    job = root_plan.jobs[0]
    for read in job.reads:
        product = root_plan.product(read.product)
        data = load_job_data(job, product, ROOT, read.client_id)
        sha, rows, train = BASELINE[read.product]
        assert (digest(data), data.rows, len(data.x_train), data.skipped) == (sha, rows, train, 0)
        assert count_rows(product, ROOT) == rows


def _sqlite(path: Path) -> None:
    frame = duckdb.sql(f"SELECT * FROM read_parquet('{PARQUET}')")
    names = frame.columns
    rows = frame.fetchall()
    db = sqlite3.connect(path)
    db.execute(f"CREATE TABLE biopsies ({', '.join(names)})")
    db.executemany(f"INSERT INTO biopsies VALUES ({', '.join('?' * len(names))})",
                   [tuple(str(v) if hasattr(v, "isoformat") else v for v in r) for r in rows])
    db.execute("CREATE TABLE other (x)")
    db.commit()
    db.close()


def _duckdb(path: Path) -> None:
    with duckdb.connect(str(path)) as con:
        con.execute(f"CREATE TABLE biopsies AS SELECT * FROM read_parquet('{PARQUET}')")


@pytest.mark.parametrize("fmt,make", [("sqlite", _sqlite), ("duckdb", _duckdb)])
def test_database_files_train_exactly_like_the_parquet_file(root_plan, tmp_path, fmt, make):
    make(tmp_path / f"charite.{fmt}")
    job, read = root_plan.jobs[0], root_plan.jobs[0].reads[0]
    parquet = root_plan.product("charite.biopsies")
    product = parquet.model_copy(update={"source": f"{fmt}:charite.{fmt}", "format": fmt, "table": "biopsies"})
    assert digest(load_job_data(job, product, tmp_path, read.client_id)) == BASELINE["charite.biopsies"][0]
    assert count_rows(product, tmp_path) == 259
    con = duckdb.connect()
    view = product_view(con, product.model_copy(update={"columns": [
        *product.columns[:2], product.columns[2].model_copy(update={"masking": "generalize",
                                                                    "generalize": "year"})]}),
        tmp_path)
    years = con.execute(f"SELECT * FROM {view}").fetchall()
    assert [d[0] for d in con.execute(f"SELECT * FROM {view}").description] == ["date_of_birth"]
    assert years[0][0] == duckdb.sql(f"SELECT year(date_of_birth) FROM '{PARQUET}' LIMIT 1").fetchall()[0][0]


@pytest.mark.parametrize("fmt,make", [("sqlite", _sqlite), ("duckdb", _duckdb)])
def test_an_unknown_table_names_the_tables_there(root_plan, tmp_path, fmt, make):
    make(tmp_path / f"x.{fmt}")
    product = root_plan.product("charite.biopsies").model_copy(
        update={"source": f"{fmt}:x.{fmt}", "format": fmt, "table": "biopsy"})
    with pytest.raises(UserError) as err:
        count_rows(product, tmp_path)
    text = err.value.render()
    assert "no table 'biopsy' in the database (tables: biopsies" in text and "\n" not in text


def test_a_missing_data_file_is_one_line(root_plan, tmp_path):
    product = root_plan.product("charite.biopsies")
    with pytest.raises(UserError) as err:
        count_rows(product, tmp_path)
    assert err.value.render() == (f"{tmp_path / product.source}: error: data file of product "
                                  "charite.biopsies not found")


def test_a_file_that_is_not_its_format_is_one_line(root_plan, tmp_path):
    (tmp_path / "examples" / "hospitals" / "data").mkdir(parents=True)
    (tmp_path / root_plan.product("charite.biopsies").source).write_text("not parquet")
    with pytest.raises(UserError) as err:
        count_rows(root_plan.product("charite.biopsies"), tmp_path)
    assert "cannot read product charite.biopsies" in err.value.render()
    assert "\n" not in err.value.render()


def _postgres(plan: Plan, uri: str) -> PlanProduct:
    return plan.product("charite.biopsies").model_copy(
        update={"source": uri, "format": "postgresql", "table": "biopsies"})


def test_postgresql_needs_no_psql_client_and_hides_a_query_string_password(root_plan, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no psql client, psycopg reads the table
    with pytest.raises(UserError) as err:  # port 1: nothing listens there
        count_rows(_postgres(root_plan, "postgresql://ann@127.0.0.1:1/x?password=s3cret"), tmp_path)
    text = err.value.render()
    assert "cannot read product charite.biopsies: cannot reach the postgresql server" in text
    assert "s3cret" not in text and "password=***" in text and "\n" not in text


def test_postgresql_server_that_does_not_answer_is_one_line(root_plan, tmp_path):
    with pytest.raises(UserError) as err:  # port 1: nothing listens there
        count_rows(_postgres(root_plan, "postgresql://ann:s3cret@127.0.0.1:1/x"), tmp_path)
    text = err.value.render()
    assert "cannot read product charite.biopsies" in text and "\n" not in text
    assert "s3cret" not in text
