"""Issue 13 in the language: multi_krum, bulyan, centered_clip and fedavgm settings, their
participant checks (MESH511, MESH516), secure aggregation (MESH513) and `explain`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshctl.cli import main
from meshctl.compiler.compile import compile_mesh

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


@pytest.fixture(scope="module")
def digits8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmark's digits mesh over 8 domains."""
    sys.path.insert(0, str(DIGITS))
    from make_data import write_mesh

    return write_mesh(tmp_path_factory.mktemp("digits8"), 8, rounds=2)


def _compile(mesh: Path, aggregation: str, privacy: str = ""):
    text = mesh.read_text().replace("aggregation: {strategy: fedavg}", f"aggregation: {{{aggregation}}}{privacy}")
    spec = mesh.parent / "variant.yaml"
    spec.write_text(text)
    return compile_mesh(spec)


@pytest.mark.parametrize(("given", "carried"), [
    ("strategy: multi_krum", {"byzantine": 1, "select": 0, "bucketing": 1, "server_momentum": 0.9}),
    ("strategy: multi_krum, byzantine: 2, select: 5, server_momentum: 0.0",
     {"byzantine": 2, "select": 5, "bucketing": 1, "server_momentum": 0.0}),
    ("strategy: bulyan", {"byzantine": 1, "bucketing": 1, "server_momentum": 0.9}),
    ("strategy: centered_clip", {"radius": 0.0, "iterations": 3, "bucketing": 1, "server_momentum": 0.9}),
    ("strategy: centered_clip, radius: 2.5, iterations: 5",
     {"radius": 2.5, "iterations": 5, "bucketing": 1, "server_momentum": 0.9}),
    ("strategy: median", {"bucketing": 1, "server_momentum": 0.9}),
    ("strategy: median, bucketing: 2, server_momentum: 0.5", {"bucketing": 2, "server_momentum": 0.5}),
    ("strategy: fedavgm", {"server_lr": 1.0, "server_momentum": 0.9}),
    ("strategy: fedadam", {"server_lr": 0.03, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
])
def test_the_plan_carries_every_setting_of_the_new_strategies(digits8, given, carried):
    result = compile_mesh_ok(_compile(digits8, given))
    agg = result.plan.jobs[0].aggregation
    assert agg.model_dump(exclude_none=True) == {"strategy": given.split(",")[0].split(": ")[1], **carried}


def compile_mesh_ok(result):
    assert result.plan is not None, result.render_diagnostics()
    assert result.errors == []
    return result


def test_a_setting_of_another_strategy_names_its_owners(digits8):
    result = _compile(digits8, "strategy: fedadam, server_momentum: 0.9")
    [err] = result.errors
    assert err.code == "MESH510"
    assert err.message == ("'server_momentum' does not apply to strategy fedadam (it is a setting of "
                           "bulyan, centered_clip, fedavgm, krum, median, multi_krum and trimmed_mean)")
    [err] = _compile(digits8, "strategy: krum, select: 3").errors
    assert err.code == "MESH510" and "(it is a setting of multi_krum)" in err.message


def test_byzantine_rules_need_their_participants(digits8):
    assert compile_mesh_ok(_compile(digits8, "strategy: bulyan, byzantine: 1"))  # 8 >= 4·1 + 3
    [err] = _compile(digits8, "strategy: bulyan, byzantine: 2").errors
    assert err.code == "MESH511"
    assert "bulyan tolerating 2 Byzantine update(s) needs at least 11 (4f + 3) updates per round" in err.message
    assert "has 8 participants" in err.message
    [err] = _compile(digits8, "strategy: multi_krum, byzantine: 3").errors
    assert err.code == "MESH511" and "needs at least 9 (2f + 3)" in err.message
    [err] = _compile(digits8, "strategy: multi_krum, select: 9").errors
    assert err.code == "MESH516" and err.message.startswith("multi_krum selects 9 updates per round")
    assert err.hint == "select at most 8, or leave `select` out for n - f"


def test_settings_are_validated(digits8):
    for good in ("strategy: centered_clip, radius: 0.5, iterations: 1", "strategy: fedavgm, server_momentum: 0.0",
                 "strategy: multi_krum, select: 1"):
        assert compile_mesh_ok(_compile(digits8, good))
    for bad in ("strategy: centered_clip, radius: 0", "strategy: centered_clip, iterations: 0",
                "strategy: fedavgm, server_momentum: 1.0", "strategy: multi_krum, select: 0"):
        result = _compile(digits8, bad)
        assert result.plan is None and result.errors, bad
        assert all(e.code.startswith("MESH2") for e in result.errors), (bad, result.render_diagnostics())


def test_secure_aggregation_takes_fedavgm_but_no_robust_rule(digits8):
    privacy = "\n    privacy: {secure_aggregation: true}"
    assert compile_mesh_ok(_compile(digits8, "strategy: fedavgm", privacy))
    for rule in ("multi_krum", "bulyan", "centered_clip"):
        [err] = _compile(digits8, f"strategy: {rule}", privacy).errors
        assert err.code == "MESH513" and f"but {rule} needs every single update" in err.message
        assert err.hint == "use fedavg, fedprox, fedadam, fedyogi or fedavgm with secure aggregation"


def test_explain_the_new_code_and_the_wider_ones():
    out = CliRunner().invoke(main, ["explain", "MESH516"])
    assert out.exit_code == 0 and "select" in out.output and "n - f" in out.output
    out = CliRunner().invoke(main, ["explain", "MESH511"])
    assert "Bulyan 4f + 3" in out.output
    out = CliRunner().invoke(main, ["explain", "MESH510"])
    assert "radius and iterations to centered_clip" in out.output
