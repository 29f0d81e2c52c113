"""Split models (`split_models:`, issue 15): the language, its checks (MESH560-567), the plan section
and the model-scope policies that judge them."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.diagnostics import CODES
from meshctl.compiler.plan import Plan
from meshctl.compiler.summary import describe_counts, render_plan_summary

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
      - {name: texture, type: float}
  - name: scans
    domain: imaging
    source: imaging.csv
    columns:
      - {name: patient_id, type: string, pii: direct}
      - {name: area, type: float}
      - {name: site, type: string}
  - name: diagnosis
    domain: clinic
    source: clinic.csv
    columns:
      - {name: patient_id, type: string, pii: direct}
      - {name: smoothness, type: float}
      - {name: diagnosis, type: category, values: [benign, malignant]}
split_models:
  - name: malignancy
    key: patient_id
    parts:
      - {product: lab.cells, features: [radius, texture], bottom: {hidden: [8], out: 4}}
      - {product: imaging.scans, features: [area], bottom: {hidden: [], out: 2}}
      - {product: clinic.diagnosis, features: [smoothness]}
    label: {product: clinic.diagnosis, column: diagnosis}
    top: {hidden: [6]}
    activations: {clip: 5.0}
    min_intersection: 10
    training: {epochs: 3, batch_size: 16, optimizer: adam, lr: 0.01, seed: 7}
"""


def _compile(tmp_path: Path, text: str = MESH, *edits: tuple[str, str]):
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    for name in ("lab", "imaging", "clinic"):
        (tmp_path / f"{name}.csv").write_text("patient_id\n")
    (tmp_path / "mesh.yaml").write_text(text)
    return compile_mesh(tmp_path / "mesh.yaml")


def _codes(result) -> list[str]:
    return [d.code for d in result.diagnostics]


def test_a_split_model_compiles_into_its_plan_section(tmp_path: Path) -> None:
    result = _compile(tmp_path)
    assert result.diagnostics == [], result.render_diagnostics()
    plan = result.plan
    assert plan is not None
    (split,) = plan.split_models
    assert split.participants == ["lab", "imaging", "clinic"]
    assert (split.label_domain, split.label_column, split.classes) == ("clinic", "diagnosis",
                                                                       ["benign", "malignant"])
    lab = split.part("lab")
    assert (lab.key, lab.features, lab.out) == ("patient_id", ["radius", "texture"], 4)
    assert [(t.name, t.shape) for t in lab.tensors] == [("0.weight", [8, 2]), ("0.bias", [8]),
                                                        ("2.weight", [4, 8]), ("2.bias", [4])]
    assert [t.shape for t in split.part("imaging").tensors] == [[2, 1], [2]]
    assert split.part("clinic").out == 8  # the default bottom
    assert [t.shape for t in split.top_tensors] == [[6, 14], [6], [2, 6], [2]]
    assert (split.clip, split.noise, split.min_intersection, split.epochs, split.seed) == (5.0, None, 10, 3, 7)
    assert split.metrics == ["loss", "accuracy"]
    again = Plan.from_toml(plan.to_toml())
    assert again == plan and "[[split_models]]" in plan.to_toml()
    summary = render_plan_summary(plan)
    assert "0 jobs, 1 split model" in summary
    assert "split model malignancy: parts lab 2→4, imaging 1→2, clinic 1→8; top 14→6→2 at clinic" in summary
    assert "at clinic (label diagnosis); activations clip 5; 3 epochs" in summary
    assert describe_counts(result.spec).endswith("0 models, 1 split model")


def test_meshes_without_split_models_have_no_such_table(tmp_path: Path) -> None:
    text = MESH.split("split_models:")[0]
    plan = _compile(tmp_path, text).plan
    assert plan is not None and plan.split_models == [] and "split_models" not in plan.to_toml()


