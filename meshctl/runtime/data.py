"""Product adapters: the only place a domain's rows exist.

Every reader of a product goes through `product_view`, which registers the
product's source in a DuckDB connection (csv, parquet, a sqlite or duckdb
database file, or a postgresql table) and creates a view of it that holds only
what may leave the data: `pii: direct` columns are never selected, `indirect`
ones are dropped, hashed with the mesh secret or generalized in the SQL itself.
What leaves this module is tensors of features and class indices, which stay in
the daemon's process; only model updates and metric sums cross the wire.
"""

from __future__ import annotations

import os
import re
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from meshctl.compiler.plan import PlanColumn, PlanJob, PlanProduct
from meshctl.errors import UserError

if TYPE_CHECKING:
    import duckdb
    import torch

SECRET_FILE = "mesh.secret"
"""The per-mesh secret that keys hashed columns, in `.meshctl/` beside the mesh.yaml."""

URI_PREFIXES = {"sqlite": "sqlite:", "duckdb": "duckdb:"}
"""Prefix of a database-file source, by format (the path follows it)."""

READ_TYPES = {"float": "FLOAT", "int": "BIGINT", "bool": "BOOLEAN", "date": "DATE", "timestamp": "TIMESTAMP",
              "tensor": "FLOAT[]"}
"""The DuckDB type a declared column type is read as (string and category: any value will do;
a tensor: a list of floats, or its text such as `[0.5, 1]`)."""


class DataError(UserError):
    """A data problem told in the domain's own words, safe to send off the domain.

    `message` is built only from names in the plan (product ids, column names, declared
    types and values, rule names) and counts: never a library's text, a cell value or a
    host path. `detail` (the library's text, offending values) and `where` (the host
    path) stay in the domain: its local log and its own terminal.
    """

    def __init__(self, message: str, *, detail: str = "", where: str | None = None, hint: str | None = None):
        super().__init__(message, where=where, hint=hint)
        self.detail = detail

    def local(self) -> str:
        """The full story for the domain's local log: the one line plus the detail."""
        return self.render() + (f" [detail: {self.detail}]" if self.detail else "")


