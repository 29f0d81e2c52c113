"""Split learning end to end (issue 15): examples/vertical through real daemons, a real coordinator,
CurveZMQ and DuckDB. The wire tap holds no key, no label and no raw feature value; the trained split
model equals the same network trained centrally on the joined rows, with the same seeds."""

from __future__ import annotations

import math
import os
import signal
import struct
from pathlib import Path

import duckdb
import psutil
import pytest
import torch
from example_copy import example_mesh

from meshctl.compiler.compile import compile_mesh
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.audit import verify_run
from meshctl.runtime.audit_report import build_report
from meshctl.runtime.domain.split import bottom_path, standardize
from meshctl.runtime.kernels import split as ks
from meshctl.runtime.launcher import start_run
from meshctl.runtime.lineage import export_events
from meshctl.tui.state import reduce_all

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "vertical"
FILES = {"lab": "lab.parquet", "imaging": "imaging.parquet", "clinic": "clinic.csv"}
EPOCHS = 2


def _mesh(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    # sgd: Adam's first step imports torch._dynamo (seconds) in each domain; the equality holds either way
    return example_mesh(EXAMPLE, tmp_path, ("epochs: 30", f"epochs: {EPOCHS}"),
                        ("optimizer: adam, lr: 0.01", "optimizer: sgd, lr: 0.1"), *edits)


def _run(mesh: Path):
    result = compile_mesh(mesh)
    assert result.plan is not None, result.render_diagnostics()
    run = start_run(mesh, result.plan, address="tcp://127.0.0.1:0")
    events = list(run.follow())
    return result.plan, run.finish(), events


def _table(path: Path) -> dict[str, list]:
    scan = f"read_parquet('{path}')" if path.suffix == ".parquet" else f"read_csv('{path}')"
    return duckdb.connect().execute(f"SELECT * FROM {scan}").fetchnumpy()


def _tap(path: Path) -> tuple[bytes, list[tuple[object, wire.Tensors]]]:
    raw, frames, i = path.read_bytes(), [], 0
    while i < len(raw):
        n = int.from_bytes(raw[i:i + 8], "little")
        frames.append(raw[i + 8:i + 8 + n])
        i += 8 + n
    out, j = [], 0
    while j < len(frames):
        head = wire._parse_header(frames[j])
        k = sum(t["chunks"] for t in head.get("tensors", []))
        out.append(wire.decode(frames[j:j + 1 + k]))
        j += 1 + k
    return raw, out


def _centralised(plan) -> tuple[float, float]:
    """The same network on the joined rows: intersection ordered by key, the same holdout, the same
    per-part standardization, seeds, batches and optimizer (kernels.split.train_centralised)."""
    split = plan.split_models[0]
    tables = {d: _table(EXAMPLE / "data" / f) for d, f in FILES.items()}
    index = {d: {str(k): r for r, k in enumerate(t["patient_id"])} for d, t in tables.items()}
    shared = sorted(set.intersection(*(set(i) for i in index.values())))
    train, test = ks.holdout_split(len(shared), split.holdout, split.seed)
    parts = []
    for p in split.parts:
        rows = [index[p.domain][k] for k in shared]
        x = torch.tensor([[float(tables[p.domain][f][r]) for f in p.features] for r in rows], dtype=torch.float32)
        parts.append(standardize(x, train)[0])
    label = tables["clinic"]["diagnosis"]
    y = torch.tensor([split.classes.index(str(label[index["clinic"][k]])) for k in shared])
    bottoms = [ks.build_bottom({"kind": "mlp", "hidden": p.hidden, "out": p.out}, len(p.features), split.seed + i)
               for i, p in enumerate(split.parts)]
    top = ks.build_top({"kind": "mlp", "hidden": split.top_hidden}, sum(p.out for p in split.parts),
                       len(split.classes), split.seed + len(split.parts))
    ks.train_centralised(bottoms, top, [x[train] for x in parts], y[train], epochs=split.epochs,
                         batch_size=split.batch_size, optimizer={"name": split.optimizer, "lr": split.lr},
                         loss="cross_entropy", seed=split.seed)
    with torch.no_grad():
        out = ks.SplitNet(bottoms, top).eval()([x[test] for x in parts])
    loss = float(torch.nn.functional.cross_entropy(out, y[test]))
    return loss, float((out.argmax(1) == y[test]).float().mean())


def test_split_learning_reaches_the_centralised_model_and_the_wire_holds_no_row(tmp_path, monkeypatch):
    # Prepare
    mesh = _mesh(tmp_path)
    tap = tmp_path / "tap"
    tap.mkdir()
    monkeypatch.setenv("MESHCTL_WIRE_TAP", str(tap))
    # Execute
    plan, result, events = _run(mesh)
    # Assert: the run, its intersection and its outputs
    assert result.ok, result.reason
    shared = next(e for e in events if isinstance(e, ev.IntersectionComputed))
    ids = {d: [str(k) for k in _table(EXAMPLE / "data" / f)["patient_id"]] for d, f in FILES.items()}
    assert shared.size == len(set.intersection(*(set(v) for v in ids.values())))
    assert shared.parties == ["lab", "imaging", "clinic"]
    rounds = [e for e in events if isinstance(e, ev.RoundCompleted)]
    assert [e.round for e in rounds] == list(range(1, EPOCHS + 1))
    done = next(e for e in events if isinstance(e, ev.JobCompleted))
    assert (result.run_dir / done.model_path).is_file()
    assert (result.run_dir / "metrics.csv").read_text().count("\nmalignancy,") == EPOCHS
    for d in FILES:
        assert bottom_path(tmp_path, result.run_dir.name, d, "malignancy").is_file()
        assert "; jobs: malignancy)" in (result.run_dir / "logs" / f"{d}.log").read_text()  # it names the split job
    assert {e.update_bytes for e in rounds} != {0}  # its activations and gradients, not "updates 0 B"
    # Assert: the dashboard's state folds the run's events (the intersection is a logged line)
    view = reduce_all(events).jobs["malignancy"]
    assert (view.state, view.current_round, view.rounds_total) == ("completed", EPOCHS, EPOCHS)
    # Assert: the audit report and the lineage name the products (and contracts) that fed each part
    report = build_report(result.run_dir)["split_models"][0]
    assert [p["product"] for p in report["parts"]] == ["lab.nuclei", "imaging.worst", "clinic.diagnoses"]
    assert (report["status"], report["intersection"]) == ("completed", shared.size)
    complete = next(e for e in export_events(result.run_dir) if e["eventType"] == "COMPLETE")
    assert complete["job"]["name"] == "model.malignancy"
    assert [i["facets"]["symlinks"]["identifiers"][0]["name"] for i in complete["inputs"]] == [
        "lab.nuclei", "imaging.worst", "clinic.diagnoses"]
    # Assert: the same network trained centrally on the joined rows scores the same
    loss, accuracy = _centralised(plan)
    assert abs(done.metrics["accuracy"] - accuracy) <= 0.01
    assert math.isclose(done.metrics["loss"], loss, rel_tol=1e-3, abs_tol=1e-4)
    # Assert: what each domain sent holds no key, no label and no raw feature value
    for domain, file in FILES.items():
        blob, messages = _tap(tap / f"{domain}.tap")
        assert b"malignant" not in blob and b"benign" not in blob
        assert not [k for k in ids[domain] if k.encode() in blob]
        table = _table(EXAMPLE / "data" / file)
        features = next(p for p in plan.split_models[0].parts if p.domain == domain).features
        for f in features:
            values = [float(v) for v in table[f] if len(repr(float(v))) >= 5][:50]  # not 0.0 (zero bytes)
            assert not [v for v in values if struct.pack("<d", v) in blob or repr(v).encode() in blob]
        rows = [struct.pack(f"<{len(features)}f", *(float(table[f][r]) for f in features)) for r in range(50)]
        assert not [r for r in rows if r in blob]
        for msg, tensors in messages:
            if isinstance(msg, wire.SplitRes):
                for name, t in tensors.items():  # points, positions, 8-wide activations, top weights
                    assert (name, t.dtype) in {("points", torch.int8), ("mine", torch.int8), ("theirs", torch.int8),
                                               ("held", torch.int64),
                                               ("order", torch.int64), ("acts", torch.float32)} \
                        or (domain == "clinic" and t.dtype == torch.float32), (name, t.dtype)
                    if name == "acts":
                        assert t.shape[1] == 8


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])


