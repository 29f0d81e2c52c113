"""A plan's TOML text made from one block per resource, and the blocks a compile server keeps.

`tomlwrite.dumps` of a whole plan's data is what `Plan.to_toml` gives; this module makes the
same bytes from each top-level resource's own text (its `[[products]]` block, or its inline
table when every table of its section fits 100 characters, tomli-w's rule). A resource's text
depends only on the resource object (a decision's also on whether its position is its policy's),
so a compile server, whose unchanged files give the same plan objects compile after compile
(`parse.ItemMemo.kept`, the decisions `ResidentMemo` replays), keeps each object's text by the
object's identity (holding the object, so that its id is not reused) and makes only the text of
what changed. `[positions]` is made from the objects on each compile (a few thousand strings).

The kept assemblies also give `meshctl plan`'s diff its blocks without cutting the texts: when
the previous plan file holds the text the server made last (`cut_of`), both sides' blocks are
known (plandiff.diff_plan_texts).
"""

from __future__ import annotations

import hashlib
import operator
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from meshctl.compiler import tomlwrite


class Plan(Protocol):
    """What this module reads of a `meshctl.compiler.plan.Plan` (which imports this module, so
    it is not imported here: no import cycle, not even a typing-only one)."""

    model_fields: ClassVar[dict[str, Any]]
    policies: list[Any]
    grants: list[Any]
    contracts: list[Any]

_KEYS: dict[str, Any] = {
    "domains": lambda r: r.name,
    "products": lambda r: r.id,
    "contracts": lambda r: r.id,
    "jobs": lambda r: r.name,
    "analyses": lambda r: r.name,
    "grants": lambda r: r.id,
    "policies": lambda r: f"{r.domain}.{r.name}" if r.domain else r.name,
    "decisions": lambda r: f"{r.policy}/{r.subject}",
    "split_models": lambda r: r.name,
}
"""How plandiff keys each section's resources (plandiff._KEYS, from the objects)."""


class _Text:
    """One resource's text: its inline table (when asked, and whether it fits) and its block."""

    __slots__ = ("block", "fits", "inline", "item", "key", "variant")

    def __init__(self, item: Any, variant: bool) -> None:
        self.item = item
        """The resource object (held: its id keys this entry)."""
        self.variant = variant
        """A decision: whether its `at` is left out (its policy's); else False."""
        self.key = ""
        """Its name as plandiff keys it (made when a diff asks: `Made.unique`)."""
        self.fits: bool | None = None
        self.inline = ""
        self.block = ""


class Assembly:
    """A hashed plan's text made from blocks, and its cut as plandiff cuts a text (without cutting it)."""

    def __init__(self, text: str, head: str, made: Made) -> None:
        self.text = text
        """The whole text (hash filled in, `[positions]` included)."""
        self.head = head
        """Everything before the first resource block (`[plan]`, `[coordinator]`, inline sections)."""
        self.made = made
        self._cut: tuple[str, list[str]] | None | bool = False

    def cut(self) -> tuple[str, list[str]] | None:
        """(head, the text of each resource block) as plandiff._blocks gives them; None when a
        resource is named twice (the diff is whole)."""
        if self._cut is False:
            self._cut = (self.head, self.made.blocks) if self.made.unique() else None
        return self._cut  # type: ignore[return-value]


