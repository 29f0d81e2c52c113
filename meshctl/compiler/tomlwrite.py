"""A TOML writer for plain data that gives tomli-w's bytes, faster.

`dumps(data)` is `tomli_w.dumps(data)` (indent 4, no multi-line strings) for data made
of dicts with string keys, lists, str, int, float and bool, which is what
`Plan.model_dump(mode="json")` gives. The layout rules are tomli-w's, kept as they are
so that a plan's bytes (and so its hash) do not depend on which writer wrote it:

- a table's plain values come first, then its sub-tables, each after a blank line;
- a non-empty list of dicts is an array of tables (`[[name]]`) unless every dict fits
  an inline table of at most 100 characters (indent and comma included);
- other lists are multi-line arrays, one item per line, indented 4 per level.

What makes it faster: a string with nothing to escape (almost all) is quoted without a
per-character loop, keys are checked once per distinct key, and an inline table is
rendered once; so is a nested array's table that is the same dict object under the same
name (a plan's shared columns: `Plan.to_toml` dumps each distinct column once).
tests/compiler/test_plan_split.py compares it with tomli-w.
"""

from __future__ import annotations

import re
from typing import Any

MAX_LINE_LENGTH = 100
INDENT = "    "

_ESCAPE = re.compile(r'[\x00-\x08\x0a-\x1f\x7f"\\]')
_COMPACT = {"\b": "\\b", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"', "\\": "\\\\"}
_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _COMPACT.get(char) or f"\\u{ord(char):04x}"


def _string(s: str) -> str:
    if _ESCAPE.search(s) is None:
        return f'"{s}"'
    return f'"{_ESCAPE.sub(_escape, s)}"'


class _Writer:
    def __init__(self) -> None:
        self.keys: dict[str, str] = {}
        self.inline: dict[int, str] = {}
        self.strings: dict[str, str] = {}
        self.prefixes: dict[str, str] = {}
        self.tables: dict[tuple[int, str], list[str]] = {}
        """Lines of nested array tables by (id of the dict, name); `data` keeps the dicts alive."""
        self.arrays: dict[tuple[int, ...], bool] = {}
        """Whether a list of these very dicts (by their ids) is written as an array of tables."""
        self.chunks: dict[tuple[tuple[int, ...], str], list[str]] = {}
        """Lines of a nested array of tables (each table after a blank line) by its dicts' ids and name."""

    def string(self, s: str) -> str:
        out = self.strings.get(s)
        if out is None:
            out = _string(s)
            if len(self.strings) < 100_000:
                self.strings[s] = out
        return out

    def key(self, k: str) -> str:
        out = self.keys.get(k)
        if out is None:
            if type(k) is not str:
                raise TypeError(f"Invalid mapping key '{k}' of type '{type(k).__qualname__}'."
                                " A string is required.")
            out = self.keys[k] = k if _BARE.fullmatch(k) else _string(k)
        return out

    def literal(self, obj: Any, level: int = 0) -> str:
        kind = type(obj)
        if kind is str:
            return self.string(obj)
        if kind is bool:
            return "true" if obj else "false"
        if kind is int or kind is float:
            return str(obj)
        if kind is list or kind is tuple:
            if not obj:
                return "[]"
            indent = INDENT * (level + 1)
            items = ",\n".join(indent + self.literal(item, level + 1) for item in obj)
            return f"[\n{items},\n{INDENT * level}]"
        if kind is dict:
            return self.inline_table(obj)
        raise TypeError(f"Object of type '{kind.__qualname__}' is not TOML serializable"
                        " (this writer takes plain data; use tomli_w for anything else)")

    def inline_table(self, obj: dict[str, Any]) -> str:
        rendered = self.inline.get(id(obj))
        if rendered is None:
            if not obj:
                rendered = "{}"
            else:
                rendered = "{ " + ", ".join(f"{self.key(k)} = {self.literal(v)}"
                                            for k, v in obj.items()) + " }"
            self.inline[id(obj)] = rendered
        return rendered

    def inline_fits(self, obj: dict[str, Any]) -> bool:
        rendered = self.inline_table(obj)
        return len(rendered) + len(INDENT) + 1 <= MAX_LINE_LENGTH and "\n" not in rendered

    def prefix(self, k: str) -> str:
        """`key = `, for a value line."""
        out = self.prefixes.get(k)
        if out is None:
            out = self.prefixes[k] = f"{self.key(k)} = "
        return out

    def table(self, table: dict[str, Any], name: str, in_array: bool, out: list[str]) -> None:
        if in_array and "." in name:  # a nested array's table: the same dict again is the same text
            done = self.tables.get((id(table), name))
            if done is not None:
                out += done
                return
            start = len(out)
            self._table(table, name, in_array, out)
            self.tables[id(table), name] = out[start:]
            return
        self._table(table, name, in_array, out)

    def _table(self, table: dict[str, Any], name: str, in_array: bool, out: list[str]) -> None:
        literals: list[str] = []
        tables: list[tuple[str, Any, bool]] = []
        prefixes, strings = self.prefixes, self.strings
        for k, v in table.items():
            kind = type(v)
            if kind is str:  # most values: looked up without calls where seen before
                text = strings.get(v)
                if text is None:
                    text = self.string(v)
                literals.append((prefixes.get(k) or self.prefix(k)) + text + "\n")
            elif kind is dict:
                tables.append((k, v, False))
            elif (kind is list or kind is tuple) and v and type(v[0]) is dict and self.array(v):
                tables.append((k, v, True))
            else:
                literals.append((prefixes.get(k) or self.prefix(k)) + self.literal(v) + "\n")
        written = False
        if in_array or name and (literals or not tables):
            written = True
            out.append(f"[[{name}]]\n" if in_array else f"[{name}]\n")
        if literals:
            written = True
            out += literals
        for k, v, array in tables:
            part = self.key(k)
            full = f"{name}.{part}" if name else part
            if not array:
                if written:
                    out.append("\n")
                written = True
                self.table(v, full, False, out)
            elif written and name:  # a nested array: the same dicts again are the same lines
                ids = tuple(map(id, v))
                done = self.chunks.get((ids, full))
                if done is None:
                    start = len(out)
                    for t in v:
                        out.append("\n")
                        self.table(t, full, True, out)
                    self.chunks[ids, full] = out[start:]
                else:
                    out += done
            else:
                for t in v:
                    if written:
                        out.append("\n")
                    written = True
                    self.table(t, full, True, out)

    def array(self, v: list[Any] | tuple[Any, ...]) -> bool:
        """Whether a non-empty list that starts with a dict is an array of tables: every item a
        dict, not all of them fitting an inline table (tomli-w's rule); kept by the dicts' ids."""
        ids = tuple(map(id, v))
        found = self.arrays.get(ids)
        if found is None:
            found = self.arrays[ids] = (all(type(t) is dict for t in v)
                                        and not all(self.inline_fits(t) for t in v))
        return found


def dumps(data: dict[str, Any]) -> str:
    """`data` as TOML text, byte for byte what `tomli_w.dumps(data)` gives."""
    out: list[str] = []
    _Writer().table(data, "", False, out)
    return "".join(out)