@dataclass(frozen=True)
class JobData:
    """One domain's tensors for one job."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    rows: int
    """Rows read (after dropping rows with NULLs in used columns)."""
    skipped: int
    """Rows skipped because a used column was NULL."""
    categories: dict[str, np.ndarray] = field(default_factory=dict)
    """Each categorical feature's values (text), training rows then test rows: one-hot
    again once the domains agree a vocabulary (`with_vocabulary`); never sent."""

    def with_vocabulary(self, job: PlanJob, vocab: dict[str, list[str]]) -> JobData:
        """This data with every categorical feature one-hot over the agreed `vocab`."""
        import torch

        from meshctl.runtime.features import job_features, one_hot_index

        x_train, x_test = self.x_train.clone(), self.x_test.clone()
        at, n_train = 0, len(self.x_train)
        for f in job_features(job):
            if f.kind == "categorical" and f.name in self.categories:
                slot = torch.from_numpy(one_hot_index(self.categories[f.name], vocab.get(f.name, []), f.width))
                for x, part in ((x_train, slot[:n_train]), (x_test, slot[n_train:])):
                    x[:, at:at + f.width] = 0.0
                    x[torch.arange(len(x)), at + part] = 1.0
            at += f.width
        return replace(self, x_train=x_train, x_test=x_test)

    def category_counts(self, job: PlanJob) -> dict[str, dict[str, int]]:
        """Per categorical feature, counts of the values at least `min_count` training rows hold."""
        from meshctl.runtime.features import categorical, category_counts

        n_train = len(self.x_train)
        return {f.name: category_counts(self.categories[f.name][:n_train], f.min_count or 1)
                for f in categorical(job) if f.name in self.categories}


def ident(name: str) -> str:
    """`name` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """`text` as a quoted SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


_ident = ident


def safe_name(text: str) -> str:
    """An unquoted SQL identifier made from `text` (letters, digits, underscores)."""
    return re.sub(r"\W", "_", text)


# -- the mesh secret ----------------------------------------------------------


def mesh_secret(base_dir: Path) -> bytes:
    """The mesh's secret key for hashed columns: `.meshctl/mesh.secret` under `base_dir`.

    Created on first use with 32 random bytes (written as 64 hex characters, mode 0600).
    Hashes link across domains only where the domains hold the same file: copy it to the
    hosts of remote domains; a domain without it makes its own, and its hashes then link
    within that domain only.
    """
    path = base_dir / ".meshctl" / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first: read theirs
        else:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(secrets.token_hex(32) + "\n")
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise UserError("mesh secret is not 64 hex characters", where=str(path),
                        hint="delete it to make a new one (hashes made with the old one will differ)")
    return bytes.fromhex(text)


# -- sources ------------------------------------------------------------------


def source_path(product: PlanProduct, base_dir: Path) -> Path:
    """The local file a product reads (its source without a `sqlite:`/`duckdb:` prefix)."""
    src = product.source
    prefix = URI_PREFIXES.get(product.format, "")
    if prefix and src.startswith(prefix):
        src = src[len(prefix):]
    return (base_dir / src).resolve()


def register_source(con: duckdb.DuckDBPyConnection, product: PlanProduct, base_dir: Path,
                    columns: Sequence[str] | None = None) -> str:
    """Create a temporary view `src_<product>` over the product's raw source; return its name.

    The raw view holds every column, PII included: it exists only inside the domain's
    DuckDB connection, for `product_view` and the contract checks. `columns`, when given,
    limits what a sqlite or postgresql source copies into DuckDB.
    """
    name = "src_" + safe_name(product.id)
    if product.format == "postgresql":
        _register_postgres(con, product, name, columns)
        return name
    path = _existing(product, base_dir)
    try:
        if product.format == "sqlite":
            body = f"SELECT * FROM {_load_sqlite(con, product, path, columns, name + '_rows')}"
        elif product.format == "duckdb":
            body = f"SELECT * FROM {_attach(con, product, path)}.{ident(_table(product))}"
        else:
            reader = {"csv": "read_csv_auto({}, header=true)", "parquet": "read_parquet({})"}
            body = "SELECT * FROM " + reader[product.format].format(literal(str(path)))
        con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS {body}")
        con.execute(f"SELECT * FROM {name} LIMIT 0")
    except _duck_error() as err:
        raise DataError(f"cannot read product {product.id}: its {product.format} source is unreadable or "
                        f"malformed ({error_kind(err)})", detail=str(err), where=str(path)) from None
    return name


def _table(product: PlanProduct) -> str:
    if not product.table:
        raise UserError(f"product {product.id} reads a {product.format} database but names no table",
                        hint="add `table: NAME` to the product")
    return product.table


def _attach(con: duckdb.DuckDBPyConnection, product: PlanProduct, path: Path) -> str:
    alias = "db_" + safe_name(product.id)
    attached = {r[0] for r in con.execute("SELECT database_name FROM duckdb_databases()").fetchall()}
    if alias not in attached:
        con.execute(f"ATTACH {literal(str(path))} AS {alias} (READ_ONLY)")
    tables = [r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = ? "
        "UNION SELECT view_name FROM duckdb_views() WHERE database_name = ?", [alias, alias]).fetchall()]
    _require_table(product, path, sorted(tables))
    return alias


def _require_table(product: PlanProduct, path: Path | str, tables: list[str]) -> None:
    table = _table(product)
    if table not in tables:
        have = ", ".join(tables[:8]) or "none"
        raise UserError(f"product {product.id}: no table {table!r} in the database (tables: {have})",
                        where=str(path))


def _load_sqlite(con: duckdb.DuckDBPyConnection, product: PlanProduct, path: Path,
                 columns: Sequence[str] | None, table: str) -> str:
    """Copy the product's sqlite table into the DuckDB temp table `table`; return its name.

    Read with Python's sqlite3 (read-only): DuckDB's sqlite extension is not bundled and
    needs a download. The copy needs neither pyarrow nor pandas (a runtime install has
    neither) and registers no Python object, so a result left open on `con` cannot block
    it (DuckDB 2 refuses `register` then): each column goes in as one typed list,
    `unnest`ed in the table's row order.
    """
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as err:
        raise DataError(f"cannot open sqlite database of {product.id} ({error_kind(err)})", detail=str(err),
                        where=str(path)) from None
    try:
        tables = [r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')").fetchall()]
        _require_table(product, path, sorted(tables))
        select = "*" if columns is None else ", ".join(ident(c) for c in columns)
        cur = db.execute(f"SELECT {select} FROM {ident(_table(product))}")
        names = [d[0] for d in cur.description]
        rows = cur.fetchall()
    except sqlite3.Error as err:
        raise DataError(f"cannot read product {product.id}: its sqlite table is unreadable or lacks a "
                        f"declared column ({error_kind(err)})", detail=str(err), where=str(path)) from None
    finally:
        db.close()
    declared = {c.name: c.type for c in product.columns}
    typed = [_sqlite_column([r[i] for r in rows], declared.get(n, "")) for i, n in enumerate(names)]
    select = ", ".join(f"unnest(?::{kind}[]) AS {ident(n)}" for n, (kind, _) in zip(names, typed))
    con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT {select}", [values for _, values in typed])
    return table


def _sqlite_column(values: list, kind: str) -> tuple[str, list]:
    """One sqlite column as (DuckDB type, values), NULLs kept.

    A declared int, float or bool column is BIGINT, DOUBLE or BOOLEAN when every value is
    one (an integral real counts as an int, 0 and 1 as booleans); another column takes the
    type all its values share (BIGINT; DOUBLE for ints and reals; VARCHAR; BLOB). What
    sqlite's loose typing leaves mixed becomes text, so the view's casts and the contract
    checks count the values that are not of the declared type.
    """
    present = [v for v in values if v is not None]
    found = {type(v) for v in present}
    numeric = found <= {int, float}
    if kind == "int" and numeric and all(isinstance(v, int) or v.is_integer() for v in present):
        return "BIGINT", [None if v is None else int(v) for v in values]
    if kind == "float" and numeric:
        return "DOUBLE", [None if v is None else float(v) for v in values]
    if kind == "bool" and numeric and all(v in (0, 1) for v in present):
        return "BOOLEAN", [None if v is None else bool(v) for v in values]
    if not present:
        return {"int": "BIGINT", "float": "DOUBLE", "bool": "BOOLEAN"}.get(kind, "VARCHAR"), values
    if kind not in ("int", "float", "bool"):
        if found == {int}:
            return "BIGINT", values
        if numeric:
            return "DOUBLE", [None if v is None else float(v) for v in values]
        if found == {bytes}:
            return "BLOB", values
    return "VARCHAR", [None if v is None else v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                       for v in values]


PG_TYPES = {"int2": "SMALLINT", "int4": "INTEGER", "int8": "BIGINT", "float4": "FLOAT", "float8": "DOUBLE",
            "bool": "BOOLEAN", "text": "VARCHAR", "varchar": "VARCHAR", "bpchar": "VARCHAR",
            "name": "VARCHAR", "date": "DATE", "time": "TIME", "timestamp": "TIMESTAMP",
            "timestamptz": "TIMESTAMPTZ"}
"""The DuckDB type a PostgreSQL column is copied as; `numeric` is read as DOUBLE, any other type as text."""

PG_CHUNK = 50_000
"""Rows fetched from the server (a server-side cursor) and inserted into DuckDB at a time."""


def _register_postgres(con: duckdb.DuckDBPyConnection, product: PlanProduct, name: str,
                       columns: Sequence[str] | None) -> None:
    """Copy a postgresql table into a typed DuckDB temp table with psycopg (no DuckDB extension).

    Values arrive as the server holds them: NULL stays NULL, text stays text ('00123' too),
    booleans, integers, floats, dates and timestamps keep their types. `table` may be
    schema-qualified (`schema.name`). The password comes from the URI, PGPASSWORD or ~/.pgpass
    (libpq); errors leave the domain as plan names and counts only.
    """
    try:
        import psycopg
        from psycopg import sql
    except ImportError:
        raise UserError(f"product {product.id}: postgresql sources need the psycopg package",
                        where=_redact(product.source), hint="pip install 'psycopg[binary]>=3.2,<4'") from None
    where = _redact(product.source)
    table = sql.Identifier(*_table(product).split(".", 1))
    try:
        params = psycopg.conninfo.conninfo_to_dict(product.source)
    except psycopg.Error as err:
        raise DataError(f"cannot read product {product.id}: its postgresql URI is malformed",
                        detail=_redact(first_line(err)), where=where) from None
    params.setdefault("connect_timeout", "10")
    params.setdefault("options", "-c statement_timeout=300000")
    try:
        with psycopg.connect(**params) as db:
            db.read_only = True
            cur = db.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(table))
            have = {d.name: db.adapters.types.get(d.type_code) for d in cur.description}
            wanted = list(have) if columns is None else list(columns)
            missing = [c for c in wanted if c not in have]
            if missing:
                plural = "s" if len(missing) > 1 else ""
                raise DataError(f"cannot read product {product.id}: declared column{plural} "
                                f"{', '.join(missing)} not in the data", where=where)
            kinds = {c: getattr(have[c], "name", "") for c in wanted}
            ducks = [PG_TYPES.get(kinds[c], "DOUBLE" if kinds[c] == "numeric" else "VARCHAR") for c in wanted]
            select = sql.SQL(", ").join(_pg_select(sql, c, kinds[c]) for c in wanted)
            con.execute(f"CREATE OR REPLACE TEMP TABLE {name}_pg ("
                        + ", ".join(f"{ident(c)} {t}" for c, t in zip(wanted, ducks)) + ")")
            insert = (f"INSERT INTO {name}_pg SELECT "
                      + ", ".join(f"UNNEST(?::{t}[])" for t in ducks))
            with db.cursor(name="meshctl_read") as rows:
                rows.execute(sql.SQL("SELECT {} FROM {}").format(select, table))
                while chunk := rows.fetchmany(PG_CHUNK):
                    con.execute(insert, [list(col) for col in zip(*chunk)])
    except psycopg.Error as err:
        raise DataError(f"cannot read product {product.id}: {_pg_why(product, err)}",
                        detail=_redact(first_line(err)), where=where) from None
    except _duck_error() as err:
        raise DataError(f"cannot read product {product.id}: its postgresql rows do not fit the DuckDB copy "
                        f"({error_kind(err)})", detail=first_line(err), where=where) from None
    con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM {name}_pg")


def _pg_select(sql, column: str, kind: str):
    """One column of the SELECT: numeric as float8, types without a DuckDB twin as text."""
    if kind in PG_TYPES:
        return sql.Identifier(column)
    cast = sql.SQL("float8" if kind == "numeric" else "text")
    return sql.SQL("{}::{}").format(sql.Identifier(column), cast)


PG_REFUSED = {"28P01", "28000", "3D000"}
"""SQLSTATEs of a refused login: wrong password, no such role or no such database."""


def _pg_why(product: PlanProduct, err: Exception) -> str:
    """Why a postgresql read failed, in plan words: from the SQLSTATE and class, never the server's text."""
    state = getattr(err, "sqlstate", None) or ""
    text = str(err)
    if state in PG_REFUSED or (state == "" and "authentication failed" in text) or \
            (state == "" and re.search(r"database .* does not exist|role .* does not exist", text)):
        return "the postgresql server refused the login (user, password or database)"
    if state == "42P01":
        return f"no table {product.table!r} in the postgresql database"
    if state == "42501":
        return f"the postgresql user may not read table {product.table!r}"
    if state == "57014":
        return "postgresql did not answer in 300 s"
    import psycopg

    if state == "" and isinstance(err, psycopg.OperationalError):
        return "cannot reach the postgresql server"
    return f"postgresql error ({error_kind(err)}{', SQLSTATE ' + state if state else ''})"


