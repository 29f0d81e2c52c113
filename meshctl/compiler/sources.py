"""Product sources (files and database URIs) and service levels (durations).

A source is a csv or parquet file (format by extension), or a URI: `sqlite:PATH`,
`duckdb:PATH` (paths relative to the mesh.yaml) or `postgresql://...`; a URI
needs a `table`, a file must not have one. Only files of `local` domains are checked
for existence (a remote domain's files are on its own host); a postgresql server is
the runtime's business.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshctl.compiler.diagnostics import Reporter, YamlPath, did_you_mean
from meshctl.compiler.plan import PlanSla
from meshctl.compiler.spec import Product, Sla

FILE_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
"""Source file suffixes the plan supports, and their formats."""

URI_FORMATS = {"sqlite:": "sqlite", "duckdb:": "duckdb", "postgresql://": "postgresql",
               "postgres://": "postgresql"}
"""Source URI prefixes the plan supports, and their formats."""

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
"""Duration units, in seconds."""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdwy])\s*$")
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


@dataclass(frozen=True)
class SourceKind:
    """What a source string is."""

    format: str
    """csv | parquet | sqlite | duckdb | postgresql"""
    path: str | None
    """Local file the source reads (relative to the mesh.yaml), None for a server."""

    @property
    def is_file(self) -> bool:
        """A csv or parquet file (no table)."""
        return self.format in ("csv", "parquet")


@functools.lru_cache(maxsize=1 << 16)
def source_kind(source: str) -> SourceKind | None:
    """The format and local path of `source`, or None when it is not supported (frozen: one
    instance per text, as checks and the plan both ask, and a compile server asks every time)."""
    for prefix, fmt in URI_FORMATS.items():
        if source.startswith(prefix):
            return SourceKind(fmt, None if fmt == "postgresql" else source[len(prefix):])
    if "://" in source:
        return None
    fmt = FILE_FORMATS.get(_suffix(source).lower())
    return SourceKind(fmt, source) if fmt else None


def _suffix(source: str) -> str:
    """PurePosixPath(source).suffix, without building a path (10,000 products: 0.3 s less)."""
    parts = [p for p in source.split("/") if p and p != "."]
    name = parts[-1] if parts else ""
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


def check_sources(products: list[Product], base: Path, report: Reporter,
                  remote: set[str] | frozenset[str] = frozenset()) -> None:
    """Report unsupported sources, missing local files and a wrong `table`.

    Files of products of `remote` domains are not looked for: they live on the domain's host.
    """
    read_by: dict[Path, str] = {}  # each file a product reads -> its domain (never suggested to another)

    def others_of(domain: str) -> set[Path]:
        """The files other domains' products read; built only when a file is missing."""
        if not read_by:
            for product in products:
                kind = source_kind(product.source)
                if kind is not None and kind.path is not None:
                    read_by.setdefault((base / kind.path).resolve(), product.domain)
        return {path for path, owner in read_by.items() if owner != domain}

    listed = _Listed(base)
    for product in products:
        kind = source_kind(product.source)
        if kind is None:
            report.error("MESH501", f"source '{product.source}' of product '{product.domain}.{product.name}' is "
                         "not a supported file or URI", (*product.path, "source"),
                         hint="use a .csv or .parquet file, sqlite:PATH, duckdb:PATH or "
                              "postgresql://...")
            continue
        if (product.table is not None) if kind.is_file else not product.table:
            _check_table(product, kind, f"{product.domain}.{product.name}", report)
        if kind.path is not None and product.domain not in remote and not listed.isfile(kind.path):
            _check_file(kind.path, f"{product.domain}.{product.name}", base, (*product.path, "source"), report,
                        product.domain, others_of)


class _Listed:
    """`os.path.isfile(base/src)` from one listing per directory: 10,000 sources in one directory
    are one scandir, not 10,000 stats. Only a plain relative path (no `.`, `..` or empty part) is
    answered from a listing, only "it is a file" (what is not listed is asked again by a stat: a
    case-insensitive file system), and only in a directory this process may list and search."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.dirs: dict[str, set[str] | None] = {}

    def isfile(self, src: str) -> bool:
        head, _, name = src.rpartition("/")
        names = self.dirs.get(head, False)
        if names is False:
            names = self.dirs[head] = self._list(head)
        if names is not None and name in names and not src.startswith("/"):
            return True
        return os.path.isfile(os.path.join(self.base, src))

    def _list(self, head: str) -> set[str] | None:
        if head and any(p in ("", ".", "..") for p in head.split("/")):  # (and absolute: a first part "")
            return None
        directory = os.path.join(self.base, head) if head else self.base
        try:
            if not os.access(directory, os.R_OK | os.X_OK):
                return None
            with os.scandir(directory) as entries:
                return {e.name for e in entries if e.is_file()}
        except (OSError, ValueError):
            return None


def _check_table(product: Product, kind: SourceKind, label: str, report: Reporter) -> None:
    if kind.is_file and product.table is not None:
        report.error("MESH212", f"product '{label}' reads a {kind.format} file, which has no "
                     "tables", (*product.path, "table"), key=True,
                     hint="remove `table`, or use a sqlite:, duckdb: or postgresql:// source")
    elif not kind.is_file and not product.table:
        report.error("MESH212", f"product '{label}' reads a {kind.format} source but names no "
                     "`table`", product.path, hint="add `table: NAME`")


def _check_file(src: str, label: str, base: Path, at: YamlPath, report: Reporter, domain: str = "",
                others_of: Callable[[str], set[Path]] = lambda domain: set()) -> None:
    if os.path.isfile(os.path.join(base, src)):  # (as Path.is_file, without building a Path)
        return
    target = base / src
    others = others_of(domain)
    siblings = ([p.name for p in target.parent.iterdir() if p.resolve() not in others]
                if target.parent.is_dir() else [])
    report.error("MESH307", f"source file '{src}' of product '{label}' does not exist", at,
                 hint=did_you_mean(target.name, siblings)
                 or "paths are relative to the mesh.yaml's directory")


def duration_s(text: str) -> float | None:
    """Seconds of a duration such as `30m`, `12h`, `7d`, `2w` or `5y`; None if malformed."""
    m = _DURATION.match(text)
    return float(m.group(1)) * UNITS[m.group(2)] if m else None


def check_sla(sla: Sla | None, at: YamlPath, report: Reporter) -> None:
    """Report a malformed freshness, retention or availability."""
    if sla is None:
        return
    for key in ("freshness", "retention"):
        value = getattr(sla, key)
        if value is not None and duration_s(value) is None:
            report.error("MESH208", f"{key} '{value}' is not a duration", (*at, key),
                         hint="a number and a unit: s, m, h, d, w or y, e.g. 7d")
    value = sla.availability
    if value is not None:
        m = _PERCENT.match(value)
        if m is None or float(m.group(1)) > 100:
            report.error("MESH208", f"availability '{value}' is not a percentage",
                         (*at, "availability"), hint="e.g. 99.9%")


def plan_sla(sla: Sla | None) -> PlanSla | None:
    """The plan's view of a checked SLA."""
    if sla is None:
        return None
    return PlanSla(freshness_s=duration_s(sla.freshness) if sla.freshness else None,
                   freshness=sla.freshness or "", availability=sla.availability or "",
                   retention=sla.retention or "")
