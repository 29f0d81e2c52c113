"""Issue 9.4: bad data is refused by its domain at join, in seconds, with the reason;
a peer's non-finite or impossible evaluation never becomes the round's metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import duckdb
import pytest

from meshctl.compiler.compile import compile_mesh
from meshctl.runtime import wire
from meshctl.runtime.coordinator import Coordinator
from meshctl.runtime.data import DataError, load_job_data
from meshctl.runtime.launcher import prepare_run

ROOT = Path(__file__).resolve().parents[2]
FREE = ["--address", "tcp://127.0.0.1:0"]


def _rewrite_parquet(path: Path, select: str) -> None:
    tmp = path.with_suffix(".new")
    duckdb.sql(f"COPY ({select.format(t=f'read_parquet({str(path)!r})')}) TO '{tmp}' (FORMAT parquet)")
    tmp.replace(path)


def test_nan_inf_and_empty_data_are_refused_at_join_in_seconds(hospitals, meshctl):
    data = hospitals.parent / "examples" / "hospitals" / "data"
    _rewrite_parquet(data / "karolinska.parquet", "SELECT * REPLACE (CASE WHEN row_number() OVER () % 12 = 0 "
                     "THEN 'NaN'::DOUBLE ELSE radius_mean END AS radius_mean) FROM {t}")
    _rewrite_parquet(data / "charite.parquet", "SELECT * REPLACE (CASE WHEN row_number() OVER () <= 3 "
                     "THEN 'inf'::DOUBLE ELSE texture_mean END AS texture_mean) FROM {t}")
    csv = data / "amsterdam-umc.csv"
    csv.write_text(csv.read_text().split("\n", 1)[0] + "\n")  # the header alone: 0 rows
    nans = duckdb.sql(f"SELECT count(*) FROM '{data / 'karolinska.parquet'}' WHERE isnan(radius_mean)").fetchall()[0][0]

    start = time.monotonic()
    out = meshctl("up", "--headless", *FREE, cwd=hospitals.parent, timeout=120)
    took = time.monotonic() - start

    assert out.returncode == 1, out.stdout + out.stderr
    assert took < 30, f"bad data took {took:.0f}s to be refused"
    last = out.stderr.strip().splitlines()[-1]
    assert f"domain karolinska refused the job: data: karolinska.biopsies: {nans} NaN values in radius_mean" in last
    assert "domain charite refused the job: data: charite.biopsies: 3 infinite values in texture_mean" in last
    assert "domain amsterdam-umc refused the job: data: amsterdam-umc.biopsies: 0 rows" in last
    run = Path(out.stdout.strip().splitlines()[-1].rsplit(": ", 1)[-1])
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert sum(e["type"] == "domain_joined" for e in events) == 3  # each domain answered, none was lost
    assert not [e for e in events if e["type"] in ("domain_lost", "message_rejected")]
    denied = {e["domain"] for e in events if e["type"] == "policy_decided" and e["policy"] == "data"}
    assert denied == {"charite", "karolinska", "amsterdam-umc"}


@pytest.fixture(scope="module")
def root_plan():
    return compile_mesh(ROOT / "mesh.yaml").plan


def test_a_target_outside_the_declared_classes_is_counted_not_quoted(root_plan, tmp_path):
    src = ROOT / "examples" / "hospitals" / "data" / "charite.parquet"
    (tmp_path / "examples" / "hospitals" / "data").mkdir(parents=True)
    dst = tmp_path / "examples" / "hospitals" / "data" / "charite.parquet"
    duckdb.sql(f"COPY (SELECT * REPLACE (CASE WHEN row_number() OVER () <= 2 THEN patient_name "
               f"ELSE diagnosis END AS diagnosis) FROM '{src}') TO '{dst}' (FORMAT parquet)")
    names = [r[0] for r in duckdb.sql(f"SELECT diagnosis FROM '{dst}' LIMIT 2").fetchall()]
    with pytest.raises(DataError) as err:
        load_job_data(root_plan.jobs[0], root_plan.product("charite.biopsies"), tmp_path, 0)
    assert err.value.message == ("charite.biopsies: 2 values in diagnosis are outside the declared values "
                                 "[benign, malignant]")
    assert all(n in err.value.detail for n in names)  # for the domain's log
    assert not any(n in err.value.message for n in names)


def test_0_training_rows_is_refused(root_plan, tmp_path):
    src = ROOT / "examples" / "hospitals" / "data" / "charite.parquet"
    (tmp_path / "examples" / "hospitals" / "data").mkdir(parents=True)
    dst = tmp_path / "examples" / "hospitals" / "data" / "charite.parquet"
    duckdb.sql(f"COPY (SELECT * FROM '{src}' LIMIT 2) TO '{dst}' (FORMAT parquet)")
    job = root_plan.jobs[0]
    job = job.model_copy(update={"evaluation": job.evaluation.model_copy(update={"holdout": 1.0})})
    with pytest.raises(DataError, match=r"^charite.biopsies: 0 rows to train job malignancy on \(all 2 are "
                                        r"held out\)$"):
        load_job_data(job, root_plan.product("charite.biopsies"), tmp_path, 0)


def _eval_res(root_plan, **fields) -> wire.EvalRes:
    """An EvalRes as the coordinator gets it (the decoder turns away NaN literals; a model may still hold one)."""
    return wire.EvalRes(**({"sender": "charite", "run": "r", "job": root_plan.jobs[0].name, "round": 1,
                            "examples": 50, "loss_sum": 10.0, "correct": 40} | fields))


@pytest.mark.parametrize("fields,problem", [
    ({"loss_sum": float("nan")}, "evaluation loss is negative or not finite"),
    ({"loss_sum": float("inf")}, "evaluation loss is negative or not finite"),
    ({"loss_sum": -1.0}, "evaluation loss is negative or not finite"),
    ({"correct": 793_695, "examples": 50}, "evaluation counts 793695 correct of 50 examples"),
    ({}, ""),
])
def test_a_non_finite_or_impossible_evaluation_is_rejected(root_plan, tmp_path, fields, problem):
    (tmp_path / "mesh.yaml").write_text("")
    manifest, _ = prepare_run(tmp_path / "mesh.yaml", root_plan, address="tcp://127.0.0.1:0")
    coordinator = Coordinator(manifest, root_plan)
    coordinator.current, coordinator.round = root_plan.jobs[0], 1  # round 1 of the job is being evaluated
    assert coordinator._check_result("charite", _eval_res(root_plan, **fields), {})[0] == problem