@pytest.mark.parametrize(("edit", "code", "words"), [
    (("product: lab.cells, features", "product: lab.cell, features"), "MESH560", "unknown product 'lab.cell'"),
    (("    key: patient_id\n", "    key: pid\n"), "MESH561", "key column 'pid' is not a column of lab.cells"),
    (("    key: patient_id\n", ""), "MESH561", "part lab.cells has no key column"),
    (("features: [area]", "features: [volume]"), "MESH562", "feature 'volume' is not a column of imaging.scans"),
    (("features: [smoothness]", "features: [smoothness, radius]"), "MESH562",
     "feature 'radius' is not a column of clinic.diagnosis"),
    (("features: [area]", "features: [area, area]"), "MESH563", "feature 'area' is read twice"),
    (("features: [smoothness]", "features: [diagnosis]"), "MESH563", ("feature 'diagnosis' of split model "
                                                                      "'malignancy' is the label")),
    (("features: [area]", "features: [patient_id]"), "MESH563", "is the key"),
    (("features: [area]", "features: [site]"), "MESH569", "is a string column without declared values"),
    (("{name: area, type: float}", "{name: area, type: float, pii: indirect}"), "MESH564", "is a PII column"),
    (("label: {product: clinic.diagnosis", "label: {product: imaging.scans"), "MESH566",
     "label column 'diagnosis' is not a column of imaging.scans"),
    (("values: [benign, malignant]", "values: [benign]"), "MESH566", "fewer than 2 values"),
    (("{product: imaging.scans, features: [area], bottom: {hidden: [], out: 2}}",
      "{product: lab.cells, key: patient_id, features: [], bottom: {hidden: [], out: 2}}"), "MESH567",
     "two parts in domain 'lab'"),
    (("    source: imaging.csv\n", "    source: imaging.csv\n    access: request\n"), "MESH405",
     "model 'malignancy' reads 'imaging.scans', which is `access: request`, without a grant"),
])
def test_split_model_checks(tmp_path: Path, edit: tuple[str, str], code: str, words: str) -> None:
    result = _compile(tmp_path, MESH, edit)
    assert result.plan is None
    found = [d for d in result.diagnostics if d.code == code]
    assert found and words in found[0].message, result.render_diagnostics()
    assert code in CODES


def test_the_label_owner_must_be_a_participant(tmp_path: Path) -> None:
    text = MESH.replace("  - name: diagnosis\n", "  - name: other\n    domain: clinic\n    source: clinic.csv\n"
                        "    columns: [{name: y, type: category, values: [a, b]}]\n  - name: diagnosis\n", 1)
    result = _compile(tmp_path, text, ("label: {product: clinic.diagnosis, column: diagnosis}",
                                       "label: {product: clinic.other, column: y}"))
    assert _codes(result) == ["MESH565"], result.render_diagnostics()


def test_unknown_keys_and_one_part_are_refused(tmp_path: Path) -> None:
    result = _compile(tmp_path, MESH, ("    min_intersection: 10\n", "    min_intersection: 10\n    rounds: 3\n"))
    assert [d.message for d in result.diagnostics if d.code == "MESH202"] == ["unknown key 'rounds' in split_models[0]"]
    one = MESH.replace("      - {product: imaging.scans, features: [area], bottom: {hidden: [], out: 2}}\n", "")
    one = one.replace("      - {product: lab.cells, features: [radius, texture], bottom: {hidden: [8], out: 4}}\n", "")
    result = _compile(tmp_path, one)
    assert result.plan is None and "at least 2 items" in result.render_diagnostics()


def test_a_split_model_may_not_share_a_name_with_a_model(tmp_path: Path) -> None:
    text = MESH.replace("split_models:", "models:\n  - name: malignancy\n    inputs: {contract: c, features: [a],"
                        " target: b}\nsplit_models:", 1)
    assert "MESH301" in _codes(_compile(tmp_path, text))


SPLIT_POLICIES = """\
policies:
  - {name: purposes, scope: model, require: 'model.purpose in ["cancer-research"]'}
  - {name: small, scope: model, effect: warn, require: 'model.parameters <= 100'}
  - name: bounded-intersection
    scope: model
    when: model.kind == "split"
    require: model.min_intersection >= 10 && model.activations.clip > 0.0
  - name: reads
    scope: model
    require: model.reads.map(r, r.id) == ["lab.cells", "imaging.scans", "clinic.diagnosis"]
"""


def _with_policies(policies: str = SPLIT_POLICIES, purpose: str = "cancer-research") -> str:
    text = MESH.replace("split_models:\n", policies + "split_models:\n", 1)
    return text.replace("    key: patient_id\n", f"    purpose: {purpose}\n    key: patient_id\n", 1)