def _redact(uri: str) -> str:
    """A connection URI (or libpq text) without its password."""
    uri = re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", uri)
    return re.sub(r"(password\s*=\s*)('[^']*'|[^&\s]+)", r"\1***", uri)


# -- the masked view ----------------------------------------------------------


def product_view(con: duckdb.DuckDBPyConnection, product: PlanProduct, base_dir: Path,
                 secret: bytes | None = None, columns: Sequence[str] | None = None) -> str:
    """Create the view every reader of `product` uses; return its (unquoted) name.

    The view exposes the product's declared columns except `pii: direct` ones, which are
    never selected. `pii: indirect` columns are masked per `column.masking`: `drop` (or
    no masking) leaves them out; `hash` gives the hex sha256 of the mesh secret (hex), a
    colon and the value as text, NULL staying NULL; `generalize` gives the year (an
    integer) or month (`YYYY-MM`) of a date, the first N characters of a string
    (`prefix:N`) or the number floored to a multiple of W (`bucket:W`). Without
    `secret`, hashed columns are left out. `columns`, when given, keeps only those.
    """
    wanted = [c for c in product.columns if c.pii != "direct" and (columns is None or c.name in columns)]
    exprs = [(c, _masked(c, secret)) for c in wanted]
    exprs = [(c, e) for c, e in exprs if e is not None]
    if not exprs:
        raise UserError(f"product {product.id} has no column that may leave the domain")
    src = register_source(con, product, base_dir, columns=[c.name for c, _ in exprs])
    name = "product_" + safe_name(product.id)
    select = ", ".join(f"{e} AS {ident(c.name)}" for c, e in exprs)
    try:
        con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT {select} FROM {src}")
        con.execute(f"SELECT * FROM {name} LIMIT 0")
    except _duck_error() as err:
        raise read_error(con, product, base_dir, err, [c.name for c, _ in exprs]) from None
    return name


