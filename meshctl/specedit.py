"""Edits of mesh.yaml that keep every other byte: access requests and contract imports.

ruamel.yaml's round-trip loader finds where each section and item is; the new
item is rendered by ruamel.yaml in the file's block style and spliced into the
original text, so comments, key order, anchors and hand-wrapped flow lists
elsewhere stay byte for byte (a full round-trip dump would re-wrap long flow
lists). An edit is written only if the edited file compiles with no error
that the original did not have. Editing is not compiling, so this lives
outside the pure compiler.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import yaml as pyyaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from meshctl.compiler.compile import CompileResult, compile_bytes
from meshctl.compiler.diagnostics import did_you_mean
from meshctl.compiler.include import DirFiles, Files, Included
from meshctl.compiler.odcs import Imported, OdcsError, import_contract, product_classification
from meshctl.compiler.spec import MeshSpec
from meshctl.errors import UserError

FLOW_KEYS = ("columns", "quality")
"""Lists whose items are written in flow style (`- {name: x, type: float}`) when they fit."""

FLOW_WIDTH = 88
"""Longest flow-style item; longer ones are written in block style."""


@dataclass(frozen=True)
class Section:
    """Where a top-level list is: its key line, its items' lines, its end (0-based)."""

    key_line: int
    items: list[int]
    """Line of each item's dash."""
    end: int
    """Line after the section's last content line."""
    indent: int
    """Column of the items' dashes."""
    empty_flow: bool = False
    """Written as `name: []` on the key line."""


# -- reading the structure ---------------------------------------------------------------


def load_roundtrip(text: str, file: str) -> CommentedMap:
    """The document as ruamel.yaml's round-trip tree; a one-line error if unreadable."""
    try:
        doc = YAML().load(text)
    except YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        problem = getattr(err, "problem", None) or type(err).__name__
        raise UserError(f"cannot edit: {problem}", where=where) from None
    if not isinstance(doc, CommentedMap):
        raise UserError("cannot edit: the top level is not a mapping", where=file)
    return doc


def find_section(doc: CommentedMap, lines: list[str], name: str, file: str) -> Section | None:
    """The list section `name` of the document, or None when it is absent."""
    if name not in doc:
        return None
    key_line = doc.lc.key(name)[0]
    keys = [doc.lc.key(k)[0] for k in doc]
    end = min((n for n in keys if n > key_line), default=len(lines))
    value = doc[name]
    if value is None or (isinstance(value, CommentedSeq) and not value and
                         re.search(r":\s*\[\s*\]\s*(#.*)?$", lines[key_line])):
        return Section(key_line, [], key_line + 1, 2, empty_flow=value is not None)
    if not isinstance(value, CommentedSeq):
        raise UserError(f"'{name}' must be a list to add to it", where=f"{file}:{key_line + 1}")
    if value.fa.flow_style():
        raise UserError(f"'{name}' is written as a flow list [...]; write it as a block list "
                        "(`- ...` lines) so meshctl can add to it", where=f"{file}:{key_line + 1}")
    items = [_dash_line(lines, value.lc.item(i)[0]) for i in range(len(value))]
    while end > key_line + 1 and _trailing(lines[end - 1]):
        end -= 1
    indent = len(lines[items[0]]) - len(lines[items[0]].lstrip()) if items else 2
    return Section(key_line, items, end, indent)


def _dash_line(lines: list[str], line: int) -> int:
    """The line of the `-` that starts the item whose content begins at `line`."""
    while line > 0 and not lines[line].lstrip().startswith("-"):
        line -= 1
    return line


def _trailing(line: str) -> bool:
    """Blank lines and top-level comments after a section belong to what follows."""
    return not line.strip() or line.startswith("#")


# -- rendering and splicing ----------------------------------------------------------------


def render_item(item: dict[str, Any], indent: int, comment: str | None = None) -> list[str]:
    """The block-style lines of one list item, its dash at column `indent`."""
    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    out = io.StringIO()
    yaml.dump(CommentedSeq([_commented(item)]), out)
    lines = out.getvalue().splitlines(keepends=True)
    shift = indent - 2  # ruamel puts a top-level dash at column 2 with this offset
    lines = [(" " * shift + ln) if shift >= 0 else ln[-shift:] for ln in lines]
    if comment:
        lines.insert(0, " " * indent + f"# {comment}\n")
    return lines


def _commented(value: Any, key: str | None = None) -> Any:
    """Plain data as ruamel.yaml nodes; items of FLOW_KEYS lists in flow style."""
    if isinstance(value, dict):
        node = CommentedMap((k, _commented(v, k)) for k, v in value.items())
        if key in FLOW_KEYS and len(_flow_text(value)) <= FLOW_WIDTH:
            node.fa.set_flow_style()
        return node
    if isinstance(value, list):
        seq = CommentedSeq(_commented(v, key if isinstance(v, dict) else None) for v in value)
        if all(not isinstance(v, dict | list) for v in value):
            seq.fa.set_flow_style()
        return seq
    return value


