"""Policies as CEL: compiled once, decided per subject at compile time.

A policy's scope says what it decides on: `model` policies see `model`,
`analysis` policies `analysis`, `product` policies `product` (see the
`*_activation` functions); all of them also see `coordinator`. When `when` is
absent or true, `require` decides: true allows; false denies (an error) or, with
`effect: warn`, warns. Domain-local policies apply to models and analyses their
domain takes part in, and to their domain's products. `round` policies are
compiled (so syntax errors are reported) but decided by the runtime each round.
Every policy is carried into the plan. A CEL syntax or evaluation error is a
diagnostic, never an exception.
"""

from __future__ import annotations

import operator
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

from celpy import celtypes

from meshctl.compiler import cel
from meshctl.compiler.build import network_key
from meshctl.compiler.diagnostics import Reporter, YamlPath
from meshctl.compiler.entrypoint import architecture_facts
from meshctl.compiler.plan import (
    PlanDecision,
    PlanPolicy,
    PlanSplit,
    aggregation_settings,
    made,
    mlp_tensors,
    parameter_count,
)
from meshctl.compiler.resolve import Resolution, ResolvedAnalysis, ResolvedModel
from meshctl.compiler.spec import Contract, Domain, MeshSpec, Policy, Product
from meshctl.compiler.split import split_activation

_ENV = cel.Environment()
"""CEL compiled to Python closures (meshctl.compiler.cel); celpy parses and is the fallback."""
_PROGRAMS: dict[str, Any] = {}
"""CEL programs by source text: identical expressions (say, the same domain-local
policy in 1,000 domains) are compiled once. Programs are immutable."""
_SCOPES = ("model", "analysis", "product")


@dataclass
class CompiledPolicy:
    """A policy with its CEL programs (None where it did not compile)."""

    policy: Policy
    label: str
    """`name`, or `domain.name` for a domain-local policy."""
    domain: str | None
    when: Any
    require: Any
    at: str | None = None
    """`FILE:LINE:COL` of the policy, found on its first decision."""

    @cached_property
    def fast(self) -> tuple[Any, Any] | None:
        """The compiled functions of `when` (None when absent) and `require` over plain variables
        (meshctl.compiler.cel.Program.function), or None where one has none."""
        when = self.when.function if self.when is not None else None
        require = self.require.function
        if require is None or (self.when is not None and when is None):
            return None
        return when, require

    @cached_property
    def reason(self) -> str:
        """What its decisions say when `require` decides: the message, or the expression."""
        return self.policy.message or f"requires {self.policy.require}"

    @property
    def ok(self) -> bool:
        """Whether every expression compiled."""
        return self.require is not None and (self.policy.when is None or self.when is not None)


def compile_policies(spec: MeshSpec, report: Reporter) -> list[CompiledPolicy]:
    """Compile every global and domain-local policy once."""
    out = [_compile(p, p.name, None, report) for p in spec.policies]
    for domain in spec.domains:
        out += [_compile(p, f"{domain.name}.{p.name}", domain.name, report)
                for p in domain.policies]
    return out


def _compile(policy: Policy, label: str, domain: str | None,
             report: Reporter) -> CompiledPolicy:
    programs = []
    for key in ("when", "require"):
        source = getattr(policy, key)
        programs.append(None if source is None else
                        _program(source, (*policy.path, key), label, key, report))
    return CompiledPolicy(policy, label, domain, *programs)


def _program(source: str, at: YamlPath, label: str, key: str, report: Reporter) -> Any:
    if source in _PROGRAMS:
        return _PROGRAMS[source]
    try:
        program = _PROGRAMS[source] = _ENV.program(_ENV.compile(source))
        return program
    except Exception as err:  # noqa: BLE001 - celpy raises CELParseError, rarely lark errors
        line, col = report.locate(at)
        column = getattr(err, "column", None)
        text = _line(report, at, line)
        if isinstance(column, int) and "\n" not in source and source in text:
            col = text.index(source, col - 1) + column
        first = str(err).strip().splitlines()
        report.error("MESH412", f"CEL syntax error in `{key}` of policy '{label}'", at, pos=(line, col),
                     hint=f"near: {first[0]}" if first else None)
        return None


