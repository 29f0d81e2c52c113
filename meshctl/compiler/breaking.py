"""Breaking-change classification between two specs: what `meshctl diff` reports.

Every change of a contract, product, policy, grant, model or analysis is a
Finding with a stable rule id (`RULES`), a class (breaking, non-breaking, info)
and the position of the change: in HEAD, or in BASE for what was removed.
A change breaks when a producer or a consumer that relied on BASE can fail
under HEAD; governance changes (GOVxxx) break when HEAD protects data less.

A contract change is *covered* when the contract's major version went up;
governance changes are never covered by a version bump. Pure: specs in,
findings out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from meshctl.compiler.diagnostics import YamlPath
from meshctl.compiler.include import MeshMap
from meshctl.compiler.loader import SourceMap
from meshctl.compiler.sources import duration_s
from meshctl.compiler.spec import (
    OPERATORS,
    Analysis,
    Column,
    Contract,
    DifferentialPrivacy,
    Grant,
    MeshSpec,
    Model,
    Policy,
    Product,
    QualityRule,
    Sla,
)

Level = Literal["breaking", "non-breaking", "info"]
LEVELS: tuple[Level, ...] = ("breaking", "non-breaking", "info")


@dataclass(frozen=True)
class Rule:
    """A kind of change: its class, whether it is governance, and what it means."""

    level: Level
    title: str
    governance: bool = False


RULES: dict[str, Rule] = {
    # contracts and products: breaking for a producer or a consumer
    "BRK001": Rule("breaking", "contract column removed"),
    "BRK002": Rule("breaking", "contract column retyped"),
    "BRK003": Rule("breaking", "new required contract column, or a column made required"),
    "BRK004": Rule("breaking", "quality rule tightened (stricter threshold or arguments)"),
    "BRK005": Rule("breaking", "quality rule severity raised (e.g. warning -> error)"),
    "BRK006": Rule("breaking", "new quality rule with severity error"),
    "BRK007": Rule("breaking", "column range narrowed (or a range added)"),
    "BRK008": Rule("breaking", "category value removed"),
    "BRK009": Rule("breaking", "contract removed"),
    "BRK010": Rule("breaking", "contract purpose removed"),
    "BRK011": Rule("breaking", "SLA weakened (freshness, retention or availability)"),
    "BRK012": Rule("breaking", "category values reordered (class indices change)"),
    "BRK013": Rule("breaking", "contract column made optional"),
    "BRK020": Rule("breaking", "product removed"),
    "BRK021": Rule("breaking", "product's contract changed (other major, other or no contract)"),
    # governance: HEAD protects data less than BASE
    "GOV001": Rule("breaking", "classification downgraded (restricted > internal > public)", True),
    "GOV002": Rule("breaking", "PII flag removed or weakened (direct > indirect > none)", True),
    "GOV003": Rule("breaking", "masking weakened (drop > hash > generalize > none)", True),
    "GOV004": Rule("breaking", "residency widened (jurisdiction changed, residency policy "
                               "removed or deny -> warn)", True),
    "GOV005": Rule("breaking", "policy removed", True),
    "GOV006": Rule("breaking", "policy relaxed (deny -> exclude -> warn, `when` added or changed, "
                               "suspend_after raised or removed)", True),
    "GOV007": Rule("breaking", "policy condition or scope changed", True),
    "GOV008": Rule("breaking", "differential privacy weakened (epsilon or delta raised, "
                               "or removed)", True),
    "GOV009": Rule("breaking", "secure aggregation turned off", True),
    "GOV010": Rule("breaking", "analysis min_group_size lowered", True),
    "GOV011": Rule("breaking", "grant widened (new grant, until extended, purpose changed)", True),
    "GOV012": Rule("breaking", "product access request -> open", True),
    "GOV013": Rule("breaking", "contract purpose added (data usable for more purposes)", True),
    # non-breaking
    "NB001": Rule("non-breaking", "new optional contract column"),
    "NB002": Rule("non-breaking", "new product"),
    "NB003": Rule("non-breaking", "new policy"),
    "NB004": Rule("non-breaking", "quality rule loosened, lowered in severity or removed"),
    "NB005": Rule("non-breaking", "new contract"),
    "NB006": Rule("non-breaking", "category value added"),
    "NB007": Rule("non-breaking", "column range widened or removed"),
    "NB008": Rule("non-breaking", "new quality rule with severity warning or info"),
    "NB009": Rule("non-breaking", "SLA strengthened"),
    "NB010": Rule("non-breaking", "governance tightened (classification, PII, masking, policy, "
                                  "privacy, access, grant revoked or shortened)"),
    "NB011": Rule("non-breaking", "new model or analysis"),
    "NB012": Rule("non-breaking", "product published under a contract"),
    # info
    "INF001": Rule("info", "documentation changed (description, message, owner)"),
    "INF002": Rule("info", "contract version changed"),
    "INF003": Rule("info", "product changed (source, table, tags, non-contract columns)"),
    "INF004": Rule("info", "model or analysis removed"),
    "INF005": Rule("info", "model or analysis changed (training, participants, metrics, ...)"),
    "INF006": Rule("info", "domain or coordinator added, removed, moved or given another public key"),
    "INF007": Rule("info", "grant bookkeeping changed (requested_by, reason)"),
}
"""Every rule id, its class and meaning; docs/ci.md lists them (a test checks it)."""


@dataclass(frozen=True)
class Side:
    """One side of a diff: a spec, where its nodes are, and the file name to show."""

    spec: MeshSpec
    smap: SourceMap
    file: str


@dataclass(frozen=True)
class Finding:
    """One classified change."""

    rule: str
    subject: str
    """What changed, e.g. `contract tumor-biopsy@1`, `product charite.biopsies`."""
    message: str
    file: str
    line: int
    column: int
    covered: bool = False
    """A breaking contract change whose contract's major version went up."""

    @property
    def level(self) -> Level:
        """breaking, non-breaking or info."""
        return RULES[self.rule].level

    @property
    def governance(self) -> bool:
        """Whether this is a governance change (never covered by a version bump)."""
        return RULES[self.rule].governance

    @property
    def where(self) -> str:
        """FILE:LINE:COL."""
        return f"{self.file}:{self.line}:{self.column}"

    def blocking(self, allow_governance: bool = False) -> bool:
        """Whether this change fails the gate (exit 3)."""
        if self.level != "breaking":
            return False
        if self.governance:
            return not allow_governance
        return not self.covered


