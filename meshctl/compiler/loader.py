"""YAML -> plain data plus a SourceMap of every node's line and column.

The parser's events (libyaml's C parser when PyYAML has it, else PyYAML's
pure-Python one) are turned into dicts, lists and scalars in one pass, so that
duplicate keys, alias cycles and every position are seen without building a
node graph first. A syntax error is worded by the pure-Python parser, as it
always was. PyYAML's own resolver and constructor decide what a scalar is.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import SafeConstructor
from yaml.events import (
    AliasEvent,
    Event,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

from meshctl.compiler.diagnostics import Diagnostic, Reporter, YamlPath

MAX_NODES = 200_000
"""Most nodes a document may expand to through aliases (guards 'billion laughs')."""
MAX_DEPTH = 100
"""Deepest nesting of mappings and lists a document may have (MESH107); the builder recurses."""

MERGE_TAG = "tag:yaml.org,2002:merge"
BOOL_TAG = "tag:yaml.org,2002:bool"
STR_TAG = "tag:yaml.org,2002:str"
INT_TAG = "tag:yaml.org,2002:int"
FLOAT_TAG = "tag:yaml.org,2002:float"

_FAST_LOADER = getattr(yaml, "CSafeLoader", None) if yaml.__with_libyaml__ else None
FLOW_FAST = True
"""Read sections of one-line flow items by their JSON rewrite (`_fast`); False: by events only."""
_RESOLVER = Resolver()
_PLAIN_STARTS = frozenset(k for k in _RESOLVER.yaml_implicit_resolvers if k)
"""First characters of a plain scalar that may resolve to something other than a str."""
_MISSING = object()

# A position entry: (key mark or None, value mark, subtree). A subtree is a dict
# key -> entry for a mapping, a list of entries for a sequence, None for a scalar.
Entry = tuple[Any, Any, Any]


class SourceMap:
    """Where each value (and each mapping key) of the document is, 1-based.

    Positions are kept as a tree shaped like the data, so recording one costs a
    tuple, and a path is looked up by walking down from the root.
    """

    partial = False
    """True when some positions are made on first lookup (the fast path's items)."""

    def __init__(self, root: Entry | None = None) -> None:
        self.root = root

    def locate(self, path: YamlPath, key: bool = False) -> tuple[int, int]:
        """Position of `path`, or of its nearest ancestor that has one."""
        entry = self.root
        if entry is None:
            return (1, 1)
        last = len(path) - 1
        for depth, step in enumerate(path):
            child = _child(entry[2], step)
            if child is None:
                break
            entry = child
            if key and depth == last and entry[0] is not None:
                return _at(entry[0])
        return _at(entry[1])


def _at(mark: Any) -> tuple[int, int]:
    """1-based (line, col) of a parser mark, or of a 0-based [line, col] (a cached entry)."""
    if type(mark) is list:
        return mark[0] + 1, mark[1] + 1
    return mark.line + 1, mark.column + 1


def _child(tree: Any, step: Any) -> Entry | None:
    if isinstance(tree, dict):
        try:
            return tree.get(step)
        except TypeError:
            return None
    if isinstance(tree, list) and isinstance(step, int) and 0 <= step < len(tree):
        return tree[step]
    return None


@dataclass
class Source:
    """A loaded mesh.yaml: its text, its data and where every node is."""

    file: str
    text: str
    data: Any
    map: SourceMap


@dataclass
class _Anchor:
    data: Any
    mark: Any
    tree: Any
    size: int = 1
    tag: str | None = None
    scalar: bool = False
    done: bool = False


class _TooDeep(Exception):
    """The document nests deeper than MAX_DEPTH at `mark`; loading stops."""

    def __init__(self, mark: Any) -> None:
        super().__init__("too deep")
        self.mark = mark


class _Muted:
    """A reporter that forgets: for parts of the document that are skipped, not built."""

    def error(self, *args: Any, **kwargs: Any) -> None:
        """Drop the error."""


class _Builder:
    """Turns the parser's events into data, recording positions and reporting problems."""

    def __init__(self, loader: Any, report: Reporter) -> None:
        self.next = loader.get_event
        self.report: Reporter | _Muted = report
        self.scalars = SafeConstructor()
        self.anchors: dict[str, _Anchor] = {}
        self.cache: dict[str, Any] = {}
        """Plain, untagged scalars' text -> value: what such a scalar is depends on its text only."""
        self.size = 0
        self.expanded = 0
        self.stopped = False
        self.muted = False
        self.depth = 0

    def document(self) -> tuple[Any, Entry] | None:
        """The single document's data and root entry; None for an empty stream."""
        self.next()  # StreamStartEvent
        event = self.next()
        if isinstance(event, StreamEndEvent):
            return None
        root = self.next()
        data, mark, tree = self.node(root)
        self.next()  # DocumentEndEvent
        event = self.next()
        if not isinstance(event, StreamEndEvent):
            raise ComposerError("expected a single document in the stream", root.start_mark,
                                "but found another document", event.start_mark)
        return data, (None, mark, tree)

    def node(self, event: Event) -> tuple[Any, Any, Any]:
        """(data, mark, subtree) of the node that starts with `event`."""
        kind = type(event)
        if kind is ScalarEvent:
            self.size += 1
            return self.scalar(event, event.start_mark), event.start_mark, None
        if kind is AliasEvent:
            return self.alias(event)
        if kind is SequenceStartEvent or kind is MappingStartEvent:
            if self.depth >= MAX_DEPTH:
                raise _TooDeep(event.start_mark)
            self.depth += 1
            try:
                return self.sequence(event) if kind is SequenceStartEvent else self.mapping(event)
            finally:
                self.depth -= 1
        raise ComposerError(None, None, f"unexpected {kind.__name__}", event.start_mark)

    def scalar(self, event: ScalarEvent, where: Any) -> Any:
        """A scalar's value; `where` is the mark a construction error is reported at.

        The caller counts the node (`size`). A plain scalar without a tag is looked up in
        `cache` first; the loops of `mapping` and `sequence` do that lookup themselves."""
        value = event.value
        plain = event.tag is None and event.implicit[0]
        if event.anchor is None:
            if plain:
                cached = self.cache.get(value, _MISSING)
                if cached is not _MISSING:
                    return cached
                if value and value[0] not in _PLAIN_STARTS:
                    self.cache[value] = value
                    return value
            elif event.tag is None:
                return value  # quoted: always a str
        tag = event.tag
        if tag is None or tag == "!":
            tag = _RESOLVER.resolve(ScalarNode, value, event.implicit)
        node = ScalarNode(tag, value, event.start_mark, event.end_mark, event.style)
        out, ok = self.construct(node, where)
        if ok and plain:  # (not a quoted one: '123' is a str, 123 an int)
            self.cache[value] = out
        if event.anchor is not None:
            self.define(event, _Anchor(out, event.start_mark, None, 1, tag, True, True))
        return out

    def construct(self, node: ScalarNode, where: Any) -> tuple[Any, bool]:
        """The value of a resolved scalar node, and whether it could be read."""
        if node.tag == BOOL_TAG and node.value.lower() not in ("true", "false"):
            return node.value, True  # YAML 1.2: yes/no/on/off are strings, not bools
        if node.tag == STR_TAG:
            return node.value, True
        try:
            return self.scalars.construct_object(node, deep=True), True
        except (yaml.YAMLError, ValueError, OverflowError) as err:  # !!int x, bad dates
            problem = getattr(err, "problem", None) or str(err)
            self.report.error("MESH101", f"cannot read this value: {problem}", pos=_pos(where))
            return None, False

    def define(self, event: Event, anchor: _Anchor) -> None:
        """Remember an anchor; a second one of the same name is an error, as in PyYAML."""
        name = event.anchor
        if name in self.anchors:
            raise ComposerError(f"found duplicate anchor {name!r}; first occurrence",
                                self.anchors[name].mark, "second occurrence", event.start_mark)
        self.anchors[name] = anchor

    def alias(self, event: AliasEvent) -> tuple[Any, Any, Any]:
        """A copy of the anchored data, placed at the alias itself."""
        anchor = self.anchors.get(event.anchor)
        mark = event.start_mark
        if anchor is None:
            raise ComposerError(None, None, f"found undefined alias {event.anchor!r}", mark)
        if self.muted:
            return None, mark, None
        if not anchor.done:
            return self.stop("a recursive alias", mark)
        self.expanded += anchor.size
        if self.expanded > MAX_NODES:
            return self.stop("too many nodes", mark)
        self.size += anchor.size
        return _copy(anchor.data), mark, anchor.tree

    def stop(self, what: str, mark: Any) -> tuple[None, Any, None]:
        """Report (once) that the document expands to `what`; the node becomes null."""
        if not self.stopped:
            self.stopped = True
            self.report.error("MESH106", f"the document expands to {what}", pos=_pos(mark))
        return None, mark, None

    def sequence(self, start: SequenceStartEvent) -> tuple[list, Any, list]:
        """A list and its entries, one per item."""
        out: list[Any] = []
        tree: list[Entry] = []
        anchor = self.open(start, out, tree)
        size, count = self.size, 1  # (nodes are counted here, added to `size` at the end)
        nxt, append, place, cache = self.next, out.append, tree.append, self.cache
        while True:
            event = nxt()
            kind = type(event)
            if kind is ScalarEvent:
                count += 1
                at = event.start_mark
                if event.tag is None and event.anchor is None:
                    if not event.implicit[0]:
                        append(event.value)
                    else:
                        value = cache.get(event.value, _MISSING)
                        append(value if value is not _MISSING else self.scalar(event, at))
                else:
                    append(self.scalar(event, at))
                place((None, at, None))
                continue
            if kind is SequenceEndEvent:
                break
            data, mark, sub = self.node(event)
            append(data)
            place((None, mark, sub))
        self.size += count
        self.close(anchor, size)
        return out, start.start_mark, tree

    def open(self, start: Event, data: Any, tree: Any) -> _Anchor | None:
        """Define the anchor of a collection that is still being built."""
        if start.anchor is None:
            return None
        anchor = _Anchor(data, start.start_mark, tree)
        self.define(start, anchor)
        return anchor

    def close(self, anchor: _Anchor | None, size: int) -> None:
        """Mark a collection's anchor usable, with the number of nodes it stands for."""
        if anchor is not None:
            anchor.size = self.size - size
            anchor.done = True

    def mapping(self, start: MappingStartEvent) -> tuple[dict, Any, dict]:
        """A dict and its entries; duplicate keys and merges (`<<`) as before."""
        out: dict[Any, Any] = {}
        tree: dict[Any, Entry] = {}
        anchor = self.open(start, out, tree)
        size, count = self.size, 1  # (nodes are counted here, added to `size` at the end)
        mark = start.start_mark
        merged: dict[Any, Any] = {}
        nxt, cache = self.next, self.cache
        while True:
            event = nxt()
            kind = type(event)
            if kind is ScalarEvent and event.anchor is None and event.tag is None:
                key = event.value
                if event.implicit[0]:
                    if key == "<<":
                        mark = self.merge(nxt(), mark, tree, merged)
                        continue
                    key = cache.get(key, _MISSING)
                    if key is _MISSING:
                        key = self.scalar(event, mark)
                count += 1
                key_mark = event.start_mark
            elif kind is MappingEndEvent:
                break
            else:
                key, key_mark, is_key = self.key(event, mark)
                if is_key == "merge":
                    mark = self.merge(nxt(), mark, tree, merged)
                    continue
                if not is_key:
                    self.skip(nxt())
                    continue
            if key in out:
                first = _pos(tree[key][0])
                self.report.error("MESH102", f"duplicate key '{key}'", pos=_pos(key_mark),
                                  hint=f"first defined at line {first[0]}")
                self.skip(nxt())
                continue
            event = nxt()
            if type(event) is ScalarEvent:
                count += 1
                at = event.start_mark
                if event.tag is None and event.anchor is None:
                    if not event.implicit[0]:
                        out[key] = event.value
                    else:
                        value = cache.get(event.value, _MISSING)
                        out[key] = value if value is not _MISSING else self.scalar(event, at)
                else:
                    out[key] = self.scalar(event, at)
                tree[key] = (key_mark, at, None)
                continue
            data, value_mark, sub = self.node(event)
            out[key] = data
            tree[key] = (key_mark, value_mark, sub)
        for key, value in merged.items():
            out.setdefault(key, value)
        self.size += count
        self.close(anchor, size)
        return out, mark, tree

    def key(self, event: Event, where: Any) -> tuple[Any, Any, bool | str]:
        """A key that is not a plain scalar: (key, mark, True | False | 'merge')."""
        mark = event.start_mark
        if isinstance(event, ScalarEvent):
            tag = event.tag
            if tag is None or tag == "!":
                tag = _RESOLVER.resolve(ScalarNode, event.value, event.implicit)
            self.size += 1
            key = self.scalar(event, where)
            return key, mark, "merge" if tag == MERGE_TAG else True
        if isinstance(event, AliasEvent):
            anchor = self.anchors.get(event.anchor)
            if anchor is not None and anchor.scalar:
                self.size += 1
                return anchor.data, mark, "merge" if anchor.tag == MERGE_TAG else True
        self.skip(event)
        self.report.error("MESH101", "a mapping key must be a plain value", pos=_pos(mark))
        return None, mark, False

    def merge(self, event: Event, mark: Any, tree: dict, into: dict) -> Any:
        """Merge the mapping(s) of a `<<` value; returns the mark the mapping now has."""
        if not isinstance(event, SequenceStartEvent):
            return self.merge_one(event, mark, tree, into)
        while not isinstance(event := self.next(), SequenceEndEvent):
            mark = self.merge_one(event, mark, tree, into)
        return mark

    def merge_one(self, source: Event, mark: Any, tree: dict, into: dict) -> Any:
        """Merge one mapping (or alias of one) into `into`; anything else is an error."""
        data, sub = None, None
        anchored = self.anchors.get(source.anchor) if isinstance(source, AliasEvent) else None
        if isinstance(source, MappingStartEvent) or isinstance(getattr(anchored, "data", None),
                                                               dict):
            data, mark, sub = self.node(source)
        else:
            self.skip(source)
        if not isinstance(data, dict):
            self.report.error("MESH101", "`<<` must merge a mapping", pos=_pos(mark))
            return mark
        tree.update(sub)
        for key, item in data.items():
            into.setdefault(key, item)
        return mark

    def skip(self, event: Event) -> None:
        """Read a node without building or reporting on it (its anchors still count)."""
        report, self.report = self.report, _Muted()
        muted, self.muted = self.muted, True
        try:
            self.node(event)
        finally:
            self.report, self.muted = report, muted


def load_text(text: str, file: str) -> tuple[Source | None, list[Diagnostic]]:
    """Parse YAML text; returns the Source (None when unusable) and diagnostics."""
    if not text.strip() or _only_comments(text):
        report = Reporter(file, lambda path, key=False: (1, 1))
        report.error("MESH105", "the file is empty", hint="start with `apiVersion: meshctl/v1`")
        return None, report.diagnostics
    if FLOW_FAST:
        with no_gc():
            fast = _fast(text, file)
        if fast is not None:
            return _no_surrogates(*fast, text)
    return _no_surrogates(*_load_events(text, file), text)


_SURROGATE_ESCAPE = re.compile(r"\\(?:u|U0000)[dD][89a-fA-F][0-9a-fA-F]{2}")
"""An escape that may name half of a UTF-16 surrogate pair (`"\\ud83d"`): not a character."""


def _no_surrogates(source: Source | None, diagnostics: list[Diagnostic],
                   text: str) -> tuple[Source | None, list[Diagnostic]]:
    """A loaded file whose strings hold a surrogate (from an escape like `"\\ud83d"`: YAML's
    characters exclude them, and no UTF-8 text or plan can hold one) is a MESH101 at that string."""
    if source is None or not _SURROGATE_ESCAPE.search(text):
        return source, diagnostics
    found = _surrogate_at(source.data, ())
    if found is None:  # (the escape was in a comment or a single-quoted string: text, no surrogate)
        return source, diagnostics
    path, key = found
    line = source.map.locate(path, key)[0]
    escape = _SURROGATE_ESCAPE.search(text.split("\n")[line - 1]) if 0 < line <= text.count("\n") + 1 else None
    report = Reporter(source.file, source.map.locate)
    report.error("MESH101", f"a string holds half of a UTF-16 surrogate pair ({escape.group() if escape else 'an escape'}), "
                 "not a character", path=path, key=key,
                 hint="write the character itself, or one 8-digit escape such as \\U0001F600")
    return None, [*diagnostics, *report.diagnostics]


def _surrogate_at(value: Any, path: tuple[Any, ...]) -> tuple[tuple[Any, ...], bool] | None:
    """(the path of the first string in `value` that holds a surrogate, whether it is a key), or None."""
    if type(value) is str:
        return (path, False) if any("\ud800" <= c <= "\udfff" for c in value) else None
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is str and _surrogate_at(key, ()) is not None:
                return (*path, key), True
            found = _surrogate_at(item, (*path, key))
            if found is not None:
                return found
    elif type(value) is list:
        for i, item in enumerate(value):
            found = _surrogate_at(item, (*path, i))
            if found is not None:
                return found
    return None


def _load_events(text: str, file: str) -> tuple[Source | None, list[Diagnostic]]:
    """load_text by the parser's events alone."""
    report = Reporter(file, lambda path, key=False: (1, 1))
    loaders = [yaml.SafeLoader] if _FAST_LOADER is None else [_FAST_LOADER, yaml.SafeLoader]
    for loader in loaders:
        report.diagnostics = []
        try:
            with no_gc():
                built = _Builder(loader(text), report).document()
            break
        except _TooDeep as deep:
            report.diagnostics = []
            report.error("MESH107", f"the document nests deeper than {MAX_DEPTH} levels",
                         pos=_pos(deep.mark),
                         hint=f"meshctl reads at most {MAX_DEPTH} levels; a mesh.yaml needs only a few")
            return None, report.diagnostics
        except yaml.YAMLError as err:
            error = err  # libyaml's wording differs: the pure-Python parser says it again
    else:
        report.diagnostics = []
        _syntax_error(error, text, report)
        return None, report.diagnostics
    if built is None:
        report.error("MESH105", "the file is empty", hint="start with `apiVersion: meshctl/v1`")
        return None, report.diagnostics
    data, root = built
    return Source(file, text, data, SourceMap(root)), report.diagnostics


def load_bytes(raw: bytes, file: str) -> tuple[Source | None, list[Diagnostic]]:
    """Decode UTF-8 (a BOM is allowed) and parse; undecodable bytes are a diagnostic."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        col = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        msg = f"the file is not UTF-8 text (byte 0x{raw[err.start]:02x})"
        return None, [Diagnostic("MESH104", "error", msg, file, line, col)]
    return load_text(text, file)


def _syntax_error(err: yaml.YAMLError, text: str, report: Reporter) -> None:
    """Report a YAML error at its mark; tabs in indentation get their own code."""
    if isinstance(err, yaml.reader.ReaderError):
        where = _line_col(text, err.position)
        report.error("MESH101", f"invalid character {chr(err.character)!r} in the file", pos=where)
        return
    problem = getattr(err, "problem", None) or "invalid YAML"
    tabs = [(n, ln.index("\t") + 1) for n, ln in enumerate(text.splitlines(), 1)
            if "\t" in ln[: len(ln) - len(ln.lstrip(" \t"))] and not ln.strip().startswith("#")]
    if "'\\t'" in problem and tabs:
        for where in tabs:
            report.error("MESH103", "tab character used for indentation", pos=where,
                         hint="indent with spaces")
        return
    mark = getattr(err, "problem_mark", None)
    where = (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)
    context = getattr(err, "context", None)
    context_mark = getattr(err, "context_mark", None)
    hint = None
    if context and context_mark is not None and context_mark.line + 1 != where[0]:
        hint = f"{context.removeprefix('while ')} that began at line {context_mark.line + 1}"
    report.error("MESH101", f"YAML syntax error: {problem}", pos=where, hint=hint)


def _pos(mark: Any) -> tuple[int, int]:
    return mark.line + 1, mark.column + 1


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _only_comments(text: str) -> bool:
    return all(not ln.strip() or ln.strip().startswith("#") for ln in text.splitlines())


@contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while a large, acyclic tree is built.

    Loaded data has no reference cycles, but allocating a million containers
    triggers full collections over all of them: this more than halves load time.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            # what was allocated meanwhile goes to the oldest generation unscanned: re-enabled
            # as it was, the next allocation would run one young collection over all of it
            # (0.4 s of a warm compile at 10,000 products); cycles are still collected later
            gc.freeze()
            gc.enable()
            gc.unfreeze()


def _copy(value: Any) -> Any:
    """A copy of loaded data (dicts, lists, scalars) that shares no container."""
    if type(value) is dict:
        return {k: _copy(v) for k, v in value.items()}
    if type(value) is list:
        return [_copy(v) for v in value]
    return value


# --- Fast path: block sequences of one-line flow collections -------------------------------
#
# A top-level section written as `key:` and then one flow collection per line
# (`  - {name: p0, domain: d0000, columns: [...]}`), the layout of a large generated mesh,
# is read by rewriting those lines into JSON (str.replace: a quote on each side of every
# `{ } [ ] , :`, empty pairs dropped) and json.loads; the rest of the file (the same text
# with those lines blanked) is loaded by events, as above. Each item's positions are made
# when first looked up, by loading that one line. A section is rewritten only where the
# rewrite reads what YAML reads: plain scalars of word characters and `./@+-` (no quotes,
# comments, anchors, tags), one space after `,` and `:` and nowhere else, numbers JSON
# writes alike, no duplicate key; anything else loads that section by events.

_OTHER = re.compile(r"[^\w./@+\- ,:\[\]{}\n]")
"""A character the rewrite does not take (quotes, `#`, `&`, `*`, `!`, tabs...)."""
_ODD = (re.compile(r"[:,][^ ]"), re.compile(r" [^\w./+\-\[{]"), re.compile(r"[\[{][^\w./+\-\[{\]}]"),
        re.compile(r"-(?<=[\[{ ]-)[^0-9]"))
"""What the rewrite would read otherwise than YAML: `,` or `:` without one space after it (`a:b`
is one scalar), a space or `[`, `{` before anything but a scalar or a collection (`{ a}`,
`[a ,b]`, `{, a}`, `@x`), a scalar starting with `-` (`- x`)."""
_DOUBTFUL = re.compile(r"[\[{ ]([0-9+.\-][^,:\]}\n]*|(?:[Tt]rue|TRUE|[Ff]alse|FALSE|[Nn]ull|NULL)"
                       r"(?=[,:\]}\n]))")
"""A plain scalar that may not be a string (a number, a date, a literal), or the end of one."""
_DELIMITERS = re.compile(r"[,:\[\]{}]")
_LONGEST = 1000
"""Longest scalar the rewrite takes (a key of over 1,024 characters is no simple key to YAML)."""
_LITERAL = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")
"""Numbers JSON and YAML both read, to the same value."""
_QUOTES = (("{", '"{"'), ("}", '"}"'), ("[", '"["'), ("]", '"]"'), (", ", '","'), (": ", '":"'),
           ("\n", '"\n"'))
_SECTION = re.compile(r"^([A-Za-z_][\w-]*):[ ]*\n((?:[ ]*(?:#[^\n]*)?\n|[ ]+- [\[{][^\n]*\n)+)"
                      r"(?=[^\s#-]|\Z)", re.MULTILINE)
_ITEM = re.compile(r"([ ]+)- (.*)")
_MAX_BRACKETS = MAX_DEPTH - 10
_MAX_LITERALS = 32


def _fast(text: str, file: str) -> tuple[Source | None, list[Diagnostic]] | None:
    """The load of `text` when some section is a block sequence of one-line flow items, else None."""
    scan = text if text.endswith("\n") else text + "\n"
    sections, line, at = [], 0, 0
    for match in _SECTION.finditer(scan):
        line, at = line + scan.count("\n", at, match.start()), match.start()
        got = _section(match, line)
        if got is not None:
            sections.append(got)
    if not sections:
        return None
    lines = scan.split("\n")
    for _, first, count, _ in sections:
        lines[first + 1:first + 1 + count] = [""] * count
    rest = "\n".join(lines)
    if not _block_mapping(rest):
        return None  # (in a flow mapping `- {...}` is an error, not a list: `{a: 1,\nproducts:\n  - {}}`)
    source, diagnostics = _load_events(rest, file)
    if source is None or diagnostics or type(source.data) is not dict:
        return None
    data, tree = source.data, source.map.root[2]
    for key, first, _, (values, places) in sections:
        entry = tree.get(key)
        if data.get(key, _MISSING) is not None or entry is None or _at(entry[0]) != (first + 1, 1):
            return None  # (the header was not a top-level key: say, inside a quoted string)
        data[key] = values
        tree[key] = (entry[0], [places[0][0], places[0][1]], _Items(places))
    source.text = text
    source.map.partial = True
    return source, []


def _block_mapping(text: str) -> bool:
    """Whether the document is a block mapping (its first three events say)."""
    parser = (_FAST_LOADER or yaml.SafeLoader)(text)
    try:
        parser.get_event()
        parser.get_event()
        root = parser.get_event()
    except yaml.YAMLError:
        return False
    return isinstance(root, MappingStartEvent) and root.flow_style is False


def _section(match: re.Match[str], first: int) -> tuple[str, int, int, Any] | None:
    """(key, header line, lines, (values, places)) of a section (its header on 0-based line
    `first`) the rewrite can read, else None."""
    body = match.group(2).split("\n")[:-1]
    places, texts, indent = [], [], None
    for n, line in enumerate(body):
        item = _ITEM.fullmatch(line)
        if item is None:
            continue  # (a blank or comment line)
        if indent is None:
            indent = len(item.group(1))
        text = item.group(2).rstrip(" ")
        if len(item.group(1)) != indent or text.count("{") + text.count("[") > _MAX_BRACKETS \
                or (len(text) >= _LONGEST and max(map(len, _DELIMITERS.split(text))) >= _LONGEST):
            return None
        places.append((first + 1 + n, indent, text))
        texts.append(text)
    joined = "\n".join(texts)
    if _OTHER.search(joined) or any(odd.search(joined) for odd in _ODD):
        return None
    literals = []
    for value in set(_DOUBTFUL.findall(joined)):
        reads = _plain_reads(value)
        if reads is None:
            return None
        if reads:
            literals.append(value)
    if len(literals) > _MAX_LITERALS:
        return None
    for old, new in _QUOTES:
        joined = joined.replace(old, new)
    joined = joined.replace('""', "")[1:-1]
    for value in literals:
        joined = joined.replace(f'"{value}"', value)
    try:
        values = [_DECODER.decode(line) for line in joined.split("\n")]
    except ValueError:
        return None
    return match.group(1), first, len(body), (values, places)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a duplicate key")  # (MESH102 comes from the parser)
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _plain_reads(value: str) -> bool | None:
    """How the rewrite must write a plain scalar it checks: True: as it is (a JSON number or
    literal that YAML reads alike), False: as a string, None: it cannot (YAML reads another type)."""
    tag = _RESOLVER.resolve(ScalarNode, value, (True, False))
    if value in ("true", "false", "null"):
        return True
    if _LITERAL.fullmatch(value):
        return True if tag in (INT_TAG, FLOAT_TAG) else None
    return False if tag == STR_TAG or (tag == BOOL_TAG and value.lower() not in ("true", "false")) \
        else None


class _Items(list):
    """The position entries of a fast section's items, each made when first looked up."""

    def __init__(self, places: list[tuple[int, int, str]]) -> None:
        super().__init__([None] * len(places))
        self.places = places

    def __getitem__(self, index: Any) -> Any:
        entry = super().__getitem__(index)
        if entry is None and isinstance(index, int):
            line, col, text = self.places[index]
            try:
                loader = _FAST_LOADER or yaml.SafeLoader
                built = _Builder(loader(" " * (col + 2) + text), _Muted()).document()
            except yaml.YAMLError:  # (never: the line read as JSON)
                built = None
            entry = _shifted(built[1], line) if built is not None else (None, [line, col + 2], None)
            super().__setitem__(index, entry)
        return entry


def _shifted(entry: Entry, lines: int) -> Entry:
    """An entry with its marks as 0-based [line, col] lists, `lines` further down."""
    key, mark, sub = entry
    if type(sub) is dict:
        sub = {k: _shifted(v, lines) for k, v in sub.items()}
    elif type(sub) is list:
        sub = [_shifted(v, lines) for v in sub]
    return (None if key is None else [key.line + lines, key.column], [mark.line + lines, mark.column], sub)
