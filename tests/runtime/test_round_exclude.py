"""Round policies that exclude one update instead of aborting the job, and suspension by policy (issue 13).

The coordinator logic runs on the in-memory hub (tests/runtime/rooms/conftest.py's `room`, no processes);
the compile-time checks on the digits mesh; one run over real processes (`meshctl up --headless`, real
daemons, DuckDB and ZeroMQ) with a sign-flip x10 attacker (the daemon's MESHCTL_TEST_SIGN_FLIP hook).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import rooms.conftest as rooms
import torch
from click.testing import CliRunner

from meshctl.cli import main
from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import PlanPolicy
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.governance import RoundGate, RoundUpdate, update_cosines

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
Domain = rooms.Domain
room = rooms.room
"""The coordinator's rooms on the in-memory hub with a fake clock (tests/runtime/rooms/conftest.py)."""
NORM = PlanPolicy(name="norm-outlier", scope="round", effect="exclude", message="update norm far above the round's median",
                  require="update.norm_ratio <= 3.0", at="mesh.yaml:30:5")


def _attacker(d: Domain, scale: float) -> None:
    """`d` answers each TrainIns with w + scale (honest domains send w + 1)."""
    def answer(conn, msg, tensors):
        if isinstance(msg, wire.TrainIns) and conn is d.conn:
            if tensors:
                d.weights = dict(tensors)
            conn.send(wire.TrainRes(job=msg.job, round=msg.round, examples=10, loss=0.5, seconds=0.01,
                                    attempt=msg.attempt), {k: v + scale for k, v in d.weights.items()})
            return
        d._on_message(conn, msg, tensors)
    d.conn.on_message = answer


def _trains(d: Domain) -> list[int]:
    return [m.round for m, _ in d.instructions() if isinstance(m, wire.TrainIns)]


# -- the coordinator, on the in-memory hub ---------------------------------------------------------

def _weights(d: Domain) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the weights of `d`'s first TrainIns, those of its last EvalIns)."""
    sent = [(m, t) for m, t in d.instructions() if t]
    return sent[0][1], [t for m, t in sent if isinstance(m, wire.EvalIns)][-1]


def test_an_outlying_update_is_excluded_each_round_and_the_job_completes(room):
    r = room(n=4, quorum=3, rounds=3, policies=(NORM,))
    _attacker(r.domains["client-0"], 100.0)
    assert r.run() == ""
    excluded = r.sink.of(ev.UpdateExcluded)
    assert [(e.round, e.domain, e.policy, e.exclusions) for e in excluded] == [
        (1, "client-0", "norm-outlier", 1), (2, "client-0", "norm-outlier", 2), (3, "client-0", "norm-outlier", 3)]
    assert excluded[0].reason == "update norm far above the round's median" and excluded[0].at == "mesh.yaml:30:5"
    assert excluded[0].update_norm > 99 * r.sink.of(ev.UpdateReceived)[1].update_norm
    assert [e.participants for e in r.sink.of(ev.RoundCompleted)] == [["client-1", "client-2", "client-3"]] * 3
    assert r.sink.of(ev.DomainSuspended) == [] and r.sink.of(ev.PolicyDecided) == []
    assert _trains(r.domains["client-0"]) == [1, 2, 3]  # without suspend_after it stays in the job
    first, last = _weights(r.domains["client-1"])  # each round's mean is the honest w + 1's alone
    assert all(torch.allclose(last[k], first[k] + 3) for k in first)
    [done] = r.sink.of(ev.JobCompleted)
    assert done.rounds == 3 and "client-0" not in done.domains