def _masked(col: PlanColumn, secret: bytes | None) -> str | None:
    """The SQL expression a column is exposed as, or None when it is left out."""
    ref = ident(col.name)
    if col.pii == "none":
        return ref
    if col.masking == "hash":
        if secret is None:
            return None
        return f"CASE WHEN {ref} IS NULL THEN NULL ELSE sha256({literal(secret.hex() + ':')} || CAST({ref} AS VARCHAR)) END"
    if col.masking == "generalize":
        return _generalized(col)
    return None  # drop, or indirect without a masking: never exposed


def _generalized(col: PlanColumn) -> str:
    ref, how = ident(col.name), col.generalize
    if how == "year":
        return f"CAST(year(CAST({ref} AS DATE)) AS INTEGER)"
    if how == "month":
        return f"strftime(CAST({ref} AS DATE), '%Y-%m')"
    m = re.fullmatch(r"(prefix|bucket):(\d+(?:\.\d*)?|\.\d+)", how)
    if m and m.group(1) == "prefix" and float(m.group(2)).is_integer():
        return f"left(CAST({ref} AS VARCHAR), {int(float(m.group(2)))})"
    if m and m.group(1) == "bucket" and float(m.group(2)) > 0:
        width = float(m.group(2))
        return f"floor(CAST({ref} AS DOUBLE) / {width!r}) * {width!r}"
    raise UserError(f"column {col.name!r}: cannot generalize as {how!r}",
                    hint="year or month (dates), prefix:N (strings), bucket:W (numbers)")


