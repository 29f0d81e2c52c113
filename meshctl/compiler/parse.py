"""Plain data -> MeshSpec, with pydantic errors turned into positioned diagnostics.

Each item of each section is validated on its own, so one broken product does
not hide the problems of the others: the result is a (possibly partial) spec of
the items that are valid, plus the names of the items that are not, so that
later stages do not report references to them as unknown.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from meshctl.compiler.diagnostics import Reporter, YamlPath, did_you_mean
from meshctl.compiler.spec import SECTIONS, MeshHeader, MeshSpec


@dataclass
class Parsed:
    """The valid part of a spec, and the names of the invalid items by section."""

    spec: MeshSpec
    broken: dict[str, set[str]] = field(default_factory=dict)
    invalid: dict[str, int] = field(default_factory=dict)
    """How many items of each section are invalid (named or not)."""
    header_ok: bool = True


def parse_spec(data: Any, report: Reporter, items: ItemMemo | None = None) -> Parsed | None:
    """Validate the loaded data; None when the top level is not a mapping.

    With `items` (a compile server's), an item whose raw data is the very object a previous
    compile validated (an unchanged file's, kept in memory) is that compile's item again."""
    if not isinstance(data, dict):
        kind = _kind(data)
        report.error("MESH201", f"the top level must be a mapping of sections, not {kind}", (),
                     hint="start with `apiVersion: meshctl/v1` and `mesh: {name: ...}`")
        return None
    header = {k: v for k, v in data.items() if k not in SECTIONS}
    header_ok = _validate(MeshSpec, header, (), data, report) is not None
    parsed = Parsed(spec=MeshSpec.model_construct(
        api_version=header.get("apiVersion"),
        mesh=_safe_header(header.get("mesh")),
    ), header_ok=header_ok)
    memo = items
    for section, item_type in SECTIONS.items():
        raws = data.get(section, [])
        if not isinstance(raws, list):
            report.error("MESH204", f"'{section}' must be a list, not {_kind(raws)}",
                         (section,), hint=f"write each {section[:-1]} as `- name: ...`")
            continue
        valid = []
        nested = "policies" in item_type.model_fields  # (a domain's; getattr on the others raises inside pydantic)
        for i, raw in enumerate(raws):
            item = memo.get(raw) if memo is not None else None
            if item is None:
                item = _validate(item_type, raw, (section, i), data, report)
                if item is not None and memo is not None:
                    memo.put(raw, item)
            if item is None:
                parsed.invalid[section] = parsed.invalid.get(section, 0) + 1
                if isinstance(raw, dict) and isinstance(raw.get("name"), str):
                    parsed.broken.setdefault(section, set()).add(raw["name"])
                continue
            item.__pydantic_private__["_path"] = (section, i)  # = item._path, without pydantic's __setattr__
            if nested:
                for j, policy in enumerate(item.policies):
                    policy.__pydantic_private__["_path"] = (section, i, "policies", j)
            valid.append(item)
        setattr(parsed.spec, section, valid)
    return parsed


class ItemMemo:
    """Validated items by the identity of their raw data, for the compiles of one process (a
    compile server's); and, by `kept`/`keep`, what later stages made from those very items.

    Only an object still held (the raw data is kept with its item) matches, and each at most once
    per compile (aliased data may repeat an object). `end()` after each compile keeps what it used."""

    def __init__(self) -> None:
        self._old: dict[int, tuple[Any, Any]] = {}
        self._new: dict[int, tuple[Any, Any]] = {}

    def get(self, raw: Any) -> Any:
        """The item validated from this very `raw` before, or None."""
        key = id(raw)
        if key in self._new:
            return None  # handed out already in this compile
        entry = self._old.get(key)
        if entry is None or entry[0] is not raw:
            return None
        self._new[key] = entry
        return entry[1]

    def put(self, raw: Any, item: Any) -> None:
        """Remember the item validated from `raw`."""
        if type(raw) is dict:
            self._new[id(raw)] = (raw, item)

    def kept(self, kind: str, *made_of: Any) -> Any:
        """What a previous compile kept (`keep`) as `kind` from these very objects, or None."""
        key = (kind, *map(id, made_of))  # (as many ids as objects: the zip below is strict)
        entry = self._old.get(key) or self._new.get(key)
        if entry is None:
            return None
        for a, b in zip(entry[0], made_of):  # (a loop, not any(): 22,000 calls)
            if a is not b:
                return None
        self._new[key] = entry
        return entry[1]

    def keep(self, kind: str, made_of: tuple[Any, ...], value: Any) -> None:
        """Keep `value`, made from exactly `made_of` (a check's "nothing to report", a plan object)."""
        self._new[(kind, *map(id, made_of))] = (made_of, value)

    def table(self, kind: str) -> tuple[dict[int, Any], dict[int, Any]]:
        """The entries of `kind` the previous compile kept, and the dict this compile keeps its own
        in (what it does not put there is dropped at `end()`): for a caller that looks up many
        items by the id of one object the entry holds (and checks it is that object)."""
        key = ("table", kind)
        new = self._new.get(key)
        if new is None:
            new = self._new[key] = ((), {})
        return self._old.get(key, ((), {}))[1], new[1]

    def same(self, kind: str, value: Any) -> Any:
        """The object a previous compile gave for a value equal to `value`, else `value` (kept now):
        one object for equal values, for `kept` keys that need a value, not an object."""
        key = (kind,)
        entry = self._new.get(key) or self._old.get(key)
        if entry is None or type(entry[1]) is not type(value) or entry[1] != value:
            entry = ((), value)
        self._new[key] = entry
        return entry[1]

    def end(self) -> None:
        """A compile ended: keep only what it used."""
        self._old, self._new = self._new, {}


def _safe_header(raw: Any) -> MeshHeader | None:
    try:
        return MeshHeader.model_validate(raw)
    except ValidationError:
        return None


def _validate(cls: type[BaseModel], raw: Any, prefix: YamlPath, root: Any,
              report: Reporter) -> Any:
    """`cls.model_validate(raw)`, reporting every error at its position."""
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        errors = _collapse_unions(err.errors(), prefix, root)
        for error, path, missing in errors:
            _report_error(cls, error, prefix, path, missing, report)
        return None


def _collapse_unions(errors: list[Any], prefix: YamlPath, root: Any) -> list[tuple]:
    """(error, data path, missing key) per error; of a union's branches keep the deepest."""
    chosen: dict[YamlPath, tuple] = {}
    plain = []
    for error in errors:
        path, missing, tagged_at = _data_path(error, prefix, root)
        entry = (error, path, missing)
        if tagged_at is None:
            plain.append(entry)
        elif tagged_at not in chosen or len(error["loc"]) > len(chosen[tagged_at][0]["loc"]):
            chosen[tagged_at] = entry
    return plain + list(chosen.values())


def _data_path(error: Any, prefix: YamlPath, root: Any) -> tuple[YamlPath, Any, YamlPath | None]:
    """Split a pydantic loc into the path in the data, a missing key, and a union tag's place."""
    node, path, tagged_at = root, list(prefix), None
    for p in prefix:
        node = node[p]
    loc = error["loc"]
    for n, el in enumerate(loc):
        if isinstance(node, dict) and el in node or isinstance(node, list) and isinstance(el, int) and 0 <= el < len(node):
            node, path = node[el], [*path, el]
        elif n == len(loc) - 1 and error["type"] == "missing":
            return tuple(path), el, tagged_at
        elif tagged_at is None:
            tagged_at = tuple(path)
    return tuple(path), None, tagged_at


def _report_error(cls: type[BaseModel], error: Any, prefix: YamlPath, path: YamlPath,
                  missing: Any, report: Reporter) -> None:
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    where = _dotted(path) or "the top level"
    if kind == "missing":
        report.error("MESH203", f"missing required key '{missing}' in {where}", path)
    elif kind == "extra_forbidden":
        allowed = _fields_at(cls, path[len(prefix):-1])
        report.error("MESH202", f"unknown key '{path[-1]}' in {where.rsplit('.', 1)[0]}"
                     if len(path) > 1 else f"unknown key '{path[-1]}' at the top level",
                     path, key=True, hint=did_you_mean(path[-1], allowed) or
                     (f"allowed keys: {', '.join(allowed)}" if allowed else None))
    elif path == ("apiVersion",):
        report.error("MESH205", f"apiVersion must be 'meshctl/v1', not {_yaml(value)}", path,
                     hint="write `apiVersion: meshctl/v1`")
    elif path and path[-1] == "pii" and kind == "literal_error":
        report.error("MESH207", f"pii must be 'direct', 'indirect' or 'none', not {_yaml(value)}",
                     path, hint="direct: identifies a person by itself (a name, an MRN); "
                                "indirect: together with other data (a birth date)")
    elif kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        report.error("MESH206", f"{_yaml(value)} is not a valid value for {where}: expected "
                     f"{ctx.get('expected', '')}", path, hint=did_you_mean(value, allowed))
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        report.error("MESH204", f"{where} must be a mapping, not {_kind(value)}", path)
    else:
        message = error["msg"][0].lower() + error["msg"][1:]
        got = f" (got {_kind(value)} {_yaml(value)})" if _short(value) else ""
        report.error("MESH204", f"{where}: {message}{got}", path, hint=_hint(kind, value))


def _hint(kind: str, value: Any) -> str | None:
    if kind == "string_type" and _short(value):
        return "quote it to make it a string"
    if isinstance(value, str) and value.count("(") > value.count(")"):
        return "a comma inside [a, b] splits the value: quote the call, e.g. \"quantile(age, " \
               "0.5)\", or write the list one `- item` per line"
    return None


def _fields_at(cls: type[BaseModel], rel: YamlPath) -> list[str]:
    """The keys allowed at `rel` below `cls` (by alias), or [] when unknown."""
    current: Any = cls
    for el in rel:
        current = _unwrap(current)
        if isinstance(el, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        fields = {f.alias or name: f for name, f in current.model_fields.items()}
        if el not in fields:
            return []
        current = fields[el].annotation
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or name for name, f in current.model_fields.items()]
    return []


def _unwrap(tp: Any) -> Any:
    """The BaseModel inside list[X], X | None and similar, else tp itself."""
    for arg in typing.get_args(tp) if typing.get_origin(tp) in (list, typing.Union,
                                                                 types.UnionType) else ():
        inner = _unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return tp


def _dotted(path: YamlPath) -> str:
    out = ""
    for el in path:
        out += f"[{el}]" if isinstance(el, int) else (f".{el}" if out else str(el))
    return out


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a bool",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _yaml(value: Any) -> str:
    """A scalar as YAML would show it: true, null, 'text', 3."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value)


def _short(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) and len(repr(value)) <= 40