def test_a_domain_excluded_suspend_after_times_leaves_the_job(room):
    policy = NORM.model_copy(update={"suspend_after": 2})
    r = room(n=5, quorum=3, rounds=4, policies=(policy,))
    _attacker(r.domains["client-0"], 100.0)
    assert r.run() == ""
    assert [(e.round, e.domain) for e in r.sink.of(ev.UpdateExcluded)] == [(1, "client-0"), (2, "client-0")]
    [s] = r.sink.of(ev.DomainSuspended)
    assert (s.job, s.round, s.domain, s.policy, s.exclusions) == ("digits", 2, "client-0", "norm-outlier", 2)
    assert _trains(r.domains["client-0"]) == [1, 2]  # no TrainIns after its suspension
    evals = [m.round for m, _ in r.domains["client-0"].instructions() if isinstance(m, wire.EvalIns)]
    assert evals == [1]  # nor the suspending round's evaluation
    honest = ["client-1", "client-2", "client-3", "client-4"]
    assert [e.participants for e in r.sink.of(ev.RoundCompleted)] == [honest] * 4
    [done] = r.sink.of(ev.JobCompleted)
    assert done.rounds == 4
    assert done.left_out == {"client-0": "was suspended by policy norm-outlier after 2 excluded update(s)"}


def test_a_round_left_below_its_quorum_fails_with_one_line(room):
    r = room(n=3, rounds=2, policies=(NORM,))  # quorum: every participant
    _attacker(r.domains["client-0"], 100.0)
    reason = r.run()
    assert reason == "job digits round 1: 2 update(s) left after excluding client-0 by policy, below the quorum of 3"
    assert [e.domain for e in r.sink.of(ev.UpdateExcluded)] == ["client-0"]
    assert r.sink.of(ev.RoundCompleted) == []


def test_a_sign_flipped_update_is_excluded_on_its_cosine(room):
    cosine = PlanPolicy(name="direction", scope="round", effect="exclude", require="update.cosine > 0.0")
    r = room(n=4, quorum=3, rounds=2, policies=(cosine,))
    _attacker(r.domains["client-2"], -10.0)  # w - 10: the honest update (+1) flipped and scaled x10
    assert r.run() == ""
    assert [(e.round, e.domain) for e in r.sink.of(ev.UpdateExcluded)] == [(1, "client-2"), (2, "client-2")]


def test_a_policy_that_fails_to_evaluate_aborts_the_round(room):
    broken = PlanPolicy(name="typo", scope="round", effect="exclude", require="update.nrom < 3.0")
    r = room(n=3, quorum=2, rounds=2, policies=(broken,))
    reason = r.run()
    assert reason.startswith("job digits round 1: policy typo on the update of client-0: failed to evaluate")
    assert reason.endswith("(fails closed)") and "\n" not in reason
    [d] = r.sink.of(ev.PolicyDecided)
    assert (d.policy, d.effect, d.subject) == ("typo", "deny", "update.digits.1.client-0")


def test_the_other_round_policies_see_the_updates_left(room):
    deny = PlanPolicy(name="norm-cap", scope="round", require="round.updates.all(u, u.update_norm < 1000.0)")
    r = room(n=4, quorum=3, rounds=2, policies=(NORM, deny))
    _attacker(r.domains["client-0"], 100.0)
    assert r.run() == ""  # norm-cap would deny the attacker's update, had it not been excluded first


# -- the pure parts ------------------------------------------------------------------------------

def test_cosines_are_to_the_coordinate_wise_median_update():
    base = [torch.zeros(3)]
    ups = {"a": [torch.tensor([1.0, 0.0, 0.0])], "b": [torch.tensor([1.0, 1.0, 0.0])],
           "c": [torch.tensor([-10.0, -10.0, 0.0])]}
    cos = update_cosines(base, ups)  # the median update is (1, 0, 0)
    assert cos == pytest.approx({"a": 1.0, "b": 2 ** -0.5, "c": -(2 ** -0.5)})
    assert update_cosines(base, {"z": [torch.zeros(3)]}) == {"z": 0.0}