def _line(report: Reporter, at: YamlPath, line: int) -> str:
    lines = report.text_of(at).splitlines()
    return lines[line - 1] if 0 < line <= len(lines) else ""


@dataclass
class Subject:
    """Something a policy decides on, with the variables its CEL sees."""

    scope: str
    """model | analysis | product"""
    kind: str
    """`model`, `analysis` or `product`, as named in messages."""
    name: str
    path: tuple[str | int, ...]
    domains: frozenset[str]
    """Domains whose local policies apply."""
    data: dict[str, Any]
    """The scope's variable (`model`, `analysis` or `product`) as plain data."""


def _read(product: Product, contract: Contract, domains: dict[str, Domain]) -> dict[str, Any]:
    """One product a model or analysis reads, as policies see it."""
    owner = domains.get(product.domain)
    return {
        "id": f"{product.domain}.{product.name}", "domain": product.domain,
        "classification": product.classification, "access": product.access,
        "tags": list(product.tags), "contract": contract.name,
        "contract_version": contract.version, "purposes": list(contract.purposes),
        "jurisdiction": owner.jurisdiction if owner else "",
    }


def _domains(names: list[str], domains: dict[str, Domain]) -> list[dict[str, str]]:
    return [{"name": n, "jurisdiction": domains[n].jurisdiction if n in domains else ""}
            for n in names]


def _dp(dp: Any) -> dict[str, float]:
    return {"epsilon": dp.epsilon if dp else 0.0, "delta": dp.delta if dp else 0.0,
            "clip": dp.clip if dp else 0.0}


def activation(resolved: ResolvedModel, spec: MeshSpec,
               domains: dict[str, Domain] | None = None) -> dict[str, Any]:
    """The `model` variable a policy sees, as plain data."""
    model = resolved.model
    domains = domains if domains is not None else {d.name: d for d in spec.domains}
    c = resolved.contract
    return {
        "kind": "federated", "name": model.name, "purpose": model.purpose,
        "participants": list(resolved.participants),
        "domains": _domains(resolved.participants, domains),
        "reads": [_read(p, c, domains) for p in resolved.products] + _held_out(resolved, domains),
        "features": list(resolved.features), "target": resolved.target.name,
        "architecture": (architecture_facts(resolved.network.architecture) if resolved.network is not None
                         else model.architecture.model_dump(mode="json", exclude_none=True)),
        "training": model.training.model_dump(mode="json"),
        "aggregation": aggregation_settings(model.aggregation.model_dump(mode="json")),
        "privacy": {"secure_aggregation": bool(model.privacy.secure_aggregation),
                    "dp": _dp(model.privacy.dp), "client_dp": _dp(model.privacy.client_dp)},
        "parameters": (resolved.network.parameters if resolved.network is not None
                       else parameter_count(mlp_tensors(resolved.input_width,
                                                        list(model.architecture.hidden),
                                                        len(resolved.target.values)))),
    }


def _kept_activation(resolved: ResolvedModel, spec: MeshSpec, domains: dict[str, Domain], kept: Any) -> dict[str, Any]:
    """activation(), or the very dict a compile server's previous compile made (`kept`, a parse.ItemMemo)
    from the same model, contract, target, products, their domains and the participants' domains,
    evaluation product, and equal participants, features, network (build.network_key), input width and
    task: all it reads.
    The same dict again is what lets the server's memo reuse its `repr` (server.ResidentMemo)."""
    evaluation, model = resolved.evaluation, resolved.model
    made_of = (model, resolved.contract, resolved.target, evaluation, resolved.evaluation_contract,
               domains.get(evaluation.domain) if evaluation is not None else None,
               *resolved.products, *[domains.get(p.domain) for p in resolved.products],
               *[domains.get(n) for n in resolved.participants])
    values = (resolved.participants, resolved.features, network_key(resolved), resolved.input_width, resolved.task)
    old, new = kept.table("model variables")  # (by the model's id: a key of 30 ids costs more than the check)
    entry = new.get(id(model)) or old.get(id(model))
    if entry is None or len(entry[0]) != len(made_of) or not all(map(operator.is_, entry[0], made_of)) \
            or entry[1] != values:
        entry = (made_of, values, activation(resolved, spec, domains))
    new[id(model)] = entry
    return entry[2]


