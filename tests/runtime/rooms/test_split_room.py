"""The split room (issue 15) on the in-memory hub: each scripted domain is the real SplitDomain over
examples/vertical's data (DuckDB), answering as the daemon does; no processes, no sockets, no sleeps."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import duckdb
import pytest
from sinks import ListSink
from split_hub import split_service

from meshctl.compiler.compile import compile_mesh
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.coordinator import Coordinator, JobAborted
from meshctl.runtime.coordinator.split import top_path
from meshctl.runtime.domain.split import SplitDomain, SplitError
from meshctl.runtime.transport.memory import Connection

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "vertical"


def _room(tmp_path: Path, *edits: tuple[str, str], narrow: str = "", lab: str = "", silent: str = ""
          ) -> tuple[Coordinator, ListSink]:
    """A service running examples/vertical (1 epoch, sgd: Adam's first step imports torch._dynamo); `narrow` sends
    activations one column short; `lab`, a DuckDB SELECT over `src`, rewrites data/lab.parquet; `silent` never
    answers a step (it beats)."""
    text = (EXAMPLE / "mesh.yaml").read_text()
    for old, new in (("epochs: 30", "epochs: 1"), ("optimizer: adam, lr: 0.01", "optimizer: sgd, lr: 0.1"), *edits):
        text = text.replace(old, new)
    shutil.copytree(EXAMPLE / "data", tmp_path / "data")
    if lab:
        src = tmp_path / "data" / "lab.parquet"
        with duckdb.connect() as con:
            con.execute(f"CREATE TABLE src AS SELECT * FROM read_parquet('{src}')")
            con.execute(f"COPY ({lab}) TO '{src}' (FORMAT parquet)")
    (tmp_path / "mesh.yaml").write_text(text)
    plan = compile_mesh(tmp_path / "mesh.yaml").plan
    assert plan is not None

    def serve(side: SplitDomain, name: str) -> Any:
        def reply(conn: Connection, msg: Any, tensors: wire.Tensors) -> None:
            if not isinstance(msg, wire.SplitIns) or name == silent:
                return
            for res, out in side.answer(msg, tensors):
                if name == narrow and getattr(res, "step", "") == "acts":
                    out = {"acts": out["acts"][:, :-1].contiguous()}
                conn.send(res, out)
        return reply

    return split_service(tmp_path, plan, serve=serve)


def test_the_service_runs_the_split_job_after_its_intersection(tmp_path):
    c, sink = _room(tmp_path)
    c._work()
    assert c._work_names() == ["malignancy"]
    kinds = [e.type for e in sink.events]
    assert kinds.index("job_started") < kinds.index("intersection_computed") < kinds.index("round_completed")
    shared = next(e for e in sink.events if isinstance(e, ev.IntersectionComputed))
    assert (shared.size, shared.min_intersection) == (484, 100)
    done = next(e for e in sink.events if isinstance(e, ev.JobCompleted))
    assert done.model_path == "models/malignancy.top.safetensors" and set(done.metrics) == {"loss", "accuracy"}
    assert top_path(tmp_path / "run", "malignancy").is_file()
    # its "updates" are the activations and gradients received: 8 float32 per row, each way, from 2 members
    test = round(c.plan.split_models[0].holdout * 484)
    (epoch,) = [e for e in sink.events if isinstance(e, ev.RoundCompleted)]
    assert epoch.update_bytes == 2 * 8 * 4 * (2 * (484 - test) + test)
    assert (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1].endswith(f",{epoch.update_bytes}")


def test_too_small_an_intersection_fails_the_job_in_one_line(tmp_path):
    c, sink = _room(tmp_path, ("min_intersection: 100", "min_intersection: 485"))
    with pytest.raises(JobAborted, match=r"^split job malignancy: the parts share 484 entities, fewer than "
                                         r"min_intersection 485$"):
        c._work()
    assert not [e for e in sink.events if isinstance(e, ev.RoundStarted)]
    assert [e.round for e in sink.events if isinstance(e, ev.JobFailed)] == [0]


def test_activations_of_the_wrong_shape_fail_the_job_naming_the_step(tmp_path):
    c, sink = _room(tmp_path, narrow="lab")
    with pytest.raises(JobAborted, match=r"^split job malignancy: domain clinic lost: "
                                         r"activations of lab missing or not \[32, 8\] float32"):
        c._work()
    assert [e.round for e in sink.events if isinstance(e, ev.JobFailed)] == [1]


def test_declared_clipping_and_noise_train_too(tmp_path):
    c, sink = _room(tmp_path, ("min_intersection: 100", "min_intersection: 100\n    activations: {clip: 3.0, noise: 0.1}"))
    c._work()
    assert c.plan.split_models[0].noise == 0.1 and c.plan.split_models[0].clip == 3.0
    assert [e.type for e in sink.events][-1] == "job_completed"


def test_the_label_owner_answers_each_member_once_and_serves_only_its_own_steps(tmp_path):
    c, _ = _room(tmp_path)
    clinic, lab = (SplitDomain(c.plan, d, tmp_path, "r1") for d in ("clinic", "lab"))
    start = wire.SplitIns(job="malignancy", step="psi_start", salt="ab" * 16)
    clinic.handle(start, {})
    ((_, points),) = lab.handle(start, {})
    ask = wire.SplitIns(job="malignancy", step="psi_answer", peer="lab")
    assert clinic.handle(ask, points)[0][0].step == "psi_answer"
    with pytest.raises(SplitError, match="a second or unknown intersection request"):  # no membership oracle
        clinic.handle(ask, points)
    with pytest.raises(SplitError, match="step forward is not for the label owner"):
        clinic.handle(wire.SplitIns(job="malignancy", step="forward"), {})
    with pytest.raises(SplitError, match="step top is not for the other parts"):
        lab.handle(wire.SplitIns(job="malignancy", step="top"), {})


def test_activation_noise_comes_from_a_secret_seed_not_the_plan(tmp_path):
    """Noise the label owner could regenerate from the plan's seed protects nothing: two runs of
    the same plan draw different noise (different final losses), while clipping alone repeats."""

    def loss(sub: str, activations: str) -> float:
        c, sink = _room(tmp_path / sub, ("min_intersection: 100", f"min_intersection: 100\n    activations: {activations}"))
        c._work()
        return next(e for e in sink.events if isinstance(e, ev.JobCompleted)).metrics["loss"]

    assert loss("clip1", "{clip: 3.0}") == loss("clip2", "{clip: 3.0}")
    assert loss("noise1", "{clip: 3.0, noise: 0.1}") != loss("noise2", "{clip: 3.0, noise: 0.1}")


@pytest.mark.parametrize(("lab", "reason"), [
    ("SELECT * EXCLUDE (patient_id) FROM src", "lab.nuclei: key column patient_id is not in data/lab.parquet"),
    ("SELECT * REPLACE (CASE WHEN rowid IN (3, 7) THEN 'nan'::DOUBLE ELSE radius_mean END AS radius_mean) FROM src",
     "lab.nuclei: 2 NaN values in radius_mean"),
    (("SELECT * REPLACE (CASE WHEN rowid = 433 THEN (SELECT patient_id FROM src WHERE rowid = 9) ELSE patient_id "
      "END AS patient_id) FROM src"),
     "lab.nuclei: key column patient_id: value at data row 434 appears twice (first at data row 10)"),
    ("SELECT * REPLACE (CASE WHEN rowid = 4 THEN NULL ELSE patient_id END AS patient_id) FROM src",
     "product lab.nuclei: column patient_id has 1 missing value; a split model needs every key and value"),
    ("SELECT * EXCLUDE (radius_mean) FROM src", "lab.nuclei: column radius_mean is not in data/lab.parquet"),
])
def test_a_part_that_cannot_train_on_its_data_refuses_it_as_a_federated_domain_does(tmp_path, lab, reason):
    """The domain stays joined (not lost): a `data` denial (the dashboard shows it refused, data), and
    the job fails in one line naming the product, the column and what is wrong with it."""
    c, sink = _room(tmp_path, lab=lab)
    with pytest.raises(JobAborted) as err:
        c._work()
    assert str(err.value) == f"split job malignancy: domain lab refused the job: data: {reason}"
    denial = [e for e in sink.events if isinstance(e, ev.PolicyDecided) and e.effect == "deny"]
    assert [(e.policy, e.domain, e.reason) for e in denial] == [("data", "lab", reason)]
    assert not [e for e in sink.events if isinstance(e, ev.DomainLost)]


def test_a_daemon_whose_feature_column_is_missing_starts_and_refuses_the_split_job_when_it_starts(tmp_path):
    """A declared feature missing from the file is a data refusal when the job reads it, as a missing key is:
    the daemon starts (its Hello, then `refused (data)`), instead of failing to start (`lost`)."""
    from meshctl.runtime.daemon import Daemon, DaemonConfig
    from meshctl.runtime.keys import KeyPair

    c, _ = _room(tmp_path, lab="SELECT * EXCLUDE (radius_mean) FROM src")
    cfg = DaemonConfig(domain="lab", plan=c.plan, base_dir=tmp_path, coordinator="tcp://127.0.0.1:1",
                       server_key=b"", keys=KeyPair.generate())
    Daemon(cfg).load()  # (no DataError: nothing else of this domain reads lab.nuclei)


def test_a_part_that_does_not_answer_fails_the_job_naming_the_step_and_the_deadline(tmp_path):
    c, _ = _room(tmp_path, ("min_intersection: 100", "min_intersection: 100\n    round_timeout_s: 0.01"), silent="clinic")
    with pytest.raises(JobAborted) as err:
        c._work()
    assert str(err.value) == ("split job malignancy: no reply from clinic to step ready within 0.01 s "
                              "(round_timeout_s)")


def test_a_domain_inside_a_split_job_is_busy_between_its_steps_until_the_job_ends(tmp_path):
    """Its heartbeats say `training` from the intersection's first step to `finish` (or the step that failed),
    not only while one step is served."""
    from meshctl.runtime.daemon import Daemon, DaemonConfig
    from meshctl.runtime.keys import KeyPair

    c, _ = _room(tmp_path)
    cfg = DaemonConfig(domain="clinic", plan=c.plan, base_dir=tmp_path, coordinator="tcp://127.0.0.1:1",
                       server_key=b"", keys=KeyPair.generate(), run="r1")
    daemon, sent = Daemon(cfg), []
    daemon._send = lambda sock, msg, tensors=None: sent.append(msg)
    daemon._dispatch(None, wire.SplitIns(job="malignancy", step="psi_start", salt="ab" * 16), {})
    assert [m.step for m in sent] == ["ready"] and daemon.state == "training"
    daemon._dispatch(None, wire.SplitIns(job="malignancy", step="backward", epoch=0, batch=0), {})  # not its step
    assert sent[-1].type == "error" and daemon.state == "idle"
