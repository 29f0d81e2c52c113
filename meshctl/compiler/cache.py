"""A cache of loaded files under `.meshctl/cache/`: what loading each file produced.

A file's entry is keyed by the sha256 of the meshctl version, the loader's format
and the file's bytes, so an edited file, or another meshctl, never finds an old
entry. An entry is JSON (data and positions), read back without running anything;
a file whose data JSON cannot hold exactly (dates, non-string keys, NaN) or whose
loading reported a problem is not cached. Deleting the directory is always safe.
Only `meshctl validate` and `plan` use it; a domain service (`serve`) compiles cold.
What an entrypoint model is (its introspection) is cached beside it, in
`.meshctl/cache/models/`, keyed by the model's code hash (meshctl.compiler.entrypoint):
editing a code file changes the hash, so a warm compile never reuses a stale answer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from meshctl import __version__
from meshctl.compiler.diagnostics import Diagnostic
from meshctl.compiler.loader import Source, SourceMap, load_bytes

FORMAT = 1
"""Version of the entry layout; part of every key."""


class LoadCache:
    """Loads files through entries in `directory` (made on first write)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.hits = 0
        self.misses = 0

    def key(self, raw: bytes) -> str:
        """The entry name of a file's bytes under this meshctl."""
        return hashlib.sha256(f"meshctl {__version__} cache {FORMAT}\0".encode() + raw).hexdigest()

    def load(self, raw: bytes, file: str) -> tuple[Source | None, list[Diagnostic]]:
        """What `load_bytes(raw, file)` gives, from the cache when an entry exists."""
        path = self.directory / f"{self.key(raw)}.json"
        try:
            entry = json.loads(path.read_bytes())
            tree = entry["tree"]
            if type(tree) is not list or len(tree) != 3:
                raise ValueError("not an entry")
            source = Source(file, raw.decode("utf-8-sig"), entry["data"], SourceMap(tree))
            self.hits += 1
            return source, []
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            pass  # no entry, or one that is not ours: load and (re)write it
        self.misses += 1
        source, diagnostics = load_bytes(raw, file)
        if source is not None and not diagnostics and _plain(source.data):
            tree = _tree(source.map.root)
            if tree is not None:
                self._write(path, {"data": source.data, "tree": tree})
        return source, diagnostics

    def _write(self, path: Path, entry: dict[str, Any]) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(entry, separators=(",", ":"), ensure_ascii=False),
                           encoding="utf-8")
            os.replace(tmp, path)
        except OSError:  # a read-only checkout compiles without a cache
            tmp.unlink(missing_ok=True)


def _plain(value: Any) -> bool:
    """Whether JSON gives back exactly `value` (types included)."""
    kind = type(value)
    if kind is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    if kind is list:
        return all(_plain(v) for v in value)
    if kind is float:
        return math.isfinite(value)
    return kind in (str, int, bool) or value is None


def _tree(entry: Any) -> Any:
    """A SourceMap entry as JSON: [key [line, col] | null, [line, col], subtree], 0-based;
    SourceMap reads this form as it is."""
    if entry is None:
        return None
    key, value, sub = entry
    if isinstance(sub, dict):
        if not all(type(k) is str for k in sub):
            return None
        inner: Any = {k: _tree(v) for k, v in sub.items()}
        if any(v is None for v in inner.values()):
            return None
    elif isinstance(sub, list):
        inner = [_tree(v) for v in sub]
        if any(v is None for v in inner):
            return None
    else:
        inner = None
    return [None if key is None else [key.line, key.column], [value.line, value.column], inner]
