"""A model's held-out evaluation product (`evaluation.product`, issue 12): scored every round by the domain
that holds it, which never trains; its rows never leave that domain; every bad declaration is refused
at compile time. Real processes, real DuckDB, real ZeroMQ; scikit-learn is the peer for the metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, log_loss

from meshctl.compiler.compile import compile_mesh
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.daemon import read_tap
from meshctl.runtime.kernels.models import build_model
from meshctl.runtime.launcher import evaluation_lines, start_run

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
COLUMNS = ", ".join([f"{{name: px{i}, type: float}}" for i in range(64)]
                    + ["{name: label, type: category, values: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}",
                       "{name: split, type: string}"])


def write_mesh(root: Path, *, participants: str = "[client-0, client-1]", evaluation: str = "",
               training: str = "", privacy: str = "", extra_products: str = "", policies: str = "",
               jurisdiction_2: str = "eu", contract_2: str = "digits@1", access_2: str = "open",
               rounds: int = 3) -> Path:
    """The digits mesh over client-0..2 (client-2's product: `contract_2`, `access_2`) in `root`."""
    if not (root / "data").exists():
        (root / "data").symlink_to(DIGITS / "data")
    products = "\n".join(
        f"  - {{name: digits, domain: client-{i}, source: data/client-{i}.parquet, contract: digits@1, "
        f"columns: *cols}}" if i < 2 else
        f"  - {{name: digits, domain: client-2, source: data/client-2.parquet, columns: *cols"
        f"{', contract: ' + contract_2 if contract_2 else ''}, access: {access_2}}}" for i in range(3))
    text = f"""apiVersion: meshctl/v1
mesh: {{name: eval-test, coordinator: {{address: tcp://127.0.0.1:7799}}}}
domains:
  - {{name: client-0, owner: a@x.example, jurisdiction: eu, address: local}}
  - {{name: client-1, owner: b@x.example, jurisdiction: eu, address: local}}
  - {{name: client-2, owner: c@x.example, jurisdiction: {jurisdiction_2}, address: local}}
contracts:
  - name: digits
    version: 1.0.0
    purposes: [benchmark]
    columns: &cols [{COLUMNS}]
  - {{name: other, version: 1.0.0, purposes: [benchmark], columns: *cols}}
products:
{products}
{extra_products}
{policies}
models:
  - name: digits-mlp
    purpose: benchmark
    inputs: {{contract: digits, features: ["px*"], target: label}}
    participants: {participants}
    architecture: {{kind: mlp, hidden: [32]}}
    training: {{rounds: {rounds}, lr: 0.05, momentum: 0.9, seed: 0{training}}}
    evaluation: {{holdout_column: split, holdout_value: test{evaluation}}}
{privacy}
"""
    path = root / "mesh.yaml"
    path.write_text(text)
    return path


def _codes(path: Path) -> list[tuple[str, str]]:
    return [(d.code, d.message) for d in compile_mesh(path).errors]


def _rows(domain: str) -> tuple[np.ndarray, np.ndarray]:
    """Every row of a domain's digits product (features, label), read straight from its Parquet file."""
    with duckdb.connect() as con:
        arr = con.execute(f"SELECT * FROM read_parquet('{DIGITS / 'data' / f'{domain}.parquet'}')").fetchnumpy()
    x = np.stack([np.asarray(arr[f"px{i}"], dtype=np.float32) for i in range(64)], axis=1)
    return x, np.asarray([int(v) for v in arr["label"]])


def test_the_evaluation_product_is_scored_every_round_by_a_domain_that_never_trains(tmp_path, monkeypatch):
    mesh = write_mesh(tmp_path, evaluation=", product: client-2.digits")
    plan = compile_mesh(mesh).plan
    assert plan is not None
    job = plan.jobs[0]
    assert job.participants == ["client-0", "client-1"] and job.evaluation.product == "client-2.digits"
    tap = tmp_path / "tap"
    tap.mkdir()
    monkeypatch.setenv("MESHCTL_WIRE_TAP", str(tap))
    run = start_run(mesh, plan, address="tcp://127.0.0.1:0")
    events = list(run.follow())
    result = run.finish()
    assert result.ok, result.reason
    held = [e for e in events if isinstance(e, ev.HeldOutEvaluated)]
    x, y = _rows("client-2")
    assert [e.round for e in held] == [1, 2, 3] and not any(e.reason for e in held)
    assert all(e.domain == "client-2" and e.examples == len(y) for e in held)  # every row, both splits
    assert {e.domain for e in events if isinstance(e, ev.UpdateReceived)} == {"client-0", "client-1"}
    # the domains' own holdouts stay the pooled metrics; the product is reported apart, per round
    with (result.run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["1", "2", "3"]
    for row, e in zip(rows, held):
        assert row["product_examples"] == str(len(y)) and row["evaluated"] == "2"
        assert float(row["product_loss"]) == pytest.approx(e.metrics["loss"], abs=1e-6)
        assert float(row["product_accuracy"]) == pytest.approx(e.metrics["accuracy"], abs=1e-6)
        assert row["product_loss"] != row["test_loss"]
    # the peer: scikit-learn on the final model's predictions over every row of the product
    model = build_model(job)
    model.load_state_dict(load_file(str(result.run_dir / "models" / "digits-mlp.safetensors")))
    with torch.no_grad():
        proba = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    last = held[-1].metrics
    assert last["loss"] == pytest.approx(log_loss(y, proba, labels=list(range(10))), abs=1e-5)
    assert last["accuracy"] == pytest.approx(accuracy_score(y, proba.argmax(1)), abs=1e-9)
    # the summary (`up` headless, `meshctl status`) says it
    lines = evaluation_lines(events, "digits-mlp", result.run_dir)
    assert lines == [(f"job digits-mlp: evaluation product client-2.digits (round 3, {len(y)} examples)  "
                      f"loss {last['loss']:.4f}  accuracy {last['accuracy']:.4f}")]
    # the product's rows never crossed the wire: client-2 said hello, beat, and sent sums without tensors
    frames = read_tap(tap / "client-2.tap")
    sent, i = [], 0
    while i < len(frames):
        k = 1 + sum(t["chunks"] for t in json.loads(frames[i])["tensors"])
        msg, tensors = wire.decode(frames[i:i + k])
        sent.append(msg.type)
        i += k
        assert not tensors
        if isinstance(msg, wire.EvalRes):
            assert msg.on == "product" and msg.examples == len(y)
    assert set(sent) <= {"hello", "heartbeat", "eval_res"} and sent.count("eval_res") == 3 and "hello" in sent
    blob = b"".join(frames)
    for row in x[:50]:
        assert row.tobytes()[:16] not in blob
        assert json.dumps([float(v) for v in row[20:24]])[1:-1] not in blob.decode("latin-1")


def test_a_domain_with_a_product_under_the_contract_is_not_a_participant_under_participants_all(tmp_path):
    plan = compile_mesh(write_mesh(tmp_path, participants="all", evaluation=", product: client-2.digits")).plan
    assert plan is not None
    job = plan.jobs[0]
    assert job.participants == ["client-0", "client-1"]
    assert [r.product for r in job.reads] == ["client-0.digits", "client-1.digits"]


@pytest.mark.parametrize(("kwargs", "code", "words"), [
    ({"evaluation": ", product: client-2.digitz"}, "MESH535", "is not a product"),
    ({"participants": "[client-0, client-1, client-2]", "evaluation": ", product: client-2.digits"},
     "MESH535", "which is the model's evaluation product"),
    ({"participants": "[client-0, client-1]", "evaluation": ", product: client-0.digits"},
     "MESH535", "is also a training product"),
    ({"evaluation": ", product: client-2.extra", "extra_products": "  - {name: extra, domain: client-2, "
      "source: data/client-2.parquet, columns: [{name: px0, type: float}, {name: label, type: category, "
      "values: [a, b]}]}"}, "MESH535", "px1 (missing)"),
    ({"evaluation": ", product: client-2.digits", "access_2": "request"}, "MESH405", "without a grant"),
    ({"evaluation": ", product: client-2.digits", "training": ", standardize: true"}, "MESH537", "standardizes"),
    ({"evaluation": ", product: client-2.digits", "privacy": "    personalization: {local: ['2.*']}"},
     "MESH538", "is scored by a domain without personal layers"),
    ({"evaluation": ", product: client-2.digits", "jurisdiction_2": "us",
      "policies": "policies:\n  - {name: eu-only, scope: model, require: \"model.reads.all(r, r.jurisdiction == "
                  "'eu')\", message: models read EU data only}"}, "MESH410", "eu-only"),
])
def test_an_evaluation_product_that_cannot_be_read_is_refused_at_compile_time(tmp_path, kwargs, code, words):
    found = _codes(write_mesh(tmp_path, **kwargs))
    assert any(c == code and words in m for c, m in found), found


def test_an_evaluation_product_of_another_contract_with_the_features_and_target_compiles(tmp_path):
    plan = compile_mesh(write_mesh(tmp_path, evaluation=", product: client-2.digits", contract_2="other@1")).plan
    assert plan is not None and plan.jobs[0].evaluation.product == "client-2.digits"


def test_a_product_domain_that_refuses_the_job_leaves_the_rounds_unscored_and_the_job_goes_on(tmp_path):
    with duckdb.connect() as con:  # client-2's rows with a label outside the model's classes
        con.execute(f"COPY (SELECT * REPLACE ('x' AS label) FROM read_parquet('{DIGITS / 'data' / 'client-2.parquet'}'))"
                    f" TO '{tmp_path / 'bad.parquet'}' (FORMAT parquet)")
    mesh = write_mesh(tmp_path, evaluation=", product: client-2.bad", rounds=2, extra_products=(
        "  - {name: bad, domain: client-2, source: bad.parquet, columns: *cols}"))
    plan = compile_mesh(mesh).plan
    assert plan is not None
    run = start_run(mesh, plan, address="tcp://127.0.0.1:0")
    events = list(run.follow())
    result = run.finish()
    assert result.ok, result.reason
    held = [e for e in events if isinstance(e, ev.HeldOutEvaluated)]
    assert [e.round for e in held] == [1, 2] and not any(e.metrics for e in held)
    assert all(e.reason.startswith("domain client-2 refused the job: ") for e in held), held[0].reason
    with (result.run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["product_examples"], r["product_loss"]) for r in rows] == [("0", ""), ("0", "")]
    assert evaluation_lines(events, "digits-mlp", result.run_dir)[0].startswith(
        "job digits-mlp: evaluation product client-2.bad not scored: domain client-2 refused the job")
