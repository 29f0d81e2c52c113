"""Tasks and metrics end to end: regression and binary meshes compile, train over real processes
(`meshctl up --headless`), and every declared metric lands in metrics.csv, domain_metrics.csv and the
events, pooled and per domain with the examples behind it."""

from __future__ import annotations

import asyncio
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.summary import render_plan_summary
from meshctl.errors import MeshctlError
from meshctl.runtime.data import load_job_data
from meshctl.runtime.events import read_events

ROOT = Path(__file__).resolve().parents[2]
REGRESSION = ROOT / "examples" / "regression"
FREE = ["--address", "tcp://127.0.0.1:0"]
BINARY_METRICS = ["loss", "accuracy", "auroc", "f1", "precision", "recall"]


def _up(mesh: Path) -> tuple[subprocess.CompletedProcess, Path]:
    out = subprocess.run([sys.executable, "-m", "meshctl", "up", "--headless", *FREE], cwd=mesh.parent,
                         capture_output=True, text=True, timeout=240, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr + out.stdout
    return out, Path(out.stdout.strip().splitlines()[-1].rsplit(": ", 1)[-1])


def _regression(tmp_path: Path) -> Path:
    shutil.copy(REGRESSION / "mesh.yaml", tmp_path / "mesh.yaml")
    shutil.copytree(REGRESSION / "data", tmp_path / "data")
    return tmp_path / "mesh.yaml"


def _binary(tmp_path: Path) -> Path:
    """The hospitals mesh declared `task: binary` with every binary metric."""
    text = (ROOT / "mesh.yaml").read_text()
    text = text.replace("      target: diagnosis\n", "      target: diagnosis\n    task: binary\n", 1)
    text = text.replace("metrics: [loss, accuracy, auroc, f1]}", f"metrics: [{', '.join(BINARY_METRICS)}]}}", 1)
    text = text.replace("training: {rounds: 15,", "training: {rounds: 8,", 1)
    (tmp_path / "mesh.yaml").write_text(text)
    shutil.copytree(ROOT / "examples" / "hospitals" / "data", tmp_path / "examples" / "hospitals" / "data")
    return tmp_path / "mesh.yaml"


def _check_outputs(run: Path, job: str, declared: list[str], domains: list[str]) -> list[dict]:
    """Every declared metric pooled (events, metrics.csv) and per domain (events, domain_metrics.csv),
    and the pooled value equal to the example-weighted domains' where a metric is a mean."""
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    rounds = [e for e in events if e["type"] == "round_completed" and e["job"] == job]
    done = next(e for e in events if e["type"] == "job_completed" and e["job"] == job)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    per = list(csv.DictReader((run / "domain_metrics.csv").open()))
    assert list(rows[0])[:8] == ["job", "round", "participants", "train_loss", "test_loss", "test_accuracy",
                                 "evaluated", "eval_examples"]
    assert len(rows) == len(rounds) and len(per) == len(rounds) * len(domains)
    for e, row in zip(rounds, rows):
        assert set(declared) <= set(e["metrics"]), (declared, e["metrics"])
        assert sorted(e["domain_metrics"]) == sorted(domains) == sorted(e["domain_examples"])
        for d in domains:
            assert set(declared) <= set(e["domain_metrics"][d])
        n = sum(e["domain_examples"].values())
        assert n == int(row["eval_examples"])
        for m in declared:
            assert float(row[f"test_{m}"]) == pytest.approx(e["metrics"][m], abs=1e-6)
            if m in ("loss", "accuracy", "mae"):  # means pool as example-weighted means
                weighted = sum(e["domain_metrics"][d][m] * e["domain_examples"][d] for d in domains) / n
                assert e["metrics"][m] == pytest.approx(weighted, rel=1e-9)
    last = [r for r in per if int(r["round"]) == rounds[-1]["round"]]
    for r in last:
        assert int(r["examples"]) == done["domain_examples"][r["domain"]] > 0
        for m in declared:
            assert float(r[f"test_{m}"]) == pytest.approx(done["domain_metrics"][r["domain"]][m], abs=1e-6)
    assert done["metrics"] == rounds[-1]["metrics"]
    return rounds


def test_regression_example_trains_to_the_centralized_baseline(tmp_path):
    # by path, under its own name: other tests import other examples' make_data.py
    spec = importlib.util.spec_from_file_location("regression_make_data", REGRESSION / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    out, run = _up(_regression(tmp_path))
    rounds = _check_outputs(run, "progression", ["loss", "mae", "rmse", "r2"], ["clinic-a", "clinic-b", "clinic-c"])
    final = rounds[-1]["metrics"]
    base = make_data.baseline()
    assert final["r2"] > base["r2"] - 0.03 and final["rmse"] < base["rmse"] * 1.03
    assert final["rmse"] ** 2 == pytest.approx(final["loss"], rel=1e-9)  # mse loss: rmse² is the mean loss
    assert "accuracy" not in final
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert rows[-1]["test_accuracy"] == "" and rows[-1]["test_auroc"] == ""
    summary = out.stdout.splitlines()
    at = next(i for i, ln in enumerate(summary) if ln.startswith("job progression: 20 rounds"))
    at += 0 if "model " in summary[at] else 1  # the model path may wrap onto its own line (120 columns)
    assert all(f"  {d}" in summary[at + 1 + i] and "examples" in summary[at + 1 + i] and "r2 " in summary[at + 1 + i]
               for i, d in enumerate(["clinic-a", "clinic-b", "clinic-c"]))


def test_binary_mesh_reports_every_binary_metric(tmp_path):
    mesh = _binary(tmp_path)
    job = compile_mesh(mesh).plan.jobs[0]
    assert (job.task, job.loss, job.classes, job.architecture.output_dim) == \
        ("binary", None, ["benign", "malignant"], 1)
    _, run = _up(mesh)
    rounds = _check_outputs(run, "malignancy", BINARY_METRICS, ["amsterdam-umc", "charite", "karolinska"])
    final = rounds[-1]["metrics"]
    assert final["accuracy"] >= 0.85 and final["auroc"] >= 0.9 and 0 < final["f1"] <= 1
    _drill_down_shows_domain_metrics(read_events(str(run / "events.jsonl")), rounds)


def _drill_down_shows_domain_metrics(events: list, rounds: list[dict]) -> None:
    """The dashboard's round drill-down (Rounds tab, Enter on a round) lists each domain's test metrics."""
    from meshctl.tui import make_app
    from meshctl.tui.widgets import ContributionTable

    async def run() -> None:
        app = make_app()
        async with app.run_test(size=(160, 40)) as pilot:
            for e in events:
                app.feed(e)
            await pilot.pause()
            app.flush()
            await pilot.pause()
            await pilot.press("2")
            await pilot.press(*["up"] * 3, "enter")  # to round 5
            await pilot.pause()
            table = app.query_one(ContributionTable)
            assert table.round == ("malignancy", 5)
            labels = [str(c.label) for c in table.columns.values()]
            assert labels[-7:] == ["test n", *(f"test {m}" for m in BINARY_METRICS)]
            want = rounds[4]
            got = {r[0]: r[-7:] for r in table.plain_rows}
            assert got == {d: [str(want["domain_examples"][d]), *(f"{want['domain_metrics'][d][m]:.4f}"
                                                                  for m in BINARY_METRICS)]
                           for d in want["domain_metrics"]}

    asyncio.run(run())


def _minimal(tmp_path: Path, target: np.ndarray, model: str) -> Path:
    """Two domains of one float feature and a float target `y`."""
    for i, d in enumerate(["a", "b"]):
        pq.write_table(pa.table({"x": np.arange(20, dtype=np.float64), "y": target + i}), tmp_path / f"{d}.parquet")
    cols = "[{name: x, type: float}, {name: y, type: float}]"
    (tmp_path / "mesh.yaml").write_text(f"""apiVersion: meshctl/v1
mesh: {{name: tiny}}
domains: [{{name: a}}, {{name: b}}]
products:
  - {{name: p, domain: a, source: a.parquet, contract: c@1, columns: {cols}}}
  - {{name: p, domain: b, source: b.parquet, contract: c@1, columns: {cols}}}
contracts:
  - {{name: c, version: 1.0.0, purposes: [r], columns: {cols}}}
models:
  - name: m
    purpose: r
    inputs: {{contract: c, features: [x], target: y}}
{model}""")
    return tmp_path / "mesh.yaml"


def test_a_float_target_is_a_regression_and_huber_is_planned(tmp_path):
    mesh = _minimal(tmp_path, np.linspace(0, 1, 20), "    loss: huber\n    huber_delta: 2.5\n")
    result = compile_mesh(mesh)
    assert result.errors == [], result.render_diagnostics()
    job = result.plan.jobs[0]
    assert (job.task, job.loss, job.huber_delta, job.classes) == ("regression", "huber", 2.5, [])
    assert job.architecture.output_dim == 1 and job.evaluation.metrics == ["loss", "mae", "rmse", "r2"]
    assert " regression (huber), " in render_plan_summary(result.plan)
    data = load_job_data(job, result.plan.product("a.p"), tmp_path, 0)
    assert data.y_train.dtype == data.y_test.dtype == torch.float32


def test_a_nan_regression_target_is_refused_in_one_line(tmp_path):
    y = np.linspace(0, 1, 20)
    y[3] = np.nan
    mesh = _minimal(tmp_path, y, "")
    result = compile_mesh(mesh)
    with pytest.raises(MeshctlError, match=r"a\.p: 1 values in y are NaN or infinite"):
        load_job_data(result.plan.jobs[0], result.plan.product("a.p"), tmp_path, 0)


def test_the_collector_refuses_sums_that_are_not_the_jobs_task():
    from meshctl.runtime import wire
    from meshctl.runtime.coordinator.collector import check_stats
    from meshctl.runtime.kernels.metrics import eval_stats

    job = compile_mesh(REGRESSION / "mesh.yaml").plan.jobs[0]
    good = eval_stats("regression", torch.randn(7, 1), torch.randn(7), classes=None, loss="mse")

    def res(stats):
        return wire.EvalRes(job=job.name, round=1, examples=7, loss_sum=1.0, correct=0, stats=stats)

    assert check_stats(job, res(good)) == ""
    wrong_task = eval_stats("binary", torch.randn(7, 1), torch.ones(7), classes=2, loss="bce")
    assert "not those of a regression job" in check_stats(job, res(wrong_task))
    assert check_stats(job, res({**good, "n": [8.0]})) == "evaluation sums count 8 examples, not 7"
    assert check_stats(job, res({**good, "moments": [float("inf"), 0, 0, 0, 0]})) == "evaluation sums are not finite"
    classifier = compile_mesh(ROOT / "mesh.yaml").plan.jobs[0]
    sums = eval_stats("classification", torch.randn(7, 2), torch.zeros(7, dtype=torch.int64), classes=2,
                      loss="cross_entropy")
    ok = wire.EvalRes(job=classifier.name, round=1, examples=7, loss_sum=1.0, correct=0, stats=sums)
    assert check_stats(classifier, ok) == ""
    forged = {**sums, "confusion": [9.0, -2.0, 0.0, 0.0]}
    assert "do not add up" in check_stats(classifier, ok.model_copy(update={"stats": forged}))
