"""`include:`: domain-owned files merged into mesh.yaml, each item keeping its own file:line:col.

mesh.yaml may list files or globs relative to its directory (`include: [domains/*.yaml]`).
An included file holds `domains`, `products` and `contracts` (a domain's local
policies sit inside the domain, as in mesh.yaml). Governance stays in mesh.yaml:
`policies`, `models`, `analyses`, `grants`, `mesh` and a further `include` in an
included file are errors (MESH111). Files are taken in the order listed, the matches
of a glob in sorted order, each file once; their items follow mesh.yaml's own, so the
merged data is the data of the same mesh written as one file.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from meshctl.compiler.diagnostics import Diagnostic, Reporter, YamlPath, did_you_mean
from meshctl.compiler.loader import Source, SourceMap, load_bytes
from meshctl.compiler.spec import SECTIONS

_NOFOLLOW = getattr(os, "O_NOFOLLOW", None)
"""Where open() can refuse a link (not on Windows: DirFiles.read then checks each file)."""
_MAGIC = re.compile(r"[*?[]")
"""What makes a path segment a wildcard for pathlib."""

INCLUDABLE = ("domains", "products", "contracts")
"""The sections an included file may hold."""


class Files(Protocol):
    """The files beside mesh.yaml: the working tree, or a git revision."""

    def read(self, name: str) -> bytes:
        """The bytes of `name` (posix, relative to mesh.yaml's directory); OSError if absent."""
        ...

    def glob(self, pattern: str) -> list[str]:
        """Names of the files matching `pattern`, sorted."""
        ...


class Outside(OSError):
    """A file that resolves (through a link) outside mesh.yaml's directory."""


class DirFiles:
    """Files of the working tree, under `root` (mesh.yaml's directory)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._top = root.resolve()
        self._inside: dict[str, bool] = {}  # per directory, for this compile: resolves inside _top
        self._prefix = os.path.join(root, "")

    def read(self, name: str) -> bytes:
        """The file's bytes; Outside when a link leads out of the directory."""
        parent = os.path.dirname(name)
        if self._inside.get(parent) and _NOFOLLOW is not None and not name.startswith("/"):
            try:  # (a directory known inside: one open that refuses a link)
                fd = os.open(self._prefix + name, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                pass  # a link (or an error): as below
            else:
                with open(fd, "rb") as file:
                    return file.read()
        path = self.root / name
        if os.path.islink(path):
            inside = path.resolve().is_relative_to(self._top)
        else:  # (not a link: where its directory resolves, once per directory; 1,000 files: 0.05 s)
            parent = os.path.dirname(name)
            inside = self._inside.get(parent)
            if inside is None:
                inside = self._inside[parent] = (self.root / parent).resolve().is_relative_to(self._top)
        if not inside:
            raise Outside("it resolves outside the mesh directory")
        return path.read_bytes()

    def glob(self, pattern: str) -> list[str]:
        """Matching files (not directories), sorted by name."""
        parts = [p for p in pattern.split("/") if p not in ("", ".")]
        if parts and not pattern.endswith("/") and not pattern.startswith("/") and "**" not in pattern \
                and ".." not in parts and not any(_MAGIC.search(p) for p in parts[:-1]) and _MAGIC.search(parts[-1]):
            return self._listed("/".join(parts[:-1]), parts[-1])
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.glob(pattern)
                      if p.is_file())

    def _listed(self, head: str, pattern: str) -> list[str]:
        """`dir/*.yaml` as pathlib globs it (its wildcard selector: the names of one listing that
        fnmatch's pattern matches, case-sensitively, dot files too), with one scandir instead of
        a Path and a stat per match (1,000 domain files)."""
        directory = os.path.join(self.root, head) if head else self.root
        if not os.path.isdir(directory):
            return []
        matches = re.compile(fnmatch.translate(pattern)).fullmatch
        try:
            with os.scandir(directory) as listing:
                entries = list(listing)
        except PermissionError:
            return []
        prefix = f"{head}/" if head else ""
        return sorted(prefix + e.name for e in entries if matches(e.name) and e.is_file())  # (a link: its target)


def match(pattern: str, names: list[str]) -> list[str]:
    """The `names` a glob matches as pathlib does: `*` and `?` within a segment, `**/` any
    number of directories; sorted."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    regex = re.compile("".join(out))
    return sorted(n for n in names if regex.fullmatch(n))


@dataclass
class Included:
    """One included file: its name beside mesh.yaml, the name diagnostics show, its load."""

    name: str
    label: str
    source: Source
    raw: bytes


class MeshMap(SourceMap):
    """Positions of a mesh merged from several files: each item is located in its own file."""

    def __init__(self, own: SourceMap, parts: list[Included],
                 origin: dict[str, list[tuple[int, int]]]) -> None:
        super().__init__(own.root)
        self.own = own
        self.parts = parts
        self.origin = origin
        """Per section, for each merged item: (index into parts or -1, index in its file)."""

    def split(self, path: YamlPath) -> tuple[int, YamlPath]:
        """(index of the file or -1 for mesh.yaml, the path inside that file)."""
        if len(path) >= 2 and isinstance(path[1], int):
            items = self.origin.get(path[0])  # type: ignore[arg-type]
            if items is not None and 0 <= path[1] < len(items):
                part, index = items[path[1]]
                return part, (path[0], index, *path[2:])
        return -1, path

    def locate(self, path: YamlPath, key: bool = False) -> tuple[int, int]:
        """Line and column of `path` in the file that declares it."""
        part, inner = self.split(path)
        return (self.own if part < 0 else self.parts[part].source.map).locate(inner, key)


def merge_includes(source: Source, files: Files, report: Reporter,
                   load: Callable[[bytes, str], tuple[Source | None, list[Diagnostic]]] = load_bytes,
                   ) -> list[Included]:
    """Load the files of `include:` (with `load`) and append their items to mesh.yaml's sections.

    Sets `source.map` and the reporter up so every later diagnostic names the file
    an item comes from. Returns the included files, in merge order.
    """
    data = source.data
    wanted = data.get("include") if isinstance(data, dict) else None
    if not isinstance(wanted, list) or not wanted:
        return []  # a malformed `include` is a schema error (MESH204), reported by parse
    base = PurePosixPath(Path(report.file).parent.as_posix())
    there = str(base)
    own = PurePosixPath(Path(report.file).name).as_posix()
    parts: list[Included] = []
    seen: set[str] = set()
    for i, pattern in enumerate(wanted):
        if not isinstance(pattern, str):
            continue
        for name in _names(pattern, files, own, ("include", i), report):
            if name in seen:
                continue
            seen.add(name)
            label = _label(there, name) if there != "." else name
            try:
                raw = files.read(name)
            except OSError as err:
                why = str(err) if isinstance(err, Outside) else (err.strerror or "cannot read").lower()
                code = "MESH109" if isinstance(err, Outside) else "MESH108"
                report.error(code, f"include '{name}': {why}", ("include", i))
                continue
            loaded, problems = load(raw, label)
            report.diagnostics += problems
            if loaded is not None and _check(loaded, label, report):
                parts.append(Included(name, label, loaded, raw))
    origin = {s: [(-1, j) for j in range(len(data.get(s) or []))]
              for s in INCLUDABLE if isinstance(data.get(s) or [], list)}
    for n, part in enumerate(parts):
        for section in INCLUDABLE:
            items = part.source.data.get(section)
            if isinstance(items, list) and items and section in origin:
                if data.get(section) is None:  # absent, or `domains:` left empty
                    data[section] = []
                data[section].extend(items)
                origin[section] += [(n, j) for j in range(len(items))]
    if parts:
        source.map = MeshMap(source.map, parts, origin)
        report.locate = source.map.locate
        report.files = _placer(source.map, report.file, own)
        report.texts = {report.file: source.text, **{p.label: p.source.text for p in parts}}
    return parts


def _label(base: str, name: str) -> str:
    """`(PurePosixPath(base) / name).as_posix()`, without a path object for a plain name (1,000 files)."""
    if name.startswith("/") or name.endswith("/") or "//" in name or base.endswith("/") \
            or any(p in (".", "..") for p in name.split("/")):
        return (PurePosixPath(base) / name).as_posix()
    return f"{base}/{name}"


def _names(pattern: str, files: Files, own: str, at: YamlPath, report: Reporter) -> list[str]:
    """The files one `include` entry names; each problem is a diagnostic at the entry."""
    if not pattern.strip():
        report.error("MESH108", "include is empty", at)
        return []
    pure = PurePosixPath(pattern)
    if pure.is_absolute() or ".." in pure.parts or re.match(r"[A-Za-z]:[\\/]", pattern):
        report.error("MESH109", f"include '{pattern}' is outside the mesh directory", at,
                     hint="include files under mesh.yaml's directory, by a relative path")
        return []
    names = files.glob(pattern) if any(c in pattern for c in "*?[") else (
        [pure.as_posix()] if pure.as_posix() in files.glob(pure.as_posix()) else [])
    if own in names:
        report.error("MESH110", f"include '{pattern}' includes {own} itself", at,
                     hint="name only the domain files, e.g. `domains/*.yaml`")
        names = [n for n in names if n != own]
        if not names:
            return []
    if not names:
        what = "matches no file" if any(c in pattern for c in "*?[") else "no such file"
        report.error("MESH108", f"include '{pattern}': {what}", at,
                     hint="paths are relative to mesh.yaml's directory")
    return names


def _check(loaded: Source, label: str, report: Reporter) -> bool:
    """Whether an included file is a mapping; each key that is not an includable list is an error
    (the file's other sections are still merged)."""
    data = loaded.data

    def error(code: str, message: str, path: YamlPath, hint: str | None = None) -> None:
        line, col = loaded.map.locate(path, key=bool(path))
        report.diagnostics.append(Diagnostic(code, "error", message, label, line, col, hint))

    if not isinstance(data, dict):
        error("MESH201", "an included file must be a mapping of sections", (),
              "write `domains:`, `products:` and `contracts:` lists")
        return False
    for key in data:
        if key in INCLUDABLE:
            if not isinstance(data[key], list):
                error("MESH204", f"'{key}' must be a list", (key,))
        elif key in SECTIONS or key in ("include", "mesh", "apiVersion"):
            error("MESH111", f"'{key}' is not allowed in an included file",
                  (key,), "an included file holds domains, products and contracts; "
                  "policies, models, analyses, grants and includes stay in mesh.yaml")
        else:
            error("MESH202", f"unknown key '{key}' in an included file", (key,),
                  did_you_mean(key, INCLUDABLE))
    return True


def _placer(smap: MeshMap, file: str, own: str) -> Any:
    """path -> (diagnostic file, plan name) of the file that declares it."""
    def place(path: YamlPath) -> tuple[str, str]:
        part, _ = smap.split(path)
        if part < 0:
            return file, own
        return smap.parts[part].label, smap.parts[part].name
    return place


def content_bytes(data: Any) -> bytes:
    """The mesh's content as canonical JSON (UTF-8), what the plan's `spec_hash` covers: the data of
    mesh.yaml with its includes merged, without `include:` and without empty sections, keys sorted.
    A mesh written as one file or as included files, with other comments, blank lines, quoting or
    key order, has the same content."""
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != "include" and v not in (None, [], {})}
    try:
        text = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_tagged)
    except TypeError:  # keys of several types in one mapping do not sort: as written
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=_tagged)
    return text.encode()


def _tagged(value: Any) -> Any:
    """A value JSON has no type for (a YAML date or timestamp, a set, bytes), tagged with its type."""
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    iso = getattr(value, "isoformat", None)
    return f"!{type(value).__name__} {iso() if iso is not None else repr(value)}"
