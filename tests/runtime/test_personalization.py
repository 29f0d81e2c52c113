"""Personalisation through real processes (issue 12): FedPer local layers that never cross the wire,
fine-tuning of the final model in each domain with its holdout metrics before and after, and each
personal model kept inside its domain's directory. The data are non-IID on purpose: every domain
labels the same three clusters with its own label map, so one global model cannot fit them all."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import duckdb
import pytest
from safetensors.torch import load_file

from meshctl.compiler.compile import compile_mesh
from meshctl.runtime import events as ev
from meshctl.runtime.daemon import read_tap
from meshctl.runtime.launcher import start_run

DOMAINS = ("a", "b", "c")

MESH = """\
apiVersion: meshctl/v1
mesh: {name: personal, coordinator: {address: tcp://127.0.0.1:0}}
domains:
%(domains)s
contracts:
  - name: blobs
    version: 1.0.0
    purposes: [research]
    columns: &cols [{name: x0, type: float}, {name: x1, type: float}, {name: x2, type: float},
                    {name: x3, type: float}, {name: label, type: category, values: [p, q, r]}]
products:
%(products)s
models:
%(models)s
"""

MODEL = """\
  - name: %(name)s
    purpose: research
    inputs: {contract: blobs, features: [x0, x1, x2, x3], target: label}
    architecture: {kind: mlp, hidden: [8]}
    training: {rounds: 4, local_epochs: 2, batch_size: 16, optimizer: sgd, lr: 0.1, momentum: 0.9, seed: 0}
    evaluation: {holdout: 0.25, metrics: [loss, accuracy]}
%(extra)s"""


def write_mesh(root: Path, models: dict[str, str]) -> Path:
    """Three domains; cluster c of domain k is labelled (c + k) mod 3; 240 rows each."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    with duckdb.connect() as con:
        for k, d in enumerate(DOMAINS):
            con.execute(f"""COPY (SELECT x0, x1, x2, x3, ['p', 'q', 'r'][((c + {k}) % 3) + 1] AS label FROM (
                SELECT i % 3 AS c,
                       (CASE WHEN i % 3 = 0 THEN 3 ELSE 0 END) + 0.6 * sin(i * 12.9898 + {k}) AS x0,
                       (CASE WHEN i % 3 = 1 THEN 3 ELSE 0 END) + 0.6 * sin(i * 78.233 + {k}) AS x1,
                       (CASE WHEN i % 3 = 2 THEN 3 ELSE 0 END) + 0.6 * sin(i * 37.719 + {k}) AS x2,
                       0.6 * sin(i * 4.1414 + {k}) AS x3
                FROM range(240) t(i))) TO '{root / "data" / f"{d}.parquet"}' (FORMAT parquet)""")
    domains = "\n".join(f"  - {{name: {d}, owner: {d}@x.example, jurisdiction: eu, address: local}}"
                        for d in DOMAINS)
    products = "\n".join(f"  - {{name: blobs, domain: {d}, source: data/{d}.parquet, classification: internal, "
                         f"contract: blobs@1, columns: *cols}}" for d in DOMAINS)
    body = "".join(MODEL % {"name": n, "extra": f"    personalization: {p}\n" if p else ""}
                   for n, p in models.items())
    path = root / "mesh.yaml"
    path.write_text(MESH % {"domains": domains, "products": products, "models": body})
    return path


def run(mesh: Path):
    result = compile_mesh(mesh)
    assert result.plan is not None, result.render_diagnostics()
    live = start_run(mesh, result.plan)
    events = list(live.follow())
    done = live.finish()
    assert done.ok, done.reason
    return result.plan, events, done


@pytest.fixture(scope="module")
def personal_run(tmp_path_factory):
    """One run, four jobs over the same data: plain FedAvg, FedPer (local head), fine-tuning, and
    FedPer under secure aggregation (the masked vector holds the shared tensors only)."""
    root = tmp_path_factory.mktemp("personal")
    mesh = write_mesh(root, {"plain": "", "fedper": '{local: ["2.*"]}', "tuned": "{fine_tune_epochs: 5}",
                             "masked": '{local: ["2.*"]}\n    privacy: {secure_aggregation: true}'})
    mp = pytest.MonkeyPatch()
    (root / "tap").mkdir()
    mp.setenv("MESHCTL_WIRE_TAP", str(root / "tap"))
    try:
        plan, events, done = run(mesh)
    finally:
        mp.undo()
    return root, plan, events, done


def _final(events, job: str) -> ev.RoundCompleted:
    return [e for e in events if isinstance(e, ev.RoundCompleted) and e.job == job][-1]


def _personalized(events, job: str) -> ev.Personalized:
    (e,) = [e for e in events if isinstance(e, ev.Personalized) and e.job == job]
    return e


def test_the_plan_shares_the_body_and_lists_the_local_head_apart(personal_run):
    _, plan, _, _ = personal_run
    jobs = {j.name: j for j in plan.jobs}
    assert jobs["plain"].personalization is None
    fedper = jobs["fedper"].personalization
    assert [t.name for t in jobs["fedper"].tensors] == ["0.weight", "0.bias"]
    assert [t.name for t in fedper.local_tensors] == ["2.weight", "2.bias"] and fedper.local == ["2.*"]
    assert jobs["fedper"].parameters == jobs["plain"].parameters  # the whole model, shared and local


def test_fedper_domains_beat_one_global_model_on_non_iid_labels(personal_run):
    _, _, events, _ = personal_run
    plain = _final(events, "plain").metrics["accuracy"]
    fedper = _personalized(events, "fedper")
    assert plain < 0.6  # one model cannot label the same cluster p, q and r at once
    assert set(fedper.domains) == set(DOMAINS) and all("after" not in m for m in fedper.domains.values())
    for d, m in fedper.domains.items():
        assert m["before"]["accuracy"] > 0.9, (d, m)
    # the pooled value is the pooled sums of each domain's personal model: the round's own metrics
    assert fedper.pooled["before"]["accuracy"] == pytest.approx(_final(events, "fedper").metrics["accuracy"])
    assert sum(fedper.examples.values()) == 3 * 60


def test_secure_aggregation_masks_only_the_shared_tensors(personal_run):
    _, plan, events, _ = personal_run
    job = next(j for j in plan.jobs if j.name == "masked")
    assert job.shared_parameters == 4 * 8 + 8 < job.parameters
    assert all(m["before"]["accuracy"] > 0.9 for m in _personalized(events, "masked").domains.values())


def test_fine_tuning_beats_the_final_global_model_in_every_domain(personal_run):
    _, _, events, done = personal_run
    tuned = _personalized(events, "tuned")
    assert tuned.fine_tune_epochs == 5
    for d, m in tuned.domains.items():
        assert m["before"]["accuracy"] < 0.7 and m["after"]["accuracy"] > 0.9, (d, m)
        assert m["after"]["loss"] < m["before"]["loss"]
    assert tuned.pooled["before"]["accuracy"] == pytest.approx(_final(events, "tuned").metrics["accuracy"])
    rows = list(csv.DictReader((Path(done.run_dir) / "personal.csv").open()))
    after = {r["domain"]: float(r["value"]) for r in rows
             if r["job"] == "tuned" and r["phase"] == "after" and r["metric"] == "accuracy"}
    assert after == pytest.approx({d: m["after"]["accuracy"] for d, m in tuned.domains.items()}
                                  | {"pooled": tuned.pooled["after"]["accuracy"]})


def test_local_tensors_never_cross_the_wire_and_personal_models_stay_in_the_domain(personal_run):
    root, _, _, done = personal_run
    run_id = Path(done.run_dir).name
    personal = {d: load_file(root / ".meshctl" / "personal" / run_id / d / "fedper.safetensors") for d in DOMAINS}
    # each domain holds a different head (its own label map), on this host inside its own directory
    assert not (personal["a"]["2.weight"] == personal["b"]["2.weight"]).all()
    assert not list(Path(done.run_dir).rglob("*personal*.safetensors"))  # the coordinator never had one
    sent = {d: read_tap(root / "tap" / f"{d}.tap") for d in DOMAINS}
    assert all(sent.values())
    blob = b"".join(f for frames in sent.values() for f in frames)
    headers = [json.loads(f) for frames in sent.values() for f in frames if f[:1] == b"{"]
    shipped = {t.get("name") for h in headers if h.get("job") == "fedper" and h.get("type") == "train_res"
               for t in h.get("tensors", [])}
    assert shipped == {"0.weight", "0.bias"}
    for d in DOMAINS:  # no 16 consecutive bytes of any domain's local head were sent
        head = personal[d]["2.weight"].contiguous().numpy().tobytes() + personal[d]["2.bias"].numpy().tobytes()
        assert not any(head[i:i + 16] in blob for i in range(0, len(head) - 15, 4))
    assert all((root / ".meshctl" / "personal" / run_id / d / "tuned.safetensors").exists() for d in DOMAINS)


@pytest.mark.parametrize(("personal", "extra", "code", "says"), [
    ('{local: ["9.*"]}', "", "MESH531", "personalization.local glob '9.*' of model 'm' matches none of its tensors"),
    ('{local: ["*"]}', "", "MESH531", "keeps every tensor local: nothing is shared"),
    ("{}", "", "MESH531", "neither local layers nor fine-tuning"),
    ("{local: [], fine_tune_lr: 0.1}", "", "MESH531", "neither local layers nor fine-tuning"),
    ('{local: ["2.*"], fine_tune_lr: 0.1}', "", "MESH531", "fine_tune_lr without fine_tune_epochs"),
    ("{fine_tune_epochs: 2}", "    privacy: {dp: {epsilon: 2.0}}\n", "MESH532", "fine-tuning trains each domain's"),
    ("{fine_tune_epochs: 2}", "    privacy: {client_dp: {epsilon: 2.0}}\n", "MESH532", "fine-tuning trains each domain's"),
    ('{local: ["2.*"]}', "    aggregation: {strategy: fedavg}\n", None, None),
])
def test_what_personalisation_cannot_do_is_refused_at_compile_time(tmp_path, personal, extra, code, says):
    mesh = write_mesh(tmp_path, {"m": personal})
    mesh.write_text(mesh.read_text() + extra)
    result = compile_mesh(mesh)
    errors = [(d.code, d.message) for d in result.errors]
    if code is None:
        assert not errors and result.plan is not None
        return
    assert [c for c, _ in errors] == [code] and says in errors[0][1], errors
    assert result.plan is None


def test_local_layers_and_cross_site_evaluation_do_not_mix(tmp_path):
    mesh = write_mesh(tmp_path, {"m": '{local: ["2.*"]}'})
    mesh.write_text(mesh.read_text().replace("metrics: [loss, accuracy]}", "metrics: [loss, accuracy], cross_site: true}"))
    errors = [(d.code, d.message) for d in compile_mesh(mesh).errors]
    assert [c for c, _ in errors] == ["MESH538"] and "cross_site" in errors[0][1], errors


def test_a_domain_keeps_its_local_tensors_when_it_loads_the_global_ones(make_plan):
    import torch

    from meshctl.compiler.plan import PlanPersonalization
    from meshctl.runtime import wire
    from meshctl.runtime.coordinator.collector import check_personal
    from meshctl.runtime.kernels import mlp
    from meshctl.runtime.kernels.personal import load_shared, shared_state

    job = make_plan(n=2).jobs[0]  # mlp 64 -> [32] -> 10: 0.weight 0.bias 2.weight 2.bias
    job = job.model_copy(update={"tensors": job.tensors[:2], "personalization": PlanPersonalization(
        local=["2.*"], local_tensors=job.tensors[2:])})
    model = mlp(64, [32], 10, seed=1)
    head = model[2].weight.detach().clone()
    load_shared(model, {t.name: torch.zeros(t.shape) for t in job.tensors}, job)
    assert not model[0].weight.any() and torch.equal(model[2].weight, head)
    assert list(shared_state(model, job)) == ["0.weight", "0.bias"]
    with pytest.raises(ValueError, match="missing"):
        load_shared(model, {"0.weight": torch.zeros(32, 64)}, job)
    # sums "after fine-tuning" from a domain of a job that does not fine-tune are rejected
    res = wire.EvalRes(job=job.name, round=job.training.rounds, examples=1, loss_sum=0.0, correct=0,
                       personal={"after": {"n": [1.0]}})
    assert "fine-tuning sums for a job or round that has none" in check_personal(job, res)


def test_local_layers_start_from_the_seeded_initial_weights_so_a_run_repeats(tmp_path):
    """A domain's local head never comes from the coordinator: it must start from the plan's seeded
    initial weights (as the shared layers do), or two runs of the same mesh train differently."""
    losses = []
    for k in range(2):
        mesh = write_mesh(tmp_path / str(k), {"fedper": '{local: ["2.*"]}'})
        _, events, _ = run(mesh)
        losses.append([(e.train_loss, e.metrics["loss"]) for e in events if isinstance(e, ev.RoundCompleted)])
    assert len(losses[0]) == 4 and losses[0] == losses[1]
