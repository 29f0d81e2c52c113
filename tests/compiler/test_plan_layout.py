"""The plan hash is a function of the mesh's meaning, not of its file layout (issue 16): the
same mesh as one mesh.yaml and as 1,001 included files (benchmarks/compile_scale.py's
generator, small), or with comments and blank lines added, has one plan hash and one spec
hash; positions are written in an unhashed `[positions]` table and read back from it.
`meshctl plan` counts policy decisions per policy and lists only warns and denies once there
are more than 20 (`--decisions all` lists each)."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner
from compiler_util import ROOT, ROOT_MESH

from meshctl.cli import main
from meshctl.compiler.cache import LoadCache
from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import POSITIONS, Plan, hashed_text
from meshctl.compiler.summary import render_plan_summary
from meshctl.runtime.audit import plan_hash_of


def _generator():  # benchmarks/ is no package: load the module by its path
    spec = importlib.util.spec_from_file_location("compile_scale", ROOT / "benchmarks" / "compile_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("compile_scale", module)
    spec.loader.exec_module(module)
    return module.write_mesh


@pytest.fixture(scope="module")
def meshes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    write_mesh = _generator()
    base = tmp_path_factory.mktemp("scale")
    sizes = {"domains": 5, "products_per_domain": 2, "contracts": 3, "policies": 12, "models": 3}
    return write_mesh(base / "one", **sizes), write_mesh(base / "split", **sizes, split=True)


def _plan(path: Path, **kw) -> Plan:
    result = compile_mesh(path, **kw)
    assert result.errors == [], result.render_diagnostics()
    return result.plan


def test_one_file_and_included_files_hash_the_same(meshes: tuple[Path, Path]) -> None:
    one, split = meshes
    assert len(list((split.parent / "domains").glob("*.yaml"))) == 5
    single, parts = _plan(one), _plan(split)
    assert parts.plan.hash == single.plan.hash and parts.plan.spec_hash == single.plan.spec_hash
    assert hashed_text(parts.to_toml()) == hashed_text(single.to_toml())
    assert parts.to_toml() != single.to_toml()  # the positions: other lines of mesh.yaml
    cache = LoadCache(split.parent / ".meshctl" / "cache")
    _plan(split, cache=cache)
    assert _plan(split, cache=cache).plan.hash == single.plan.hash  # warm: the same


def test_comments_and_blank_lines_keep_the_hash_a_meaning_edit_changes_it(
        meshes: tuple[Path, Path], tmp_path: Path) -> None:
    one, _ = meshes
    before = _plan(one)
    text = one.read_text()
    one.write_text("# owned by governance\n\n" + text.replace("\npolicies:", "\n\n# policies\npolicies:"))
    try:
        moved = _plan(one)
        assert (moved.plan.hash, moved.plan.spec_hash) == (before.plan.hash, before.plan.spec_hash)
        assert moved.policies[0].at != before.policies[0].at and moved.decisions[0].at != before.decisions[0].at
        one.write_text(text.replace("rounds: 10, seed: 0", "rounds: 11, seed: 0"))
        assert _plan(one).plan.hash != before.plan.hash
    finally:
        one.write_text(text)


def test_positions_are_read_back_and_not_hashed(meshes: tuple[Path, Path], tmp_path: Path) -> None:
    _, split = meshes
    plan = _plan(split)
    text = plan.to_toml()
    assert POSITIONS in text and '\nat = "' not in hashed_text(text)  # no position in the hashed part
    back = Plan.from_toml(text)
    assert back == plan and back.decisions[0].at == plan.decisions[0].at != ""
    assert back.content_hash() == plan.plan.hash
    path = tmp_path / "plan.toml"
    path.write_text(text.replace('"mesh.yaml:', '"elsewhere.yaml:'))  # positions edited: same hash
    assert plan_hash_of(path) == (plan.plan.hash, plan.plan.hash)
    path.write_text(text.replace("rounds = 10", "rounds = 12", 1))  # content edited: caught
    recorded, actual = plan_hash_of(path)
    assert recorded == plan.plan.hash != actual
    assert Plan.from_toml(path.read_text()).content_hash() == actual


def test_a_format_1_plan_is_read_and_its_hash_still_verifies(meshes: tuple[Path, Path], tmp_path: Path) -> None:
    _, split = meshes
    plan = _plan(split)
    assert plan.plan.format == 2
    body, _, _ = plan.to_toml().partition(POSITIONS)
    assert Plan.from_toml(body).policies[0].at == ""  # no positions: read, without them
    # format 1, as meshctl wrote it before: an `at` in each table, all of it hashed
    data = plan.model_dump(mode="json", exclude_none=True)
    data["plan"].update(format=1, hash="")
    text = tomli_w.dumps({k: v for k, v in data.items() if v != []})
    digest = f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"
    text = text.replace('\nhash = ""\n', f'\nhash = "{digest}"\n', 1)
    old = Plan.from_toml(text)
    assert old.decisions[0].at == plan.decisions[0].at and old.content_hash() == digest == old.plan.hash
    assert old.to_toml() == text and POSITIONS not in text
    (tmp_path / "plan.toml").write_text(text)
    assert plan_hash_of(tmp_path / "plan.toml") == (digest, digest)


def test_a_malformed_positions_table_is_a_value_error(meshes: tuple[Path, Path]) -> None:
    _, split = meshes
    text = _plan(split).to_toml()
    with pytest.raises(ValueError, match="positions"):
        Plan.from_toml(text + "jobs = []\n")


def test_plan_counts_decisions_per_policy_and_lists_warns(meshes: tuple[Path, Path], tmp_path: Path) -> None:
    one, _ = meshes
    run = CliRunner().invoke(main, ["plan", str(one), "-o", str(tmp_path / "p.toml")])
    assert run.exit_code == 0, run.output
    assert "policy decisions: 36 (36 allow); `--decisions all` lists each" in run.output
    assert re.search(r"\n    policy-000  3 allow \(mesh.yaml:\d+:5\)\n", run.output)
    assert "model.m000" not in run.output  # no line per allow
    every = CliRunner().invoke(main, ["plan", str(one), "-o", str(tmp_path / "p.toml"), "--decisions", "all"])
    assert every.exit_code == 0 and every.output.count("\n    allow policy-") == 36
    # a warn is listed whole; the counts say it
    plan = _plan(one)
    warned = plan.decisions[5].model_copy(update={"effect": "warn", "reason": "mind this"})
    text = render_plan_summary(plan.model_copy(update={"decisions": [*plan.decisions[:5], warned,
                                                                     *plan.decisions[6:]]}))
    assert "policy decisions: 36 (35 allow, 1 warn)" in text
    assert f"    warn  {warned.policy}  {warned.subject}: mind this ({warned.at})" in text
    assert f"    {warned.policy}  2 allow, 1 warn (" in text


def test_a_small_plan_still_lists_every_decision(tmp_path: Path) -> None:
    run = CliRunner().invoke(main, ["plan", str(ROOT_MESH), "-o", str(tmp_path / "p.toml")])
    assert run.exit_code == 0, run.output
    assert "    allow minimum-cohort            model.malignancy:" in run.output
    summary = CliRunner().invoke(main, ["plan", str(ROOT_MESH), "-o", str(tmp_path / "p.toml"),
                                        "--decisions", "summary"])
    assert "policy decisions: 3 (2 allow, 1 warn)" in summary.output
    assert "    minimum-cohort            1 allow (mesh.yaml:" in summary.output
    bad = CliRunner().invoke(main, ["plan", str(ROOT_MESH), "--decisions", "some"])
    assert bad.exit_code == 2 and "'some' is not one of 'auto', 'summary', 'all'" in bad.output