def _held_out(resolved: ResolvedModel, domains: dict[str, Domain]) -> list[dict[str, Any]]:
    """The model's evaluation product as a read (it is one; its domain reads it), or nothing."""
    product = resolved.evaluation
    if product is None:
        return []
    if resolved.evaluation_contract is not None:
        return [_read(product, resolved.evaluation_contract, domains)]
    owner = domains.get(product.domain)
    return [{"id": f"{product.domain}.{product.name}", "domain": product.domain,
             "classification": product.classification, "access": product.access, "tags": list(product.tags),
             "contract": "", "contract_version": "", "purposes": [],
             "jurisdiction": owner.jurisdiction if owner else ""}]


def split_model_activation(split: PlanSplit, resolution: Resolution, spec: MeshSpec,
                           domains: dict[str, Domain]) -> dict[str, Any]:
    """The `model` variable a policy sees of a split model (meshctl.compiler.split.split_activation);
    `reads` are its parts' products, as a federated model's are."""
    products = {f"{p.domain}.{p.name}": p for p in spec.products}
    reads = []
    for part in split.parts:
        product = products[part.product]
        contract = resolution.contracts.get(id(product))
        owner = domains.get(product.domain)
        reads.append(_read(product, contract, domains) if contract is not None else {
            "id": part.product, "domain": product.domain, "classification": product.classification,
            "access": product.access, "tags": list(product.tags), "contract": "", "contract_version": "",
            "purposes": [], "jurisdiction": owner.jurisdiction if owner else ""})
    return split_activation(split, reads, {n: d.jurisdiction for n, d in domains.items()})


def analysis_activation(resolved: ResolvedAnalysis, domains: dict[str, Domain]) -> dict[str, Any]:
    """The `analysis` variable a policy sees, as plain data."""
    analysis = resolved.analysis
    return {
        "name": analysis.name, "purpose": analysis.purpose,
        "participants": list(resolved.participants),
        "domains": _domains(resolved.participants, domains),
        "reads": [_read(p, resolved.contract, domains) for p in resolved.products],
        "group_by": [c.name for c in resolved.group_by],
        "metrics": [m.label for m, _ in resolved.metrics],
        "min_group_size": analysis.min_group_size,
        "privacy": {"dp": _dp(analysis.privacy.dp)},
    }


def product_activation(product: Product, contract: Contract | None,
                       domains: dict[str, Domain]) -> dict[str, Any]:
    """The `product` variable a policy sees, as plain data."""
    owner = domains.get(product.domain)
    return {
        "id": f"{product.domain}.{product.name}", "name": product.name,
        "domain": product.domain, "jurisdiction": owner.jurisdiction if owner else "",
        "classification": product.classification, "access": product.access,
        "tags": list(product.tags),
        "columns": [{"name": c.name, "type": c.type, "pii": c.pii,
                     "masking": c.masking or ("drop" if c.pii == "indirect" else "")}
                    for c in product.columns],
        "contract": f"{contract.name}@{contract.version}" if contract else "",
        "purposes": list(contract.purposes) if contract else [],
    }


