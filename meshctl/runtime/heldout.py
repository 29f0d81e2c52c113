"""A domain's side of held-out and cross-site evaluation (the coordinator's: coordinator/crosssite.py).

Evaluation product: the domain that holds a job's `evaluation.product` reads it through the same
masked view as any training read (data.py), every row as test data, and scores the global model on
it when asked (`EvalIns.on == "product"`); it never trains on it. A domain that holds the product
but does not train joins the job for this alone (governance lets it: the product is its read).

Cross-site evaluation: `EvalIns.model == "local:<domain>"` carries that domain's last local model.
The daemon scores a copy of its model with those weights, never the job's own weights (which stay
the global ones), and only when the plan declares `cross_site: true`: otherwise it refuses.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshctl.compiler.plan import Plan, PlanJob, PlanProduct
from meshctl.runtime import wire
from meshctl.runtime.data import JobData, load_job_data

if TYPE_CHECKING:
    import duckdb


def held_out_of(plan: Plan, job: PlanJob, domain: str) -> str:
    """The id of `job`'s evaluation product when `domain` holds it, else ""."""
    pid = job.evaluation.product
    if not pid:
        return ""
    product = next((p for p in plan.products if p.id == pid), None)
    return pid if product is not None and product.domain == domain else ""


def load_held_out(job: PlanJob, product: PlanProduct, base_dir: Path, con: duckdb.DuckDBPyConnection) -> JobData:
    """Every row of `product` as test data for `job` (features and target only: the holdout column of the
    training products is not read here). Raises DataError like any read."""
    whole = job.model_copy(update={"evaluation": job.evaluation.model_copy(
        update={"holdout_column": "", "holdout": 0.01})})
    data = load_job_data(whole, product, base_dir, 0, con)
    import torch

    x = torch.cat([data.x_train, data.x_test])
    y = torch.cat([data.y_train, data.y_test])
    return dataclasses.replace(data, x_train=x[:0], y_train=y[:0], x_test=x, y_test=y)


def score_held_out(daemon: Any, ins: wire.EvalIns, tensors: wire.Tensors) -> object:
    """The daemon's answer to an EvalIns for its evaluation product or for another domain's local model."""
    name, me = ins.job, daemon.cfg.domain

    def refuse(code: str, reason: str) -> wire.ErrorReply:
        return wire.ErrorReply(code=code, reason=reason[:4096], job=name, round=ins.round)

    job = next((j for j in daemon.cfg.plan.jobs if j.name == name), None)
    if ins.model and (job is None or not job.evaluation.cross_site):
        return refuse("unexpected", f"domain {me}: job {name!r} does not declare cross_site evaluation; "
                                    "local models are not scored here")
    if ins.on == "product" and name not in daemon.held_out:
        return refuse("unknown-job", f"domain {me} holds no evaluation product of job {name!r}")
    if ins.model:  # another domain's local model: the job's own (global) weights stay as they are
        st = daemon.jobs.get(name)
        if name in daemon.refused or st is None:
            return daemon._state(name, ins.version, {}, ins.round).model_copy(update={"round": ins.round})
        expect = {t.name: (t.shape, t.dtype) for t in st.job.tensors}
        got = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()}
        if got != expect:
            return refuse("bad-weights", "weights do not match the plan's model")
        model = copy.deepcopy(st.model)
        model.load_state_dict(tensors)
    else:
        st = daemon._state(name, ins.version, tensors, ins.round)
        if isinstance(st, wire.ErrorReply):
            return st.model_copy(update={"round": ins.round})
        model = st.model
    data = daemon.held_out[name] if ins.on == "product" else st.data
    reply = daemon._scored(ins, dataclasses.replace(st, data=data, model=model))
    return reply.model_copy(update={"on": ins.on, "model": ins.model})