# -- what the daemon reads ----------------------------------------------------


def job_columns(job: PlanJob) -> list[str]:
    """Columns a job may read: features, target, holdout column."""
    cols = [*job.features, job.target]
    if job.evaluation.holdout_column:
        cols.append(job.evaluation.holdout_column)
    return cols


def count_rows(product: PlanProduct, base_dir: Path, con: duckdb.DuckDBPyConnection | None = None) -> int:
    """Row count of a product (a count, never a row); `con` is the domain's connection, if open."""
    import duckdb

    if con is None:
        with duckdb.connect() as own:
            return count_rows(product, base_dir, own)
    view = product_view(con, product, base_dir)
    try:
        return int(con.execute(f"SELECT count(*) FROM {view}").fetchall()[0][0])
    except duckdb.Error as err:
        raise read_error(con, product, base_dir, err) from None


def load_keyed(product: PlanProduct, base_dir: Path, key: str, columns: Sequence[str],
               con: duckdb.DuckDBPyConnection | None = None) -> tuple[list[str], dict[str, list]]:
    """A split model's part (meshctl.runtime.domain.split): its key column as text and `columns`, in source order.

    The key may be a `pii: direct` column: it is read here, from the raw source, only to be hashed and
    blinded for the private set intersection, and never leaves the daemon's process; `columns` are
    non-PII (the compiler checked, MESH564 and MESH566). A NULL key or value is a DataError.
    """
    import duckdb

    if con is None:
        with duckdb.connect() as own:
            return load_keyed(product, base_dir, key, columns, own)
    src = register_source(con, product, base_dir, columns=[key, *columns])
    select = ", ".join([f"CAST({ident(key)} AS VARCHAR)", *(ident(c) for c in columns)])
    try:
        rows = con.execute(f"SELECT {select} FROM {src}").fetchall()
    except duckdb.Error as err:
        try:
            have = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
        except duckdb.Error:
            have = {key}
        shown = "its postgresql table" if product.format == "postgresql" else product.source
        if key not in have:  # the key may be PII, which read_error does not look for
            raise DataError(f"{product.id}: key column {key} is not in {shown}", detail=str(err),
                            where=str(_where(product, base_dir))) from None
        absent = [c for c in columns if c not in have]
        if absent:  # a feature or the label: as the key, a data refusal naming the column
            raise DataError(f"{product.id}: column{'s' if len(absent) > 1 else ''} {', '.join(absent)} "
                            f"{'are' if len(absent) > 1 else 'is'} not in {shown}", detail=str(err),
                            where=str(_where(product, base_dir))) from None
        raise read_error(con, product, base_dir, err, [key, *columns]) from None
    for i, name in enumerate([key, *columns]):
        missing = sum(1 for r in rows if r[i] is None)
        if missing:
            raise DataError(f"product {product.id}: column {name} has {missing} missing "
                            f"value{'s' if missing > 1 else ''}; a split model needs every key and value",
                            where=str(_where(product, base_dir)))
    return [r[0] for r in rows], {c: [r[i + 1] for r in rows] for i, c in enumerate(columns)}


