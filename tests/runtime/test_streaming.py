"""Streamed job data (meshctl/runtime/stream.py, docs/streaming.md): a domain re-reads its rows in
Arrow batches from DuckDB instead of holding them, and trains as well as the in-memory path."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch

from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import PlanDp, PlanPrivacy
from meshctl.runtime.data import DataError, load_job_data
from meshctl.runtime.kernels import mlp
from meshctl.runtime.kernels.train import train_local, train_stream
from meshctl.runtime.stream import STREAM_ABOVE, StreamData, streams

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "stream_scale.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
from stream_scale import make_plan, write_parquet

MESH = """\
apiVersion: meshctl/v1
mesh:
  name: stream-test
  coordinator: {address: tcp://127.0.0.1:7799}
domains:
  - {name: bank-a, owner: a@bank.example, jurisdiction: eu, address: local}
  - {name: bank-b, owner: b@bank.example, jurisdiction: eu, address: local}
  - {name: bank-c, owner: c@bank.example, jurisdiction: eu, address: local}
products:
  - {name: rows, domain: bank-a, source: data/a.parquet, classification: internal, contract: rows@1,
     columns: &cols [{name: f0, type: float}, {name: f1, type: float}, {name: f2, type: float},
       {name: f3, type: float}, {name: f4, type: float}, {name: f5, type: float},
       {name: label, type: category, values: [a, b, c]}, {name: split, type: string}]}
  - {name: rows, domain: bank-b, source: data/b.parquet, classification: internal, contract: rows@1,
     columns: *cols}
  - {name: rows, domain: bank-c, source: data/c.parquet, classification: internal, contract: rows@1,
     columns: *cols}
contracts:
  - {name: rows, version: 1.0.0, purposes: [benchmark], columns: *cols}
models:
  - name: held
    purpose: benchmark
    inputs: {contract: rows, features: ["f*"], target: label}
    participants: all
    architecture: {kind: mlp, hidden: [16]}
    training: {rounds: 2, batch_size: 32, lr: 0.05, momentum: 0.9, data: memory, standardize: true}
    evaluation: {holdout_column: split, holdout_value: test}
    privacy: {secure_aggregation: true}
  - name: streamed
    purpose: benchmark
    inputs: {contract: rows, features: ["f*"], target: label}
    participants: all
    architecture: {kind: mlp, hidden: [16]}
    training: {rounds: 2, batch_size: 32, lr: 0.05, momentum: 0.9, data: stream, buffer_rows: 200,
               standardize: true}
    evaluation: {holdout_column: split, holdout_value: test}
    privacy: {secure_aggregation: true}
"""


def _rows(path: Path, n: int, seed: int) -> None:
    """n rows of a 3-class problem of 6 features, deterministic; every 4th row or so is `test`."""
    feats = ", ".join(f"(hash(i, {k}, {seed}) % 1000000) / 1000000.0 - 0.5 AS f{k}" for k in range(6))
    score = [" + ".join(f"{math.sin(7 * c + k):.3f} * f{k}" for k in range(6)) for c in range(3)]
    duckdb.sql(f"""COPY (SELECT f0, f1, f2, f3, f4, f5,
        CASE WHEN s0 >= s1 AND s0 >= s2 THEN 'a' WHEN s1 >= s2 THEN 'b' ELSE 'c' END AS label, split
        FROM (SELECT *, {score[0]} AS s0, {score[1]} AS s1, {score[2]} AS s2 FROM (
            SELECT i, {feats}, CASE WHEN hash(i, 7, {seed}) % 4 = 0 THEN 'test' ELSE 'train' END AS split
            FROM range({n}) t(i)))) TO '{path}' (FORMAT parquet)""")


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        _rows(tmp_path / "data" / f"{name}.parquet", 4000, seed)
    (tmp_path / "mesh.yaml").write_text(MESH)
    return tmp_path / "mesh.yaml"


def test_streamed_training_reaches_the_in_memory_accuracy(mesh):
    """`meshctl up --headless`, real processes: the same model trained on data held in memory and on
    data streamed in batches of 200 rows (about 15 batches an epoch per domain), standardized with
    the pooled sums and under secure aggregation, scores the same."""
    out = subprocess.run([sys.executable, "-m", "meshctl", "up", "--headless", "--address", "tcp://127.0.0.1:0"],
                         cwd=mesh.parent, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr + out.stdout
    run = Path(out.stdout.strip().splitlines()[-1].rsplit(": ", 1)[-1])
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    final = {r["job"]: float(r["test_accuracy"]) for r in rows if int(r["round"]) == 2}
    assert final["held"] > 0.9 and abs(final["streamed"] - final["held"]) <= 0.01, final
    log = (run / "logs" / "bank-a.log").read_text()
    assert "job streamed: streaming 4000 rows of bank-a.rows (buffer 200 rows)" in log
    assert "job held: streaming" not in log
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "run_completed" and events[-1]["ok"]


def test_a_buffer_holding_every_row_trains_exactly_as_in_memory(tmp_path):
    """Same order, same steps: streaming changes how rows are read, not what is learned."""
    _rows(tmp_path / "a.parquet", 3000, 1)
    plan = make_plan(tmp_path / "a.parquet", "stream", 32, None)
    job, product = plan.jobs[0], plan.products[0]
    job = job.model_copy(update={"features": job.features[:6], "architecture": job.architecture.model_copy(
        update={"input_dim": 6})})
    product = product.model_copy(update={"columns": product.columns[:6] + product.columns[20:]})
    held = load_job_data(job, product, tmp_path, 0)
    stream = StreamData.open(job, product, tmp_path, 0)
    assert (stream.n_train, stream.n_test) == (len(held.y_train), len(held.y_test))
    a, b = mlp(6, [8], 3, seed=0), mlp(6, [8], 3, seed=0)
    la = train_local(a, held.x_train, held.y_train, epochs=2, momentum=0.9, shuffle_seed=5)
    lb = train_stream(b, lambda: stream.batches("train"), epochs=2, momentum=0.9, shuffle_seed=5,
                      buffer_rows=10_000)
    assert la == lb
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def _peak(mode: str, source: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(BENCH), "--child", mode, "--source", str(source),
                             "--batch-size", "8192", "--buffer", "8192"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_streamed_memory_does_not_grow_with_rows(tmp_path):
    """The daemon's data path for a job (open or read, one local epoch, one evaluation), each run in
    a fresh process: from 250k to 750k rows the streamed path's peak RSS grows by a small fraction
    of what the in-memory path's grows by (benchmarks/stream_scale.py measures a whole daemon)."""
    paths = {n: tmp_path / f"{n}.parquet" for n in (250_000, 750_000)}
    for n, path in paths.items():
        write_parquet(path, n)
    procs = {(mode, n): _peak(f"{mode}-path", path) for mode in ("stream", "memory") for n, path in paths.items()}
    peak = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        peak[key] = json.loads(out.strip().splitlines()[-1])["peak_mb"]
    stream = peak["stream", 750_000] - peak["stream", 250_000]
    memory = peak["memory", 750_000] - peak["memory", 250_000]
    assert memory > 100, peak  # the in-memory path holds the table: some 50 MB per 100k rows at its peak
    assert stream < 0.15 * memory, peak


@pytest.mark.parametrize("bad", ["nan", "label", "text"])
def test_a_malformed_row_mid_stream_gives_the_in_memory_error(tmp_path, bad):
    """The stream's load-time check reads every batch: a bad row far from the first batch is refused
    with the in-memory path's one line, counts over the whole table included."""
    path = tmp_path / "rows.parquet"
    _rows(tmp_path / "clean.parquet", 50_000, 3)
    cell = {"nan": "CASE WHEN i IN (30000, 45000) THEN 'nan'::FLOAT ELSE f0 END",
            "label": "f0", "text": "CASE WHEN i IN (30000, 45000) THEN 'oops' ELSE f0::VARCHAR END"}[bad]
    label = "CASE WHEN i = 40000 THEN 'z' ELSE label END" if bad == "label" else "label"
    duckdb.sql(f"COPY (SELECT {cell} AS f0, f1, f2, f3, f4, f5, {label} AS label, split FROM "
               f"(SELECT row_number() OVER () - 1 AS i, * FROM '{tmp_path / 'clean.parquet'}')) TO '{path}' "
               f"(FORMAT parquet)")
    plan = make_plan(path, "stream", 32, 1000)
    job = plan.jobs[0].model_copy(update={"features": [f"f{i}" for i in range(6)]})
    product = plan.products[0].model_copy(update={"columns": plan.products[0].columns[:6]
                                                  + plan.products[0].columns[20:]})
    with pytest.raises(DataError) as held:
        load_job_data(job, product, tmp_path, 0)
    with pytest.raises(DataError) as streamed:
        StreamData.open(job, product, tmp_path, 0)
    assert streamed.value.render() == held.value.render()
    expect = {"nan": "2 NaN values in f0", "label": "1 values in label are outside",
              "text": "2 values in f0 are not float"}[bad]
    assert expect in held.value.message


def _compile(tmp_path: Path, training: str, source: str = "data/a.parquet"):
    (tmp_path / "data").mkdir(exist_ok=True)
    _rows(tmp_path / "data" / "a.parquet", 100, 1)
    _rows(tmp_path / "data" / "b.parquet", 100, 2)
    _rows(tmp_path / "data" / "c.parquet", 100, 3)
    text = MESH.replace("data/a.parquet", source).replace(
        "{rounds: 2, batch_size: 32, lr: 0.05, momentum: 0.9, data: memory, standardize: true}", training)
    (tmp_path / "mesh.yaml").write_text(text)
    return compile_mesh(tmp_path / "mesh.yaml")


@pytest.mark.parametrize(("training", "code", "words"), [
    ("{data: stream, batch_size: 64, buffer_rows: 32}", "MESH525", "buffer_rows 32 is smaller than its batch_size 64"),
    ("{data: memory, buffer_rows: 1000}", "MESH525", "sets `buffer_rows` but reads its data into memory"),
])
def test_the_compiler_refuses_what_streaming_cannot_do(tmp_path, training, code, words):
    result = _compile(tmp_path, training)
    found = [d for d in result.diagnostics if d.code == code]
    assert found and words in found[0].message, [d.message for d in result.diagnostics]


def test_streaming_refuses_dp_and_sqlite_sources(tmp_path):
    result = _compile(tmp_path, "{data: stream}\n    privacy: {dp: {epsilon: 3.0, delta: 1.0e-5, clip: 1.0}}")
    assert any(d.code == "MESH524" and "DP-SGD needs Poisson sampling" in d.message for d in result.diagnostics), \
        [d.message for d in result.diagnostics]
    result = _compile(tmp_path, "{data: stream}", source="sqlite:data/a.db")
    assert any(d.code == "MESH526" and "sqlite rows are copied into memory" in d.message
               for d in result.diagnostics), [d.message for d in result.diagnostics]
    explained = subprocess.run([sys.executable, "-m", "meshctl", "explain", "MESH524"], capture_output=True,
                               text=True, check=False)
    assert explained.returncode == 0 and "Poisson sampling" in explained.stdout


def test_data_auto_is_the_default_plan(tmp_path):
    """`data: auto` and no `data:` give the same jobs in the plan (golden plans stay as they were)."""
    one = _compile(tmp_path, "{rounds: 2, data: auto}").plan
    two = _compile(tmp_path, "{rounds: 2}").plan
    assert one is not None and two is not None, [d.message for d in _compile(tmp_path, "{data: auto}").diagnostics]
    jobs = one.to_toml().split("[[jobs]]", 1)[1]
    assert jobs == two.to_toml().split("[[jobs]]", 1)[1] and one.jobs[0].training.data is None
    assert jobs.count("data =") == 1  # the other model's `data: stream`
    streamed = _compile(tmp_path, "{rounds: 2, data: stream, buffer_rows: 4096}").plan
    assert streamed is not None and streamed.jobs[0].training.data == "stream"
    assert streamed.to_toml().count('data = "stream"') == 2 and "buffer_rows = 4096" in streamed.to_toml()


def test_auto_streams_above_the_threshold_and_never_dp_or_sqlite(tmp_path):
    plan = make_plan(tmp_path / "rows.parquet", "memory", 32, None)
    job, product = plan.jobs[0], plan.products[0]
    auto = job.model_copy(update={"training": job.training.model_copy(update={"data": None})})
    assert not streams(auto, product, STREAM_ABOVE) and streams(auto, product, STREAM_ABOVE + 1)
    assert not streams(job, product, 10 * STREAM_ABOVE)  # data: memory
    dp = auto.model_copy(update={"privacy": PlanPrivacy(dp=PlanDp(epsilon=1.0, delta=1e-5, clip=1.0))})
    assert not streams(dp, product, 10 * STREAM_ABOVE)
    assert not streams(auto, product.model_copy(update={"format": "sqlite"}), 10 * STREAM_ABOVE)


def test_without_pyarrow_auto_reads_into_memory_and_stream_is_refused_in_one_line(tmp_path):
    blocked = tmp_path / "pyarrow"
    blocked.mkdir()
    (blocked / "__init__.py").write_text("raise ImportError('pyarrow is not installed')\n")
    probe = f"""
import sys
sys.path.insert(0, {str(ROOT / 'benchmarks')!r})
from pathlib import Path
from stream_scale import make_plan
from meshctl.errors import UserError
from meshctl.runtime.stream import streams
plan = make_plan(Path('rows.parquet'), 'stream', 32, None)
job, product = plan.jobs[0], plan.products[0]
auto = job.model_copy(update={{"training": job.training.model_copy(update={{"data": None}})}})
print(streams(auto, product, 10**8))
try:
    streams(job, product, 10)
except UserError as err:
    print(err.render())
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "False", ("error: job scale streams its data (`data: stream`), which needs pyarrow "
        "(hint: pip install 'pyarrow>=15,<27', or use `data: memory`)")]
