"""Policy decisions made the cheap way (issue 16: 100,000 decisions at full size) are the ones the
general way makes: the same decisions, in the same order, and the same diagnostics."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from compiler_util import ROOT

from meshctl.compiler import policy
from meshctl.compiler.cache import LoadCache
from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import PlanDecision

sys.path.insert(0, str(ROOT / "benchmarks"))
from compile_scale import write_mesh

POLICIES = [  # every way a decision is made: allows, when false, warn, deny, errors, celpy's answers
    '{name: when-false, scope: model, when: "model.name == \'nope\'", require: "false"}',
    '{name: when-true, scope: model, when: "model.name.startsWith(\'m\')", require: "true", message: ok}',
    '{name: warns, scope: model, effect: warn, require: "model.training.rounds > 100"}',
    '{name: denies-one, scope: model, require: "model.name != \'m001\'"}',
    '{name: index-error, scope: model, require: "model.reads[-1].domain == \'x\'"}',
    '{name: gives-int, scope: model, require: "size(model.reads)"}',
    '{name: outside-subset, scope: model, require: "duration(\'1h\') > duration(\'30m\')"}',
    '{name: doubt, scope: model, require: "model.training.rounds + 1.0 > 0.0"}',
    '{name: when-error, scope: model, when: "model.nope", require: "true"}',
    '{name: when-int, scope: model, when: "1", require: "true"}',
    '{name: in-reads, scope: model, require: "model.reads.exists(p, p.jurisdiction in [\'eu\', 1])"}',
    '{name: first-read, scope: model, require: "model.reads[0].domain.startsWith(\'d\')"}',
    '{name: products, scope: product, effect: warn, require: "product.name == \'p0\'"}',
]


def _mesh(tmp_path: Path) -> Path:
    path = write_mesh(tmp_path, domains=4, products_per_domain=2, contracts=3, policies=2, models=3)
    text = path.read_text()
    extra = "".join(f"  - {p}\n" for p in POLICIES)
    path.write_text(text.replace("policies:\n", "policies:\n" + extra, 1))
    return path


def _compiled(path: Path, monkeypatch: pytest.MonkeyPatch, cache: LoadCache | None = None,
              ) -> tuple[list[str], list[dict]]:
    """The diagnostics and every decision (a mesh with a denial has no plan) of compiling `path`."""
    made: list = []
    decide = policy.decide
    monkeypatch.setattr("meshctl.compiler.compile.decide", lambda *a, **k: made.append(decide(*a, **k)) or made[-1])
    result = compile_mesh(path, hashed=False, cache=cache)
    return [repr(d) for d in result.diagnostics], [dict(d.__dict__) for d in made[0]]


def test_inline_decisions_are_the_general_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _mesh(tmp_path)
    fast = _compiled(path, monkeypatch)
    for _ in range(2):  # with a memo (the path `meshctl validate` takes): cold, then remembered values
        cache = LoadCache(tmp_path / ".meshctl" / "cache")
        assert _compiled(path, monkeypatch, cache) == fast
    assert cache.decisions.hits > 0
    monkeypatch.setattr(policy.CompiledPolicy, "fast", property(lambda self: None))  # all by _decide
    assert _compiled(path, monkeypatch) == fast
    diagnostics, decisions = fast
    codes = {code for code in ("MESH410", "MESH411", "MESH413", "MESH414") if any(code in d for d in diagnostics)}
    assert len(codes) == 4, diagnostics
    effects = {(d["policy"], d["effect"]) for d in decisions}
    assert {("when-false", "allow"), ("warns", "warn"), ("denies-one", "deny"), ("products", "warn"),
            ("outside-subset", "allow"), ("in-reads", "allow"), ("first-read", "allow")} <= effects
    assert any(d["reason"].startswith("does not apply") for d in decisions)


def test_a_decision_is_the_instance_model_construct_makes() -> None:
    fields = {"policy": "p", "scope": "model", "subject": "model.m", "effect": "allow", "reason": "r",
              "at": "mesh.yaml:3:5"}
    fast = policy._decision(*fields.values())
    slow = PlanDecision.model_construct(**fields)
    assert type(fast) is PlanDecision and fast == slow
    assert list(fast.__dict__.items()) == list(slow.__dict__.items())
    assert fast.__pydantic_fields_set__ == slow.__pydantic_fields_set__
    assert fast.__pydantic_extra__ is None and fast.__pydantic_private__ is None
    other = policy._decision(*fields.values())
    assert other.__pydantic_fields_set__ is not fast.__pydantic_fields_set__  # (each its own, as pydantic's)
    assert fast.model_dump() == fields and fast.model_copy(update={"effect": "deny"}).effect == "deny"