class _Maker:
    """Makes the texts of one plan; `kept` maps id(resource) to its _Text of an earlier plan."""

    def __init__(self, kept: dict[int, _Text]) -> None:
        self.kept = kept
        self.used: dict[int, _Text] = {}
        self.new = 0
        """How many resources' texts were made (not kept)."""
        self.writer = tomlwrite._Writer()
        self.columns: dict[int, dict[str, Any]] = {}
        """Each PlanColumn object's dumped dict, one per object (the writer formats it once)."""
        self.alive: list[dict[str, Any]] = []
        """Every dict dumped: the writer keeps texts by id(dict), so none may go while it writes."""

    def texts(self, section: str, items: list[Any], variant: Any, recheck: bool) -> list[_Text]:
        """Each item's kept text, or a new (empty) one. A kept entry holds its item, so an item whose
        id is kept is that very item; its text is reused unless `recheck` and its `variant(item)`
        (a decision: whether its position is its policy's) changed."""
        ids = list(map(id, items))
        if not self.kept:  # a cold compile
            entries = [_Text(item, variant(item)) for item in items]
            self.new += len(entries)
            self.used.update(zip(ids, entries))
            return entries
        entries = list(map(self.kept.get, ids))  # (C loops: 100,000 decisions)
        if recheck:
            for i, (item, entry) in enumerate(zip(items, entries, strict=True)):
                if entry is not None and entry.variant is not variant(item):
                    entries[i] = None
        i = 0
        while True:  # each new item (few when kept), found by a C loop
            try:
                i = entries.index(None, i)
            except ValueError:
                break
            item = items[i]
            entries[i] = _Text(item, variant(item))
            self.new += 1
            i += 1
        self.used.update(zip(ids, entries))
        return entries

    def data(self, section: str, item: Any, variant: bool) -> dict[str, Any]:
        """The resource as `Plan._texts` dumps it: positions out, columns shared."""
        if section == "decisions":
            data = item.__dict__.copy()  # all str (as dumped)
            if variant:
                data.pop("at", None)
            self.alive.append(data)
            return data
        data = item.model_dump(mode="json", exclude_none=True)
        self.alive.append(data)
        if section in ("policies", "grants"):
            data.pop("at", None)
        elif section == "contracts":
            for rule in data.get("quality", ()):
                rule.pop("at", None)
        if "columns" in data and section in ("products", "contracts"):
            shared = self.columns
            data["columns"] = [shared.setdefault(id(c), d) for c, d in zip(item.columns, data["columns"],
                                                                            strict=True)]
        return data

    def fits(self, section: str, entry: _Text) -> bool:
        if entry.fits is None:
            entry.inline = self.writer.inline_table(self.data(section, entry.item, entry.variant))
            entry.fits = len(entry.inline) + len(tomlwrite.INDENT) + 1 <= tomlwrite.MAX_LINE_LENGTH \
                and "\n" not in entry.inline
        return entry.fits

    def block(self, section: str, entry: _Text) -> str:
        if not entry.block:
            if section == "decisions":
                entry.block = self.decision(entry.item, entry.variant)
                if entry.block:
                    return entry.block
            out: list[str] = []
            self.writer.table(self.data(section, entry.item, entry.variant), section, True, out)
            entry.block = "".join(out)
        return entry.block

    def decision(self, decision: Any, drop_at: bool) -> str:
        """A decision's block as the writer makes it (every value a str: one line each, in field
        order), 2.5 times faster; "" for a decision of another shape (the writer makes it)."""
        fields = decision.__dict__
        if tuple(fields) != _DECISION:
            return ""
        policy, scope, subject, effect, reason, at = fields.values()
        if not str is type(policy) is type(scope) is type(subject) is type(effect) is type(reason) is type(at):
            return ""
        known, string = self.writer.strings.get, self.writer.string
        text = (f"[[decisions]]\npolicy = {known(policy) or string(policy)}\nscope = {known(scope) or string(scope)}"
                f"\nsubject = {known(subject) or string(subject)}\neffect = {known(effect) or string(effect)}"
                f"\nreason = {known(reason) or string(reason)}\n")
        return text if drop_at else f"{text}at = {known(at) or string(at)}\n"


_DECISION = ("policy", "scope", "subject", "effect", "reason", "at")
"""PlanDecision's fields, in order (a decision's `__dict__` of another shape goes through the writer)."""


@dataclass
class Made:
    """A plan's text in parts: `head + rest() + positions` is `"".join(plan._texts())`."""

    head: str
    """Everything before the first resource block: inline sections, `[plan]`, `[coordinator]`."""
    blocks: list[str]
    """The text of each resource block (`[[products]]` ...), without the blank line before it."""
    positions: str
    """The `[positions]` table after a blank line, or ""."""
    used: dict[int, _Text]
    """The resources' texts, by id of the resource, for the next assembly."""
    sections: list[tuple[str, list[_Text]]]
    """The texts of each section written as blocks."""
    of_policy: dict[str, str]
    """Each policy's position, by its label (a decision's text depends on it)."""
    new: int
    """How many resources' texts were made, not kept."""

    def rest(self) -> str:
        """The blocks, each after a blank line."""
        return "\n".join(["", *self.blocks]) if self.blocks else ""

    def unique(self) -> bool:
        """No resource block is named twice in its section (plandiff keys blocks by name)."""
        for section, entries in self.sections:
            if section not in _KEYS:  # (plandiff cuts no such block: the diff is whole)
                return False
            keys = list(map(_KEY, entries))
            i = 0
            while True:  # the names not asked for before
                try:
                    i = keys.index("", i)
                except ValueError:
                    break
                entry = entries[i]
                entry.key = keys[i] = _KEYS[section](entry.item)
                i += 1
            if len(set(keys)) != len(keys):
                return False
        return True


