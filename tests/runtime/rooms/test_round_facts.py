"""What round policies and metrics.csv see of a round: the update's norm (of the update, not of the
weights sent), the ε the job has spent, and how many holdout examples the test metrics cover."""

from __future__ import annotations

import csv
import math

from meshctl.compiler.plan import PlanDp, PlanPolicy
from meshctl.runtime import events as ev
from meshctl.runtime import wire


def test_update_norm_is_the_norm_of_the_update_not_of_the_weights(room):
    r = room(n=3, rounds=2)  # each scripted domain sends the global weights plus one, everywhere
    assert r.run() == ""
    norms = [e.update_norm for e in r.sink.of(ev.UpdateReceived)]
    assert len(norms) == 6
    expect = math.sqrt(r.coordinator.plan.jobs[0].parameters)  # ||(w + 1) - w|| = sqrt(#parameters)
    assert all(abs(n - expect) < 1e-6 for n in norms), (norms, expect)


def test_metrics_csv_records_how_much_each_evaluation_covers(room):
    r = room(n=3, rounds=2)
    assert r.run() == ""
    with (r.coordinator.run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["round"], row["evaluated"], row["eval_examples"]) for row in rows] == [("1", "3", "30"),
                                                                                         ("2", "3", "30")]


def test_round_epsilon_spent_is_what_the_job_has_spent(room):
    watch = PlanPolicy(name="eps-watch", scope="round", require="round.epsilon_spent <= 1.0", effect="warn",
                       message="the job has spent more than ε 1")
    r = room(n=3, rounds=3, dp=PlanDp(epsilon=2.0, delta=1e-5, clip=1.0), policies=(watch,))
    for name, d in r.domains.items():  # each round charges ε 0.6 to the domain's product
        def answer(conn, msg, tensors, d=d, name=name):
            if isinstance(msg, wire.TrainIns) and conn is d.conn:
                if tensors:
                    d.weights = dict(tensors)
                charge = wire.LedgerCharge(product=f"{name}.digits", epsilon=0.6, total=0.6 * msg.round, cap=None)
                conn.send(wire.TrainRes(job=msg.job, round=msg.round, examples=10, loss=0.5, seconds=0.01,
                                        charges=[charge], attempt=msg.attempt), {k: v + 1 for k, v in d.weights.items()})
                return
            d._on_message(conn, msg, tensors)
        d.conn.on_message = answer
    assert r.run() == ""
    warned = [e.subject for e in r.sink.of(ev.PolicyDecided) if e.policy == "eps-watch" and e.effect == "warn"]
    assert warned == ["round.digits.2", "round.digits.3"]  # 0.6 after round 1; 1.2 and 1.8 after
