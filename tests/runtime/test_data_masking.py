"""Query-level masking over the hospitals example: direct PII is never selected,
indirect PII is dropped, hashed with the mesh secret, or generalized in the SQL."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import duckdb
import pytest

from meshctl.compiler.plan import PlanColumn, PlanProduct
from meshctl.errors import UserError
from meshctl.runtime.data import mesh_secret, product_view

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "hospitals" / "data"
SOURCES = {"charite": ("charite.parquet", "parquet"), "amsterdam-umc": ("amsterdam-umc.csv", "csv")}
SECRET = bytes(range(32))


def hospital(domain: str, **dob: object) -> PlanProduct:
    """The hospitals product of `domain`, with date_of_birth's masking set by `dob`."""
    file, fmt = SOURCES[domain]
    cols = [PlanColumn(name="patient_name", type="string", pii="direct"),
            PlanColumn(name="mrn", type="string", pii="direct"),
            PlanColumn(name="date_of_birth", type="date", pii="indirect", **dob),
            PlanColumn(name="radius_mean", type="float"),
            PlanColumn(name="diagnosis", type="category", values=["benign", "malignant"])]
    return PlanProduct(id=f"{domain}.biopsies", domain=domain, name="biopsies", source=str(DATA / file),
                       format=fmt, columns=cols)


def raw(domain: str, column: str) -> list:
    """A column straight from the file (what the view must never show as is)."""
    file, fmt = SOURCES[domain]
    reader = "read_parquet" if fmt == "parquet" else "read_csv_auto"
    return [r[0] for r in duckdb.sql(f"SELECT {column} FROM {reader}('{DATA / file}')").fetchall()]


def view_of(product: PlanProduct, secret: bytes | None = SECRET) -> tuple[list[str], list[tuple], str]:
    """(column names, rows, the view's SQL text)."""
    con = duckdb.connect()
    name = product_view(con, product, ROOT, secret)
    rel = con.execute(f"SELECT * FROM {name}")
    cols = [d[0] for d in rel.description]
    rows = rel.fetchall()
    sql = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = ?", [name]).fetchone()[0]
    return cols, rows, sql


@pytest.mark.parametrize("domain", SOURCES)
@pytest.mark.parametrize("masking", [{"masking": "drop"}, {}, {"masking": "hash"},
                                     {"masking": "generalize", "generalize": "year"},
                                     {"masking": "generalize", "generalize": "month"}])
def test_direct_identifiers_never_reach_any_view(domain, masking):
    cols, rows, sql = view_of(hospital(domain, **masking))
    assert "patient_name" not in cols and "mrn" not in cols
    assert "patient_name" not in sql and "mrn" not in sql
    names, mrns = set(raw(domain, "patient_name")), set(raw(domain, "mrn"))
    values = {str(v) for row in rows for v in row}
    assert not values & names and not values & mrns
    assert len(rows) == len(raw(domain, "mrn"))


@pytest.mark.parametrize("domain", SOURCES)
@pytest.mark.parametrize("masking", [{"masking": "drop"}, {}])
def test_dropped_indirect_column_is_not_in_the_view(domain, masking):
    cols, _, _ = view_of(hospital(domain, **masking))
    assert cols == ["radius_mean", "diagnosis"]


@pytest.mark.parametrize("domain", SOURCES)
def test_hash_is_keyed_sha256_of_secret_and_value(domain):
    cols, rows, _ = view_of(hospital(domain, masking="hash"))
    assert cols[0] == "date_of_birth"
    births = raw(domain, "date_of_birth")
    expected = [hashlib.sha256(f"{SECRET.hex()}:{b.isoformat()}".encode()).hexdigest() for b in births]
    assert [r[0] for r in rows] == expected
    assert not {str(b) for b in births} & {r[0] for r in rows}


def test_hash_depends_on_the_secret_and_links_equal_values_across_domains():
    _, rows_a, _ = view_of(hospital("charite", masking="hash"))
    _, rows_b, _ = view_of(hospital("charite", masking="hash"), secret=bytes(32))
    assert all(a[0] != b[0] for a, b in zip(rows_a, rows_b))
    _, csv_rows, _ = view_of(hospital("amsterdam-umc", masking="hash"))
    births = {b: h for b, h in zip(raw("charite", "date_of_birth"), (r[0] for r in rows_a))}
    for b, (h, *_rest) in zip(raw("amsterdam-umc", "date_of_birth"), csv_rows):
        if b in births:  # the same date in a parquet and a csv domain hashes the same
            assert births[b] == h


def test_hash_columns_are_left_out_without_the_secret():
    cols, _, _ = view_of(hospital("charite", masking="hash"), secret=None)
    assert cols == ["radius_mean", "diagnosis"]


@pytest.mark.parametrize("domain", SOURCES)
def test_generalize_year_and_month(domain):
    births = raw(domain, "date_of_birth")
    _, years, _ = view_of(hospital(domain, masking="generalize", generalize="year"))
    assert [r[0] for r in years] == [b.year for b in births]
    _, months, _ = view_of(hospital(domain, masking="generalize", generalize="month"))
    assert [r[0] for r in months] == [f"{b.year:04d}-{b.month:02d}" for b in births]
    assert len({r[0] for r in years}) < len(set(births))


def test_generalize_prefix_and_bucket():
    product = hospital("charite")
    cols = [PlanColumn(name="patient_name", type="string", pii="indirect", masking="generalize",
                       generalize="prefix:2"),
            PlanColumn(name="radius_mean", type="float", pii="indirect", masking="generalize",
                       generalize="bucket:5")]
    names, rows, _ = view_of(product.model_copy(update={"columns": cols}))
    assert names == ["patient_name", "radius_mean"]
    assert [r[0] for r in rows] == [n[:2] for n in raw("charite", "patient_name")]
    assert [r[1] for r in rows] == [5 * (x // 5) for x in raw("charite", "radius_mean")]


def test_bad_generalize_is_a_user_error():
    with pytest.raises(UserError, match="cannot generalize as 'decade'"):
        view_of(hospital("charite", masking="generalize", generalize="decade"))


def test_a_product_of_only_direct_columns_has_nothing_to_show():
    product = hospital("charite")
    only = product.model_copy(update={"columns": product.columns[:2]})
    with pytest.raises(UserError, match="no column that may leave the domain"):
        view_of(only)


def test_mesh_secret_is_made_once_private_and_stable(tmp_path):
    first = mesh_secret(tmp_path)
    path = tmp_path / ".meshctl" / "mesh.secret"
    assert len(first) == 32 and mesh_secret(tmp_path) == first
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert mesh_secret(tmp_path / "other") != first


def test_a_damaged_mesh_secret_is_one_clear_error(tmp_path):
    (tmp_path / ".meshctl").mkdir()
    (tmp_path / ".meshctl" / "mesh.secret").write_text("not hex\n")
    with pytest.raises(UserError) as err:
        mesh_secret(tmp_path)
    assert "mesh secret is not 64 hex characters" in err.value.render()
    assert "\n" not in err.value.render()
