"""`top: {at: coordinator}` of a split model (issue 15): the coordinator runs the top model and the label
owner only the loss. Its checks (MESH578, MESH579), the label-only part, the warning that the coordinator
learns the labels (MESH580), and the policy variable `model.top.at` a governance team denies it with."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from meshctl.cli import main
from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import Plan, PlanPolicy
from meshctl.compiler.split import split_activation
from meshctl.compiler.summary import render_plan_summary
from meshctl.runtime.governance import evaluate_split

MESH = """\
apiVersion: meshctl/v1
mesh: {name: vertical}
domains:
  - {name: lab}
  - {name: imaging}
  - {name: clinic}
products:
  - name: cells
    domain: lab
    source: lab.csv
    columns:
      - {name: patient_id, type: string, pii: direct}
      - {name: radius, type: float}
  - name: scans
    domain: imaging
    source: imaging.csv
    columns:
      - {name: patient_id, type: string, pii: direct}
      - {name: area, type: float}
  - name: diagnosis
    domain: clinic
    source: clinic.csv
    columns:
      - {name: patient_id, type: string, pii: direct}
      - {name: smoothness, type: float}
      - {name: diagnosis, type: category, values: [benign, malignant]}
split_models:
  - name: malignancy
    purpose: research
    key: patient_id
    parts:
      - {product: lab.cells, features: [radius], bottom: {hidden: [], out: 4}}
      - {product: imaging.scans, features: [area], bottom: {hidden: [], out: 2}}
      - {product: clinic.diagnosis, features: [smoothness], bottom: {hidden: [], out: 2}}
    label: {product: clinic.diagnosis, column: diagnosis}
    top: {hidden: [6], at: coordinator}
"""
LABEL_ONLY = ("{product: clinic.diagnosis, features: [smoothness], bottom: {hidden: [], out: 2}}",
              "{product: clinic.diagnosis}")
DENY = """\
policies:
  - name: labels-stay-home
    scope: model
    when: model.kind == "split"
    require: model.top.at != "coordinator"
    message: the labels stay with the label owner
