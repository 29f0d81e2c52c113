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

FORMAT = 3
"""Version of the entry layout; part of every key. (2: positions kept as JSON text, decoded
on the first lookup; 3: no positions (`tree: null`) for a file the loader read by its fast
path, whose positions it makes when looked up.)"""


class LoadCache:
    """Loads files through entries in `directory` (made on first write)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.hits = 0
        self.misses = 0
        self._memo: DecisionMemo | None = None

    @property
    def decisions(self) -> DecisionMemo:
        """The policy values remembered beside the loads (read once per LoadCache)."""
        if self._memo is None:
            self._memo = DecisionMemo(self.directory / "policies" / "decisions.json")
        return self._memo

    def key(self, raw: bytes) -> str:
        """The entry name of a file's bytes under this meshctl."""
        return hashlib.sha256(f"meshctl {__version__} cache {FORMAT}\0".encode() + raw).hexdigest()

    def load(self, raw: bytes, file: str) -> tuple[Source | None, list[Diagnostic]]:
        """What `load_bytes(raw, file)` gives, from the cache when an entry exists."""
        path = self.directory / f"{self.key(raw)}.json"
        try:
            entry = json.loads(path.read_bytes())
            tree = entry["tree"]
            if type(tree) is not str and tree is not None:
                raise ValueError("not an entry")
            source = Source(file, raw.decode("utf-8-sig"), entry["data"], _LazyMap(tree, raw, file))
            self.hits += 1
            return source, []
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            pass  # no entry, or one that is not ours: load and (re)write it
        self.misses += 1
        source, diagnostics = load_bytes(raw, file)
        if source is not None and not diagnostics and _plain(source.data):
            if source.map.partial:  # (positions made when looked up: from the file, then)
                self._write(path, {"data": source.data, "tree": None})
                return source, diagnostics
            tree = _tree(source.map.root)
            if tree is not None:
                self._write(path, {"data": source.data,
                                   "tree": json.dumps(tree, separators=(",", ":"), ensure_ascii=False)})
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


class _LazyMap(SourceMap):
    """A cached file's positions, kept as JSON text until the first lookup: a clean compile
    looks up few positions in a domain's file, often none (0.3 s of 1,000 files' trees).
    Without a text (`tree: null`), the positions come from loading the file on first lookup."""

    def __init__(self, tree: str | None, raw: bytes, file: str) -> None:  # (root is made when read)
        self._tree: str | None = tree
        self._pending = True
        self._raw, self._file = raw, file
        self._root: Any = None

    @property
    def root(self) -> Any:
        """The position tree (SourceMap's), decoded (or loaded) now if it was not yet."""
        if self._pending:
            text, self._tree, self._pending = self._tree, None, False
            try:
                if text is None:
                    raise ValueError("no positions kept")
                root = json.loads(text)
                if type(root) is not list or len(root) != 3:
                    raise ValueError("not a position tree")
            except ValueError:  # none kept, or a broken entry: the positions come from the file
                source, _ = load_bytes(self._raw, self._file)
                root = source.map.root if source is not None else None
            self._root = root
        return self._root

    @root.setter
    def root(self, value: Any) -> None:
        self._tree, self._root, self._pending = None, value, False


class DecisionMemo:
    """Values of policy expressions, by (expression text, the exact variables it saw).

    One JSON file (`policies/decisions.json` in the cache directory) keyed inside by the meshctl
    version: the variables a policy sees are hashed as JSON (their order kept), so a
    model whose reads, features or settings change is decided again, and so is every
    subject after an upgrade. Only the entries the last compile used are kept.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hits = 0
        self.misses = 0
        self._old: dict[str, dict[str, Any]] = {}
        self._used: dict[str, dict[str, Any]] = {}
        try:
            entry = json.loads(path.read_bytes())
            if entry["key"] == self.version_key():
                exprs = entry["exprs"]
                self._old = {k: {exprs[int(i)]: v for i, v in values.items()}
                             for k, values in entry["subjects"].items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            self._old = {}  # none yet, another meshctl's, or broken: decide afresh

    @staticmethod
    def version_key() -> str:
        """What an entry must have been written by: this meshctl, this layout."""
        return hashlib.sha256(f"meshctl {__version__} decisions {FORMAT}".encode()).hexdigest()

    def values(self, variables: dict[str, Any]) -> dict[str, Any] | None:
        """The remembered values (expression text -> value) for exactly `variables`; the
        caller adds what it evaluates. None when JSON cannot hold the variables exactly."""
        if not _plain(variables):
            return None
        return self._entry(hashlib.sha256(json.dumps(variables, separators=(",", ":"), ensure_ascii=False)
                                          .encode()).hexdigest()[:32])

    def _entry(self, key: Any) -> dict[Any, Any]:
        """The values this compile uses under `key`: those the last compile kept (a hit), else none
        (a miss); the caller adds what it evaluates."""
        got = self._used.get(key)
        if got is None:
            old = self._old.get(key)
            got = self._used[key] = dict(old) if old is not None else {}
            if old is not None:
                self.hits += 1
            else:
                self.misses += 1
        return got

    def save(self) -> None:
        """Write what this compile used, when it differs from what was read."""
        used, self._used = self._used, {}
        if used.keys() == self._old.keys() and all(len(v) == len(self._old[k]) for k, v in used.items()):
            return
        self._old = used
        index: dict[str, int] = {}
        subjects = {k: {str(index.setdefault(text, len(index))): value for text, value in v.items()}
                    for k, v in used.items()}
        entry = {"key": self.version_key(), "exprs": list(index), "subjects": subjects}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(entry, separators=(",", ":"), ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:  # a read-only checkout compiles without it
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