@dataclass
class _Diff:
    """Collects findings, locating each in BASE or HEAD."""

    base: Side
    head: Side
    findings: list[Finding] = field(default_factory=list)

    def add(self, rule: str, on: Literal["base", "head"], path: YamlPath, subject: str,
            message: str, covered: bool = False) -> None:
        side = self.head if on == "head" else self.base
        line, col = side.smap.locate(path)
        self.findings.append(Finding(rule, subject, message, _file_of(side, path), line, col,
                                     covered))


def _file_of(side: Side, path: YamlPath) -> str:
    """The side's file, or the included file beside it that declares `path`."""
    part = side.smap.split(path)[0] if isinstance(side.smap, MeshMap) else -1
    if part < 0:
        return side.file
    name = side.smap.parts[part].name
    head, sep, _ = side.file.rpartition("/")
    if not sep:
        head, sep, _ = side.file.rpartition(":")  # REV:mesh.yaml
    return f"{head}{sep}{name}"


def classify(base: Side, head: Side) -> list[Finding]:
    """Every change from BASE to HEAD, classified, in section order."""
    diff = _Diff(base, head)
    _mesh(diff)
    _contracts(diff)
    _products(diff)
    _policies(diff)
    _models(diff, "model", base.spec.models, head.spec.models)
    _models(diff, "analysis", base.spec.analyses, head.spec.analyses)
    _grants(diff)
    return diff.findings


def summary(findings: Iterable[Finding], allow_governance: bool = False) -> dict[str, int]:
    """Counts by class, and of blocking changes."""
    findings = list(findings)
    counts = {level: sum(f.level == level for f in findings) for level in LEVELS}
    counts["blocking"] = sum(f.blocking(allow_governance) for f in findings)
    return counts


# -- mesh, domains ---------------------------------------------------------------------


def _mesh(d: _Diff) -> None:
    old, new = d.base.spec, d.head.spec
    at = ("mesh", "coordinator", "jurisdiction")
    if old.mesh.coordinator.jurisdiction != new.mesh.coordinator.jurisdiction:
        d.add("GOV004", "head", at, "coordinator", "jurisdiction "
              f"{_show(old.mesh.coordinator.jurisdiction)} -> "
              f"{_show(new.mesh.coordinator.jurisdiction)}")
    if old.mesh.coordinator.address != new.mesh.coordinator.address:
        d.add("INF006", "head", ("mesh", "coordinator", "address"), "coordinator",
              f"address {old.mesh.coordinator.address} -> {new.mesh.coordinator.address}")
    if old.mesh.coordinator.public_key != new.mesh.coordinator.public_key:
        d.add("INF006", "head", ("mesh", "coordinator"), "coordinator",
              f"public key {_key(old.mesh.coordinator.public_key)} -> {_key(new.mesh.coordinator.public_key)}")
    if old.mesh.description != new.mesh.description:
        d.add("INF001", "head", ("mesh", "description"), "mesh", "description changed")
    before = {x.name: x for x in old.domains}
    after = {x.name: x for x in new.domains}
    for name, dom in before.items():
        if name not in after:
            d.add("INF006", "base", dom.path, f"domain {name}", "domain removed")
            continue
        now = after[name]
        if dom.jurisdiction != now.jurisdiction:
            d.add("GOV004", "head", (*now.path, "jurisdiction"), f"domain {name}",
                  f"jurisdiction {_show(dom.jurisdiction)} -> {_show(now.jurisdiction)}")
        if dom.address != now.address:
            d.add("INF006", "head", (*now.path, "address"), f"domain {name}",
                  f"address {dom.address} -> {now.address}")
        if dom.public_key != now.public_key:
            d.add("INF006", "head", now.path, f"domain {name}",
                  f"public key {_key(dom.public_key)} -> {_key(now.public_key)}")
        if (dom.owner, dom.description) != (now.owner, now.description):
            d.add("INF001", "head", now.path, f"domain {name}", "owner or description changed")
    for name, dom in after.items():
        if name not in before:
            d.add("INF006", "head", dom.path, f"domain {name}", "domain added")