"""


def _compile(tmp_path: Path, *edits: tuple[str, str], text: str = MESH):
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    for name in ("lab", "imaging", "clinic"):
        (tmp_path / f"{name}.csv").write_text("patient_id\n")
    (tmp_path / "mesh.yaml").write_text(text)
    return compile_mesh(tmp_path / "mesh.yaml")


def test_the_top_at_the_coordinator_is_planned_and_warned_about(tmp_path: Path) -> None:
    result = _compile(tmp_path)
    assert result.plan is not None, result.render_diagnostics()
    (warning,) = result.diagnostics
    assert (warning.code, warning.severity) == ("MESH580", "warning")
    assert warning.message.startswith("the coordinator runs the top model of split model 'malignancy': it learns "
                                      "the diagnosis of every shared row")
    (split,) = result.plan.split_models
    assert split.top_at == "coordinator" and split.label_domain == "clinic"
    assert Plan.from_toml(result.plan.to_toml()) == result.plan and 'top_at = "coordinator"' in result.plan.to_toml()
    assert ("top 8→6→2 at the coordinator (label diagnosis, loss at clinic)"
            in render_plan_summary(result.plan))


def test_the_default_plan_has_no_top_at(tmp_path: Path) -> None:
    result = _compile(tmp_path, ("top: {hidden: [6], at: coordinator}", "top: {hidden: [6], at: label_owner}"))
    assert result.plan is not None and result.diagnostics == [], result.render_diagnostics()
    assert result.plan.split_models[0].top_at is None and "top_at" not in result.plan.to_toml()
    assert "top 8→6→2 at clinic (label diagnosis)" in render_plan_summary(result.plan)


def test_the_label_owner_may_hold_only_the_label(tmp_path: Path) -> None:
    result = _compile(tmp_path, LABEL_ONLY)
    assert result.plan is not None, result.render_diagnostics()
    clinic = result.plan.split_models[0].part("clinic")
    assert (clinic.features, clinic.out, clinic.tensors, clinic.hidden) == ([], 0, [], [])
    assert result.plan.split_models[0].top_tensors[0].shape == [6, 6]  # lab 4 + imaging 2
    assert "parts lab 1→4, imaging 1→2, clinic label only; top 6→6→2" in render_plan_summary(result.plan)
    model = split_activation(result.plan.split_models[0], [], {})
    assert model["top"] == {"at": "coordinator"}
    assert (model["parts"][2]["bottom"]["kind"], model["parts"][2]["parameters"]) == ("none", 0)


@pytest.mark.parametrize(("edits", "code", "words"), [
    ((("at: coordinator", "at: coordinater"),), "MESH578",
     "split model 'malignancy': top.at 'coordinater' is neither label_owner nor coordinator"),
    ((LABEL_ONLY, ("at: coordinator", "at: label_owner")), "MESH579",
     "the label owner's part clinic.diagnosis reads no features, and the label owner runs the top model"),
    ((("{product: clinic.diagnosis, features: [smoothness], bottom: {hidden: [], out: 2}}",
       "{product: clinic.diagnosis, bottom: {hidden: [], out: 2}}"),), "MESH579",
     "the label owner's part clinic.diagnosis reads no features but declares a bottom model"),
    ((("{product: imaging.scans, features: [area], bottom: {hidden: [], out: 2}}", "{product: imaging.scans}"),),
     "MESH562", "split model 'malignancy': part imaging.scans reads no features"),
], ids=["unknown-at", "label-only-top-at-owner", "label-only-with-bottom", "member-without-features"])
def test_what_the_coordinator_top_refuses(tmp_path: Path, edits: tuple, code: str, words: str) -> None:
    result = _compile(tmp_path, *edits)
    assert result.plan is None
    found = [d for d in result.diagnostics if d.code == code]
    assert found and words in found[0].message, result.render_diagnostics()


def test_the_hint_of_an_unknown_at_suggests_the_nearest(tmp_path: Path) -> None:
    (found,) = [d for d in _compile(tmp_path, ("at: coordinator", "at: coordinater")).diagnostics
                if d.code == "MESH578"]
    assert found.hint == "did you mean 'coordinator'?"


def test_one_policy_line_denies_the_top_at_the_coordinator(tmp_path: Path) -> None:
    result = _compile(tmp_path, text=MESH.replace("split_models:\n", DENY + "split_models:\n", 1))
    assert result.plan is None
    (denied,) = [d for d in result.diagnostics if d.code == "MESH410"]
    assert "policy 'labels-stay-home' denies model 'malignancy'" in denied.message
    allowed = _compile(tmp_path, ("at: coordinator", "at: label_owner"),
                       text=MESH.replace("split_models:\n", DENY + "split_models:\n", 1))
    assert allowed.plan is not None, allowed.render_diagnostics()
    assert {(d.policy, d.effect) for d in allowed.plan.decisions} == {("labels-stay-home", "allow")}


def test_each_domain_denies_it_again_on_its_own_copy_of_the_plan(tmp_path: Path) -> None:
    """The compiler's deny is not the only one: the label owner decides again before Hello."""
    plan = _compile(tmp_path).plan
    assert plan is not None
    policy = PlanPolicy(name="labels-stay-home", scope="model", when='model.kind == "split"',
                        require='model.top.at != "coordinator"')
    plan = plan.model_copy(update={"policies": [*plan.policies, policy]})
    decided = {d.policy: d.effect for d in evaluate_split(plan, plan.split_models[0], "clinic")}
    assert decided["labels-stay-home"] == "deny"


@pytest.mark.parametrize("code", ["MESH578", "MESH579", "MESH580"])
def test_meshctl_explain_knows_the_codes(code: str) -> None:
    result = CliRunner().invoke(main, ["explain", code])
    assert result.exit_code == 0 and code in result.output and "coordinator" in result.output
