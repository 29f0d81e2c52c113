"""The domain has the final word: run-time decisions on plans, and real runs where domains refuse.

Plans are built directly (conftest's digits plan) or compiled from the root mesh.yaml and then
hand-edited as TOML: that is the tampered-plan scenario, a coordinator running a plan that the
compiler would never have produced.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from datetime import date
from pathlib import Path

import pytest
import tomli_w

from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import (
    Plan,
    PlanContract,
    PlanDp,
    PlanGrant,
    PlanPolicy,
    PlanPrivacy,
    PlanQualityRule,
    mlp_tensors,
)
from meshctl.runtime import events as ev
from meshctl.runtime.governance import (
    RoundGate,
    RoundUpdate,
    evaluate_job,
    job_activation,
    plan_integrity,
)
from meshctl.runtime.launcher import start_run

ROOT = Path(__file__).resolve().parents[2]
TODAY = date(2025, 6, 1)


def _edit(plan: Plan, **changes) -> Plan:
    return plan.model_copy(update=changes).with_hash()


def _job(plan: Plan, **changes) -> Plan:
    return _edit(plan, jobs=[plan.jobs[0].model_copy(update=changes)])


def _product(plan: Plan, pid: str, **changes) -> Plan:
    return _edit(plan, products=[p.model_copy(update=changes) if p.id == pid else p for p in plan.products])


def _denied(decisions) -> dict[str, str]:
    return {d.policy: d.reason for d in decisions if d.effect == "deny"}


# -- decisions, without processes ------------------------------------------------------------

def test_a_clean_plan_is_allowed_by_every_invariant(make_plan):
    plan = make_plan(n=2)
    decisions = evaluate_job(plan, plan.jobs[0], "client-0", TODAY)
    assert {d.policy for d in decisions} == {"invariant:participant", "invariant:no-pii-features",
                                             "invariant:grant-required", "invariant:epsilon-budget"}
    assert all(d.effect == "allow" and d.domain == "client-0" and d.stage == "runtime" for d in decisions)
    assert all(d.subject == "model.digits" for d in decisions)
    assert plan_integrity(plan, "client-0").effect == "allow"


def test_pii_features_and_non_participants_are_denied(make_plan):
    plan = make_plan(n=2)
    cols = [c.model_copy(update={"pii": "indirect"}) if c.name == "px3" else c for c in plan.products[0].columns]
    plan = _product(plan, "client-0.digits", columns=cols)
    assert "client-0.digits.px3 (pii indirect)" in _denied(evaluate_job(plan, plan.jobs[0], "client-0", TODAY))[
        "invariant:no-pii-features"]
    assert not _denied(evaluate_job(plan, plan.jobs[0], "client-1", TODAY))  # its own product is clean
    outsider = _job(plan, participants=["client-1"])
    assert "not among the job's participants" in _denied(
        evaluate_job(outsider, outsider.jobs[0], "client-0", TODAY))["invariant:participant"]


@pytest.mark.parametrize("grants, purpose, needle", [
    ([], "research", "has no grant for model:digits"),
    ([PlanGrant(id="g", product="client-0.digits", subject="model:digits", purpose="marketing")], "research",
     "is for purpose 'marketing'"),
    ([PlanGrant(id="g", product="client-0.digits", subject="model:digits", purpose="research",
                until="2025-05-31")], "research", "expired on 2025-05-31"),
    ([PlanGrant(id="g", product="client-0.digits", subject="model:other", purpose="research")], "research",
     "has no grant for model:digits"),
])
def test_request_products_need_a_live_grant_for_the_job_and_its_purpose(make_plan, grants, purpose, needle):
    plan = _product(make_plan(n=2), "client-0.digits", access="request")
    plan = _edit(_job(plan, purpose=purpose), grants=grants)
    assert needle in _denied(evaluate_job(plan, plan.jobs[0], "client-0", TODAY))["invariant:grant-required"]


def test_a_grant_valid_through_today_allows(make_plan):
    plan = _product(make_plan(n=2), "client-0.digits", access="request")
    plan = _edit(_job(plan, purpose="research"), grants=[
        PlanGrant(id="g", product="client-0.digits", subject="model:digits", purpose="research", until="2025-06-01")])
    assert not _denied(evaluate_job(plan, plan.jobs[0], "client-0", TODAY))


def test_epsilon_above_a_products_budget_is_denied_and_no_dp_warns(make_plan):
    plan = _product(make_plan(n=2), "client-0.digits", epsilon_budget=2.0)
    no_dp = {d.policy: d.effect for d in evaluate_job(plan, plan.jobs[0], "client-0", TODAY)}
    assert no_dp["invariant:epsilon-budget"] == "warn"
    over = _job(plan, privacy=PlanPrivacy(dp=PlanDp(epsilon=8.0)))
    assert "ε 8 exceeds client-0.digits's budget 2" in _denied(
        evaluate_job(over, over.jobs[0], "client-0", TODAY))["invariant:epsilon-budget"]
    within = _job(plan, privacy=PlanPrivacy(dp=PlanDp(epsilon=1.5)))
    assert not _denied(evaluate_job(within, within.jobs[0], "client-0", TODAY))
    # what earlier runs spent (the privacy ledger) counts: 1.5 more on top of 1.0 is over 2
    spent = {"client-0.digits": 1.0}
    assert "with 1 already spent" in _denied(
        evaluate_job(within, within.jobs[0], "client-0", TODAY, spent))["invariant:epsilon-budget"]


def test_a_daemon_reads_what_its_products_spent_from_the_ledger(make_plan, tmp_path):
    from meshctl.runtime.daemon import Daemon, DaemonConfig
    from meshctl.runtime.keys import KeyPair
    from meshctl.runtime.ledger import Ledger, ledger_path

    plan = _product(make_plan(n=2), "client-0.digits", epsilon_budget=2.0)
    plan = _job(plan, privacy=PlanPrivacy(dp=PlanDp(epsilon=1.5)))
    Ledger(ledger_path(tmp_path)).charge("client-0.digits", 1.0, 2.0, subject="analysis:a", run="r0")
    keys = KeyPair.generate()
    cfg = DaemonConfig(domain="client-0", plan=plan, base_dir=tmp_path, coordinator="tcp://127.0.0.1:1",
                       server_key=b"", keys=keys)
    assert Daemon(cfg)._spent(plan, plan.jobs) == {"client-0.digits": 1.0}


def test_global_and_own_local_policies_decide_and_a_broken_one_fails_closed(make_plan):
    plan = _edit(make_plan(n=2), policies=[
        PlanPolicy(name="small-models", scope="model", require="model.parameters < 100", message="too big"),
        PlanPolicy(name="few-rounds", scope="model", require="model.training.rounds <= 1", domain="client-1",
                   effect="warn", message="many rounds"),
        PlanPolicy(name="typo", scope="model", require="model.nope.size() > 0"),
        PlanPolicy(name="later", scope="round", require="false"),
    ])
    mine = {d.policy: d for d in evaluate_job(plan, plan.jobs[0], "client-0", TODAY)}
    assert mine["small-models"].effect == "deny" and mine["small-models"].reason == "too big"
    assert "client-1.few-rounds" not in mine and "later" not in mine
    assert mine["typo"].effect == "deny" and "fails closed" in mine["typo"].reason
    theirs = {d.policy: d.effect for d in evaluate_job(plan, plan.jobs[0], "client-1", TODAY)}
    assert theirs["client-1.few-rounds"] == "warn"


def test_the_activation_mirrors_the_compilers(tmp_path):
    result = compile_mesh(ROOT / "mesh.yaml")
    plan = result.plan
    act = job_activation(plan, plan.jobs[0])
    assert act["participants"] == ["charite", "karolinska", "amsterdam-umc"]
    assert act["reads"][0] == {"id": "charite.biopsies", "domain": "charite", "classification": "restricted",
                               "access": "open", "tags": [], "contract": "tumor-biopsy", "contract_version": "1.0.0",
                               "purposes": ["cancer-research"], "jurisdiction": "eu"}
    decided = {d.policy: d.effect for d in evaluate_job(plan, plan.jobs[0], "charite", TODAY)}
    compiled = {d.policy: d.effect for d in plan.decisions}
    assert {k: decided[k] for k in compiled} == compiled  # same policies, same verdicts


def test_a_hand_edit_without_rehash_breaks_plan_integrity(make_plan):
    plan = make_plan(n=2)
    edited = plan.model_copy(update={"jobs": [plan.jobs[0].model_copy(update={"purpose": "ads"})]})
    decision = plan_integrity(edited, "client-0")
    assert decision.effect == "deny" and "it was edited" in decision.reason


def test_round_gate_decides_on_round_facts(make_plan):
    plan = _edit(make_plan(n=2), policies=[
        PlanPolicy(name="quorum", scope="round", require="size(round.participants) >= 2"),
        PlanPolicy(name="norms", scope="round", effect="warn", require="round.updates.all(u, u.update_norm < 10.0)"),
    ])
    gate = RoundGate(plan, plan.jobs[0])
    ok = gate.evaluate(1, ["client-0", "client-1"], [RoundUpdate("client-0", 10, 0.5, 1.0),
                                                     RoundUpdate("client-1", 10, 0.5, 99.0)])
    assert {d.policy: d.effect for d in ok} == {"quorum": "allow", "norms": "warn"}
    assert ok[0].subject == "round.digits.1"
    alone = gate.evaluate(2, ["client-0"], [RoundUpdate("client-0", 10, 0.5, 1.0)])
    assert {d.policy: d.effect for d in alone} == {"quorum": "deny", "norms": "allow"}
    assert not RoundGate(make_plan(n=2), make_plan(n=2).jobs[0])


# -- real runs -----------------------------------------------------------------------------------

def _events(result) -> list[ev.Event]:
    return ev.read_events(str(result.run_dir / "events.jsonl"))


def _tap_types(path: Path) -> list[str]:
    raw, i, types = path.read_bytes(), 0, []
    while i < len(raw):
        n = int.from_bytes(raw[i:i + 8], "little")
        frame = raw[i + 8:i + 8 + n]
        i += 8 + n
        if frame[:1] == b"{":
            types.append(json.loads(frame)["type"])
    return types


@pytest.fixture
def hospitals(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "mesh.yaml", tmp_path / "mesh.yaml")
    shutil.copytree(ROOT / "examples" / "hospitals" / "data", tmp_path / "examples" / "hospitals" / "data")
    return tmp_path / "mesh.yaml"


def _tampered(mesh: Path) -> Plan:
    """The compiled hospitals plan, hand-edited: a PII feature, a product without grant, ε over a cap."""
    data = tomllib.loads(compile_mesh(mesh).plan.to_toml())
    job = data["jobs"][0]
    job["features"].append("date_of_birth")
    job["architecture"]["input_dim"] += 1
    tensors = mlp_tensors(job["architecture"]["input_dim"], job["architecture"]["hidden"], 2)
    job["tensors"] = [t.model_dump() for t in tensors]
    job["parameters"] = sum(t.shape[0] * (t.shape[1] if len(t.shape) > 1 else 1) for t in tensors)
    job["privacy"]["dp"] = {"epsilon": 8.0, "delta": 1e-5, "clip": 1.0}
    for product in data["products"]:
        product["epsilon_budget"] = 1.0
        if product["domain"] == "charite":
            product["access"] = "request"
    data["grants"] = []
    return Plan.from_toml(tomli_w.dumps(data)).with_hash()  # a careful tamperer re-hashes


def test_every_domain_refuses_a_tampered_plan_and_no_update_leaves(hospitals, tmp_path, monkeypatch):
    tap = tmp_path / "tap"
    tap.mkdir()
    monkeypatch.setenv("MESHCTL_WIRE_TAP", str(tap))
    run = start_run(hospitals, _tampered(hospitals), address="tcp://127.0.0.1:0")
    list(run.follow())
    result = run.finish()
    assert not result.ok
    events = _events(result)
    denies = [e for e in events if isinstance(e, ev.PolicyDecided) and e.stage == "runtime" and e.effect == "deny"]
    by_domain: dict[str, set[str]] = {}
    for e in denies:
        by_domain.setdefault(e.domain, set()).add(e.policy)
    assert by_domain == {
        "charite": {"invariant:no-pii-features", "invariant:grant-required", "invariant:epsilon-budget"},
        "karolinska": {"invariant:no-pii-features", "invariant:epsilon-budget"},
        "amsterdam-umc": {"invariant:no-pii-features", "invariant:epsilon-budget"},
    }
    pii = next(e for e in denies if e.policy == "invariant:no-pii-features" and e.domain == "karolinska")
    assert "karolinska.biopsies.date_of_birth (pii indirect)" in pii.reason and pii.subject == "model.malignancy"
    failed = next(e for e in events if isinstance(e, ev.JobFailed))
    assert "0 of 3 participants can take part, quorum is 3" in failed.reason
    for domain in ("charite", "karolinska", "amsterdam-umc"):
        assert f"domain {domain} refused the job" in failed.reason
    assert "charite.biopsies is access: request and has no grant for model:malignancy" in failed.reason
    assert result.reason == failed.reason
    kinds = {type(e).__name__ for e in events}
    assert not kinds & {"JobStarted", "RoundStarted", "UpdateReceived", "RoundCompleted"}
    for domain in ("charite", "karolinska", "amsterdam-umc"):
        sent = set(_tap_types(tap / f"{domain}.tap"))
        assert "hello" in sent and sent <= {"hello", "heartbeat"}, sent


def test_a_domain_local_deny_and_a_failing_contract_leave_only_those_domains_out(mesh_file, make_plan):
    plan = make_plan(n=4, rounds=2)
    contract = PlanContract(id="digits@1.0.0", name="digits", version="1.0.0", quality=[
        PlanQualityRule(name="enough-rows", metric="rowCount", operator="mustBeGreaterThan", threshold=10)])
    strict = PlanContract(id="digits-strict@1.0.0", name="digits-strict", version="1.0.0", quality=[
        PlanQualityRule(name="huge", metric="rowCount", operator="mustBeGreaterThan", threshold=1_000_000),
        PlanQualityRule(name="big", metric="rowCount", operator="mustBeGreaterThan", threshold=100_000,
                        severity="warning")])
    products = [p.model_copy(update={"contract": "digits-strict@1.0.0" if p.domain == "client-2" else contract.id})
                for p in plan.products]
    plan = _edit(plan, products=products, contracts=[contract, strict], policies=[
        PlanPolicy(name="one-round-only", scope="model", domain="client-3", require="model.training.rounds <= 1",
                   message="client-3 trains one round at most", at="mesh.yaml:9:9")])
    plan = _job(plan, quorum=2)
    run = start_run(mesh_file, plan)
    list(run.follow())
    result = run.finish()
    assert result.ok, result.reason
    events = _events(result)
    runtime = [e for e in events if isinstance(e, ev.PolicyDecided) and e.stage == "runtime"]
    denies = {(e.domain, e.policy): e for e in runtime if e.effect == "deny"}
    assert set(denies) == {("client-3", "client-3.one-round-only"), ("client-2", "contract:digits-strict@1.0.0")}
    assert denies[("client-3", "client-3.one-round-only")].reason == "client-3 trains one round at most"
    assert denies[("client-3", "client-3.one-round-only")].at == "mesh.yaml:9:9"
    assert "huge observed" in denies[("client-2", "contract:digits-strict@1.0.0")].reason
    assert "mustBeGreaterThan 1000000" in denies[("client-2", "contract:digits-strict@1.0.0")].reason
    started = next(e for e in events if isinstance(e, ev.JobStarted))
    assert started.participants == ["client-0", "client-1"]
    assert {e.domain for e in events if isinstance(e, ev.UpdateReceived)} == {"client-0", "client-1"}
    checks = {(e.domain, e.rule): e for e in events if isinstance(e, ev.ContractChecked)}
    assert checks[("client-0", "enough-rows")].passed and checks[("client-0", "enough-rows")].observed > 10
    assert not checks[("client-2", "huge")].passed and checks[("client-2", "huge")].severity == "error"
    assert not checks[("client-2", "big")].passed and checks[("client-2", "big")].severity == "warning"
    assert ("client-3", "enough-rows") not in checks  # a refused job's products are not even checked
    import sqlite3

    with sqlite3.connect(mesh_file.parent / ".meshctl" / "catalog.db") as con:  # `up` ingested the run
        assert con.execute("SELECT run FROM runs").fetchall() == [(result.run_dir.name,)]
    listed = [e for e in events if isinstance(e, ev.ProductListed)]
    assert [e.product for e in listed] == [f"client-{i}.digits" for i in range(4)]
    assert listed[0].columns[0] == {"name": "px0", "type": "float", "pii": "none", "masking": ""}


def test_a_round_policy_warns_then_denies_at_round_two(mesh_file, make_plan, capsys):
    (mesh_file.parent / ".meshctl" / "catalog.db").mkdir(parents=True)  # a broken catalog: only a warning
    plan = _edit(make_plan(n=2, rounds=5), policies=[
        PlanPolicy(name="norm-watch", scope="round", effect="warn", message="large update",
                   require="round.updates.all(u, u.update_norm < 0.001)"),
        PlanPolicy(name="stop-early", scope="round", require="round.number < 2 && size(round.participants) >= 2",
                   message="this study stops after one round"),
    ])
    run = start_run(mesh_file, plan)
    list(run.follow())
    result = run.finish()
    assert not result.ok
    events = _events(result)
    decided = [(e.policy, e.effect, e.subject) for e in events if isinstance(e, ev.PolicyDecided)]
    assert ("norm-watch", "warn", "round.digits.1") in decided  # only the coordinator has norms
    # the global stop-early is decided by each domain on round 2's TrainIns (and would be by
    # the coordinator before aggregating): both domains refuse, so the round cannot happen
    denies = {(e.domain, e.policy) for e in events
              if isinstance(e, ev.PolicyDecided) and e.effect == "deny" and e.subject == "round.digits.2"}
    assert denies and denies <= {("client-0", "stop-early"), ("client-1", "stop-early")}  # the first ends it
    # round 2's TrainIns rides right behind round 1's EvalIns: the refusals may end the job
    # before round 1's evaluation is in; round 2 never completes
    assert [e.round for e in events if isinstance(e, ev.RoundCompleted)] in ([], [1])
    failed = next(e for e in events if isinstance(e, ev.JobFailed))
    assert failed.round in (1, 2) and "stop-early" in failed.reason
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: catalog not updated: ")


def test_a_domain_decides_its_own_round_policies_and_leaves_the_job_the_rest_goes_on(mesh_file, make_plan):
    """Domains evaluate the global and their own `scope: round` policies on every TrainIns."""
    plan = _edit(make_plan(n=3, rounds=3), policies=[
        PlanPolicy(name="enough-peers", scope="round", require="size(round.participants) >= 2"),
        PlanPolicy(name="first-round-only", scope="round", domain="client-2", require="round.number <= 1",
                   message="client-2 lends its data to round 1 only"),
        PlanPolicy(name="norms", scope="round", effect="warn", require="round.updates.all(u, u.update_norm < 1e9)"),
    ])
    plan = _job(plan, quorum=2)
    mine = RoundGate(plan, plan.jobs[0], "client-2")
    assert [p.name for p in mine.policies] == ["enough-peers", "first-round-only"]  # not `norms`
    assert [p.name for p in RoundGate(plan, plan.jobs[0], "client-0").policies] == ["enough-peers"]
    run = start_run(mesh_file, plan)
    list(run.follow())
    result = run.finish()
    assert result.ok, result.reason
    events = _events(result)
    denied = [e for e in events if isinstance(e, ev.PolicyDecided) and e.scope == "round"]
    assert [(e.domain, e.policy, e.effect, e.subject) for e in denied] == [
        ("client-2", "client-2.first-round-only", "deny", "round.digits.2")]
    assert "round 1 only" in denied[0].reason
    rejected = [e for e in events if isinstance(e, ev.MessageRejected)]
    assert len(rejected) == 1 and "domain client-2 rejected job 'digits' round 2" in rejected[0].reason
    by_round = {}
    for e in events:
        if isinstance(e, ev.UpdateReceived):
            by_round.setdefault(e.round, set()).add(e.domain)
    assert by_round == {1: {"client-0", "client-1", "client-2"}, 2: {"client-0", "client-1"},
                        3: {"client-0", "client-1"}}
    assert [e.round for e in events if isinstance(e, ev.RoundCompleted)] == [1, 2, 3]


def test_a_daemon_answers_instructions_its_plan_forbids_with_errors_and_never_trains(tmp_path, make_plan):
    """Play a compromised coordinator against a real `meshctl daemon` that refused the job."""
    import subprocess
    import sys

    import torch
    import zmq

    from meshctl.runtime import wire
    from meshctl.runtime.keys import MESH_ZAP_DOMAIN, KeyPair, curve_server, start_authenticator

    plan = make_plan(n=2, rounds=3)
    cols = [c.model_copy(update={"pii": "direct"}) if c.name == "px0" else c for c in plan.products[0].columns]
    plan = _product(plan, "client-0.digits", columns=cols)
    plan_file = tmp_path / "mesh.plan.toml"
    plan.write(plan_file)
    (tmp_path / "data").symlink_to(ROOT / "examples" / "digits" / "data")
    server, client = KeyPair.generate(), KeyPair.generate()
    key_file = client.save(tmp_path / "keys", "client-0")
    ctx = zmq.Context()
    auth = start_authenticator(ctx, {MESH_ZAP_DOMAIN: {client.public}})
    router = ctx.socket(zmq.ROUTER)
    curve_server(router, server, MESH_ZAP_DOMAIN)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "meshctl", "daemon", "--plan", str(plan_file), "--domain", "client-0",
         "--coordinator", f"tcp://127.0.0.1:{port}", "--server-key", server.public.decode(), "--key", str(key_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def receive():
        assert router.poll(60_000), "the daemon went quiet"
        frames = router.recv_multipart()
        return frames[0], wire.decode(frames[1:])[0]

    def send(identity, msg, tensors=None):
        router.send_multipart([identity, *wire.encode(msg.model_copy(update={"sender": "coordinator"}), tensors)])

    try:
        identity, knock = receive()  # a daemon started without a run id asks for it first
        assert isinstance(knock, wire.Knock)
        send(identity, wire.RunInfo(run="r1", plan_hash=plan.plan.hash))
        identity, hello = receive()
        assert isinstance(hello, wire.Hello)
        assert "invariant:no-pii-features" in hello.refused["digits"]
        assert any(d.policy == "invariant:no-pii-features" and d.effect == "deny" for d in hello.decisions)
        send(identity, wire.Welcome(run="r1", plan_hash=plan.plan.hash))
        weights = {t.name: torch.zeros(t.shape) for t in plan.jobs[0].tensors}
        send(identity, wire.TrainIns(job="digits", round=1, version=0), weights)
        send(identity, wire.EvalIns(job="digits", round=1, version=1), weights)
        send(identity, wire.TrainIns(job="other", round=1, version=0), weights)
        replies = []
        while len(replies) < 3:
            _, msg = receive()
            if not isinstance(msg, wire.Heartbeat):
                replies.append(msg)
        assert [(type(m).__name__, m.code) for m in replies] == [
            ("ErrorReply", "refused"), ("ErrorReply", "refused"), ("ErrorReply", "unknown-job")]
        assert "refused job 'digits'" in replies[0].reason
        send(identity, wire.Shutdown())
        out, _ = daemon.communicate(timeout=30)
    finally:
        daemon.kill()
        router.close(0)
        auth.stop()
        ctx.term()
    assert daemon.returncode == 0 and "Traceback" not in out
    assert "rejected an instruction for job 'digits'" in out
