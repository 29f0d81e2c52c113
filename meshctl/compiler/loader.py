"""YAML -> plain data plus a SourceMap of every node's line and column.

The document is composed into YAML nodes (which keep their marks) and turned
into dicts, lists and scalars here, so that duplicate keys, alias cycles and
every position are seen. PyYAML's own constructor is used only for scalars.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from meshctl.compiler.diagnostics import Diagnostic, Reporter, YamlPath

MAX_NODES = 200_000
"""Most nodes a document may expand to through aliases (guards 'billion laughs')."""

MERGE_TAG = "tag:yaml.org,2002:merge"
BOOL_TAG = "tag:yaml.org,2002:bool"


@dataclass
class SourceMap:
    """Where each value (and each mapping key) of the document is, 1-based."""

    values: dict[YamlPath, tuple[int, int]] = field(default_factory=dict)
    keys: dict[YamlPath, tuple[int, int]] = field(default_factory=dict)

    def locate(self, path: YamlPath, key: bool = False) -> tuple[int, int]:
        """Position of `path`, or of its nearest ancestor that has one."""
        path = tuple(path)
        if key and path in self.keys:
            return self.keys[path]
        while path:
            if path in self.values:
                return self.values[path]
            path = path[:-1]
        return self.values.get((), (1, 1))


@dataclass
class Source:
    """A loaded mesh.yaml: its text, its data and where every node is."""

    file: str
    text: str
    data: Any
    map: SourceMap


class _AliasComposer(yaml.SafeLoader):
    """A loader whose aliases are shallow copies carrying the alias's own position."""

    def compose_node(self, parent: Node | None, index: Any) -> Node:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = copy.copy(super().compose_node(parent, index))
            node.start_mark = mark
            return node
        return super().compose_node(parent, index)


class _Builder:
    """Turns a node graph into data, recording positions and reporting problems."""

    def __init__(self, report: Reporter, smap: SourceMap) -> None:
        self.report = report
        self.smap = smap
        self.scalars = SafeConstructor()
        self.count = 0
        self.stopped = False

    def build(self, node: Node, path: YamlPath, active: tuple[int, ...] = ()) -> Any:
        self.count += 1
        self.smap.values[path] = _pos(node)
        if self.count > MAX_NODES or id(node.value) in active:
            if not self.stopped:
                self.stopped = True
                what = "a recursive alias" if id(node.value) in active else "too many nodes"
                self.report.error("MESH106", f"the document expands to {what}", path)
            return None
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        active = (*active, id(node.value))
        if isinstance(node, SequenceNode):
            return [self.build(item, (*path, i), active) for i, item in enumerate(node.value)]
        if isinstance(node, MappingNode):
            return self._mapping(node, path, active)
        return None

    def _scalar(self, node: ScalarNode, path: YamlPath) -> Any:
        if node.tag == BOOL_TAG and node.value.lower() not in ("true", "false"):
            return node.value  # YAML 1.2: yes/no/on/off are strings, not bools
        try:
            return self.scalars.construct_object(node, deep=True)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err)
            self.report.error("MESH101", f"cannot read this value: {problem}", path)
            return None

    def _mapping(self, node: MappingNode, path: YamlPath, active: tuple[int, ...]) -> dict:
        out: dict[Any, Any] = {}
        merged: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                self._merge(value_node, path, active, merged)
                continue
            if not isinstance(key_node, ScalarNode):
                self.report.error("MESH101", "a mapping key must be a plain value",
                                  pos=_pos(key_node))
                continue
            key = self._scalar(key_node, path)
            if not _hashable(key):
                continue
            if key in out:
                first = self.smap.keys[(*path, key)]
                self.report.error("MESH102", f"duplicate key '{key}'", pos=_pos(key_node),
                                  hint=f"first defined at line {first[0]}")
                continue
            self.smap.keys[(*path, key)] = _pos(key_node)
            out[key] = self.build(value_node, (*path, key), active)
        for key, value in merged.items():
            out.setdefault(key, value)
        return out

    def _merge(self, node: Node, path: YamlPath, active: tuple[int, ...], into: dict) -> None:
        sources = node.value if isinstance(node, SequenceNode) else [node]
        for source in sources:
            value = self.build(source, path, active) if isinstance(source, MappingNode) else None
            if not isinstance(value, dict):
                self.report.error("MESH101", "`<<` must merge a mapping", path)
                continue
            for key, item in value.items():
                into.setdefault(key, item)


def load_text(text: str, file: str) -> tuple[Source | None, list[Diagnostic]]:
    """Parse YAML text; returns the Source (None when unusable) and diagnostics."""
    smap = SourceMap()
    report = Reporter(file, lambda path, key=False: smap.locate(path, key))
    if not text.strip() or _only_comments(text):
        report.error("MESH105", "the file is empty", hint="start with `apiVersion: meshctl/v1`")
        return None, report.diagnostics
    try:
        node = yaml.compose(text, Loader=_AliasComposer)
    except yaml.YAMLError as err:
        _syntax_error(err, text, report)
        return None, report.diagnostics
    if node is None:
        report.error("MESH105", "the file is empty", hint="start with `apiVersion: meshctl/v1`")
        return None, report.diagnostics
    data = _Builder(report, smap).build(node, ())
    return Source(file, text, data, smap), report.diagnostics


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


def _pos(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _only_comments(text: str) -> bool:
    return all(not ln.strip() or ln.strip().startswith("#") for ln in text.splitlines())


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