def assemble(plan: Plan, previous: Made | None = None) -> Made:
    """The text of a format-2 plan, made per resource; `previous`: an earlier assembly, whose texts
    are reused for the very same objects."""
    from meshctl.compiler.loader import no_gc

    with no_gc():
        maker = _Maker(previous.used if previous is not None else {})
        of_policy = {(f"{p.domain}.{p.name}" if p.domain else p.name): p.at for p in plan.policies}
        recheck = previous is not None and previous.of_policy != of_policy
        literals: list[str] = []
        tables: list[str] = []
        blocks: list[str] = []
        sections: list[tuple[str, list[_Text]]] = []
        for name in type(plan).model_fields:
            value = getattr(plan, name)
            if value is None:
                continue  # (exclude_none)
            if not isinstance(value, list):  # plan, coordinator: small tables, made each time
                if blocks:  # (the writer would put it after them: not a layout made here)
                    raise TypeError(f"plan table {name} after its resource blocks")
                out: list[str] = []
                maker.writer.table(value.model_dump(mode="json", exclude_none=True), name, False, out)
                tables.append("".join(out))
                continue
            if not value:
                continue  # empty sections are left out
            if name == "decisions":  # its `at` is left out when it is its policy's
                entries = maker.texts(name, value, lambda d: d.at == of_policy.get(d.policy, ""), recheck)
            else:
                entries = maker.texts(name, value, _no_variant, False)
            if all(maker.fits(name, e) for e in entries):  # tomli-w: an inline array of inline tables
                items = "".join(f"{tomlwrite.INDENT}{e.inline},\n" for e in entries)
                literals.append(f"{maker.writer.prefix(name)}[\n{items}]\n")
                continue
            texts = list(map(_BLOCK, entries))
            i = 0
            while True:  # each text not made before
                try:
                    i = texts.index("", i)
                except ValueError:
                    break
                texts[i] = maker.block(name, entries[i])
                i += 1
            blocks += texts
            sections.append((name, entries))
        head = "".join(literals + [("\n" if literals or i else "") + t for i, t in enumerate(tables)])
        return Made(head, blocks, _positions(plan), maker.used, sections, of_policy, maker.new)


def _no_variant(item: Any) -> bool:
    return False


_BLOCK = operator.attrgetter("block")
_KEY = operator.attrgetter("key")


def _positions(plan: Plan) -> str:
    """The `[positions]` table of `plan` (plan._take_positions, from the objects), after a blank line."""
    positions: dict[str, Any] = {}
    for section in ("policies", "grants"):
        ats = [item.at for item in getattr(plan, section)]
        if any(ats):
            positions[section] = ats
    quality = [[rule.at for rule in contract.quality] for contract in plan.contracts]
    if any(any(ats) for ats in quality):
        positions["quality"] = quality
    return "\n" + tomlwrite.dumps({"positions": positions}) if positions else ""


def fill_hash(text: str, digest: str) -> str | None:
    """`text` (a plan's TOML with `hash = ""`) with the digest filled in; None when its `[plan]`
    table is not where the line is looked for (then the text is made again with the hash set)."""
    # [plan] is the first table and `hash` is its only empty-string field named so
    head, sep, tail = text.partition('\nhash = ""\n')
    if sep and head.startswith("[plan]") and "\n[" not in head:
        return f'{head}\nhash = "{digest}"\n{tail}'
    return None


def hashed(plan: Plan) -> tuple[str, Assembly | None]:
    """(the content hash of a format-2 `plan` whose hash is empty, its text with that hash filled
    in, or None), made per resource; in a compile server (RESIDENT), from the texts it keeps."""
    resident = RESIDENT
    made = assemble(plan, resident.last if resident is not None else None)
    rest = made.rest()
    digest = hashlib.sha256(made.head.encode())
    digest.update(rest.encode())
    hexdigest = f"sha256:{digest.hexdigest()}"
    head = fill_hash(made.head, hexdigest)
    if head is None:
        return hexdigest, None
    assembly = Assembly(head + rest + made.positions, head, made)
    if resident is not None:
        resident.keep(assembly)
    return hexdigest, assembly


_MADE: dict[int, Assembly] = {}
"""The assemblies of hashed plans alive in this process, by id(plan) (`own`)."""


def own(plan: Plan, assembly: Assembly) -> None:
    """Keep `assembly` as long as the hashed `plan` whose text it is lives (for `assembly_of`)."""
    _MADE[id(plan)] = assembly
    weakref.finalize(plan, _MADE.pop, id(plan), None)


def assembly_of(text: str) -> Assembly | None:
    """The assembly of a plan text made here: by this process for a plan still alive, or kept by
    the compile server (compared: a plan file edited by hand, or written by another meshctl, is none)."""
    kept = [*_MADE.values(), *(RESIDENT.made if RESIDENT is not None else ())]
    for made in kept:
        if made.text is text:
            return made
    for made in kept:
        if len(made.text) == len(text) and made.text == text:
            return made
    return None


class PlanTexts:
    """What a compile server keeps of the plans it made: each resource's text (by the object) and
    the last two texts with their blocks, for `meshctl plan`'s diff against the previous plan file."""

    def __init__(self) -> None:
        self.last: Made | None = None
        self.made: list[Assembly] = []
        self.diffs = 0
        """How many diffs took both sides' blocks from here."""

    def status(self) -> dict[str, int]:
        """What `compile-server status` says of them: texts kept, made by the last plan, diffs."""
        last = self.last
        return {"kept": len(last.used) if last else 0, "made": last.new if last else 0, "diffs": self.diffs}

    def keep(self, assembly: Assembly) -> None:
        self.last = assembly.made
        self.made = [*self.made[-1:], assembly]


RESIDENT: PlanTexts | None = None
"""In a compile server, while it runs a command: the texts it keeps (set by server.Server.run)."""