def test_a_part_that_cannot_read_its_key_refuses_its_data_in_one_line(tmp_path):
    """Real daemons: the lab's file lost its key column. The lab stays joined and refuses its data
    (`refused (data)` on the dashboard, as a federated domain's), and the run fails in one line."""
    mesh = _mesh(tmp_path)
    src = tmp_path / "data" / "lab.parquet"
    with duckdb.connect() as con:
        con.execute(f"CREATE TABLE src AS SELECT * EXCLUDE (patient_id) FROM read_parquet('{src}')")
        con.execute(f"COPY src TO '{src}' (FORMAT parquet)")
    _, result, events = _run(mesh)
    assert not result.ok
    assert ("split job malignancy: domain lab refused the job: data: lab.nuclei: key column patient_id is not "
            "in data/lab.parquet") in result.reason and "\n" not in result.reason
    assert not [e for e in events if isinstance(e, ev.DomainLost)]
    lab = reduce_all(events).domains["lab"]
    assert (lab.state, lab.cause) == ("refused", "data")


def _top_and_metrics(mesh: Path, kill_at: int = 0):
    """(top model, JobCompleted, RunResumed events, run directory) of one run of `mesh`; with `kill_at`, its
    coordinator proper is SIGKILLed once the epoch `kill_at` is recorded as a resume point (its metrics
    row is written before), and its supervisor resumes it."""
    from safetensors.torch import load_file

    plan = compile_mesh(mesh).plan
    assert plan is not None
    run = start_run(mesh, plan, address="tcp://127.0.0.1:0")
    daemons: dict[str, int] = {}
    for e in run.follow():
        if isinstance(e, ev.DomainJoined):
            daemons[e.domain] = e.pid
        if kill_at and isinstance(e, ev.CheckpointWritten) and e.round == kill_at:
            kill_at = 0
            coordinator = psutil.Process(daemons["lab"]).ppid()
            assert coordinator != run.proc.pid  # the coordinator proper, under its supervisor
            os.kill(coordinator, signal.SIGKILL)
    result = run.finish()
    assert result.ok, result.reason
    events = ev.read_events(str(result.run_dir / "events.jsonl"))
    done = next(e for e in events if isinstance(e, ev.JobCompleted))
    top = load_file(str(result.run_dir / done.model_path))
    return top, done, [e for e in events if isinstance(e, ev.RunResumed)], result.run_dir


