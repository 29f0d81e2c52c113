"""diff_plans(old, new): what a new Plan adds, changes and removes, Terraform-style.

Resources are keyed by name: domains by name, products and contracts by id,
jobs and analyses by name, grants by id, policies by `name` (`domain.name` for a
domain-local one) and policy decisions by `policy/subject`. The header (hashes,
versions) is not a resource, and neither are `mesh.yaml:LINE:COL` positions, so
a plan recompiled from a mesh.yaml whose only edit is a comment (or a moved
line) has no changes. Pure: no I/O.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from pydantic import BaseModel

from meshctl.compiler import plantext
from meshctl.compiler.entrypoint import label
from meshctl.compiler.plan import (
    Plan,
    PlanAnalysis,
    PlanArchitecture,
    PlanContract,
    PlanJob,
    PlanPolicy,
    hashed_text,
)

Action = Literal["+", "~", "-"]
T = TypeVar("T", bound=BaseModel)


@dataclass(frozen=True)
class Change:
    """One resource added (`+`), changed (`~`) or removed (`-`)."""

    action: Action
    kind: str
    """`coordinator`, `domain`, `product`, `contract`, `job`, `analysis`, `split model`,
    `grant`, `policy` or `decision`."""
    name: str
    details: tuple[str, ...] = ()
    """For `~`: what changed, e.g. `rounds 15 -> 20`; for a decision `+`/`-`: its effect."""

    def render(self) -> str:
        """`~ job malignancy: rounds 15 -> 20`, or `+ domain x`."""
        head = f"{self.action} {self.kind} {self.name}".rstrip()
        return f"{head}: {', '.join(self.details)}" if self.details else head


def diff_plans(old: Plan, new: Plan) -> list[Change]:
    """Every change from `old` to `new`: coordinator, domains, products, contracts, jobs,
    analyses, split models, grants, policies, decisions."""
    changes: list[Change] = []
    coordinator = _field_changes(old.coordinator, new.coordinator)
    if coordinator:
        changes.append(Change("~", "coordinator", "", coordinator))
    changes += _diff_named("domain", old.domains, new.domains, lambda d: d.name, _field_changes)
    changes += _diff_named("product", old.products, new.products, lambda p: p.id, _field_changes)
    changes += _diff_named("contract", old.contracts, new.contracts, lambda c: c.id,
                           _contract_changes)
    changes += _diff_named("job", old.jobs, new.jobs, lambda j: j.name, _job_changes)
    changes += _diff_named("analysis", old.analyses, new.analyses, lambda a: a.name,
                           _analysis_changes)
    changes += _diff_named("split model", old.split_models, new.split_models, lambda s: s.name,
                           _field_changes)
    changes += _diff_named("grant", old.grants, new.grants, lambda g: g.id, _field_changes,
                           show=lambda g: (f"until {g.until}",) if g.until else ())
    changes += _diff_named("policy", old.policies, new.policies, _policy_key, _field_changes,
                           show=lambda p: (p.scope,))
    changes += _diff_named("decision", old.decisions, new.decisions,
                           lambda d: f"{d.policy}/{d.subject}",
                           lambda a, b: (f"{a.effect} -> {b.effect}",) if a.effect != b.effect
                           else (), show=lambda d: (d.effect,))
    return changes


_HEADER = re.compile(r"^\[(\[?)([^\].\n]*)([^\n]*)\n", re.MULTILINE)
"""A table header line; values are one-line strings and arrays indent their items, so in
TOML that meshctl wrote no value line starts with `[`."""

_KEYS: dict[str, tuple[tuple[str, ...], Callable[..., str]]] = {
    "domains": (("name",), lambda name: name),
    "products": (("id",), lambda id_: id_),
    "contracts": (("id",), lambda id_: id_),
    "jobs": (("name",), lambda name: name),
    "analyses": (("name",), lambda name: name),
    "grants": (("id",), lambda id_: id_),
    "policies": (("name", "domain"), lambda name, domain: f"{domain}.{name}" if domain else name),
    "decisions": (("policy", "subject"), lambda policy, subject: f"{policy}/{subject}"),
    "split_models": (("name",), lambda name: name),
}
"""The fields of a resource's block that `diff_plans` keys it by (the first is the block's
first field, as meshctl writes it), and how it makes the key."""

_START = re.compile(rf"^\[\[({'|'.join(_KEYS)})\]\]\n", re.MULTILINE)
"""Where a resource's block starts."""

_STRING = r'("[^"\\\n]*(?:\\.[^"\\\n]*)*")'
"""A TOML basic string, quotes included."""

_KEY_LINES = {section: re.compile(
    rf'\[\[{section}\]\]\n{fields[0]} = {_STRING}\n'
    + "".join(rf'(?:[a-z_]+ = [^\n]*\n)*?{f} = {_STRING}\n' for f in fields[1:]))
    for section, (fields, _) in _KEYS.items()}