def test_model_policies_judge_split_models_into_the_plan(tmp_path: Path) -> None:
    result = _compile(tmp_path, _with_policies())
    assert [(d.code, d.message) for d in result.diagnostics] == [
        ("MESH411", "policy 'small' warns about model 'malignancy': requires model.parameters <= 100")]
    plan = result.plan
    assert plan is not None
    decided = {(d.policy, d.subject): d.effect for d in plan.decisions}
    assert decided == {("bounded-intersection", "model.malignancy"): "allow", ("reads", "model.malignancy"): "allow",
                       ("purposes", "model.malignancy"): "allow", ("small", "model.malignancy"): "warn"}
    summary = render_plan_summary(plan)
    assert "policy decisions:" in summary and "model.malignancy" in summary and "warn" in summary


def test_the_split_model_variables(tmp_path: Path) -> None:
    from meshctl.compiler.entrypoint import builtin_hash
    from meshctl.compiler.split import split_activation

    plan = _compile(tmp_path, _with_policies()).plan
    assert plan is not None
    model = split_activation(plan.split_models[0], [], {"lab": "eu"})
    assert (model["kind"], model["name"], model["purpose"]) == ("split", "malignancy", "cancer-research")
    assert model["participants"] == ["lab", "imaging", "clinic"]
    assert model["domains"][:2] == [{"name": "lab", "jurisdiction": "eu"}, {"name": "imaging", "jurisdiction": ""}]
    assert model["features"] == ["radius", "texture", "area", "smoothness"] and model["target"] == "diagnosis"
    assert model["label"] == {"domain": "clinic", "product": "clinic.diagnosis", "column": "diagnosis",
                              "classes": ["benign", "malignant"]}
    assert model["parts"][0] == {"domain": "lab", "product": "lab.cells", "key": "patient_id",
                                 "features": ["radius", "texture"], "bottom": {"kind": "mlp", "hidden": [8], "out": 4,
                                                                                  "activation": "relu", "entrypoint": "",
                                                                                  "code_hash": builtin_hash()},
                                 "parameters": 8 * 2 + 8 + 4 * 8 + 4}
    assert model["activations"] == {"clip": 5.0, "noise": 0.0} and model["min_intersection"] == 10
    assert model["architecture"]["kind"] == "split" and model["architecture"]["hidden"] == [6]
    assert model["training"]["epochs"] == 3 and model["privacy"]["dp"]["epsilon"] == 0.0
    top = 6 * 14 + 6 + 2 * 6 + 2
    assert model["parameters"] == sum(p["parameters"] for p in model["parts"]) + top


@pytest.mark.parametrize(("policies", "purpose", "code", "words"), [
    (SPLIT_POLICIES, "advertising", "MESH410", "policy 'purposes' denies model 'malignancy'"),
    (SPLIT_POLICIES.replace("min_intersection >= 10", "min_intersection >= 1000"), "cancer-research", "MESH410",
     "policy 'bounded-intersection' denies model 'malignancy'"),
    ("policies:\n  - {name: strategy, scope: model, require: 'model.aggregation.strategy == \"fedavg\"'}\n",
     "cancer-research", "MESH413", "policy 'strategy' failed to evaluate `require` for model 'malignancy'"),
    ("domains_policies", "cancer-research", "MESH410", "policy 'clinic.no-noise' denies model 'malignancy'"),
], ids=["purpose", "min-intersection", "field-it-lacks", "domain-local"])
def test_a_policy_denies_a_split_model_or_cannot_read_it(tmp_path: Path, policies: str, purpose: str, code: str,
                                                         words: str) -> None:
    if policies == "domains_policies":  # a domain-local policy of a participant applies
        text = _with_policies("", purpose).replace(
            "  - {name: clinic}\n", "  - name: clinic\n    policies:\n      - {name: no-noise, scope: model,"
                                    " require: 'model.activations.noise > 0.0'}\n", 1)
    else:
        text = _with_policies(policies, purpose)
    result = _compile(tmp_path, text)
    assert result.plan is None
    found = [d for d in result.diagnostics if d.code == code]
    assert found and words in found[0].message, result.render_diagnostics()


