"""The root mesh.yaml compiles, deterministically, into a plan that round-trips."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from compiler_util import ROOT, ROOT_MESH, SPECS

from meshctl.compiler.compile import compile_bytes, compile_mesh
from meshctl.compiler.diagnostics import CODES
from meshctl.compiler.plan import Plan
from meshctl.compiler.summary import render_plan_summary


def test_root_mesh_compiles_with_one_warning_decision() -> None:
    result = compile_mesh(ROOT_MESH)
    assert result.errors == [], result.render_diagnostics()
    assert result.plan is not None
    warns = [d for d in result.plan.decisions if d.effect == "warn"]
    assert [d.policy for d in warns] == ["restricted-needs-privacy"]
    assert all(d.effect == "allow" for d in result.plan.decisions if d not in warns)
    assert [d.code for d in result.warnings] == ["MESH411"]


def test_root_plan_has_resolved_job() -> None:
    plan = compile_mesh(ROOT_MESH).plan
    assert plan is not None
    job = plan.job("malignancy")
    assert job.participants == ["charite", "karolinska", "amsterdam-umc"]
    assert [(r.product, r.client_id) for r in job.reads] == [
        ("charite.biopsies", 0), ("karolinska.biopsies", 1), ("amsterdam-umc.biopsies", 2)]
    assert job.classes == ["benign", "malignant"]
    assert len(job.features) == 10 and job.architecture.input_dim == 10
    assert job.parameters == 10 * 32 + 32 + 32 * 16 + 16 + 16 * 2 + 2
    assert job.quorum == 3 and job.round_timeout_s == 300.0
    assert plan.product("amsterdam-umc.biopsies").format == "csv"
    assert plan.product("charite.biopsies").columns[0].pii == "direct"
    assert plan.decisions[0].at == "mesh.yaml:88:5"


def test_compiling_twice_gives_identical_bytes() -> None:
    first = compile_mesh(ROOT_MESH).plan
    second = compile_mesh(ROOT_MESH).plan
    assert first is not None and second is not None
    assert first.to_toml().encode() == second.to_toml().encode()
    assert first.plan.hash.startswith("sha256:")


def test_plan_round_trips_through_toml() -> None:
    plan = compile_mesh(ROOT_MESH).plan
    assert plan is not None
    again = Plan.from_toml(plan.to_toml())
    assert again == plan
    assert again.with_hash().plan.hash == plan.plan.hash


def test_plan_does_not_depend_on_working_directory(tmp_path: Path, monkeypatch) -> None:
    shutil.copytree(SPECS / "valid", tmp_path / "valid")
    shutil.copytree(SPECS / "data", tmp_path / "data")
    here = compile_mesh(SPECS / "valid" / "minimal.yaml").plan
    monkeypatch.chdir(tmp_path)
    there = compile_mesh(Path("valid/minimal.yaml")).plan
    assert here is not None and there is not None
    assert here.to_toml() == there.to_toml()


def test_digits_example_expands_globs_and_skips_holdout_column() -> None:
    path = ROOT / "examples" / "digits" / "mesh.yaml"
    if not path.exists():  # written by another part of the project
        return
    result = compile_mesh(path)
    assert result.errors == [], result.render_diagnostics()
    job = result.plan.jobs[0]
    assert job.features == [f"px{i}" for i in range(64)]
    assert job.classes == [str(i) for i in range(10)]
    assert job.evaluation.holdout_column == "split"


def test_glob_pii_is_an_error_and_glob_order_is_declared_order() -> None:
    plan = compile_mesh(SPECS / "valid" / "globs.yaml").plan
    assert plan is not None
    job = plan.job("risk")
    assert job.features == ["age", "income", "score"]  # split is the holdout column
    assert job.participants == ["south", "north"]  # declared domain order
    assert job.quorum == 1
    assert [d.policy for d in plan.decisions] == ["dp-budget", "north.eu-only"]


def test_every_code_used_has_help() -> None:
    used: set[str] = set()
    for module in (ROOT / "meshctl" / "compiler").glob("*.py"):
        used |= set(re.findall(r'"(MESH\d{3})"', module.read_text()))
    used -= set()  # every literal code is reported somewhere
    assert used, "no codes found"
    assert used <= set(CODES), sorted(used - set(CODES))
    assert all(CODES[c].strip() for c in CODES)


def test_codes_are_grouped_by_stage() -> None:
    assert all(re.fullmatch(r"MESH[1-5]\d\d", code) for code in CODES)


def test_summary_names_jobs_rounds_and_decisions() -> None:
    plan = compile_mesh(ROOT_MESH).plan
    assert plan is not None
    text = render_plan_summary(plan)
    assert "job malignancy" in text and "914 parameters" in text and "15 rounds" in text
    assert "warn  restricted-needs-privacy" in text and "(mesh.yaml:96:5)" in text


def test_any_bytes_give_diagnostics_not_exceptions() -> None:
    for raw in [b"", b"\x00\xff\xfe", b"[1, 2", b"42", b"- a", b"apiVersion: meshctl/v1",
                b"a: &a [*a]", b"{{{", b"apiVersion: [1]\nmesh: 3\ndomains: {a: 1}\n",
                b"models: [1, {}, {name: 3, inputs: []}]\npolicies: [{name: p, require: '(('}]"]:
        result = compile_bytes(raw, "mesh.yaml")
        assert result.plan is None and result.errors


def test_hashed_plan_toml_is_the_same_as_a_fresh_dump_and_validate_skips_the_hash():
    """with_hash() keeps the TOML it made; it must equal serializing the plan anew."""
    import tomli_w

    from meshctl.compiler.plan import _take_positions

    plan = compile_mesh(ROOT / "mesh.yaml").plan
    data = plan.model_dump(mode="json", exclude_none=True)
    positions = _take_positions(data)  # written last, outside the hash
    assert plan.to_toml() == (tomli_w.dumps({k: v for k, v in data.items() if v != []}) + "\n"
                              + tomli_w.dumps({"positions": positions}))
    assert plan.to_toml().startswith("[plan]\n")
    unhashed = compile_mesh(ROOT / "mesh.yaml", hashed=False).plan
    assert unhashed.plan.hash == "" and plan.plan.hash.startswith("sha256:")
    assert unhashed.plan.spec_hash == "" and plan.plan.spec_hash.startswith("sha256:")  # not made either
    header = unhashed.plan.model_copy(update={"spec_hash": plan.plan.spec_hash})
    assert unhashed.model_copy(update={"plan": header}).with_hash().to_toml() == plan.to_toml()