def _key(public_key: str) -> str:
    """A public key as its fingerprint (sha256, first 8 hex digits, as `meshctl keys show`), or none."""
    return hashlib.sha256(public_key.encode()).hexdigest()[:8] if public_key else "none"


# -- contracts -------------------------------------------------------------------------


def _contracts(d: _Diff) -> None:
    old_names = {c.name for c in d.base.spec.contracts}
    new_names = {c.name for c in d.head.spec.contracts}
    for name in sorted(old_names | new_names, key=_order(d, "contracts")):
        pairs, removed, added = _pair_versions(
            [c for c in d.base.spec.contracts if c.name == name],
            [c for c in d.head.spec.contracts if c.name == name])
        for c in removed:
            d.add("BRK009", "base", c.path, f"contract {name}@{c.major}",
                  f"contract removed (version {c.version})")
        for c in added:
            d.add("NB005", "head", c.path, f"contract {name}@{c.major}",
                  f"new contract (version {c.version})")
        for old, new in pairs:
            _contract(d, old, new)


def _order(d: _Diff, section: str) -> Callable[[str], tuple[int, int, str]]:
    """Sort key: names in HEAD order, then names only in BASE in BASE order."""
    head = {x.name: i for i, x in enumerate(getattr(d.head.spec, section))}
    base = {x.name: i for i, x in enumerate(getattr(d.base.spec, section))}
    return lambda n: (0, head[n], n) if n in head else (1, base.get(n, 0), n)


def _pair_versions(old: list[Contract], new: list[Contract]) -> tuple[
        list[tuple[Contract, Contract]], list[Contract], list[Contract]]:
    """Pair same-name contracts: equal majors first, then the rest in version order."""
    pairs = [(o, n) for o in old for n in new if o.major == n.major]
    rest_old = sorted((o for o in old if all(o is not p[0] for p in pairs)), key=_semver)
    rest_new = sorted((n for n in new if all(n is not p[1] for p in pairs)), key=_semver)
    pairs += list(zip(rest_old, rest_new, strict=False))
    n = min(len(rest_old), len(rest_new))
    return pairs, rest_old[n:], rest_new[n:]


def _semver(c: Contract) -> tuple[int, ...]:
    return tuple(int(x) for x in c.version.split("."))


def _contract(d: _Diff, old: Contract, new: Contract) -> None:
    subject = f"contract {new.name}@{old.major}"
    covered = new.major > old.major
    if old.version != new.version:
        d.add("INF002", "head", (*new.path, "version"), subject,
              f"version {old.version} -> {new.version}")
    if old.description != new.description:
        d.add("INF001", "head", (*new.path, "description"), subject, "description changed")
    _contract_columns(d, old, new, subject, covered)
    _quality(d, old, new, subject, covered)
    for purpose in old.purposes:
        if purpose not in new.purposes:
            d.add("BRK010", "head", (*new.path, "purposes"), subject,
                  f"purpose '{purpose}' removed", covered)
    for purpose in new.purposes:
        if purpose not in old.purposes:
            d.add("GOV013", "head", (*new.path, "purposes"), subject,
                  f"purpose '{purpose}' added")
    _sla(d, old.sla, new.sla, (*new.path, "sla") if new.sla else new.path, subject, covered)


