"""A throwaway PostgreSQL cluster for tests: initdb in /tmp, a private port and socket dir,
test data loaded, stopped and removed afterwards. Import `pg_server` into a test module.

The server binaries must be installed (CI has PostgreSQL 15): without them the tests FAIL,
never skip. initdb refuses root, so as root the cluster runs as the `postgres` user.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

ROOT = Path(__file__).resolve().parents[2]
HOSPITALS = ROOT / "examples" / "hospitals" / "data"
USER, PASSWORD, DATABASE = "mesh", "pg-s3cret-7Q", "meshtest"


@dataclass(frozen=True)
class PgServer:
    port: int
    socket_dir: str

    def uri(self, password: str | None = PASSWORD, database: str = DATABASE) -> str:
        auth = USER if password is None else f"{USER}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): "
                    "install postgresql-15 (CI has it)")
    return Path(found[-1]).parent


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(admin_conninfo: str) -> None:
    import psycopg

    with psycopg.connect(admin_conninfo, autocommit=True) as db:
        db.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        db.execute(f"CREATE DATABASE {DATABASE} OWNER {USER}")
    with psycopg.connect(admin_conninfo.replace("dbname=postgres", f"dbname={DATABASE}")) as db:
        db.execute(f"SET ROLE {USER}")
        db.execute("""CREATE TABLE biopsies (patient_name text, mrn text, date_of_birth date,
            radius_mean double precision, texture_mean double precision, perimeter_mean double precision,
            area_mean double precision, smoothness_mean double precision, compactness_mean double precision,
            concavity_mean double precision, concave_points_mean double precision,
            symmetry_mean double precision, fractal_dimension_mean double precision, diagnosis text)""")
        rows = duckdb.sql(f"SELECT * FROM '{HOSPITALS / 'charite.parquet'}'").fetchall()
        with db.cursor() as cur, cur.copy("COPY biopsies FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        db.execute("CREATE SCHEMA other")
        db.execute("""CREATE TABLE other.products (id integer, code text, note text, active boolean,
            price numeric(10, 2), weight real, made date)""")
        db.execute("""INSERT INTO other.products VALUES
            (1, '00123', 'first', true, 12.50, 1.5, '2024-01-02'),
            (2, '0042', NULL, false, NULL, NULL, NULL),
            (3, '', '', NULL, 3.00, 2.25, '2023-12-31')""")
        db.execute("CREATE TABLE products AS SELECT * FROM other.products")  # the same rows, in public


@pytest.fixture(scope="session")
def pg_server():
    """A running PostgreSQL server with `biopsies` (charite's rows) and `other.products`."""
    bin_dir = _bin_dir()
    base = Path(tempfile.mkdtemp(prefix="meshctl-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
    port = _free_port()
    started = False
    try:
        subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                                     "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C"]),
                       check=True, capture_output=True, timeout=120)
        opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts,
                                     "-l", str(base / "server.log"), "-w", "-t", "60", "start"]),
                       check=True, capture_output=True, timeout=90)
        started = True
        _load(f"host={sock} port={port} user=postgres dbname=postgres")
        yield PgServer(port=port, socket_dir=str(sock))
    finally:
        if started:
            subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                                         "stop"]), capture_output=True, timeout=60, check=False)
        shutil.rmtree(base, ignore_errors=True)