def _flow_text(value: Any) -> str:
    """`value` in YAML flow style on one line, to decide whether it fits."""
    return pyyaml.safe_dump(value, default_flow_style=True, width=10_000,
                            sort_keys=False).strip()


def append_item(text: str, name: str, item: dict[str, Any], file: str,
                comment: str | None = None) -> str:
    """`text` with `item` appended to list section `name` (created at the end if absent)."""
    doc = load_roundtrip(text, file)
    lines = text.splitlines(keepends=True)
    section = find_section(doc, lines, name, file)
    if section is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        block = ["\n", f"{name}:\n", *render_item(item, 2, comment)]
        return "".join(lines + block)
    if section.empty_flow:
        lines[section.key_line] = re.sub(r"\s*\[\s*\]", "", lines[section.key_line], count=1)
    block = render_item(item, section.indent, comment)
    if section.end > 0 and not lines[section.end - 1].endswith("\n"):
        lines[section.end - 1] += "\n"
    return "".join(lines[: section.end] + block + lines[section.end:])


def replace_item(text: str, name: str, index: int, item: dict[str, Any], file: str) -> str:
    """`text` with item `index` of list section `name` replaced by `item`."""
    doc = load_roundtrip(text, file)
    lines = text.splitlines(keepends=True)
    section = find_section(doc, lines, name, file)
    assert section is not None and index < len(section.items)
    start = section.items[index]
    stop = section.items[index + 1] if index + 1 < len(section.items) else section.end
    while stop > start + 1 and _comment_or_blank(lines[stop - 1]):
        stop -= 1  # comments above the next item stay with it
    return "".join(lines[:start] + render_item(item, section.indent) + lines[stop:])


def _comment_or_blank(line: str) -> bool:
    return not line.strip() or line.lstrip().startswith("#")


# -- checked writes -------------------------------------------------------------------------


def compile_checked(path: Path) -> tuple[str, CompileResult, MeshSpec]:
    """The text, compile result and spec of the mesh.yaml to edit; errors are one line."""
    if not path.is_file():
        raise UserError("no such file" if not path.exists() else "not a file", where=str(path))
    raw = path.read_bytes()
    result = compile_bytes(raw, path, hashed=False)  # edits read the spec, not the plan
    if result.spec is None:
        raise UserError("cannot edit a mesh.yaml that does not parse", where=str(path),
                        hint="`meshctl validate` shows why")
    return raw.decode("utf-8-sig"), result, result.spec


class _EditedFiles:
    """The files beside mesh.yaml, as they would be with one included file edited."""

    def __init__(self, base: Files, name: str, data: bytes) -> None:
        self.base, self.name, self.data = base, name, data

    def read(self, name: str) -> bytes:
        """The edited bytes for the edited file, else what is on disk."""
        return self.data if name == self.name else self.base.read(name)

    def glob(self, pattern: str) -> list[str]:
        """Matching files on disk (the edited one exists there)."""
        return self.base.glob(pattern)


def write_checked(path: Path, before: CompileResult, text: str,
                  included: Included | None = None) -> CompileResult:
    """Write `text` to `path` (or to the `included` file of the mesh at `path`) if the mesh
    compiles with no error `before` did not have."""
    if included is None:
        after = compile_bytes(text.encode(), path, hashed=False)
        target = path
    else:
        files = _EditedFiles(DirFiles(path.parent), included.name, text.encode())
        after = compile_bytes(path.read_bytes(), path, hashed=False, files=files)
        target = path.parent / included.name
    old = {(d.code, d.message) for d in before.errors}
    new = [d for d in after.errors if (d.code, d.message) not in old]
    if new:
        first = new[0]
        raise UserError(f"the edit would not compile: {first.message} [{first.code}]",
                        where=first.where, hint="nothing was written")
    tmp = target.with_name(f".{target.name}.meshctl-edit")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    return after


# -- access requests ----------------------------------------------------------------------


