"""The evaluation room of one job: its held-out evaluation product, and cross-site evaluation at its end.

Evaluation product (`evaluation.product`): each round, right behind the holdout EvalIns, the domain that
holds the product gets `EvalIns(on="product")` with the new global weights and answers with sums over
every row of it; the room pools them like any domain's (training.pooled_metrics), emits HeldOutEvaluated
and hands the metrics to the metrics.csv row (`product_<metric>` columns). The product's domain need not
train; a round it cannot score (not joined, refused, lost, silent past the round deadline) says why in
the event and leaves the columns empty: the job goes on.

Cross-site evaluation (`evaluation.cross_site: true`, NVIDIA FLARE's cross-site model evaluation): after
the last round, the global model and each participant's last local model (its final update, which the
coordinator aggregated) are sent to every site still taking part: each participant scores them on its
holdout, the product's domain on the product. The model x site matrix goes to `cross_site.csv` (one row
per cell: job, model, site, examples, metrics) and a CrossSiteEvaluated event. The compiler refuses it
under secure aggregation and DP (MESH536): there the coordinator holds no local model to send, and
sending one would unprotect it. Every daemon also refuses a local model unless its plan declares it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshctl.compiler.plan import PlanJob
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.coordinator.collector import kind_of
from meshctl.runtime.coordinator.outputs import append_row

Score = Callable[[PlanJob, dict[str, wire.EvalRes]], tuple[dict[str, float], dict[str, dict[str, float]]]]
"""training.pooled_metrics: (pooled metrics, each site's) of evaluation replies."""

FIRST_JOIN_S = 60.0
"""How long the first product evaluation waits for the product's domain to join (at most the round deadline)."""
CROSS_SITE_FILE = "cross_site.csv"


class Evaluations:
    """The evaluation product and cross-site evaluation of the job `training` runs."""

    def __init__(self, training: Any, score: Score):
        """`training`: the coordinator.training.Training that runs the job (its members, collector, sink,
        sends and run directory); `score`: how replies become metrics."""
        self.t, self.score = training, score
        job, plan = training.job, training.plan
        self.product = job.evaluation.product or ""
        self.domain = next((p.domain for p in plan.products if p.id == self.product), "")
        self.asked: dict[int, str] = {}
        """Round -> "" when its product EvalIns went out, else why it did not."""
        self.waited = False

    # -- the evaluation product, every round ---------------------------------------------
    def send(self, rnd: int, weights: wire.Tensors) -> None:
        """Round `rnd`'s product EvalIns with the new global weights (nothing without a product)."""
        if not self.product:
            return
        if not self.waited:  # the product's domain trains nothing: it may join after the first round
            self.waited = True
            self._await_join(min(self.t.job.round_timeout_s, FIRST_JOIN_S))
        why = self._unavailable()
        if not why:
            peer = self.t.members.peers[self.domain]
            msg = wire.EvalIns(job=self.t.job.name, round=rnd, version=rnd, on="product")
            self.t._send_to(self.t.job, peer, msg, weights, rnd)
        self.asked[rnd] = why

    def collect(self, rnd: int) -> tuple[dict[str, float], int] | None:
        """Round `rnd`'s product metrics and examples ({} and 0 when it was not scored); None without a
        product. Emits HeldOutEvaluated either way."""
        if not self.product:
            return None
        job = self.t.job
        why = self.asked.pop(rnd, "it was not asked")
        got: dict[str, Any] = {}
        if not why:
            key = ("eval_res:product", self.domain)
            got = self._gather(rnd, [key], job.round_timeout_s)
            why = "" if key in got else self._unavailable() or f"no reply within {job.round_timeout_s:.0f}s"
        if why:
            self.t.sink.emit(ev.HeldOutEvaluated(job=job.name, round=rnd, product=self.product, domain=self.domain,
                                                 reason=why))
            return {}, 0
        msg = got[("eval_res:product", self.domain)]
        metrics = self._metrics(msg)
        self.t.sink.emit(ev.HeldOutEvaluated(job=job.name, round=rnd, product=self.product, domain=self.domain,
                                             examples=msg.examples, metrics=metrics))
        return metrics, msg.examples

    # -- cross-site evaluation, at the end ------------------------------------------------
    def cross_site(self, rnd: int, weights: wire.Tensors, local: dict[str, wire.Tensors],
                   participants: list[str]) -> None:
        """Score the global model and each participant's last local model at every site (a no-op unless the
        job declares `cross_site`); writes cross_site.csv and emits CrossSiteEvaluated."""
        job, members = self.t.job, self.t.members
        if not job.evaluation.cross_site or rnd < 1:
            return
        models = {"global": weights, **{f"local:{d}": local[d] for d in job.participants if d in local}}
        sites = {d: "holdout" for d in members.active(participants)}
        if self.product and not self._unavailable():
            sites[self.product] = "product"
        expected: dict[tuple[str, str], tuple[str, str]] = {}  # (kind, domain) -> (model, site)
        for model, tensors in models.items():
            for site, on in sites.items():
                domain = self.domain if on == "product" else site
                peer = members.peers.get(domain)
                if peer is None:
                    continue
                msg = wire.EvalIns(job=job.name, round=rnd, version=rnd, on=on, model=model)
                sent = members.send(peer, msg, tensors)
                self.t.bytes_out[(job.name, rnd)] = self.t.bytes_out.get((job.name, rnd), 0) + sent
                kind = kind_of(wire.EvalRes(job=job.name, round=rnd, on=on, model=model, examples=0, loss_sum=0.0,
                                            correct=0))
                expected[(kind, domain)] = (model, site)
        got = self._gather(rnd, list(expected), job.round_timeout_s)
        cells = []
        for model in models:
            for site, on in sites.items():
                key = next((k for k, v in expected.items() if v == (model, site)), None)
                if key is not None and key in got:
                    msg = got[key]
                    cells.append(ev.CrossSiteCell(model=model, site=site, examples=msg.examples,
                                                  metrics=self._metrics(msg)))
                else:
                    domain = self.domain if on == "product" else site
                    reason = self._unavailable(domain) or f"no reply within {job.round_timeout_s:.0f}s"
                    cells.append(ev.CrossSiteCell(model=model, site=site, reason=reason))
        event = ev.CrossSiteEvaluated(job=job.name, round=rnd, models=list(models), sites=list(sites), cells=cells,
                                      path=CROSS_SITE_FILE)
        write_matrix(self.t.run_dir / CROSS_SITE_FILE, event)
        self.t.sink.emit(event)

    # -- helpers ------------------------------------------------------------------------------
    def _metrics(self, msg: wire.EvalRes) -> dict[str, float]:
        return self.score(self.t.job, {"site": msg})[0]

    def _unavailable(self, domain: str = "") -> str:
        """Why `domain` (default: the product's) cannot score for the job now; "" when it can."""
        domain = domain or self.domain
        members, job = self.t.members, self.t.job
        peer = members.peers.get(domain)
        if domain in members.failed:
            return f"domain {domain} lost: {members.failed[domain]}"
        if domain in members.refused:
            return f"domain {domain} was refused: {members.refused[domain]}"
        if domain in members.dropped:
            return f"domain {domain} {members.dropped[domain]}"
        if peer is None:
            return f"domain {domain} has not joined"
        if job.name in peer.refused:
            return f"domain {domain} refused the job: {peer.refused[job.name]}"
        return ""

    def _await_join(self, timeout: float) -> None:
        """Wait up to `timeout` for the product's domain to join (or to be refused or lost)."""
        clock, members = self.t.collector.clock, self.t.members
        start = clock.monotonic()
        while (self.domain not in members.peers and self.domain not in members.failed
               and self.domain not in members.refused and clock.monotonic() - start < timeout):
            self.t.collector.pump()

    def _gather(self, rnd: int, keys: list[tuple[str, str]], timeout: float) -> dict[tuple[str, str], Any]:
        """The replies `keys` ((kind, domain)) of round `rnd`, as many as arrive while their domains can still
        answer, within `timeout`; the kinds are closed afterwards (a later reply is late)."""
        collector, members = self.t.collector, self.t.members
        start = collector.clock.monotonic()
        while True:
            waiting = [(k, d) for k, d in keys if (k, rnd, d) not in collector.inbox and not self._unavailable(d)
                       and d in members.peers]
            if not waiting or collector.clock.monotonic() - start > timeout:
                break
            collector.pump()
        got = {(k, d): collector.inbox.pop((k, rnd, d))[0] for k, d in keys if (k, rnd, d) in collector.inbox}
        for kind in {k for k, _ in keys}:
            collector.closed.add((kind, rnd))
            collector.discard(kind, rnd)
        return got


def write_matrix(path: Path, event: ev.CrossSiteEvaluated) -> None:
    """Append the matrix as rows (job, model, site, examples, reason, one column per metric) to `path`."""
    names = list(dict.fromkeys(k for c in event.cells for k in c.metrics))
    header = ["job", "round", "model", "site", "examples", *names, "reason"]
    for c in event.cells:
        append_row(path, header, {"job": event.job, "round": event.round, "model": c.model, "site": c.site,
                                  "examples": c.examples if not c.reason else "", "reason": c.reason,
                                  **{k: f"{v:.6f}" for k, v in c.metrics.items()}})