def load_job_data(job: PlanJob, product: PlanProduct, base_dir: Path, client_id: int,
                  con: duckdb.DuckDBPyConnection | None = None) -> JobData:
    """Read `product` for `job` through its masked view: the job's columns only, never PII.

    `con` is the domain's connection, if it has one open (else a private one is used).
    """
    import duckdb

    if con is None:
        with duckdb.connect() as own:
            return load_job_data(job, product, base_dir, client_id, own)

    by_name = {c.name: c for c in product.columns}
    cols = job_columns(job)
    for c in cols:
        col = by_name.get(c)
        if col is None:
            raise UserError(f"product {product.id} has no column {c!r} that job {job.name} needs")
        if col.pii != "none":
            raise UserError(f"job {job.name} asks for PII column {product.id}.{c}; refused")
    select = ", ".join(f"CAST({ident(c)} AS {_read_as(job, c)}) AS {ident(c)}" for c in cols)
    not_null = " AND ".join(f"{ident(c)} IS NOT NULL" for c in cols)
    view = product_view(con, product, base_dir, columns=cols)
    try:
        total = int(con.execute(f"SELECT count(*) FROM {view}").fetchall()[0][0])
        arrays = con.execute(f"SELECT * FROM (SELECT {select} FROM {view}) WHERE {not_null}").fetchnumpy()
    except duckdb.Error as err:
        raise read_error(con, product, base_dir, err, cols) from None
    return _tensors(job, product, arrays, total, client_id, _where(product, base_dir))