def _contract_columns(d: _Diff, old: Contract, new: Contract, subject: str,
                      covered: bool) -> None:
    before = {c.name: (i, c) for i, c in enumerate(old.columns)}
    after = {c.name: (i, c) for i, c in enumerate(new.columns)}
    for name, (i, col) in before.items():
        if name not in after:
            d.add("BRK001", "base", (*old.path, "columns", i), subject,
                  f"column '{name}' removed", covered)
    for name, (j, col) in after.items():
        at = (*new.path, "columns", j)
        if name not in before:
            if col.required:
                d.add("BRK003", "head", at, subject, f"new required column '{name}'", covered)
            else:
                d.add("NB001", "head", at, subject, f"new optional column '{name}'")
            continue
        was = before[name][1]
        if was.type != col.type:
            d.add("BRK002", "head", (*at, "type"), subject,
                  f"column '{name}' retyped {was.type} -> {col.type}", covered)
        elif col.type == "tensor" and was.shape != col.shape:  # another shape is another type
            d.add("BRK002", "head", (*at, "shape"), subject,
                  f"column '{name}' reshaped {was.shape} -> {col.shape}", covered)
        if was.required != col.required:
            rule = "BRK003" if col.required else "BRK013"
            d.add(rule, "head", at, subject,
                  f"column '{name}' made {'required' if col.required else 'optional'}", covered)
        _column(d, was, col, at, subject, covered)


def _column(d: _Diff, was: Column, col: Column, at: YamlPath, subject: str,
            covered: bool) -> None:
    """Values, range, PII, masking and docs of one column (contract or product)."""
    name = col.name
    if was.type == col.type == "category":
        gone = [v for v in was.values if v not in col.values]
        came = [v for v in col.values if v not in was.values]
        if gone:
            d.add("BRK008", "head", (*at, "values"), subject,
                  f"column '{name}': category value{_s(gone)} {_quote(gone)} removed", covered)
        if came:
            d.add("NB006", "head", (*at, "values"), subject,
                  f"column '{name}': category value{_s(came)} {_quote(came)} added")
        if not gone and not came and was.values != col.values:
            d.add("BRK012", "head", (*at, "values"), subject,
                  f"column '{name}': category values reordered", covered)
    _range(d, was, col, at, subject, covered)
    _privacy(d, was, col, at, subject)
    if was.description != col.description:
        d.add("INF001", "head", at, subject, f"column '{name}': description changed")


def _range(d: _Diff, was: Column, col: Column, at: YamlPath, subject: str,
           covered: bool) -> None:
    old, new = was.range, col.range
    if old == new:
        return
    where = (*at, "range") if new else at
    text = f"column '{col.name}': range {_show(old)} -> {_show(new)}"
    if new is not None and (old is None or new[0] > old[0] or new[1] < old[1]):
        d.add("BRK007", "head", where, subject, text, covered)
    else:
        d.add("NB007", "head", where, subject, text)


PII_STRENGTH = {"none": 0, "indirect": 1, "direct": 2}
MASKING_STRENGTH = {"none": 0, "generalize": 1, "hash": 2, "drop": 3}
CLASSIFICATION_STRENGTH = {"public": 0, "internal": 1, "restricted": 2}


def _privacy(d: _Diff, was: Column, col: Column, at: YamlPath, subject: str) -> None:
    name = col.name
    if PII_STRENGTH[col.pii] < PII_STRENGTH[was.pii]:
        d.add("GOV002", "head", (*at, "pii") if col.pii != "none" else at, subject,
              f"column '{name}': pii {was.pii} -> {col.pii}")
    elif PII_STRENGTH[col.pii] > PII_STRENGTH[was.pii]:
        d.add("NB010", "head", (*at, "pii"), subject, f"column '{name}': pii {was.pii} -> "
              f"{col.pii}")
    if was.pii != "indirect" or col.pii != "indirect":
        return
    old, new = was.masking or "drop", col.masking or "drop"
    if (old, was.generalize) == (new, col.generalize):
        return
    text = f"column '{name}': masking {_masking(was)} -> {_masking(col)}"
    weaker = MASKING_STRENGTH[new] < MASKING_STRENGTH[old] or new == old == "generalize"
    d.add("GOV003" if weaker else "NB010", "head", (*at, "masking") if col.masking else at,
          subject, text)


def _masking(col: Column) -> str:
    """The effective masking of an indirect identifier (default drop), with its form."""
    masking = col.masking or "drop"
    return f"generalize {col.generalize}" if masking == "generalize" and col.generalize \
        else masking


# -- quality rules ---------------------------------------------------------------------

SEVERITY_STRENGTH = {"info": 0, "warning": 1, "error": 2}


