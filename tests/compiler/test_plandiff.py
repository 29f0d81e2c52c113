"""`diff_plans` and `meshctl plan` against a previous plan, on edited copies of mesh.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from compiler_util import ROOT, ROOT_MESH

from meshctl.cli import main
from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import Plan
from meshctl.compiler.plandiff import Change, diff_plans, render_changes

UPPSALA_DOMAIN = "  - name: uppsala\n    address: local\n\nproducts:"
UPPSALA_PRODUCT = """  - name: biopsies
    domain: uppsala
    source: examples/hospitals/data/charite.parquet
    classification: restricted
    contract: tumor-biopsy@1
    columns: *biopsy-columns

contracts:"""


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    """A copy of the root mesh.yaml with its data files, so sources resolve."""
    shutil.copy(ROOT_MESH, tmp_path / "mesh.yaml")
    shutil.copytree(ROOT / "examples" / "hospitals" / "data",
                    tmp_path / "examples" / "hospitals" / "data")
    return tmp_path / "mesh.yaml"


def edit(path: Path, *pairs: tuple[str, str]) -> None:
    text = path.read_text()
    for old, new in pairs:
        assert old in text, old
        text = text.replace(old, new, 1)
    path.write_text(text)


def plan(mesh: Path, *args: str):
    return CliRunner().invoke(main, ["plan", str(mesh), *args])


def changes_of(output: str) -> list[str]:
    """The change lines and the count line of `meshctl plan` stdout."""
    return [line for line in output.splitlines()
            if line[:2] in ("+ ", "- ", "~ ") or line.startswith(("Plan:", "No changes."))]


@pytest.fixture
def root_plan() -> Plan:
    result = compile_mesh(ROOT_MESH)
    assert result.plan is not None
    return result.plan


# -- diff_plans ---------------------------------------------------------------

def test_same_plan_has_no_changes(root_plan: Plan) -> None:
    assert diff_plans(root_plan, root_plan) == []
    assert render_changes([]) == "No changes."


def test_header_only_changes_are_not_changes(root_plan: Plan) -> None:
    header = root_plan.plan.model_copy(update={"spec_hash": "sha256:x", "hash": "sha256:y"})
    assert diff_plans(root_plan, root_plan.model_copy(update={"plan": header})) == []


def test_job_changes_in_detail(root_plan: Plan) -> None:
    job = root_plan.jobs[0]
    new_job = job.model_copy(update={
        "training": job.training.model_copy(update={"rounds": 20, "lr": 0.1}),
        "participants": job.participants[:2], "features": [*job.features[1:], "age"],
        "target": "grade", "parameters": 1000,
        "architecture": job.architecture.model_copy(update={"hidden": [64]}),
        "purpose": "other"})
    new = root_plan.model_copy(update={"jobs": [new_job]})
    [change] = diff_plans(root_plan, new)
    assert change == Change("~", "job", "malignancy", (
        "participants -amsterdam-umc", "rounds 15 -> 20", "lr 0.05 -> 0.1",
        "parameters 914 -> 1,000", "features -radius_mean +age", "target diagnosis -> grade",
        "architecture mlp 10-32-16-2 -> mlp 10-64-2", "purpose cancer-research -> other"))
    reordered = job.model_copy(update={"features": job.features[::-1]})
    [change] = diff_plans(root_plan, root_plan.model_copy(update={"jobs": [reordered]}))
    assert change.render() == "~ job malignancy: features reordered"


def test_added_removed_and_decisions(root_plan: Plan) -> None:
    warn = root_plan.decisions[2]
    new = root_plan.model_copy(update={
        "domains": root_plan.domains[1:],
        "products": root_plan.products[1:],
        "jobs": [root_plan.jobs[0].model_copy(update={"name": "grading"})],
        "decisions": [root_plan.decisions[0], warn.model_copy(update={"effect": "allow"}),
                      warn.model_copy(update={"subject": "model.grading"})]})
    lines = render_changes(diff_plans(root_plan, new)).splitlines()
    assert lines == [
        "- domain charite",
        "- product charite.biopsies",
        "- job malignancy",
        "+ job grading",
        "- decision purpose-limitation/model.malignancy: allow",
        "~ decision restricted-needs-privacy/model.malignancy: warn -> allow",
        "+ decision restricted-needs-privacy/model.grading: warn",
        "Plan: 2 to add, 1 to change, 4 to remove.",
    ]


# -- meshctl plan ---------------------------------------------------------------

def test_first_plan_prints_no_diff(mesh: Path) -> None:
    result = plan(mesh)
    assert result.exit_code == 0, result.output
    assert changes_of(result.stdout) == []
    assert plan(mesh, "--detailed-exitcode").exit_code == 0  # now unchanged
    (mesh.parent / "mesh.plan.toml").unlink()
    assert plan(mesh, "--detailed-exitcode").exit_code == 2  # no previous plan: all new


def test_unchanged_plan_says_no_changes(mesh: Path) -> None:
    assert plan(mesh).exit_code == 0
    edit(mesh, ("# An oncology", "# A comment-only edit. An oncology"))
    result = plan(mesh, "--detailed-exitcode")
    assert result.exit_code == 0, result.output
    assert changes_of(result.stdout) == ["No changes."]
    assert result.stdout.index("No changes.") < result.stdout.index("wrote ")


def test_edited_mesh_prints_changes_and_exits_2(mesh: Path) -> None:
    assert plan(mesh).exit_code == 0
    edit(mesh, ("rounds: 15", "rounds: 20"), ("hidden: [32, 16]", "hidden: [64]"),
         ("    address: local\n\nproducts:", "    address: local\n" + UPPSALA_DOMAIN),
         ("\ncontracts:", "\n" + UPPSALA_PRODUCT),
         ("    require: model.privacy.secure_aggregation\n",
          "    require: size(model.participants) >= 4\n"))
    result = plan(mesh, "--detailed-exitcode")
    assert result.exit_code == 2, result.output
    assert changes_of(result.stdout) == [
        "+ domain uppsala",
        "+ product uppsala.biopsies",
        ("~ job malignancy: participants +uppsala, rounds 15 -> 20, parameters 914 -> 834, "
        "architecture mlp 10-32-16-2 -> mlp 10-64-2, quorum 3 -> 4"),
        ("~ policy restricted-needs-privacy: require model.privacy.secure_aggregation -> "
        "size(model.participants) >= 4"),
        "~ decision restricted-needs-privacy/model.malignancy: warn -> allow",
        "Plan: 2 to add, 3 to change, 0 to remove.",
    ]
    assert Plan.read(mesh.parent / "mesh.plan.toml").job("malignancy").training.rounds == 20
    again = plan(mesh, "--detailed-exitcode")
    assert again.exit_code == 0 and changes_of(again.stdout) == ["No changes."]


def test_without_detailed_exitcode_changes_exit_0(mesh: Path) -> None:
    assert plan(mesh).exit_code == 0
    edit(mesh, ("rounds: 15", "rounds: 20"))
    result = plan(mesh)
    assert result.exit_code == 0
    assert changes_of(result.stdout) == ["~ job malignancy: rounds 15 -> 20",
                                         "Plan: 0 to add, 1 to change, 0 to remove."]


def test_errors_exit_1_and_keep_the_previous_plan(mesh: Path) -> None:
    assert plan(mesh).exit_code == 0
    before = (mesh.parent / "mesh.plan.toml").read_text()
    edit(mesh, ("participants: all", "participants: [charite, karolinska]"))
    result = plan(mesh, "--detailed-exitcode")
    assert result.exit_code == 1
    assert "error[MESH410]" in result.output
    assert (mesh.parent / "mesh.plan.toml").read_text() == before


def test_unreadable_previous_plan_is_noted_and_replaced(mesh: Path) -> None:
    out = mesh.parent / "mesh.plan.toml"
    out.write_text("not = [toml")
    result = plan(mesh, "--detailed-exitcode")
    assert result.exit_code == 2, result.output
    assert "note: not a readable plan" in result.output
    assert changes_of(result.stdout) == []
    assert Plan.read(out).job("malignancy")


def test_a_changed_split_model_is_a_change_in_both_diffs() -> None:
    """A split model's settings (its learning rate, a part's width) show in the plan diff, from
    plans and from plan texts: a reviewer must see them change."""
    from meshctl.compiler.plandiff import diff_plan_texts

    vertical = ROOT / "examples" / "vertical" / "mesh.yaml"
    old = compile_mesh(vertical).plan
    assert old is not None and old.split_models
    split = old.split_models[0]
    new = old.model_copy(update={"split_models": [split.model_copy(update={"lr": split.lr * 2})]})
    expected = [Change("~", "split model", split.name, (f"lr {split.lr} -> {split.lr * 2}",))]
    assert diff_plans(old, new) == expected
    assert diff_plan_texts(old.to_toml(), new.to_toml()) == expected