def test_a_real_mesh_with_model_policies_takes_a_split_model(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    text = (root / "mesh.yaml").read_text().replace("examples/hospitals/data/", str(root / "examples/hospitals/data") + "/")
    text += """
split_models:
  - name: vertical
    purpose: cancer-research
    key: mrn
    parts:
      - {product: charite.biopsies, features: [radius_mean]}
      - {product: karolinska.biopsies, features: [texture_mean]}
      - {product: amsterdam-umc.biopsies, features: [area_mean]}
    label: {product: charite.biopsies, column: diagnosis}
"""
    (tmp_path / "mesh.yaml").write_text(text)
    result = compile_mesh(tmp_path / "mesh.yaml")
    assert result.plan is not None, result.render_diagnostics()
    decided = {d.policy: d.effect for d in result.plan.decisions if d.subject == "model.vertical"}
    assert decided == {"minimum-cohort": "allow", "purpose-limitation": "allow", "restricted-needs-privacy": "warn"}
    warned = [d.message for d in result.diagnostics if d.code == "MESH411"]
    assert "policy 'restricted-needs-privacy' warns about model 'vertical'" in " ".join(warned)
    from meshctl.runtime.governance import evaluate_split, split_model_activation

    (split,) = result.plan.split_models  # each domain decides again on the plan alone, the same way
    assert split_model_activation(result.plan, split)["reads"][1] == {
        "id": "karolinska.biopsies", "domain": "karolinska", "classification": "restricted", "access": "open",
        "tags": [], "contract": "tumor-biopsy", "contract_version": "1.0.0", "purposes": ["cancer-research"],
        "jurisdiction": "eu"}
    for domain in split.participants:
        runtime = {d.policy: d.effect for d in evaluate_split(result.plan, split, domain)}
        assert {k: runtime[k] for k in decided} == decided
        assert [runtime[f"invariant:{k}"] for k in ("participant", "no-pii-features", "grant-required")] == [
            "allow"] * 3


def test_a_split_model_reads_a_request_product_under_a_grant(tmp_path: Path) -> None:
    from meshctl.specedit import request_access

    text = _with_policies("").replace("    source: imaging.csv\n", "    source: imaging.csv\n    access: request\n", 1)
    assert _compile(tmp_path, text).plan is None
    request_access(tmp_path / "mesh.yaml", "imaging.scans", "malignancy", "cancer-research", until=None,
                   reason="", by="ana", today=date(2026, 1, 1))
    result = compile_mesh(tmp_path / "mesh.yaml")
    assert result.plan is not None, result.render_diagnostics()
    (split,) = result.plan.split_models
    assert split.grants == ["imaging.scans->model:malignancy"]
    assert [g.id for g in result.plan.grants] == ["imaging.scans->model:malignancy"]
    wrong = (tmp_path / "mesh.yaml").read_text().replace("purpose: cancer-research\n    requested_by",
                                                          "purpose: ads\n    requested_by")
    assert "MESH404" in _codes(_compile(tmp_path, wrong))


def test_split_models_without_request_products_carry_no_grants(tmp_path: Path) -> None:
    plan = _compile(tmp_path).plan
    assert plan is not None and plan.split_models[0].grants is None and "grants" not in plan.to_toml()


def test_a_feature_of_another_part_says_which_product_has_it(tmp_path: Path) -> None:
    result = _compile(tmp_path, MESH, ("features: [smoothness]", "features: [smoothness, radius]"))
    (found,) = [d for d in result.diagnostics if d.code == "MESH562"]
    assert found.hint == "radius is a column of lab.cells, another part: list it under that part's features"


def test_zero_clip_and_noise_are_off_as_the_docs_say(tmp_path: Path) -> None:
    (tmp_path / "zero").mkdir()
    (tmp_path / "none").mkdir()
    zero = _compile(tmp_path / "zero", MESH, ("activations: {clip: 5.0}", "activations: {clip: 0.0, noise: 0.0}"))
    none = _compile(tmp_path / "none", MESH, ("    activations: {clip: 5.0}\n", ""))
    assert zero.plan is not None and none.plan is not None, zero.render_diagnostics()
    split = zero.plan.split_models[0]
    assert (split.clip, split.noise) == (None, None)
    assert split == none.plan.split_models[0]