def _read_as(job: PlanJob, column: str) -> str:
    """The SQL type a job reads a column as: text for the target, holdout and categorical
    features, a float list for tensor features, FLOAT for the rest."""
    from meshctl.runtime.features import job_features

    kinds = {f.name: f.kind for f in job_features(job)}
    if column == job.target and job.task == "regression":
        return "DOUBLE"
    if column in (job.target, job.evaluation.holdout_column) or kinds.get(column) == "categorical":
        return "VARCHAR"
    return "FLOAT[]" if kinds.get(column) == "tensor" else "FLOAT"


def _tensors(job: PlanJob, product: PlanProduct, arrays: dict, total: int, client_id: int,
             where: Path | str) -> JobData:
    from meshctl.runtime.features import FeatureError, categorical, feature_matrix

    n = len(arrays[job.target])
    if n == 0:
        skipped = f" ({total} with a NULL in a column job {job.name} reads)" if total else ""
        raise DataError(f"{product.id}: 0 rows{skipped}", where=str(where))
    try:
        x = feature_matrix(job, arrays)
    except FeatureError as err:
        raise DataError(f"{product.id}: {err}", where=str(where),
                        hint="remove or impute them; a model cannot train on them") from None
    y = targets(job, arrays[job.target], product.id, where)
    import torch

    test = _holdout_mask(job, arrays, n, client_id)
    if test.all():
        raise DataError(f"{product.id}: 0 rows to train job {job.name} on (all {n} are held out)",
                        where=str(where))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    mask = torch.from_numpy(test)
    x_train, x_test = xt[~mask], xt[mask]
    cats = {f.name: np.concatenate([np.asarray([str(v) for v in arrays[f.name]], dtype=object)[~test],
                                    np.asarray([str(v) for v in arrays[f.name]], dtype=object)[test]])
            for f in categorical(job)}
    return JobData(x_train.contiguous(), yt[~mask], x_test.contiguous(), yt[mask], n, total - n, cats)


def targets(job: PlanJob, values: np.ndarray, product_id: str, where: Path | str) -> np.ndarray:
    """The target column as the job's loss takes it: int64 class index (classification), float32 0/1
    (binary: the second declared value is 1), float32 (regression; NaN or infinite values refused)."""
    if job.task == "regression":
        y = np.asarray(values, dtype=np.float64)
        bad = ~np.isfinite(y) | (np.abs(y) > np.finfo(np.float32).max)
        if bad.any():
            raise DataError(f"{product_id}: {int(bad.sum())} values in {job.target} are NaN or infinite",
                            where=str(where), hint="remove or impute them; a model cannot train on them")
        return y.astype(np.float32)
    index = {v: i for i, v in enumerate(job.classes)}
    labels = [str(v) for v in values]
    bad_labels = [v for v in labels if v not in index]
    if bad_labels:
        raise DataError(f"{product_id}: {len(bad_labels)} values in {job.target} are outside the declared values "
                        f"[{', '.join(job.classes)}]", detail=f"e.g. {sorted(set(bad_labels))[:3]}", where=str(where))
    y = np.fromiter((index[v] for v in labels), dtype=np.int64, count=len(labels))
    return y.astype(np.float32) if job.task == "binary" else y