def _quality(d: _Diff, old: Contract, new: Contract, subject: str, covered: bool) -> None:
    before = {_rule_key(r): (i, r) for i, r in enumerate(old.quality)}
    after = {_rule_key(r): (j, r) for j, r in enumerate(new.quality)}
    for key, (i, rule) in before.items():
        if key not in after:
            d.add("NB004", "base", (*old.path, "quality", i), subject,
                  f"quality rule {_label(rule)} removed")
    for key, (j, rule) in after.items():
        at = (*new.path, "quality", j)
        if key not in before:
            level = "BRK006" if rule.severity == "error" else "NB008"
            d.add(level, "head", at, subject,
                  f"new {rule.severity} quality rule {_label(rule)}", covered and
                  level == "BRK006")
            continue
        was = before[key][1]
        if SEVERITY_STRENGTH[rule.severity] > SEVERITY_STRENGTH[was.severity]:
            d.add("BRK005", "head", (*at, "severity"), subject, f"quality rule {_label(rule)}: "
                  f"severity {was.severity} -> {rule.severity}", covered)
        elif SEVERITY_STRENGTH[rule.severity] < SEVERITY_STRENGTH[was.severity]:
            d.add("NB004", "head", (*at, "severity"), subject, f"quality rule {_label(rule)}: "
                  f"severity {was.severity} -> {rule.severity}")
        change = _strictness(was, rule)
        if change in ("tighter", "changed"):
            d.add("BRK004", "head", at, subject, f"quality rule {_label(rule)} {change}: "
                  f"{_thresholds(was)} -> {_thresholds(rule)}", covered)
        elif change == "looser":
            d.add("NB004", "head", at, subject, f"quality rule {_label(rule)} loosened: "
                  f"{_thresholds(was)} -> {_thresholds(rule)}")
        if (was.description, was.dimension) != (rule.description, rule.dimension):
            d.add("INF001", "head", at, subject, f"quality rule {_label(rule)}: description "
                  "or dimension changed")


def _rule_key(rule: QualityRule) -> str:
    """Identity of a rule across versions: its name, else what it measures."""
    if rule.name:
        return f"name:{rule.name}"
    what = rule.metric or rule.query or rule.description
    return f"{rule.type}:{rule.column or ''}:{what}"


def _label(rule: QualityRule) -> str:
    if rule.name:
        return f"'{rule.name}'"
    what = rule.metric or ("sql" if rule.query else rule.type)
    return f"{what}({rule.column})" if rule.column else what


def _thresholds(rule: QualityRule) -> str:
    parts = [f"{op} {_show(getattr(rule, op))}" for op in rule.operators()]
    for arg in ("validValues", "validRange", "missingValues", "pattern"):
        if getattr(rule, arg) is not None:
            parts.append(f"{arg} {_show(getattr(rule, arg))}")
    if rule.unit != "rows":
        parts.append(rule.unit)
    return ", ".join(parts) or "no threshold"


Strictness = Literal["same", "tighter", "looser", "changed"]


def _strictness(old: QualityRule, new: QualityRule) -> Strictness:
    """How `new` compares to `old`: tighter, looser, the same, or not comparable."""
    if old.unit != new.unit or old.operators() != new.operators() or (
            old.query != new.query) or old.pattern != new.pattern:
        return "changed"
    moves = {_operator(op, getattr(old, op), getattr(new, op)) for op in OPERATORS
             if getattr(old, op) is not None}
    moves.add(_set_move(old.validValues, new.validValues, narrower_is_tighter=True))
    moves.add(_set_move(old.missingValues, new.missingValues, narrower_is_tighter=False))
    moves.add(_interval_move(old.validRange, new.validRange, narrower_is_tighter=True))
    moves.discard("same")
    if "changed" in moves or len(moves) > 1:
        return "changed"
    return moves.pop() if moves else "same"


def _operator(op: str, old: object, new: object) -> Strictness:
    if old == new:
        return "same"
    if op in ("mustBeLessThan", "mustBeLessOrEqualTo"):
        return "tighter" if new < old else "looser"  # type: ignore[operator]
    if op in ("mustBeGreaterThan", "mustBeGreaterOrEqualTo"):
        return "tighter" if new > old else "looser"  # type: ignore[operator]
    if op == "mustBeBetween":
        return _interval_move(old, new, narrower_is_tighter=True)  # type: ignore[arg-type]
    if op == "mustNotBeBetween":
        return _interval_move(old, new, narrower_is_tighter=False)  # type: ignore[arg-type]
    return "changed"  # mustBe, mustNotBe: another value is neither tighter nor looser


def _interval_move(old: list[float] | None, new: list[float] | None,
                   narrower_is_tighter: bool) -> Strictness:
    if old == new:
        return "same"
    if old is None or new is None:
        narrower = old is None
    elif old[0] <= new[0] and new[1] <= old[1]:
        narrower = True
    elif new[0] <= old[0] and old[1] <= new[1]:
        narrower = False
    else:
        return "changed"
    return "tighter" if narrower == narrower_is_tighter else "looser"