def subjects(resolution: Resolution, spec: MeshSpec,
             scopes: Container[str] = _SCOPES, splits: Sequence[PlanSplit] = ()) -> Iterator[Subject]:
    """Every model (split models after the others), analysis and product a policy can decide on,
    in plan order (of `scopes`); `splits` are the checked split models' plan sections."""
    domains = {d.name: d for d in spec.domains}
    for r in resolution.models if "model" in scopes else ():
        yield Subject("model", "model", r.model.name, r.model.path,
                      frozenset(r.participants) | ({r.evaluation.domain} if r.evaluation else set()),
                      activation(r, spec, domains) if resolution.kept is None else
                      _kept_activation(r, spec, domains, resolution.kept))
    paths = {m.name: m.path for m in spec.split_models}
    for split in splits if "model" in scopes else ():
        yield Subject("model", "model", split.name, paths[split.name], frozenset(split.participants),
                      split_model_activation(split, resolution, spec, domains))
    for a in resolution.analyses if "analysis" in scopes else ():
        yield Subject("analysis", "analysis", a.analysis.name, a.analysis.path,
                      frozenset(a.participants), analysis_activation(a, domains))
    for p in spec.products if "product" in scopes else ():
        yield Subject("product", "product", f"{p.domain}.{p.name}", p.path,
                      frozenset([p.domain]),
                      product_activation(p, resolution.contracts.get(id(p)), domains))


def decide(policies: list[CompiledPolicy], resolution: Resolution, spec: MeshSpec,
           report: Reporter, file: str, memo: Memo | None = None,
           splits: Sequence[PlanSplit] = ()) -> list[PlanDecision]:
    """Decide every model (split models included: `splits`), analysis and product policy;
    report denials and warnings.

    With `memo` (meshctl.compiler.cache.DecisionMemo), an expression's value is taken from
    it when the same expression text saw the same variables before (same diagnostics,
    same decisions: only the evaluation is skipped).
    """
    coordinator = {"jurisdiction": spec.mesh.coordinator.jurisdiction,
                   "address": spec.mesh.coordinator.address}
    by_scope: dict[str, list[CompiledPolicy]] = {}
    for compiled in policies:
        if compiled.ok:
            by_scope.setdefault(compiled.policy.scope, []).append(compiled)
    decisions = []
    replays = getattr(memo, "replays", False)  # a compile server's memo also keeps whole decisions
    keys = {id(c): _replay_key(c, report) for c in policies if c.ok} if replays else {}
    for subject in subjects(resolution, spec, by_scope, splits):  # (no product policy: no product's variables)
        applicable = [c for c in by_scope.get(subject.scope, [])
                      if c.domain is None or c.domain in subject.domains]
        if not applicable:
            continue
        variables = _Variables(subject, coordinator)
        if memo is not None:
            variables.memo = memo.values({subject.scope: subject.data, "coordinator": coordinator})
        key: tuple | None = None
        if replays and variables.memo is not None:
            key = (variables.id, *(keys[id(c)] for c in applicable))  # (a tuple: never an expression text)
            kept = variables.memo.get(key)
            if kept is not None:
                decisions += kept
                continue
        made_here, reported = [], len(report.diagnostics)
        plain, values, sid = variables.cel().plain, variables.memo, variables.id
        for compiled in applicable:
            fast = compiled.fast if plain is not None else None
            if fast is not None:  # the common case inline: an allow, from values the compiled CEL is sure of
                when, require = fast
                try:
                    if values is not None:  # (values remembered first, as _truth takes them)
                        applies = True if when is None else _known(when, plain, values, compiled.policy.when)
                        holds = _known(require, plain, values, compiled.policy.require) if applies else None
                    else:
                        applies = True if when is None else when(plain)
                        holds = require(plain) if applies is True else None
                    if applies is True and holds is True:
                        made_here.append(_decision(compiled.label, compiled.policy.scope, sid, "allow",
                                                   compiled.reason, compiled.at or _at(compiled, report)))
                        continue
                    if applies is False:
                        made_here.append(_decision(compiled.label, compiled.policy.scope, sid, "allow",
                                                   f"does not apply: {compiled.policy.when}",
                                                   compiled.at or _at(compiled, report)))
                        continue
                except Exception:  # noqa: BLE001, S110 - an error or a doubt: _decide says what it is
                    pass
            decision = _decide(compiled, subject, variables, report, file)  # (evaluates again: the same)
            if decision is not None:
                made_here.append(decision)
        if key is not None and len(report.diagnostics) == reported:  # (diagnostics are never replayed)
            variables.memo[key] = made_here
        decisions += made_here
    return sorted(decisions, key=lambda d: (d.subject, d.policy))