def _holdout_mask(job: PlanJob, arrays: dict, n: int, client_id: int) -> np.ndarray:
    ev = job.evaluation
    if ev.holdout_column:
        return np.asarray([str(v) == ev.holdout_value for v in arrays[ev.holdout_column]], dtype=bool)
    mask = np.zeros(n, dtype=bool)
    k = round(n * ev.holdout)
    if k:
        import torch

        g = torch.Generator().manual_seed(job.training.seed * 1_000_003 + client_id)
        mask[torch.randperm(n, generator=g)[:k].numpy()] = True
    return mask


def _where(product: PlanProduct, base_dir: Path) -> Path | str:
    return _redact(product.source) if product.format == "postgresql" else source_path(product, base_dir)


def _existing(product: PlanProduct, base_dir: Path) -> Path:
    path = source_path(product, base_dir)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise UserError(f"data file of product {product.id} {what}", where=str(path))
    return path


def _duck_error() -> type[Exception]:
    import duckdb

    return duckdb.Error


def first_line(err: Exception) -> str:
    """The first non-empty line of an error's text (or its type's name)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(err).__name__


_first_line = first_line


def error_kind(err: Exception) -> str:
    """What kind of error a library raised, from its class alone (e.g. `Conversion Error`), never its text."""
    name = type(err).__name__.removesuffix("Exception").removesuffix("Error") or type(err).__name__
    words = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name)
    return " ".join(words + ["Error"]) if words else "Error"


def read_error(con: duckdb.DuckDBPyConnection, product: PlanProduct, base_dir: Path, err: Exception,
               columns: Sequence[str] | None = None) -> DataError:
    """A DataError for a failed read of `product`: which declared column is missing or holds values
    that do not convert to its declared type, found with DuckDB (counts only); the library's text
    goes to the detail."""
    wanted = [c for c in product.columns if c.pii != "direct" and (columns is None or c.name in columns)]
    try:
        why = _diagnose(con, "src_" + safe_name(product.id), wanted)
    except _duck_error():
        why = ""
    return DataError(f"cannot read product {product.id}: {why or error_kind(err)}", detail=str(err),
                     where=str(_where(product, base_dir)))


def _diagnose(con: duckdb.DuckDBPyConnection, src: str, columns: Sequence[PlanColumn]) -> str:
    have = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
    missing = [c.name for c in columns if c.name not in have]
    if missing:
        return f"declared column{'s' if len(missing) > 1 else ''} {', '.join(missing)} not in the data"
    typed = [c for c in columns if c.type in READ_TYPES]
    if not typed:
        return ""
    counts = con.execute("SELECT " + ", ".join(
        f"count(*) FILTER (WHERE {ident(c.name)} IS NOT NULL AND TRY_CAST({ident(c.name)} AS "
        f"{READ_TYPES[c.type]}) IS NULL)" for c in typed) + f" FROM {src}").fetchall()[0]
    bad = [f"{n} values in {c.name} are not {c.type} (its declared type)" for c, n in zip(typed, counts) if n]
    return "; ".join(bad)


def feature_sums(x: torch.Tensor) -> tuple[int, list[float], list[float]]:
    """(count, per-feature sum, per-feature sum of squares) of a feature matrix, in float64."""
    xd = x.double()
    return len(x), xd.sum(0).tolist(), xd.pow(2).sum(0).tolist()


def pooled_mean_std(stats: list[tuple[int, list[float], list[float]]]) -> tuple[list[float], list[float]]:
    """Mesh-wide mean and population standard deviation from per-domain sums (exact)."""
    n = sum(c for c, _, _ in stats)
    if n == 0:
        raise ValueError("no training rows to standardize with")
    import torch

    s = torch.tensor([x for _, x, _ in stats], dtype=torch.float64).sum(0)
    q = torch.tensor([x for _, _, x in stats], dtype=torch.float64).sum(0)
    mean = s / n
    std = (q / n - mean.pow(2)).clamp_min(0).sqrt()
    std[std < 1e-12] = 1.0
    return mean.tolist(), std.tolist()