def _set_move(old: list | None, new: list | None, narrower_is_tighter: bool) -> Strictness:
    if old == new or (old is not None and new is not None and set(old) == set(new)):
        return "same"
    if old is None or new is None:
        narrower = old is None
    elif set(new) <= set(old):
        narrower = True
    elif set(old) <= set(new):
        narrower = False
    else:
        return "changed"
    return "tighter" if narrower == narrower_is_tighter else "looser"


# -- SLA -------------------------------------------------------------------------------

def _duration(text: str | None) -> float | None:
    return duration_s(text or "")


def _percent(text: str | None) -> float | None:
    try:
        return float((text or "").strip().rstrip("%"))
    except ValueError:
        return None


def _sla(d: _Diff, old: Sla | None, new: Sla | None, at: YamlPath, subject: str,
         covered: bool) -> None:
    """Freshness (lower is stronger), retention and availability (higher is stronger)."""
    old, new = old or Sla(), new or Sla()
    checks = (("freshness", _duration, -1), ("retention", _duration, 1),
              ("availability", _percent, 1))
    for key, value, sign in checks:
        a, b = getattr(old, key), getattr(new, key)
        if a == b:
            continue
        x, y = value(a), value(b)
        weaker = (a is not None and b is None) or (
            x is not None and y is not None and (y - x) * sign < 0)
        text = f"sla {key} {_show(a)} -> {_show(b)}"
        if weaker:
            d.add("BRK011", "head", at, subject, text, covered)
        else:
            d.add("NB009", "head", at, subject, text)


# -- products --------------------------------------------------------------------------


def _products(d: _Diff) -> None:
    before = {f"{p.domain}.{p.name}": p for p in d.base.spec.products}
    after = {f"{p.domain}.{p.name}": p for p in d.head.spec.products}
    for pid, old in before.items():
        if pid not in after:
            d.add("BRK020", "base", old.path, f"product {pid}", "product removed",
                  _bumped(d, old.contract))
            continue
        _product(d, old, after[pid], f"product {pid}")
    for pid, new in after.items():
        if pid not in before:
            d.add("NB002", "head", new.path, f"product {pid}", "new product")


def _ref(ref: str | None) -> tuple[str, int | None]:
    """(`name`, major) of a `name@major` or `name@x.y.z` contract reference."""
    name, _, version = (ref or "").partition("@")
    head = version.split(".")[0]
    return name, int(head) if head.isdigit() else None


def _bumped(d: _Diff, ref: str | None) -> bool:
    """Whether HEAD declares the referenced contract with a higher major than BASE's ref."""
    name, major = _ref(ref)
    if not name:
        return False
    base_major = major if major is not None else max(
        (c.major for c in d.base.spec.contracts if c.name == name), default=0)
    return any(c.name == name and c.major > base_major for c in d.head.spec.contracts)


def _product(d: _Diff, old: Product, new: Product, subject: str) -> None:
    covered = _bumped(d, old.contract)
    if old.contract != new.contract:
        (a, am), (b, bm) = _ref(old.contract), _ref(new.contract)
        text = f"contract {old.contract or 'none'} -> {new.contract or 'none'}"
        if not a:
            d.add("NB012", "head", (*new.path, "contract"), subject, text)
        elif a != b or am != bm:
            ok = bool(b) and a == b and (bm or 0) > (am or 0) and covered
            d.add("BRK021", "head", (*new.path, "contract") if b else new.path, subject, text,
                  ok)
    if CLASSIFICATION_STRENGTH[new.classification] < CLASSIFICATION_STRENGTH[old.classification]:
        d.add("GOV001", "head", (*new.path, "classification"), subject,
              f"classification {old.classification} -> {new.classification}")
    elif new.classification != old.classification:
        d.add("NB010", "head", (*new.path, "classification"), subject,
              f"classification {old.classification} -> {new.classification}")
    if old.access != new.access:
        rule = "GOV012" if new.access == "open" else "NB010"
        d.add(rule, "head", (*new.path, "access"), subject, f"access {old.access} -> "
              f"{new.access}")
    _product_columns(d, old, new, subject)
    _sla(d, old.sla, new.sla, (*new.path, "sla") if new.sla else new.path, subject, covered)
    changed = [k for k in ("source", "table", "tags") if getattr(old, k) != getattr(new, k)]
    if changed:
        d.add("INF003", "head", (*new.path, changed[0]), subject, f"{', '.join(changed)} "
              "changed")
    if old.description != new.description:
        d.add("INF001", "head", (*new.path, "description"), subject, "description changed")