def _replay_key(compiled: CompiledPolicy, report: Reporter) -> tuple:
    """Everything of a policy a decision is made of, besides the subject and its variables."""
    policy = compiled.policy
    if compiled.at is None:
        compiled.at = report.at(policy.path)
    return (compiled.label, policy.scope, policy.when, policy.require, policy.effect, policy.message,
            compiled.at)


class _Variables:
    """A subject's CEL activation, converted only if some policy needs it whole."""

    def __init__(self, subject: Subject, coordinator: Any) -> None:
        self.subject = subject
        self.coordinator = coordinator
        self._cel: dict[str, Any] | None = None
        self.what = f"{subject.kind} '{subject.name}'"
        """The subject as messages name it."""
        self.id = f"{subject.kind}.{subject.name}"
        """The subject as decisions name it."""
        self.memo: dict[str, Any] | None = None
        """Remembered values of expressions over exactly these variables, by expression text."""

    def cel(self) -> dict[str, Any]:
        """The activation: the scope variable and `coordinator`."""
        if self._cel is None:
            self._cel = cel.Activation({self.subject.scope: self.subject.data,
                                        "coordinator": self.coordinator})
        return self._cel



def _decide(compiled: CompiledPolicy, subject: Subject, variables: _Variables,
            report: Reporter, file: str) -> PlanDecision | None:
    policy = compiled.policy
    if compiled.at is None:
        compiled.at = report.at(policy.path)
    at = compiled.at
    if compiled.when is not None:
        applies = _truth(compiled, "when", compiled.when, variables, report)
        if applies is None:
            return None
        if not applies:
            return _made(compiled, variables, "allow", f"does not apply: {policy.when}")
    holds = _truth(compiled, "require", compiled.require, variables, report)
    if holds is None:
        return None
    reason = compiled.reason
    if holds:
        return _made(compiled, variables, "allow", reason)
    hint = f"policy '{compiled.label}' is declared at {at}"
    text = f"policy '{compiled.label}' {{}} {variables.what}: {reason}"
    if policy.effect == "warn":
        report.warning("MESH411", text.format("warns about"), subject.path, hint=hint)
        return _made(compiled, variables, "warn", reason)
    report.error("MESH410", text.format("denies"), subject.path, hint=hint)
    return _made(compiled, variables, "deny", reason)


def _known(function: Any, plain: dict[str, Any], values: dict[Any, Any], text: str) -> bool | None:
    """What _truth gives with a memo where it is a bool: the value remembered for `text`, else the
    compiled function's when it is sure (then remembered); None for anything else (_truth decides)."""
    value = values.get(text)
    if value is not None:
        return value if type(value) is bool else None
    try:
        value = function(plain)
    except Exception:  # noqa: BLE001 - an error or a doubt: _truth decides
        return None
    if value is True or value is False:
        values[text] = value
        return value
    return None


def _at(compiled: CompiledPolicy, report: Reporter) -> str:
    """`FILE:LINE:COL` of the policy, looked up on its first decision."""
    compiled.at = report.at(compiled.policy.path)
    return compiled.at


def _made(compiled: CompiledPolicy, variables: _Variables, effect: str, why: str) -> PlanDecision:
    return _decision(compiled.label, compiled.policy.scope, variables.id, effect, why, compiled.at)


def decision(fields: dict[str, str]) -> PlanDecision:
    """PlanDecision.model_construct(**fields) with every field given, without validating again
    (100,000 decisions at full size): plan.made."""
    return made(PlanDecision, **fields)


_FIELDS_SET = set(PlanDecision.model_fields)
_new, _set = object.__new__, object.__setattr__


