"""`meshctl init`: write a first mesh.yaml from one data file, as `flwr new` does for Flower.

The data file (CSV or Parquet) is inspected with DuckDB: its column names and types, and the
values of a text column with few distinct values (a category). The mesh has one local domain,
one product of that file, a contract of its columns, a purpose-limitation policy and a model
that predicts the target (`--target`, else the last category column, else the last number).
Torch-free; nothing is overwritten.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from meshctl.errors import UserError

MAX_CATEGORIES = 20
"""A text column with at most this many distinct values is a category."""

_TYPES = {"BIGINT": "int", "INTEGER": "int", "SMALLINT": "int", "TINYINT": "int", "HUGEINT": "int",
          "UBIGINT": "int", "UINTEGER": "int", "USMALLINT": "int", "UTINYINT": "int", "DOUBLE": "float",
          "FLOAT": "float", "REAL": "float", "BOOLEAN": "bool", "DATE": "date", "TIMESTAMP": "timestamp",
          "VARCHAR": "string"}


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    values: tuple[str, ...] = ()


def inspect(data: Path) -> list[Column]:
    """The columns of a CSV or Parquet file: meshctl types; categories with their values."""
    import duckdb

    if data.suffix.lower() not in (".csv", ".parquet"):
        raise UserError("not a CSV or Parquet file", where=str(data), hint="give a .csv or .parquet file")
    reader = "read_parquet" if data.suffix.lower() == ".parquet" else "read_csv_auto"
    con = duckdb.connect()
    try:
        source = f"{reader}('{str(data).replace(chr(39), chr(39) * 2)}')"
        described = con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()
        columns = []
        for name, duck, *_ in described:
            kind = _TYPES.get(str(duck).split("(")[0], "float" if str(duck).startswith("DECIMAL") else "string")
            values: tuple[str, ...] = ()
            if kind == "string":
                quoted = '"' + name.replace('"', '""') + '"'
                found = con.execute(f"SELECT DISTINCT {quoted} FROM {source} WHERE {quoted} IS NOT NULL "
                                    f"ORDER BY 1 LIMIT {MAX_CATEGORIES + 1}").fetchall()
                if 2 <= len(found) <= MAX_CATEGORIES:
                    kind, values = "category", tuple(str(v[0]) for v in found)
            columns.append(Column(name, kind, values))
    except duckdb.Error as err:
        raise UserError(f"cannot read it: {str(err).splitlines()[0]}", where=str(data)) from None
    finally:
        con.close()
    return columns


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "data"


def _pick_target(columns: list[Column], target: str | None, data: Path) -> Column:
    if target is not None:
        found = next((c for c in columns if c.name == target), None)
        if found is None or found.type not in ("category", "int", "float", "bool"):
            raise UserError(f"--target {target}: " + ("no such column" if found is None else
                            f"a {found.type} column cannot be predicted"), where=str(data),
                            hint="columns: " + ", ".join(c.name for c in columns))
        return found
    for kinds in (("category",), ("int", "float")):
        found = next((c for c in reversed(columns) if c.type in kinds), None)
        if found is not None:
            return found
    raise UserError("no column to predict (no category, no number)", where=str(data))


def _column_line(c: Column) -> str:
    values = f", values: [{', '.join(_quote(v) for v in c.values)}]" if c.values else ""
    return f"      - {{name: {_quote(c.name)}, type: {c.type}{values}}}"


def _quote(text: str) -> str:
    return text if re.fullmatch(r"[A-Za-z_.][A-Za-z0-9_./-]*", text) and text not in ("true", "false", "null") \
        else '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(data_ref: str, columns: list[Column], *, domain: str, product: str, target: Column) -> str:
    """The mesh.yaml text."""
    features = [c.name for c in columns if c is not target and c.type in ("int", "float", "bool")]
    if not features:
        raise UserError(f"no numeric column to learn {target.name} from", where=data_ref)
    cols = "\n".join(_column_line(c) for c in columns)
    contract = f"{product}-contract"
    return f"""apiVersion: meshctl/v1
mesh:
  name: {domain}-mesh
  description: Written by `meshctl init` from {data_ref}; edit freely, then `meshctl validate`.
  coordinator: {{address: tcp://127.0.0.1:7700}}

domains:
  - name: {domain}
    address: local   # add the other domains here; each runs its own daemon

products:
  - name: {product}
    domain: {domain}
    source: {_quote(data_ref)}
    description: {product} of {domain}.
    classification: internal
    contract: {contract}@1
    columns:   # mark a column `pii: direct` (or indirect) and it never leaves its domain
{cols}

contracts:
  - name: {contract}
    version: 1.0.0
    purposes: [research]
    columns:
{cols}

policies:
  - name: purpose-limitation
    scope: model
    require: model.reads.all(p, model.purpose in p.purposes)
    message: a model may only read products whose contract allows its purpose

models:
  - name: predict-{_slug(target.name)}
    purpose: research
    inputs:
      contract: {contract}
      features: [{', '.join(_quote(f) for f in features)}]
      target: {_quote(target.name)}
    participants: all
    architecture: {{kind: mlp, hidden: [32]}}
    training: {{rounds: 5, local_epochs: 1, batch_size: 32, lr: 0.05, seed: 0, standardize: true}}
    aggregation: {{strategy: fedavg}}
    evaluation: {{holdout: 0.2}}
"""


def init_mesh(folder: Path, data: Path | None, *, domain: str | None = None, target: str | None = None) -> Path:
    """Write FOLDER/mesh.yaml; its path. Refuses to overwrite one."""
    mesh = folder / "mesh.yaml"
    if mesh.exists():
        raise UserError("already exists; meshctl init never overwrites it", where=str(mesh),
                        hint="`meshctl validate` checks it, or init into another folder")
    if data is None:
        raise UserError("--data FILE is needed: the CSV or Parquet file the first product serves",
                        hint="meshctl init --data examples/hospitals/data/amsterdam-umc.csv")
    if not data.is_file():
        raise UserError("no such file" if not data.exists() else "not a file", where=str(data))
    columns = inspect(data)
    picked = _pick_target(columns, target, data)
    folder.mkdir(parents=True, exist_ok=True)
    resolved, base = data.resolve(), folder.resolve()
    ref = os.path.relpath(resolved, base)  # relative to mesh.yaml, as `source:` is read, if close by
    ref = str(resolved) if ref.startswith(f"..{os.sep}..") else ref
    name = _slug(domain or "my-domain")
    text = render(ref, columns, domain=name, product=_slug(data.stem), target=picked)
    mesh.write_text(text)
    return mesh