def _product_columns(d: _Diff, old: Product, new: Product, subject: str) -> None:
    """PII and masking of product columns; other column changes are the contract's business."""
    before = {c.name: c for c in old.columns}
    after = {c.name: (j, c) for j, c in enumerate(new.columns)}
    gone = [n for n in before if n not in after]
    came = [n for n in after if n not in before]
    retyped = [n for n, (_, c) in after.items() if n in before and before[n].type != c.type]
    if gone or came or retyped:
        parts = [f"-{n}" for n in gone] + [f"+{n}" for n in came] + [f"~{n}" for n in retyped]
        d.add("INF003", "head", (*new.path, "columns"), subject, f"columns {' '.join(parts)}")
    for name, (j, col) in after.items():
        if name in before:
            _privacy(d, before[name], col, (*new.path, "columns", j), subject)


# -- policies --------------------------------------------------------------------------


def _all_policies(spec: MeshSpec) -> dict[str, Policy]:
    """Global policies by name, domain-local ones as `domain/name`."""
    out = {p.name: p for p in spec.policies}
    for dom in spec.domains:
        out.update({f"{dom.name}/{p.name}": p for p in dom.policies})
    return out


def _residency(policy: Policy) -> bool:
    """A policy that decides on where data or computation is (mentions jurisdiction)."""
    return "jurisdiction" in f"{policy.when or ''} {policy.require}"


def _policies(d: _Diff) -> None:
    before, after = _all_policies(d.base.spec), _all_policies(d.head.spec)
    for name, old in before.items():
        subject = f"policy {name}"
        if name not in after:
            rule = "GOV004" if _residency(old) else "GOV005"
            d.add(rule, "base", old.path, subject, f"{'residency ' * _residency(old)}policy "
                  f"removed (effect {old.effect})")
            continue
        _policy(d, old, after[name], subject)
    for name, new in after.items():
        if name not in before:
            d.add("NB003", "head", new.path, f"policy {name}", f"new policy (effect {new.effect})")


_STRENGTH = {"warn": 0, "exclude": 1, "deny": 2}
"""A failed `require` warns, excludes one update (a round policy) or denies: each stronger."""


def _policy(d: _Diff, old: Policy, new: Policy, subject: str) -> None:
    if old.effect != new.effect:
        relaxed = _STRENGTH[new.effect] < _STRENGTH[old.effect]
        rule = ("GOV004" if _residency(old) else "GOV006") if relaxed else "NB010"
        d.add(rule, "head", (*new.path, "effect"), subject, f"effect {old.effect} -> "
              f"{new.effect}")
    if old.when != new.when:
        rule = "NB010" if new.when is None else "GOV006"
        what = "added" if old.when is None else "removed" if new.when is None else "changed"
        d.add(rule, "head", (*new.path, "when") if new.when else new.path, subject,
              f"`when` {what}: {new.when or old.when}")
    if old.suspend_after != new.suspend_after and old.effect == new.effect == "exclude":
        later = new.suspend_after is None or (old.suspend_after is not None and new.suspend_after > old.suspend_after)
        d.add("GOV006" if later else "NB010", "head", (*new.path, "suspend_after") if new.suspend_after else new.path,
              subject, f"suspend_after {old.suspend_after or 'none'} -> {new.suspend_after or 'none'}")
    if old.require != new.require or old.scope != new.scope:
        what = "require" if old.require != new.require else "scope"
        d.add("GOV007", "head", (*new.path, what), subject, f"{what} changed: "
              f"{getattr(old, what)} -> {getattr(new, what)}")
    if (old.message, old.description) != (new.message, new.description):
        d.add("INF001", "head", new.path, subject, "message or description changed")


# -- models and analyses ---------------------------------------------------------------


def _models(d: _Diff, kind: str, old_items: list[Model] | list[Analysis],
            new_items: list[Model] | list[Analysis]) -> None:
    before = {x.name: x for x in old_items}
    after = {x.name: x for x in new_items}
    for name, old in before.items():
        if name not in after:
            d.add("INF004", "base", old.path, f"{kind} {name}", f"{kind} removed")
            continue
        new = after[name]
        subject = f"{kind} {name}"
        _protections(d, old, new, subject)
        changed = [k for k in type(new).model_fields
                   if k not in ("name", "description", "privacy", "min_group_size")
                   and getattr(old, k) != getattr(new, k)]
        if changed:
            d.add("INF005", "head", (*new.path, changed[0]), subject,
                  f"{', '.join(changed)} changed")
        if old.description != new.description:
            d.add("INF001", "head", new.path, subject, "description changed")
    for name, new in after.items():
        if name not in before:
            d.add("NB011", "head", new.path, f"{kind} {name}", f"new {kind}")


def _protections(d: _Diff, old: Model | Analysis, new: Model | Analysis,
                 subject: str) -> None:
    """DP of both; secure aggregation of models; min_group_size of analyses."""
    _dp(d, old.privacy.dp, new.privacy.dp, (*new.path, "privacy"), subject)
    sec_old = getattr(old.privacy, "secure_aggregation", False)
    if sec_old and not getattr(new.privacy, "secure_aggregation", False):
        d.add("GOV009", "head", (*new.path, "privacy"), subject, "secure aggregation turned off")
    a, b = getattr(old, "min_group_size", None), getattr(new, "min_group_size", None)
    if a is not None and b is not None and a != b:
        d.add("GOV010" if b < a else "NB010", "head", (*new.path, "min_group_size"), subject,
              f"min_group_size {a} -> {b}")


