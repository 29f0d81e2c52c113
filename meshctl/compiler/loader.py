"""YAML -> plain data plus a SourceMap of every node's line and column.

The parser's events (libyaml's C parser when PyYAML has it, else PyYAML's
pure-Python one) are turned into dicts, lists and scalars in one pass, so that
duplicate keys, alias cycles and every position are seen without building a
node graph first. A syntax error is worded by the pure-Python parser, as it
always was. PyYAML's own resolver and constructor decide what a scalar is.
"""

from __future__ import annotations

import gc
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

_FAST_LOADER = getattr(yaml, "CSafeLoader", None) if yaml.__with_libyaml__ else None
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
        """A scalar's value; `where` is the mark a construction error is reported at."""
        self.size += 1
        value = event.value
        if event.tag is None and event.anchor is None:
            if not event.implicit[0]:
                return value  # quoted: always a str
            if value and value[0] not in _PLAIN_STARTS:
                return value
            cached = self.cache.get(value, _MISSING)
            if cached is not _MISSING:
                return cached
        tag = event.tag
        if tag is None or tag == "!":
            tag = _RESOLVER.resolve(ScalarNode, value, event.implicit)
        node = ScalarNode(tag, value, event.start_mark, event.end_mark, event.style)
        out, ok = self.construct(node, where)
        if ok and event.tag is None:
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
        size = self.size
        self.size += 1
        nxt, append, place = self.next, out.append, tree.append
        while True:
            event = nxt()
            kind = type(event)
            if kind is SequenceEndEvent:
                break
            if kind is ScalarEvent:
                append(self.scalar(event, event.start_mark))
                place((None, event.start_mark, None))
                continue
            data, mark, sub = self.node(event)
            append(data)
            place((None, mark, sub))
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
        size = self.size
        self.size += 1
        mark = start.start_mark
        merged: dict[Any, Any] = {}
        nxt = self.next
        while True:
            event = nxt()
            kind = type(event)
            if kind is MappingEndEvent:
                break
            if kind is ScalarEvent and event.anchor is None and event.tag is None:
                if event.implicit[0] and event.value == "<<":
                    mark = self.merge(nxt(), mark, tree, merged)
                    continue
                key = self.scalar(event, mark)
                key_mark = event.start_mark
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
                out[key] = self.scalar(event, event.start_mark)
                tree[key] = (key_mark, event.start_mark, None)
                continue
            data, value_mark, sub = self.node(event)
            out[key] = data
            tree[key] = (key_mark, value_mark, sub)
        for key, value in merged.items():
            out.setdefault(key, value)
        self.close(anchor, size)
        return out, mark, tree

    def key(self, event: Event, where: Any) -> tuple[Any, Any, bool | str]:
        """A key that is not a plain scalar: (key, mark, True | False | 'merge')."""
        mark = event.start_mark
        if isinstance(event, ScalarEvent):
            tag = event.tag
            if tag is None or tag == "!":
                tag = _RESOLVER.resolve(ScalarNode, event.value, event.implicit)
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
    report = Reporter(file, lambda path, key=False: (1, 1))
    if not text.strip() or _only_comments(text):
        report.error("MESH105", "the file is empty", hint="start with `apiVersion: meshctl/v1`")
        return None, report.diagnostics
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