def request_access(path: Path, product: str, subject: str, purpose: str, *,
                   until: date | None, reason: str, by: str, today: date) -> dict[str, Any]:
    """Append a grant of `product` to `subject` (a model or analysis) to mesh.yaml.

    Checks that both exist (with did-you-mean), that the purpose is the
    subject's, that `until` is not past, and that no such grant exists yet.
    Returns the grant as written.
    """
    text, result, spec = compile_checked(path)
    where = str(path)
    products = [f"{p.domain}.{p.name}" for p in spec.products]
    if product not in products:
        raise UserError(f"unknown product '{product}'", where=where,
                        hint=did_you_mean(product, products) or "products are <domain>.<name>")
    found = next(p for p in spec.products if f"{p.domain}.{p.name}" == product)
    if found.access == "open":
        raise UserError(f"product '{product}' is `access: open`: every model and analysis may read it, "
                        "no grant is needed", where=where)
    kind, name = _subject(spec, subject, where)
    item = next(x for x in ([*spec.models, *spec.split_models] if kind == "model" else spec.analyses)
                if x.name == name)
    if item.purpose and purpose != item.purpose:
        raise UserError(f"purpose '{purpose}' is not the purpose of {kind} '{name}' "
                        f"('{item.purpose}')", where=where, hint=f"--purpose {item.purpose}")
    if until is not None and until < today:
        raise UserError(f"--until {until} is in the past", where=where)
    for g in spec.grants:
        if g.product == product and g.subject == f"{kind}:{name}" and g.purpose == purpose:
            line = result.loaded.map.locate(g.path)[0] if result.loaded else 0
            raise UserError(f"{kind} '{name}' already has a grant on '{product}' for purpose "
                            f"'{purpose}'", where=f"{where}:{line}",
                            hint="edit that grant's `until` instead")
    grant: dict[str, Any] = {"product": product, kind: name, "purpose": purpose}
    if until is not None:
        grant["until"] = until
    grant["requested_by"] = by
    if reason:
        grant["reason"] = reason
    comment = f"requested by {by} on {today.isoformat()}: merge this change to approve"
    write_checked(path, result, append_item(text, "grants", grant, where, comment))
    return grant


def _subject(spec: MeshSpec, subject: str, where: str) -> tuple[str, str]:
    """(`model` | `analysis`, name) of `NAME`, `model:NAME` or `analysis:NAME`."""
    kind, _, name = subject.rpartition(":")
    models = [m.name for m in spec.models] + [m.name for m in spec.split_models]
    analyses = [a.name for a in spec.analyses]
    found = [k for k, names in (("model", models), ("analysis", analyses))
             if name in names and kind in ("", k)]
    if not found:
        raise UserError(f"unknown model or analysis '{subject}'", where=where,
                        hint=did_you_mean(name, models + analyses)
                        or "--for names a model or an analysis of the mesh")
    if len(found) > 1:
        raise UserError(f"'{name}' is both a model and an analysis", where=where,
                        hint=f"write --for model:{name} or --for analysis:{name}")
    return found[0], name


# -- contract imports ------------------------------------------------------------------------


def import_odcs(path: Path, odcs_file: Path, *, replace: bool,
                name: str | None = None) -> tuple[str, Imported]:
    """Import the ODCS contract in `odcs_file` into the mesh.yaml at `path`.

    Returns (`added` | `replaced`, the import with its list of dropped fields).
    """
    import yaml
    from pydantic import ValidationError

    try:
        doc = yaml.safe_load(odcs_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read: {err}", where=str(odcs_file)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{odcs_file}:{mark.line + 1}:{mark.column + 1}" if mark else str(odcs_file)
        raise UserError(f"not YAML: {getattr(err, 'problem', err)}", where=where) from None
    _, _, spec = compile_checked(path)
    guess = name or (doc.get("name") if isinstance(doc, dict) else None)
    known = [c for c in spec.contracts if c.name == guess]
    classification = product_classification(spec, known[-1]) if known else None
    try:
        imported = import_contract(doc, name, classification)
    except (OdcsError, ValidationError) as err:
        first = str(err).splitlines()[0] if isinstance(err, OdcsError) else _pydantic(err)
        raise UserError(first, where=str(odcs_file)) from None
    return add_contract(path, imported.contract, replace=replace), imported


def _pydantic(err: Any) -> str:
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"])
    return f"the imported contract is not valid: {loc}: {e['msg']}"


def add_contract(path: Path, contract: dict[str, Any], *, replace: bool) -> str:
    """Add `contract` (mesh.yaml data) to the contracts of mesh.yaml; returns `added`
    or `replaced`. A contract of the same name and major is replaced only with
    `replace`."""
    text, result, spec = compile_checked(path)
    major = int(str(contract["version"]).split(".")[0])
    same = [i for i, c in enumerate(spec.contracts)
            if c.name == contract["name"] and c.major == major]
    if same and not replace:
        old = spec.contracts[same[0]]
        raise UserError(f"contract '{old.name}@{old.major}' already exists (version "
                        f"{old.version})", where=str(path),
                        hint="pass --replace to replace it, or bump the major version")
    included = None
    if same:  # replaced where it is declared: mesh.yaml or the included file that holds it
        included, (_, index) = result.declared_in(spec.contracts[same[0]].path)
        assert isinstance(index, int)
        if included is not None:
            text = included.source.text
        edited = replace_item(text, "contracts", index, contract,
                              included.label if included is not None else str(path))
    else:
        edited = append_item(text, "contracts", contract, str(path))
    write_checked(path, result, edited, included)
    return "replaced" if same else "added"
