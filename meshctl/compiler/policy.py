"""Policies as CEL: compiled once, decided per model at compile time.

A model policy sees one variable, `model` (see `activation`). When `when` is
absent or true, `require` decides: true allows; false denies (an error) or, with
`effect: warn`, warns. Domain-local policies apply to models their domain takes
part in. A CEL syntax or evaluation error is a diagnostic, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import celpy
from celpy import celtypes

from meshctl.compiler.diagnostics import Reporter, YamlPath
from meshctl.compiler.plan import PlanDecision, PlanTensor, mlp_tensors
from meshctl.compiler.resolve import Resolution, ResolvedModel
from meshctl.compiler.spec import MeshSpec, Policy

_ENV = celpy.Environment()


@dataclass
class CompiledPolicy:
    """A policy with its CEL programs (None where it did not compile)."""

    policy: Policy
    label: str
    """`name`, or `domain.name` for a domain-local policy."""
    domain: str | None
    when: Any
    require: Any

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
    try:
        return _ENV.program(_ENV.compile(source))
    except Exception as err:  # celpy raises CELParseError and, rarely, lark errors
        line, col = report.locate(at)
        column = getattr(err, "column", None)
        if isinstance(column, int) and "\n" not in source and source in _line(report, line):
            col = _line(report, line).index(source, col - 1) + column
        first = str(err).strip().splitlines()
        report.error("MESH412", f"CEL syntax error in `{key}` of policy '{label}'", pos=(line, col),
                     hint=f"near: {first[0]}" if first else None)
        return None


def _line(report: Reporter, line: int) -> str:
    lines = report.source.splitlines()
    return lines[line - 1] if 0 < line <= len(lines) else ""


def activation(resolved: ResolvedModel, spec: MeshSpec) -> dict[str, Any]:
    """The `model` variable a policy sees, as plain data."""
    model = resolved.model
    domains = {d.name: d for d in spec.domains}
    c = resolved.contract
    reads = [{
        "id": f"{p.domain}.{p.name}", "domain": p.domain, "classification": p.classification,
        "contract": c.name, "contract_version": c.version, "purposes": list(c.purposes),
        "jurisdiction": domains[p.domain].jurisdiction if p.domain in domains else "",
    } for p in resolved.products]
    dp = model.privacy.dp
    return {
        "name": model.name, "purpose": model.purpose,
        "participants": list(resolved.participants), "reads": reads,
        "features": list(resolved.features), "target": resolved.target.name,
        "architecture": model.architecture.model_dump(mode="json", exclude_none=True),
        "training": model.training.model_dump(mode="json"),
        "aggregation": model.aggregation.model_dump(mode="json"),
        "privacy": {
            "secure_aggregation": model.privacy.secure_aggregation,
            "dp": {"epsilon": dp.epsilon if dp else 0.0, "delta": dp.delta if dp else 0.0,
                   "clip": dp.clip if dp else 0.0},
        },
        "parameters": parameter_count(mlp_tensors(len(resolved.features),
                                                  list(model.architecture.hidden),
                                                  len(resolved.target.values))),
    }


def decide(policies: list[CompiledPolicy], resolution: Resolution, spec: MeshSpec,
           report: Reporter, file: str) -> list[PlanDecision]:
    """Decide every model policy for every resolved model; report denials and warnings."""
    decisions = []
    for resolved in resolution.models:
        variables = {"model": celpy.json_to_cel(activation(resolved, spec))}
        for compiled in policies:
            if compiled.policy.scope != "model" or not compiled.ok:
                continue
            if compiled.domain is not None and compiled.domain not in resolved.participants:
                continue
            decision = _decide(compiled, resolved, variables, report, file)
            if decision is not None:
                decisions.append(decision)
    return sorted(decisions, key=lambda d: (d.subject, d.policy))


def _decide(compiled: CompiledPolicy, resolved: ResolvedModel, variables: dict[str, Any],
            report: Reporter, file: str) -> PlanDecision | None:
    policy, model = compiled.policy, resolved.model
    line, col = report.locate(policy.path)
    at = f"{file}:{line}:{col}"
    subject = f"model.{model.name}"
    reason = policy.message or f"requires {policy.require}"

    def made(effect: str, why: str) -> PlanDecision:
        return PlanDecision(policy=compiled.label, scope=policy.scope, subject=subject,
                            effect=effect, reason=why, at=at)

    if compiled.when is not None:
        applies = _evaluate(compiled, "when", compiled.when, variables, model.name, report)
        if applies is None:
            return None
        if not applies:
            return made("allow", f"does not apply: {policy.when}")
    holds = _evaluate(compiled, "require", compiled.require, variables, model.name, report)
    if holds is None:
        return None
    if holds:
        return made("allow", reason)
    hint = f"policy '{compiled.label}' is declared at {at}"
    text = f"policy '{compiled.label}' {{}} model '{model.name}': {reason}"
    if policy.effect == "warn":
        report.warning("MESH411", text.format("warns about"), model.path, hint=hint)
        return made("warn", reason)
    report.error("MESH410", text.format("denies"), model.path, hint=hint)
    return made("deny", reason)


def _evaluate(compiled: CompiledPolicy, key: str, program: Any, variables: dict[str, Any],
              model: str, report: Reporter) -> bool | None:
    at = (*compiled.policy.path, key)
    try:
        value = program.evaluate(variables)
    except Exception as err:  # CELEvalError, and anything celpy lets escape
        value = err
    if isinstance(value, Exception):
        detail = value.args[0] if value.args else type(value).__name__
        report.error("MESH413", f"policy '{compiled.label}' failed to evaluate `{key}` for "
                     f"model '{model}': {detail}", at)
        return None
    if not isinstance(value, celtypes.BoolType):
        report.error("MESH414", f"`{key}` of policy '{compiled.label}' gave "
                     f"{type(value).__name__.removesuffix('Type').lower()} {value!s}, "
                     f"not a bool", at)
        return None
    return bool(value)


def parameter_count(tensors: list[PlanTensor]) -> int:
    """Number of scalars in `tensors`."""
    total = 0
    for tensor in tensors:
        n = 1
        for d in tensor.shape:
            n *= d
        total += n
    return total
