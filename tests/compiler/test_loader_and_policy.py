"""Positions from the loader, and CEL policy decisions."""

from __future__ import annotations

from compiler_util import ROOT_MESH, SPECS

from meshctl.compiler.compile import compile_bytes
from meshctl.compiler.loader import load_text

MINIMAL = (SPECS / "valid" / "minimal.yaml").read_text()


def test_source_map_positions_are_one_based_and_exact() -> None:
    source, diags = load_text(ROOT_MESH.read_text(), "mesh.yaml")
    assert diags == [] and source is not None
    assert source.map.locate(("models", 0, "inputs", "features", 3)) == (109, 61)
    assert source.map.locate(("apiVersion",), key=True) == (12, 1)
    assert source.map.locate(("products", 1, "columns")) == (60, 14)  # the alias itself
    assert source.map.locate(("products", 0, "nope", 7)) == source.map.locate(("products", 0))


def test_yes_and_no_stay_strings() -> None:
    source, _ = load_text("values: [yes, no, true]\n", "f.yaml")
    assert source is not None and source.data == {"values": ["yes", "no", True]}


def _compile(text: str):
    return compile_bytes(text.encode(), SPECS / "valid" / "mesh.yaml")


def test_warn_policy_is_a_warning_and_a_decision() -> None:
    result = _compile(MINIMAL.replace("    message: a model needs two banks",
                                      "    effect: warn\n    message: a model needs two banks")
                      .replace(">= 2", ">= 5"))
    assert [d.code for d in result.diagnostics] == ["MESH411"]
    assert result.plan is not None and result.plan.decisions[0].effect == "warn"


def test_when_false_allows_with_reason() -> None:
    result = _compile(MINIMAL.replace("    require: size", "    when: model.purpose == 'x'\n"
                                      "    require: size").replace(">= 2", ">= 5"))
    assert result.plan is not None
    decision = result.plan.decisions[0]
    assert decision.effect == "allow" and decision.reason.startswith("does not apply")


def test_non_bool_policy_result_is_a_diagnostic() -> None:
    result = _compile(MINIMAL.replace("size(model.participants) >= 2", "model.parameters"))
    assert [d.code for d in result.errors] == ["MESH414"]


def test_policy_sees_privacy_defaults_and_parameters() -> None:
    expr = ("!model.privacy.secure_aggregation && model.privacy.dp.epsilon == 0.0 && "
            "model.parameters == 50 && model.reads[0].contract_version == '1.0.0'")
    result = _compile(MINIMAL.replace("size(model.participants) >= 2", f'"{expr}"'))
    assert result.errors == [], result.render_diagnostics()


def test_domain_policy_applies_only_where_domain_participates() -> None:
    text = MINIMAL.replace("  - name: south\n", "  - name: south\n    policies:\n"
                           "      - {name: never, require: 'false', message: no}\n")
    assert [d.code for d in _compile(text).errors] == ["MESH410"]
    only_north = text.replace("participants: all", "participants: [north]")
    result = _compile(only_north.replace(">= 2", ">= 1"))
    assert result.errors == [] and [d.policy for d in result.plan.decisions] == ["two-banks"]