def test_domains_leave_exclude_policies_to_the_coordinator(make_plan):
    plan = make_plan(n=3)
    plan = plan.model_copy(update={"policies": [NORM, PlanPolicy(name="few", scope="round", require="true")]})
    job = plan.jobs[0]
    mine = RoundGate(plan, job, domain="client-1")
    assert [p.name for p in mine.policies] == ["few"] and mine.excluders == []
    theirs = RoundGate(plan, job)
    assert [p.name for p in theirs.excluders] == ["norm-outlier"] and [p.name for p in theirs.policies] == ["few"]
    ups = [RoundUpdate("client-0", 10, 0.5, 1.0), RoundUpdate("client-1", 10, 0.5, 1.1),
           RoundUpdate("client-2", 10, 0.5, 9.0)]
    out = theirs.exclusions(1, ["client-0", "client-1", "client-2"], ups)
    assert [(d, x.effect, x.subject) for d, x, _ in out] == [("client-2", "exclude", "update.digits.1.client-2")]


# -- the language ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmark's digits mesh over 4 domains, 2 rounds."""
    sys.path.insert(0, str(DIGITS))
    from make_data import write_mesh

    return write_mesh(tmp_path_factory.mktemp("digits4"), 4, rounds=2)


def _compile(mesh: Path, policy: str, model: str = "    quorum: 3\n"):
    text = mesh.read_text().replace("policies:\n", f"policies:\n  - {policy}\n", 1)
    text = text.replace("    aggregation: {strategy: fedavg}\n", f"    aggregation: {{strategy: fedavg}}\n{model}")
    spec = mesh.parent / "variant.yaml"
    spec.write_text(text)
    return compile_mesh(spec)


EXCLUDE = "{name: outlier, scope: round, effect: exclude, suspend_after: 3, require: 'update.norm_ratio <= 3.0'}"


def test_the_plan_carries_an_exclude_policy_and_its_suspend_after(digits4):
    result = _compile(digits4, EXCLUDE)
    assert result.errors == [] and result.warnings == [], result.render_diagnostics()
    [p] = [p for p in result.plan.policies if p.name == "outlier"]
    assert (p.scope, p.effect, p.suspend_after) == ("round", "exclude", 3)
    plain = _compile(digits4, "{name: any, scope: round, require: 'true'}")
    assert "suspend_after" not in plain.plan.to_toml()  # (None is dropped: other plans stay byte-identical)


def test_exclude_is_refused_where_it_means_nothing(digits4):
    [err] = _compile(digits4, "{name: m, scope: model, effect: exclude, require: 'true'}").errors
    assert err.code == "MESH543"
    assert err.message == "policy 'm' has effect: exclude, but a `scope: model` policy decides on no update to exclude"
    [err] = _compile(digits4, "{name: w, scope: round, effect: warn, suspend_after: 2, require: 'true'}").errors
    assert err.code == "MESH543" and "sets suspend_after" in err.message and "its effect is warn" in err.message
    [err] = _compile(digits4, EXCLUDE.replace("suspend_after: 3", "suspend_after: 0")).errors
    assert err.code.startswith("MESH2")  # the schema: at least 1


def test_exclude_is_refused_under_secure_aggregation(digits4):
    errors = _compile(digits4, EXCLUDE, "    quorum: 3\n    privacy: {secure_aggregation: true}\n").errors
    assert [e.code for e in errors] == ["MESH544"]
    assert errors[0].message == ("round policy 'outlier' excludes single updates, which the coordinator cannot see "
                                 "under the secure aggregation of model 'digits-mlp'")


def test_exclude_with_a_quorum_of_every_participant_warns(digits4):
    result = _compile(digits4, EXCLUDE, "")
    [w] = result.warnings
    assert w.code == "MESH545" and "quorum is every participant (4)" in w.message
    assert w.hint == "set `quorum:` to the updates a round must keep, e.g. 3"
    assert result.plan is not None


