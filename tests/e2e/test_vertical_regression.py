"""Split learning with a numeric label, a regression, and a categorical feature (issue 15):
examples/vertical-regression/mesh.yaml through real daemons, a real coordinator, CurveZMQ and DuckDB.
The top model has one output and trains with mse; the clinic one-hot encodes `sex` over its declared
values; the holdout's loss, mae, rmse and r2 equal those scikit-learn computes on the predictions of
the same network trained centrally on the joined rows, with the same seeds."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import duckdb
import torch
from example_copy import example_mesh
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import PlanFeature
from meshctl.runtime import events as ev
from meshctl.runtime.domain.split import standardize
from meshctl.runtime.features import _text
from meshctl.runtime.kernels import split as ks
from meshctl.runtime.launcher import start_run

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "vertical-regression"
FILES = {"clinic": "progression_clinic.parquet", "lab": "progression_lab.parquet"}
EPOCHS = 3


def _mesh(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    # sgd: Adam's first step imports torch._dynamo (seconds) in each domain; the equality holds either way
    return example_mesh(EXAMPLE, tmp_path, ("epochs: 60", f"epochs: {EPOCHS}"),
                        ("optimizer: adam, lr: 0.05", "optimizer: sgd, lr: 0.0005"), *edits)


def _table(domain: str) -> dict[str, list]:
    return duckdb.connect().execute(f"SELECT * FROM read_parquet('{EXAMPLE / 'data' / FILES[domain]}')").fetchnumpy()


def _centralised(plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(the holdout's predictions, its labels) of the same network trained on the joined rows: the
    intersection ordered by key, the same holdout, per-part standardization, seeds, batches, optimizer."""
    split = plan.split_models[0]
    tables = {d: _table(d) for d in FILES}
    index = {d: {str(k): r for r, k in enumerate(t["patient_id"])} for d, t in tables.items()}
    shared = sorted(set.intersection(*(set(i) for i in index.values())))
    train, test = ks.holdout_split(len(shared), split.holdout, split.seed)
    parts = []
    for p in split.parts:
        rows = [index[p.domain][k] for k in shared]
        blocks = []
        for f in p.inputs or [PlanFeature(name=f) for f in p.features]:  # a categorical feature: one-hot
            column = tables[p.domain][f.name]
            blocks.append(torch.tensor([[float(column[r])] for r in rows]) if f.kind == "numeric" else
                          torch.tensor([[float(_text(column[r]) == v) for v in f.vocabulary] for r in rows]))
        x = torch.cat(blocks, dim=1)
        parts.append(standardize(x, train)[0])
    y = torch.tensor([float(tables["clinic"]["progression"][index["clinic"][k]]) for k in shared])
    bottoms = [ks.build_bottom({"kind": "mlp", "hidden": p.hidden, "out": p.out}, p.input_width, split.seed + i)
               for i, p in enumerate(split.parts)]
    top = ks.build_top({"kind": "mlp", "hidden": split.top_hidden}, sum(p.out for p in split.parts), 1,
                       split.seed + len(split.parts))
    ks.train_centralised(bottoms, top, [x[train] for x in parts], y[train], epochs=split.epochs,
                         batch_size=split.batch_size, optimizer={"name": split.optimizer, "lr": split.lr},
                         loss="mse", seed=split.seed)
    with torch.no_grad():
        out = ks.SplitNet(bottoms, top).eval()([x[test] for x in parts]).flatten()
    return out, y[test]


def test_a_regression_split_model_scores_as_scikit_learn_on_the_centralised_predictions(tmp_path, monkeypatch):
    # Prepare
    mesh = _mesh(tmp_path)
    tap = tmp_path / "tap"
    tap.mkdir()
    monkeypatch.setenv("MESHCTL_WIRE_TAP", str(tap))
    result = compile_mesh(mesh)
    assert result.plan is not None, result.render_diagnostics()
    plan = result.plan
    (split,) = plan.split_models
    assert (split.task, split.classes, split.metrics) == ("regression", [], ["loss", "mae", "rmse", "r2"])
    assert [(f.name, f.kind, f.width) for f in split.parts[0].inputs] == [  # sex: one-hot over [1, 2]
        ("age", "numeric", 1), ("sex", "categorical", 2), ("bmi", "numeric", 1), ("bp", "numeric", 1)]
    # Execute
    run = start_run(mesh, plan, address="tcp://127.0.0.1:0")
    events = list(run.follow())
    finished = run.finish()
    # Assert: every epoch reports the regression's metrics
    assert finished.ok, finished.reason
    epochs = [e for e in events if isinstance(e, ev.RoundCompleted)]
    assert [e.round for e in epochs] == list(range(1, EPOCHS + 1))
    assert all(set(e.metrics) == {"loss", "mae", "rmse", "r2"} for e in epochs)
    done = next(e for e in events if isinstance(e, ev.JobCompleted))
    assert (finished.run_dir / done.model_path).is_file()
    # Assert: scikit-learn on the centralised network's predictions gives the same numbers
    pred, y = _centralised(plan)
    expected = {"loss": mean_squared_error(y, pred), "mae": mean_absolute_error(y, pred),
                "rmse": math.sqrt(mean_squared_error(y, pred)), "r2": r2_score(y, pred)}
    for name, value in expected.items():
        assert math.isclose(done.metrics[name], value, rel_tol=1e-3, abs_tol=1e-3), (name, done.metrics, expected)
    # Assert: no label leaves the clinic (float64 values, or four in a row as float32)
    blob = (tap / "clinic.tap").read_bytes()
    labels = [float(v) for v in _table("clinic")["progression"]]
    assert not [v for v in labels if struct.pack("<d", v) in blob]
    assert not [i for i in range(200) if struct.pack("<4f", *labels[i:i + 4]) in blob]


def test_a_diverged_loss_fails_the_job_in_one_line_and_the_clinic_is_not_lost(tmp_path):
    """Real daemons: sgd at lr 0.5 on raw progression scores overflows in the first epoch. The clinic,
    alive, says so (`split-failed`); the run fails in its line and no domain is lost."""
    mesh = _mesh(tmp_path, ("optimizer: sgd, lr: 0.0005", "optimizer: sgd, lr: 0.5"))
    plan = compile_mesh(mesh).plan
    assert plan is not None
    run = start_run(mesh, plan, address="tcp://127.0.0.1:0")
    events = list(run.follow())
    finished = run.finish()
    assert not finished.ok
    line = "split job progression: the loss at clinic diverged at epoch 1 batch 3 (lr 0.5 too high?)"
    assert line in finished.reason and "\n" not in finished.reason, finished.reason
    assert [e.reason for e in events if isinstance(e, ev.JobFailed)] == [line]
    assert not [e for e in events if isinstance(e, ev.DomainLost)]