"""A block's key fields, read from its first lines."""


def diff_plan_texts(old: str, new: str) -> list[Change]:
    """`diff_plans` of two plans' TOML texts, parsing only what differs.

    Each text is cut into its head (everything before the first `[[...]]` header) and
    one block per resource (`[[products]]` up to the next such header). A block found
    unchanged in both texts is the same resource on both sides and adds no change, so
    it is left out of both before parsing, and the rest is diffed as plans: the changes
    are those `diff_plans` gives on the whole plans. A text laid out otherwise (not
    written by meshctl, or naming a resource twice) is parsed and diffed whole.
    ValueError when a text is not a plan.
    """
    if old == new:
        return []
    old_cut, new_cut = _kept_cuts(old, new) or (_blocks(old), _blocks(new))
    if old_cut is None or new_cut is None:
        return diff_plans(Plan.from_toml(old), Plan.from_toml(new))
    old_head, old_blocks = old_cut
    new_head, new_blocks = new_cut
    return diff_plans(_partial(old_head, old_blocks, set(new_blocks)),
                      _partial(new_head, new_blocks, set(old_blocks)))


Cut = tuple[str, list[str]] | None
"""A plan text's head and the text of each resource block, or None (not laid out as meshctl writes it)."""


def _kept_cuts(old: str, new: str) -> tuple[Cut, Cut] | None:
    """The cuts of two plan texts where they were made here from blocks (`plantext.assembly_of`:
    this process's plan, or a compile server's last texts), without cutting them; the other text
    is cut. None when neither was."""
    old_made, new_made = plantext.assembly_of(old), plantext.assembly_of(new)
    if old_made is None and new_made is None:
        return None
    if old_made is not None and new_made is not None and plantext.RESIDENT is not None:
        plantext.RESIDENT.diffs += 1
    return (old_made.cut() if old_made is not None else _blocks(old),
            new_made.cut() if new_made is not None else _blocks(new))


def _blocks(text: str) -> Cut:
    """(head, [block text]) of a plan's TOML, its `[positions]` left out (positions are
    no change); None when it is not laid out as meshctl writes it (a table outside its
    resource's block, a key not where meshctl writes it, a resource named twice)."""
    text = hashed_text(text)
    starts = [(m.start(), m.group(1)) for m in _START.finditer(text)]
    if not starts:
        return text, []
    section = None
    for array, name, rest in _HEADER.findall(text, starts[0][0]):
        if array and rest == "]]" and name in _KEYS:
            section = name
        elif name != section or not rest.startswith("."):
            return None  # a table of another section inside a resource's block
    ends = [start for start, _ in starts[1:]] + [len(text)]
    blocks = []
    seen: set[tuple[str, str]] = set()
    for (start, section), end in zip(starts, ends, strict=True):
        m = _KEY_LINES[section].match(text, start, end)
        if m is None:
            return None
        key = _KEYS[section][1](*(_unquote(raw) for raw in m.groups()))
        if (section, key) in seen:
            return None
        seen.add((section, key))
        if text.startswith("\n\n", end - 2):  # the blank line before the next block: not the block's
            end -= 1
        blocks.append(text[start:end])
    return text[:starts[0][0]], blocks


def _unquote(raw: str) -> str:
    """A TOML basic string's value."""
    if "\\" not in raw:
        return raw[1:-1]
    return tomllib.loads(f"v = {raw}")["v"]


def _partial(head: str, blocks: list[str], other: set[str]) -> Plan:
    """The plan of `head` and the blocks not in `other` (the other side's: unchanged resources)."""
    data = tomllib.loads(head)
    kept = tomllib.loads("".join(itertools.filterfalse(other.__contains__, blocks)))
    for section, items in kept.items():
        if section in data:  # a section both in the head and in blocks: not a plan we wrote
            raise ValueError(f"{section} is written twice")
        data[section] = items
    for section in _KEYS:  # every resource of a required section may be left out
        data.setdefault(section, [])
    return Plan.model_validate(data)


def render_changes(changes: Sequence[Change]) -> str:
    """One line per change, then `Plan: N to add, M to change, K to remove.` or `No changes.`"""
    if not changes:
        return "No changes."
    count = {a: sum(c.action == a for c in changes) for a in ("+", "~", "-")}
    lines = [c.render() for c in changes]
    lines.append(f"Plan: {count['+']} to add, {count['~']} to change, {count['-']} to remove.")
    return "\n".join(lines)


def _diff_named(kind: str, old: Sequence[T], new: Sequence[T],
                key: Callable[[T], str], compare: Callable[[T, T], tuple[str, ...]],
                show: Callable[[T], tuple[str, ...]] = lambda _: ()) -> list[Change]:
    """Removed and changed items in old order, then added ones in new order."""
    before = {key(x): x for x in old}
    after = {key(x): x for x in new}
    out: list[Change] = []
    for name, item in before.items():
        if name not in after:
            out.append(Change("-", kind, name, show(item)))
        elif details := compare(item, after[name]):
            out.append(Change("~", kind, name, details))
    out += [Change("+", kind, name, show(item)) for name, item in after.items()
            if name not in before]
    return out