def test_a_killed_coordinator_of_a_split_run_is_resumed_to_the_uninterrupted_model(tmp_path):
    """SIGKILL of the coordinator after epoch 2: the supervisor resumes the run, the intersection is computed
    again, each domain takes up its kept epoch-2 state and the job ends with the uninterrupted run's top model
    and holdout metrics, bit for bit (the same float32 operations in the same order; no noise), and an
    audit log that verifies."""
    epochs = 6  # the kill lands mid-job however late the follower sees the record of epoch 2
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()
    a, done_a, _, run_a = _top_and_metrics(_mesh(straight, (f"epochs: {EPOCHS}", f"epochs: {epochs}")))
    b, done_b, resumed, run_dir = _top_and_metrics(_mesh(killed, (f"epochs: {EPOCHS}", f"epochs: {epochs}")),
                                                   kill_at=2)
    assert len(resumed) == 1 and 2 <= resumed[0].rounds["malignancy"] < epochs, resumed
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert done_a.metrics == done_b.metrics
    assert verify_run(run_dir).ok
    rounds = [int(line.split(",")[1]) for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert rounds == list(range(1, epochs + 1))
    from safetensors.torch import load_file

    for d in FILES:  # the bottom models stayed in their domains, and equal too
        x = load_file(str(bottom_path(straight, run_a.name, d, "malignancy")))
        y = load_file(str(bottom_path(killed, run_dir.name, d, "malignancy")))
        assert all(torch.equal(x[k], y[k]) for k in x), d
    assert not list((killed / ".meshctl" / "split" / run_dir.name).glob("*/malignancy/"))  # (epochs: dropped at the end)


def test_a_domains_own_round_policy_bounds_its_activations_before_they_leave(tmp_path):
    """Real daemons: the lab's local round policy (a real CEL expression) denies its first batch's activations;
    the daemon answers `policy:lab.own-bound`, nothing of that batch crosses, and the run fails in one line
    naming the policy, the epoch, the batch, the domain and the norm (docs/governance.md)."""
    mesh = _mesh(tmp_path, ('  - {name: lab, description: "cytology lab: nucleus measurements, means"}',
                            ('  - name: lab\n    policies:\n      - name: own-bound\n        scope: round\n'
                             '        when: round.kind == "split"\n'
                             '        require: round.activations.all(a, a.max_row_norm <= 0.01)\n')))
    _, result, events = _run(mesh)
    assert not result.ok
    assert result.reason.startswith("split job malignancy: domain lab refused: round policy lab.own-bound denies "
                                    "epoch 1 batch 1: the activations of lab (32 rows, norm "), result.reason
    assert "\n" not in result.reason
    denied = [e for e in events if isinstance(e, ev.PolicyDecided) and e.effect == "deny"]
    assert [(e.policy, e.domain, e.subject) for e in denied] == [("lab.own-bound", "lab", "round.malignancy.1")]
    assert not [e for e in events if isinstance(e, ev.RoundCompleted)]