@pytest.mark.parametrize("code", ["MESH543", "MESH544", "MESH545"])
def test_explain_the_codes(code):
    out = CliRunner().invoke(main, ["explain", code])
    assert out.exit_code == 0 and "exclude" in out.output


# -- the dashboard -------------------------------------------------------------------------------

EXCLUDED = ev.UpdateExcluded(job="digits", round=2, domain="client-0", policy="outlier", reason="norm far above",
                             at="mesh.yaml:30:5", update_norm=40.0, exclusions=2)
SUSPENDED = ev.DomainSuspended(job="digits", round=2, domain="client-0", policy="outlier", exclusions=2,
                               reason="norm far above")


def test_the_policy_decisions_list_shows_exclusions_and_suspensions():
    import asyncio

    from meshctl.tui import make_app
    from meshctl.tui.state import reduce_all
    from meshctl.tui.widgets import PolicyTable

    state = reduce_all([EXCLUDED, SUSPENDED])
    assert [(d.policy, d.effect, d.subject, d.stage) for d in state.decisions] == [
        ("outlier", "exclude", "update.digits.2.client-0", "runtime"), ("outlier", "suspend", "domain.client-0", "runtime")]

    async def run() -> None:
        app = make_app()
        async with app.run_test(size=(100, 24)) as pilot:
            for e in (EXCLUDED, SUSPENDED):
                assert app.feed(e)
            await pilot.pause()
            app.flush()
            await pilot.press("3")
            await pilot.pause()
            table = app.query_one(PolicyTable)
            assert table.plain_rows == [
                ["exclude", "outlier", "mesh.yaml:30:5", "coordinator", "update.digits.2.client-0", "norm far above"],
                ["suspend", "outlier", "–", "coordinator", "domain.client-0",
                 "2 update(s) excluded in job digits: client-0 takes no further part"]]
            styles = [table.get_row_at(i)[0].style for i in range(2)]
            assert all(s.bold for s in styles)

    asyncio.run(run())


# -- over real processes ---------------------------------------------------------------------------