_JOB_DETAILED = ("participants", "training", "parameters", "features", "target", "architecture")
_JOB_DERIVED = ("tensors", "reads")
"""Job fields that follow from others (shapes from the architecture, reads from participants)."""


def _job_changes(old: PlanJob, new: PlanJob) -> tuple[str, ...]:
    """Participants, training (rounds, lr, ...), parameters, features, target and
    architecture in detail; any other changed field by name."""
    out: list[str] = []
    out += _list_change("participants", old.participants, new.participants)
    out += _field_changes(old.training, new.training)
    if old.parameters != new.parameters:
        out.append(f"parameters {old.parameters:,} -> {new.parameters:,}")
    out += _list_change("features", old.features, new.features)
    if old.target != new.target:
        out.append(f"target {old.target} -> {new.target}")
    if old.architecture != new.architecture:
        out.append(f"architecture {_shape(old.architecture)} -> {_shape(new.architecture)}")
    skip = set(_JOB_DETAILED) | set(_JOB_DERIVED)
    out += [_describe(name, getattr(old, name), getattr(new, name))
            for name in PlanJob.model_fields
            if name not in skip and getattr(old, name) != getattr(new, name)]
    return tuple(out)


def _policy_key(policy: PlanPolicy) -> str:
    return f"{policy.domain}.{policy.name}" if policy.domain else policy.name


def _contract_changes(old: PlanContract, new: PlanContract) -> tuple[str, ...]:
    """Purposes in detail, quality rules by name; other fields by name."""
    out = _list_change("purposes", old.purposes, new.purposes)
    rules_old = {q.name: q.model_copy(update={"at": ""}) for q in old.quality}
    rules_new = {q.name: q.model_copy(update={"at": ""}) for q in new.quality}
    if rules_old != rules_new:
        gone = [f"-{n}" for n in rules_old if n not in rules_new]
        came = [f"+{n}" for n in rules_new if n not in rules_old]
        changed = [f"~{n}" for n in rules_old if n in rules_new and rules_old[n] != rules_new[n]]
        out.append(f"quality {' '.join(gone + came + changed)}".rstrip())
    out += [_describe(name, getattr(old, name), getattr(new, name))
            for name in ("columns", "sla") if getattr(old, name) != getattr(new, name)]
    return tuple(out)


def _analysis_changes(old: PlanAnalysis, new: PlanAnalysis) -> tuple[str, ...]:
    """Participants, group_by and metrics in detail; any other changed field by name."""
    out = _list_change("participants", old.participants, new.participants)
    out += _list_change("group_by", old.group_by, new.group_by)
    out += _list_change("metrics", [m.label for m in old.metrics],
                        [m.label for m in new.metrics])
    skip = {"participants", "group_by", "reads", "group_values", "columns"}
    if [m.label for m in old.metrics] == [m.label for m in new.metrics]:
        skip.discard("metrics")
    else:
        skip.add("metrics")
    out += [_describe(name, getattr(old, name), getattr(new, name))
            for name in PlanAnalysis.model_fields
            if name not in skip and getattr(old, name) != getattr(new, name)]
    return tuple(out)


def _shape(arch: PlanArchitecture) -> str:
    """`mlp 10-32-16-2` (layer widths from input to output); an entrypoint with its args and
    short code hash, so a changed hash is a change a reviewer sees."""
    return label(arch)


def _list_change(name: str, old: list[str], new: list[str]) -> list[str]:
    """`features -a +b`, `features reordered`, or nothing."""
    if old == new:
        return []
    gone = [f"-{x}" for x in old if x not in new]
    came = [f"+{x}" for x in new if x not in old]
    return [f"{name} {' '.join(gone + came)}" if gone or came else f"{name} reordered"]


def _field_changes(old: BaseModel, new: BaseModel) -> tuple[str, ...]:
    """`field a -> b` for each changed scalar field, `field changed` for the rest;
    positions (`at`) are not compared."""
    return tuple(_describe(name, getattr(old, name), getattr(new, name))
                 for name in type(old).model_fields
                 if name != "at" and getattr(old, name) != getattr(new, name))


def _describe(name: str, old: object, new: object) -> str:
    """`name a -> b` for scalars (empty strings as `""`), `name changed` otherwise."""
    scalars = str | int | float | bool
    if isinstance(old, scalars) and isinstance(new, scalars):
        return f"{name} {_show(old)} -> {_show(new)}"
    return f"{name} changed"


def _show(value: object) -> str:
    return '""' if value == "" else str(value)