def _dp(d: _Diff, old: DifferentialPrivacy | None, new: DifferentialPrivacy | None,
        at: YamlPath, subject: str) -> None:
    if old == new or old is None:
        if old is None and new is not None:
            d.add("NB010", "head", (*at, "dp"), subject, f"differential privacy added "
                  f"(epsilon {new.epsilon:g})")
        return
    if new is None:
        d.add("GOV008", "head", at, subject, f"differential privacy removed (was epsilon "
              f"{old.epsilon:g})")
        return
    for key in ("epsilon", "delta"):
        a, b = getattr(old, key), getattr(new, key)
        if b != a:
            rule = "GOV008" if b > a else "NB010"
            d.add(rule, "head", (*at, "dp", key), subject, f"dp {key} {a:g} -> {b:g}")


# -- grants ----------------------------------------------------------------------------


def _grants(d: _Diff) -> None:
    def key(g: Grant) -> str:
        return f"{g.product} -> {g.subject}"

    before = {key(g): g for g in d.base.spec.grants}
    after = {key(g): g for g in d.head.spec.grants}
    for k, old in before.items():
        if k not in after:
            d.add("NB010", "base", old.path, f"grant {k}", "grant revoked")
            continue
        new = after[k]
        if old.purpose != new.purpose:
            d.add("GOV011", "head", (*new.path, "purpose"), f"grant {k}",
                  f"purpose {old.purpose} -> {new.purpose}")
        if old.until != new.until:
            longer = new.until is None or (old.until is not None and new.until > old.until)
            d.add("GOV011" if longer else "NB010", "head", (*new.path, "until")
                  if new.until else new.path, f"grant {k}",
                  f"until {old.until or 'no expiry'} -> {new.until or 'no expiry'}")
        if (old.requested_by, old.reason) != (new.requested_by, new.reason):
            d.add("INF007", "head", new.path, f"grant {k}", "requested_by or reason changed")
    for k, new in after.items():
        if k not in before:
            until = f" until {new.until}" if new.until else " with no expiry"
            d.add("GOV011", "head", new.path, f"grant {k}",
                  f"new grant for purpose {new.purpose}{until}")


# -- rendering -------------------------------------------------------------------------


def render(findings: list[Finding], allow_governance: bool = False) -> str:
    """Findings grouped by class, aligned, then a count line (or `No changes.`)."""
    if not findings:
        return "No changes."
    width = max(len(f.where) for f in findings)
    lines: list[str] = []
    for level in LEVELS:
        group = [f for f in findings if f.level == level]
        if not group:
            continue
        lines.append(f"{level} ({len(group)}):")
        for f in group:
            lines.append(f"  {f.rule:<6}  {f.where:<{width}}  {f.subject}: {f.message}"
                         f"{_note(f, allow_governance)}")
    return "\n".join([*lines, count_line(findings, allow_governance)])


def _note(f: Finding, allow_governance: bool) -> str:
    if f.level != "breaking":
        return ""
    if f.governance:
        return "  [governance, allowed]" if allow_governance else "  [governance]"
    return "  [covered by major bump]" if f.covered else "  [needs a major version bump]"


def count_line(findings: list[Finding], allow_governance: bool = False) -> str:
    """`3 breaking (2 blocking), 1 non-breaking, 0 info.`"""
    n = summary(findings, allow_governance)
    return (f"{n['breaking']} breaking ({n['blocking']} blocking), "
            f"{n['non-breaking']} non-breaking, {n['info']} info.")


def to_json(findings: list[Finding], base: str, head: str,
            allow_governance: bool = False) -> dict[str, object]:
    """The machine-readable report of `meshctl diff --format json`."""
    return {
        "base": base, "head": head,
        "summary": summary(findings, allow_governance),
        "changes": [{"rule": f.rule, "class": f.level, "governance": f.governance,
                     "covered": f.covered, "blocking": f.blocking(allow_governance),
                     "subject": f.subject, "message": f.message, "file": f.file,
                     "line": f.line, "column": f.column} for f in findings],
    }


# -- text ------------------------------------------------------------------------------


def _s(items: list) -> str:
    return "s" if len(items) != 1 else ""


def _quote(items: list[str]) -> str:
    return ", ".join(f"'{x}'" for x in items)


def _show(value: object) -> str:
    if value is None:
        return "none"
    if value == "":
        return '""'
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)