def _up(mesh: Path, env: dict[str, str]) -> tuple[Path, list[dict]]:
    """`meshctl up --headless` on `mesh`: (its run directory, its events)."""
    proc = subprocess.run([sys.executable, "-m", "meshctl", "up", "--headless", "--address", "tcp://127.0.0.1:0",
                           "--threads", "1", str(mesh)], check=False, capture_output=True, text=True, cwd=mesh.parent,
                          env={**os.environ, **env}, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1].rsplit(": ", 1)[-1])
    return run_dir, [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_meshctl_up_excludes_a_sign_flipping_attacker_then_suspends_it(tmp_path):
    sys.path.insert(0, str(DIGITS))
    from make_data import write_mesh

    from meshctl.runtime.audit import verify_run
    from meshctl.runtime.audit_report import build_report

    mesh = write_mesh(tmp_path, 4, rounds=5)
    policy = ("{name: outlier, scope: round, effect: exclude, suspend_after: 3, require: 'update.norm_ratio <= 3.0', "
              "message: update norm over 3x the round's median}")
    mesh.write_text(mesh.read_text().replace("policies:\n", f"policies:\n  - {policy}\n", 1)
                    .replace("    aggregation: {strategy: fedavg}\n", "    aggregation: {strategy: fedavg}\n    quorum: 3\n"))
    run_dir, events = _up(mesh, {"MESHCTL_TEST_SIGN_FLIP": "client-0:10"})
    kinds = [e["type"] for e in events]
    assert "job_completed" in kinds and "job_failed" not in kinds
    excluded = [(e["round"], e["domain"], e["policy"], e["exclusions"]) for e in events if e["type"] == "update_excluded"]
    assert excluded == [(r, "client-0", "outlier", r) for r in (1, 2, 3)]
    [suspended] = [e for e in events if e["type"] == "domain_suspended"]
    assert (suspended["domain"], suspended["round"], suspended["exclusions"]) == ("client-0", 3, 3)
    rounds = [e for e in events if e["type"] == "round_completed"]
    assert [r["participants"] for r in rounds] == [["client-1", "client-2", "client-3"]] * 5
    trained = {(e["round"], e["domain"]) for e in events if e["type"] == "update_received"}
    assert (3, "client-0") in trained and (4, "client-0") not in trained  # no part after its suspension
    [done] = [e for e in events if e["type"] == "job_completed"]
    assert done["left_out"] == {"client-0": "was suspended by policy outlier after 3 excluded update(s)"}
    assert verify_run(run_dir).ok  # each exclusion and the suspension are entries of the hash-chained audit log
    policies = build_report(run_dir)["policies"]  # and decisions of the compliance report
    assert [(d["effect"], d["subject"]) for d in policies["runtime"] if d["effect"] in ("exclude", "suspend")] == [
        *[("exclude", f"update.digits-mlp.{r}.client-0") for r in (1, 2, 3)], ("suspend", "domain.client-0")]
    assert (policies["counts"]["exclude"], policies["counts"]["suspend"]) == (3, 1)
    # clean, this mesh reaches 0.93; without client-0's data (a quarter of the rows, non-IID) 0.87
    assert rounds[-1]["metrics"]["accuracy"] > 0.8, rounds[-1]["metrics"]


def test_exclude_with_a_quorum_of_the_whole_sample_warns(digits4):
    [w] = _compile(digits4, EXCLUDE, "    sampling: {per_round: 2}\n").warnings
    assert w.code == "MESH545" and "quorum is every domain of its sample (2 per round)" in w.message
    assert _compile(digits4, EXCLUDE, "    sampling: {per_round: 3}\n    quorum: 2\n").warnings == []


def test_meshctl_diff_ranks_exclude_between_warn_and_deny(digits4, tmp_path):
    from meshctl.compiler.breaking import classify
    from meshctl.gitrev import load_side

    def policy(effect: str, suspend: str = "") -> str:
        return f"{{name: outlier, scope: round, effect: {effect},{suspend} require: 'update.norm_ratio <= 3.0'}}"

    def rules(base: str, head: str) -> list[tuple[str, str]]:
        for name, text in (("base", base), ("head", head)):
            (digits4.parent / f"{name}.yaml").write_text(
                digits4.read_text().replace("policies:\n", f"policies:\n  - {text}\n", 1))
        old = load_side(str(digits4.parent / "base.yaml"), digits4.parent / "head.yaml")
        new = load_side(str(digits4.parent / "head.yaml"), digits4.parent / "head.yaml")
        return [(f.rule, f.message) for f in classify(old, new) if f.subject == "policy outlier"]

    assert rules(policy("deny"), policy("exclude")) == [("GOV006", "effect deny -> exclude")]
    assert rules(policy("exclude"), policy("warn")) == [("GOV006", "effect exclude -> warn")]
    assert rules(policy("warn"), policy("exclude")) == [("NB010", "effect warn -> exclude")]
    assert rules(policy("exclude", " suspend_after: 3,"), policy("exclude", " suspend_after: 5,")) == [
        ("GOV006", "suspend_after 3 -> 5")]
    assert rules(policy("exclude"), policy("exclude", " suspend_after: 2,")) == [("NB010", "suspend_after none -> 2")]


def test_a_round_policy_that_reads_update_must_exclude(digits4):
    [err] = _compile(digits4, "{name: w, scope: round, effect: warn, require: 'update.update_norm < 5.0'}").errors
    assert err.code == "MESH543"
    assert err.message == ("round policy 'w' reads `update`, which is bound only for `effect: exclude` (decided per "
                           "update); its effect is warn")
    bound = "{name: b, scope: round, require: 'round.updates.all(update, update.update_norm < 5.0)'}"
    assert _compile(digits4, bound).errors == []  # (`update` bound by the macro)
