"""Split models with a numeric label (a regression) and with categorical features (issue 15): what
the compiler accepts, what it refuses (the federated models' codes where the meaning is the same),
and the plan it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_split_language import MESH, _compile  # (the same three-domain mesh and its compile)

from meshctl.compiler.summary import render_plan_summary

REGRESSION = MESH.replace("{name: diagnosis, type: category, values: [benign, malignant]}",
                          "{name: diagnosis, type: category, values: [benign, malignant]}\n"
                          "      - {name: size, type: float}\n      - {name: stage, type: int}\n"
                          "      - {name: smoker, type: bool}").replace(
    "label: {product: clinic.diagnosis, column: diagnosis}", "label: {product: clinic.diagnosis, column: size}")


def test_a_numeric_label_is_a_regression_with_one_output(tmp_path: Path) -> None:
    result = _compile(tmp_path, REGRESSION)
    assert result.diagnostics == [], result.render_diagnostics()
    (split,) = result.plan.split_models
    assert (split.task, split.classes, split.loss, split.huber_delta) == ("regression", [], None, None)
    assert split.metrics == ["loss", "mae", "rmse", "r2"]
    assert [t.shape for t in split.top_tensors][-1] == [1]  # the last bias: one output
    assert "top 14→6→1 at clinic (label size, regression (mse))" in render_plan_summary(result.plan)


def test_an_int_label_with_huber_loss(tmp_path: Path) -> None:
    result = _compile(tmp_path, REGRESSION, ("column: size}", "column: stage}\n    loss: huber\n    huber_delta: 5"))
    assert result.diagnostics == [], result.render_diagnostics()
    (split,) = result.plan.split_models
    assert (split.task, split.loss, split.huber_delta) == ("regression", "huber", 5.0)
    assert "(label stage, regression (huber))" in render_plan_summary(result.plan)


def test_a_classification_split_model_writes_no_task(tmp_path: Path) -> None:
    plan = _compile(tmp_path, MESH).plan
    assert plan is not None
    assert (plan.split_models[0].task, plan.split_models[0].loss) == (None, None)
    assert "task" not in plan.to_toml().split("[[split_models]]")[1]


@pytest.mark.parametrize(("text", "edit", "code", "words"), [
    (REGRESSION, ("min_intersection: 10", "min_intersection: 10\n    evaluation: {metrics: [loss, accuracy]}"),
     "MESH514", "evaluation metric 'accuracy' of split model 'malignancy' does not fit its task (regression"),
    (MESH, ("min_intersection: 10", "min_intersection: 10\n    evaluation: {metrics: [loss, r2]}"),
     "MESH514", "evaluation metric 'r2' of split model 'malignancy' does not fit its task (classification"),
    (REGRESSION, ("column: size}", "column: size}\n    loss: cross_entropy"), "MESH528",
     "loss cross_entropy of split model 'malignancy' does not fit its task (regression"),
    (MESH, ("column: diagnosis}", "column: diagnosis}\n    loss: mse"), "MESH528",
     "loss mse of split model 'malignancy' does not fit its task (classification"),
    (REGRESSION, ("column: size}", "column: size}\n    huber_delta: 2"), "MESH529",
     "huber_delta is a setting of `loss: huber`"),
])
def test_what_does_not_fit_the_label_is_refused_as_for_a_model(tmp_path: Path, text: str, edit: tuple[str, str],
                                                               code: str, words: str) -> None:
    result = _compile(tmp_path, text, edit)
    assert result.plan is None
    found = [d for d in result.diagnostics if d.code == code]
    assert found and words in found[0].message, result.render_diagnostics()


CATEGORICAL = MESH.replace("{name: site, type: string}", "{name: site, type: category, values: [north, south, east]}")


def test_a_categorical_feature_is_one_hot_over_its_declared_values(tmp_path: Path) -> None:
    result = _compile(tmp_path, CATEGORICAL, ("features: [area]", "features: [area, site]"))
    assert result.diagnostics == [], result.render_diagnostics()
    lab, imaging, _ = result.plan.split_models[0].parts
    assert lab.inputs is None and lab.input_width == 2  # all numeric: the plan as before
    assert [(f.name, f.kind, f.width, f.vocabulary) for f in imaging.inputs] == [
        ("area", "numeric", 1, None), ("site", "categorical", 3, ["north", "south", "east"])]
    assert imaging.input_width == 4 and imaging.tensors[0].shape == [2, 4]  # bottom {hidden: [], out: 2}
    assert "imaging 4→2" in render_plan_summary(result.plan)


def test_a_category_of_numbers_is_categorical_too(tmp_path: Path) -> None:
    text = MESH.replace("{name: site, type: string}", "{name: site, type: category, values: [1, 2]}")
    result = _compile(tmp_path, text, ("features: [area]", "features: [site]"))
    assert result.diagnostics == [], result.render_diagnostics()
    (site,) = result.plan.split_models[0].parts[1].inputs
    assert (site.kind, site.vocabulary) == ("categorical", ["1", "2"])


@pytest.mark.parametrize(("column", "code", "words"), [
    ("{name: site, type: string}", "MESH569", "feature 'site' of imaging.scans is a string column without declared values"),
    ("{name: site, type: date}", "MESH564", "is a date column; a bottom model reads int, float, bool or categorical"),
])
def test_a_feature_it_cannot_encode_is_refused(tmp_path: Path, column: str, code: str, words: str) -> None:
    result = _compile(tmp_path, MESH.replace("{name: site, type: string}", column), ("features: [area]",
                                                                                     "features: [area, site]"))
    assert result.plan is None
    assert [(d.code, words in d.message) for d in result.diagnostics] == [(code, True)], result.render_diagnostics()