def _decision(policy: str, scope: str, subject: str, effect: str, reason: str, at: str) -> PlanDecision:
    """decision() of these fields, every one a plain str built here, with less work: the same
    instance (`__dict__` in field order, every field set), made as plan.made makes it."""
    instance = _new(PlanDecision)
    _set(instance, "__dict__", {"policy": policy, "scope": scope, "subject": subject, "effect": effect,
                                "reason": reason, "at": at})
    _set(instance, "__pydantic_fields_set__", _FIELDS_SET.copy())
    _set(instance, "__pydantic_extra__", None)
    _set(instance, "__pydantic_private__", None)
    return instance


class Memo(Protocol):
    """Where decide() finds and keeps expression values (meshctl.compiler.cache.DecisionMemo)."""

    def values(self, variables: dict[str, Any]) -> dict[str, Any] | None:
        """The values remembered for exactly `variables` (filled in by the caller), or None."""
        ...


def _run(program: Any, variables: _Variables) -> Any:
    """The value of one expression; an exception is a value."""
    try:
        return program.evaluate(variables.cel())
    except Exception as err:  # noqa: BLE001 - CELEvalError, and anything celpy lets escape
        return err


def outcome(program: Any, variables: _Variables) -> bool | list[str]:
    """One expression's value as JSON can keep it: a bool, ["error", detail] or
    ["value", type, text] (what the diagnostics say of anything else)."""
    value = _run(program, variables)
    if isinstance(value, Exception):
        return ["error", str(value.args[0] if value.args else type(value).__name__)]
    if not isinstance(value, celtypes.BoolType):
        return ["value", type(value).__name__.removesuffix("Type").lower(), str(value)]
    return bool(value)


def _kept(value: Any) -> bool:
    """Whether a remembered value other than a bool is one `outcome` gives."""
    return (type(value) is list and all(type(v) is str for v in value)
            and len(value) == {"error": 2, "value": 3}.get(value[0] if value else "", 0))


def _truth(compiled: CompiledPolicy, key: str, program: Any, variables: _Variables,
           report: Reporter) -> bool | None:
    """What _evaluate gives, without its steps where the compiled CEL is certain of a bool (most
    evaluations): the value is then the one `outcome` would give."""
    memo = variables.memo
    text = getattr(compiled.policy, key)
    if memo is None or text not in memo:
        value = program.truth(variables.cel())
        if value is not None:
            if memo is not None:
                memo[text] = value
            return value
    return _evaluate(compiled, key, program, variables, variables.what, report)


def _evaluate(compiled: CompiledPolicy, key: str, program: Any, variables: _Variables,
              what: str, report: Reporter) -> bool | None:
    memo, text = variables.memo, getattr(compiled.policy, key)
    value = memo.get(text) if memo is not None else None  # (keyed by the expression's text)
    if type(value) is not bool and not _kept(value):  # not remembered (or not in a shape we write)
        value = outcome(program, variables)
        if memo is not None:
            memo[text] = value
    if type(value) is bool:
        return value
    at = (*compiled.policy.path, key)
    if value[0] == "error":
        report.error("MESH413", f"policy '{compiled.label}' failed to evaluate `{key}` for "
                     f"{what}: {value[1]}", at)
        return None
    report.error("MESH414", f"`{key}` of policy '{compiled.label}' gave {value[1]} {value[2]}, "
                 f"not a bool", at)
    return None


def plan_policies(spec: MeshSpec, report: Reporter, file: str) -> list[PlanPolicy]:
    """Every global, then every domain-local policy (in declared order), for the runtime."""
    def one(policy: Policy, domain: str) -> PlanPolicy:
        return PlanPolicy(name=policy.name, scope=policy.scope, require=policy.require,
                          when=policy.when or "", effect=policy.effect, message=policy.message,
                          domain=domain, at=report.at(policy.path), suspend_after=policy.suspend_after)

    out = [one(p, "") for p in spec.policies]
    for domain in spec.domains:
        out += [one(p, domain.name) for p in domain.policies]
    return out
