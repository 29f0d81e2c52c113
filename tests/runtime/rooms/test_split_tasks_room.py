"""Split jobs with a numeric label, categorical features, and the data and numbers a part cannot train
on (issue 15), on the in-memory hub: each scripted domain is the real SplitDomain over
examples/vertical's and examples/vertical-regression's data (DuckDB), answering as the daemon does; no processes, no sockets, no sleeps."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pytest
from sinks import ListSink
from split_hub import split_service

from meshctl.compiler.compile import compile_mesh
from meshctl.runtime import events as ev
from meshctl.runtime.coordinator import Coordinator, JobAborted

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
PROGRESSION = (("epochs: 60", "epochs: 1"), ("optimizer: adam, lr: 0.05", "optimizer: sgd, lr: 0.0005"))
MALIGNANCY = (("epochs: 30", "epochs: 1"), ("optimizer: adam, lr: 0.01", "optimizer: sgd, lr: 0.1"))


def _room(tmp_path: Path, mesh: str, *edits: tuple[str, str], data: dict[str, str] | None = None
          ) -> tuple[Coordinator, ListSink]:
    """A service running examples/`mesh`; `data` maps a data file to a DuckDB SELECT over `src`
    (the file as it is) that rewrites it."""
    text = (EXAMPLES / mesh).read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    shutil.copytree((EXAMPLES / mesh).parent / "data", tmp_path / "data")
    for name, select in (data or {}).items():
        src = tmp_path / "data" / name
        scan = f"read_parquet('{src}')" if name.endswith(".parquet") else f"read_csv('{src}')"
        fmt = "(FORMAT parquet)" if name.endswith(".parquet") else "(FORMAT csv, HEADER true)"
        with duckdb.connect() as con:
            con.execute(f"CREATE TABLE src AS SELECT * FROM {scan}")
            con.execute(f"COPY ({select}) TO '{src}' {fmt}")
    (tmp_path / "mesh.yaml").write_text(text)
    plan = compile_mesh(tmp_path / "mesh.yaml").plan
    assert plan is not None
    return split_service(tmp_path, plan)


def test_a_regression_with_a_categorical_feature_trains_and_reports_its_metrics(tmp_path):
    c, sink = _room(tmp_path, "vertical-regression/mesh.yaml", *PROGRESSION)
    c._work()
    done = next(e for e in sink.events if isinstance(e, ev.JobCompleted))
    assert set(done.metrics) == {"loss", "mae", "rmse", "r2"}
    row = dict(zip(*[line.split(",") for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[:2]]))
    assert row["test_accuracy"] == "" and float(row["test_mae"]) == pytest.approx(done.metrics["mae"], rel=1e-5)


def _refused(tmp_path: Path, mesh: str, edits: tuple, data: dict[str, str]) -> tuple[str, list[ev.Event]]:
    c, sink = _room(tmp_path, mesh, *edits, data=data)
    with pytest.raises(JobAborted) as err:
        c._work()
    assert not [e for e in sink.events if isinstance(e, ev.DomainLost)]
    return str(err.value), sink.events


@pytest.mark.parametrize(("mesh", "edits", "data", "reason"), [
    ("vertical-regression/mesh.yaml", PROGRESSION,
     {"progression_clinic.parquet": "SELECT * REPLACE (CASE WHEN rowid = 5 THEN 3 ELSE sex END AS sex) FROM src"},
     "clinic.visits: feature column sex holds 1 value not declared in its values"),
    ("vertical-regression/mesh.yaml", PROGRESSION,
     {"progression_clinic.parquet": ("SELECT * REPLACE (CASE WHEN rowid IN (2, 8) THEN 'nan'::DOUBLE "
                                     "ELSE progression END AS progression) FROM src")},
     "clinic.visits: label column: 2 NaN values in progression"),
    ("vertical-regression/mesh.yaml", PROGRESSION,
     {"progression_clinic.parquet": "SELECT * REPLACE (CASE WHEN rowid = 4 THEN NULL ELSE progression END "
                                    "AS progression) FROM src"},
     "product clinic.visits: column progression has 1 missing value; a split model needs every key and value"),
    ("vertical/mesh.yaml", MALIGNANCY,
     {"clinic.csv": "SELECT * REPLACE (CASE WHEN rowid = 4 THEN NULL ELSE diagnosis END AS diagnosis) FROM src"},
     "product clinic.diagnoses: column diagnosis has 1 missing value; a split model needs every key and value"),
])
def test_data_a_part_cannot_train_on_is_refused_naming_product_column_and_count(tmp_path, mesh, edits, data,
                                                                                reason):
    line, events = _refused(tmp_path, mesh, edits, data)
    domain = reason.removeprefix("product ").split(".")[0]
    job = "progression" if mesh.startswith("vertical-regression/") else "malignancy"
    assert line == f"split job {job}: domain {domain} refused the job: data: {reason}"
    denial = [e for e in events if isinstance(e, ev.PolicyDecided) and e.effect == "deny"]
    assert [(e.policy, e.domain, e.reason) for e in denial] == [("data", domain, reason)]


def test_a_diverged_loss_fails_the_job_in_one_line_and_loses_no_domain(tmp_path):
    """sgd at lr 0.5 on raw progression scores (in the hundreds) overflows within the first epoch:
    the job fails naming where and what, and the clinic, alive, is not called lost."""
    c, sink = _room(tmp_path, "vertical-regression/mesh.yaml", ("epochs: 60", "epochs: 3"),
                    ("optimizer: adam, lr: 0.05", "optimizer: sgd, lr: 0.5"))
    with pytest.raises(JobAborted) as err:
        c._work()
    assert not [e for e in sink.events if isinstance(e, ev.DomainLost)]
    line = "split job progression: the loss at clinic diverged at epoch 1 batch 3 (lr 0.5 too high?)"
    assert str(err.value) == line
    assert [(e.round, e.reason) for e in sink.events if isinstance(e, ev.JobFailed)] == [(1, line)]
