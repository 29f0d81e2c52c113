"""Cross-site evaluation (`evaluation.cross_site: true`, issue 12; NVIDIA FLARE's cross-site model evaluation
is the peer): at the end of a job the global model and every participant's last local model are scored by
every participant on its holdout. Real processes; the local models are replayed here from the checkpoint
they started from, and scikit-learn scores them."""

from __future__ import annotations

import csv
import types

import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, log_loss
from test_eval_product import write_mesh

from meshctl.compiler.compile import compile_mesh
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.data import load_job_data
from meshctl.runtime.heldout import score_held_out
from meshctl.runtime.kernels import train_local
from meshctl.runtime.kernels.models import build_model
from meshctl.runtime.launcher import evaluation_lines, start_run

DOMAINS = ["client-0", "client-1", "client-2"]


def _sklearn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        proba = torch.softmax(model(x), dim=1).numpy()
    return {"loss": log_loss(y.numpy(), proba, labels=list(range(10))),
            "accuracy": accuracy_score(y.numpy(), proba.argmax(1))}


def test_every_model_is_scored_at_every_site_and_the_cells_are_what_the_sites_would_say(tmp_path):
    mesh = write_mesh(tmp_path, participants=f"[{', '.join(DOMAINS)}]", evaluation=", cross_site: true", rounds=2)
    plan = compile_mesh(mesh).plan
    assert plan is not None
    job = plan.jobs[0]
    assert job.evaluation.cross_site is True
    run = start_run(mesh, plan, address="tcp://127.0.0.1:0")
    events = list(run.follow())
    result = run.finish()
    assert result.ok, result.reason
    (cross,) = [e for e in events if isinstance(e, ev.CrossSiteEvaluated)]
    models = ["global", *(f"local:{d}" for d in DOMAINS)]
    assert cross.models == models and cross.sites == DOMAINS and cross.round == 2
    cells = {(c.model, c.site): c for c in cross.cells}
    assert sorted(cells) == sorted((m, s) for m in models for s in DOMAINS)
    assert not any(c.reason for c in cross.cells)
    # the global model's row is the final round's per-domain evaluation
    final = next(e for e in events if isinstance(e, ev.RoundCompleted) and e.round == 2)
    for site in DOMAINS:
        assert cells[("global", site)].examples == final.domain_examples[site]
        for name, value in final.domain_metrics[site].items():
            assert cells[("global", site)].metrics[name] == pytest.approx(value, abs=1e-9), (site, name)
    # each local model, replayed from round 1's global model as its domain trains it in round 2,
    # scored by scikit-learn on every site's holdout: the cells (its own site included) say the same
    data = {r.domain: load_job_data(job, plan.product(r.product), tmp_path, r.client_id) for r in job.reads}
    start = load_file(str(result.run_dir / "checkpoints" / job.name / "round-0001.safetensors"))
    t = job.training
    for read in job.reads:
        model = build_model(job)
        model.load_state_dict(start)
        d = data[read.domain]
        torch.set_num_threads(1)
        train_local(model, d.x_train, d.y_train, epochs=t.local_epochs, batch_size=t.batch_size,
                    optimizer=t.optimizer, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                    shuffle_seed=1000 * 2 + read.client_id)
        for site in DOMAINS:
            want = _sklearn(model, data[site].x_test, data[site].y_test)
            got = cells[(f"local:{read.domain}", site)]
            assert got.examples == len(data[site].y_test)
            assert got.metrics["loss"] == pytest.approx(want["loss"], abs=1e-4), (read.domain, site)
            assert got.metrics["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9), (read.domain, site)
    # the matrix is in the run directory and in the summary
    with (result.run_dir / "cross_site.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["site"]) for r in rows] == [(c.model, c.site) for c in cross.cells]
    for r in rows:
        assert float(r["accuracy"]) == pytest.approx(cells[(r["model"], r["site"])].metrics["accuracy"], abs=1e-6)
    lines = evaluation_lines(events, job.name, result.run_dir)
    assert lines[0].startswith("job digits-mlp: cross-site evaluation") and lines[1].split()[0] == "accuracy"
    assert [line.split()[0] for line in lines[2:]] == models


@pytest.mark.parametrize(("privacy", "words"), [
    ("    privacy: {secure_aggregation: true}", "uses secure aggregation"),
    ("    privacy: {dp: {epsilon: 5}}", "trains with DP"),
    ("    personalization: {local: ['2.*']}", "keeps layers 2.* in each domain"),
])
def test_cross_site_is_refused_where_local_models_are_protected(tmp_path, privacy, words):
    path = write_mesh(tmp_path, participants=f"[{', '.join(DOMAINS)}]", evaluation=", cross_site: true",
                      privacy=privacy)
    found = [(d.code, d.message) for d in compile_mesh(path).errors]
    code = "MESH538" if "personalization" in privacy else "MESH536"
    assert any(c == code and words in m for c, m in found), found


def test_a_domain_scores_no_local_model_its_plan_does_not_declare(tmp_path):
    plan = compile_mesh(write_mesh(tmp_path)).plan
    assert plan is not None and plan.jobs[0].evaluation.cross_site is None
    daemon = types.SimpleNamespace(cfg=types.SimpleNamespace(plan=plan, domain="client-0"), held_out={})
    reply = score_held_out(daemon, wire.EvalIns(job="digits-mlp", round=3, version=3, model="local:client-1"), {})
    assert isinstance(reply, wire.ErrorReply) and "does not declare cross_site" in reply.reason
