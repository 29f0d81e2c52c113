"""Model-scope policies over split models at run time (issue 15): each domain decides the split
model on its own copy of the plan before it says Hello; a part that refuses stops the job before
the private set intersection, so no key, activation or row leaves any domain. Real daemons, a
real coordinator, CurveZMQ and DuckDB."""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import Plan, PlanGrant
from meshctl.runtime import events as ev
from meshctl.runtime.launcher import start_run

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vertical"
POLICIES = """\
policies:
  - {name: research-only, scope: model, require: 'model.purpose in ["cancer-research"]'}
"""
CLINIC = """\
  - name: clinic
    description: "clinic: measurement errors and the diagnosis"
    policies:
      - name: noisy-activations
        scope: model
        when: model.kind == "split"
        require: model.activations.noise > 0.0
        message: activations leave the clinic's partners only with noise
"""


def _tap_types(path: Path) -> list[str]:
    raw, i, types = path.read_bytes(), 0, []
    while i < len(raw):
        n = int.from_bytes(raw[i:i + 8], "little")
        frame = raw[i + 8:i + 8 + n]
        i += 8 + n
        if frame[:1] == b"{":
            types.append(json.loads(frame)["type"])
    return types


def _tampered(tmp_path: Path) -> Plan:
    """examples/vertical with a global and a clinic-local model policy, compiled (both allow), then the
    plan the domains get says no noise (a careful tamperer re-hashes): the clinic's policy denies it."""
    text = (EXAMPLE / "mesh.yaml").read_text()
    edits = (('  - {name: clinic, description: "clinic: measurement errors and the diagnosis"}\n', CLINIC),
             ("split_models:\n", POLICIES + "split_models:\n"),
             ("    min_intersection: 100\n", "    min_intersection: 100\n    activations: {noise: 0.1}\n"))
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    shutil.copytree(EXAMPLE / "data", tmp_path / "data")
    (tmp_path / "mesh.yaml").write_text(text)
    compiled = compile_mesh(tmp_path / "mesh.yaml")
    plan = compiled.plan
    assert plan is not None, compiled.render_diagnostics()
    assert {(d.policy, d.effect) for d in plan.decisions} == {("research-only", "allow"),
                                                              ("clinic.noisy-activations", "allow")}
    split = plan.split_models[0].model_copy(update={"noise": None})
    return plan.model_copy(update={"split_models": [split]}).with_hash()


def test_a_domain_whose_policy_denies_the_split_model_stops_it_before_the_intersection(tmp_path, monkeypatch):
    tampered = _tampered(tmp_path)
    tap = tmp_path / "tap"
    tap.mkdir()
    monkeypatch.setenv("MESHCTL_WIRE_TAP", str(tap))
    run = start_run(tmp_path / "mesh.yaml", tampered, address="tcp://127.0.0.1:0")
    list(run.follow())
    result = run.finish()
    assert not result.ok
    events = ev.read_events(str(result.run_dir / "events.jsonl"))
    runtime = [e for e in events if isinstance(e, ev.PolicyDecided) and e.stage == "runtime"]
    denies = {(e.domain, e.policy) for e in runtime if e.effect == "deny"}
    assert denies == {("clinic", "clinic.noisy-activations")}
    allowed = {(e.domain, e.policy) for e in runtime if e.effect == "allow"}
    assert {("lab", "research-only"), ("lab", "invariant:no-pii-features"), ("clinic", "research-only")} <= allowed
    failed = next(e for e in events if isinstance(e, ev.JobFailed))
    assert failed.job == "malignancy" and failed.round == 0
    assert failed.reason == ("split job malignancy: domain clinic refused the job: clinic.noisy-activations: "
                             "activations leave the clinic's partners only with noise")
    kinds = {type(e).__name__ for e in events}
    assert not kinds & {"JobStarted", "IntersectionComputed", "RoundStarted"}
    for domain in ("lab", "imaging", "clinic"):  # nothing but joining and liveness left any domain
        sent = set(_tap_types(tap / f"{domain}.tap"))
        assert "hello" in sent and sent <= {"hello", "heartbeat"}, sent


def test_a_domain_answers_steps_of_a_split_job_it_refused_with_errors(tmp_path):
    """Play a compromised coordinator that starts the refused job anyway against a real `meshctl daemon`."""
    import subprocess
    import sys

    import zmq

    from meshctl.runtime import wire
    from meshctl.runtime.keys import MESH_ZAP_DOMAIN, KeyPair, curve_server, start_authenticator

    plan = _tampered(tmp_path)
    plan_file = tmp_path / "mesh.plan.toml"
    plan.write(plan_file)
    server, client = KeyPair.generate(), KeyPair.generate()
    key_file = client.save(tmp_path / "keys", "clinic")
    ctx = zmq.Context()
    auth = start_authenticator(ctx, {MESH_ZAP_DOMAIN: {client.public}})
    router = ctx.socket(zmq.ROUTER)
    curve_server(router, server, MESH_ZAP_DOMAIN)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "meshctl", "daemon", "--plan", str(plan_file), "--domain", "clinic",
         "--coordinator", f"tcp://127.0.0.1:{port}", "--server-key", server.public.decode(), "--key", str(key_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def receive():
        assert router.poll(60_000), "the daemon went quiet"
        frames = router.recv_multipart()
        return frames[0], wire.decode(frames[1:])[0]

    def send(identity, msg, tensors=None):
        router.send_multipart([identity, *wire.encode(msg.model_copy(update={"sender": "coordinator"}), tensors)])

    try:
        identity, knock = receive()
        assert isinstance(knock, wire.Knock)
        send(identity, wire.RunInfo(run="r1", plan_hash=plan.plan.hash))
        identity, hello = receive()
        assert isinstance(hello, wire.Hello)
        assert hello.refused == {"malignancy": "clinic.noisy-activations: activations leave the clinic's "
                                               "partners only with noise"}
        send(identity, wire.Welcome(run="r1", plan_hash=plan.plan.hash))
        send(identity, wire.SplitIns(job="malignancy", step="psi_start", salt="ab" * 16))
        while True:
            _, reply = receive()
            if not isinstance(reply, wire.Heartbeat):
                break
        assert isinstance(reply, wire.ErrorReply) and reply.code == "refused"
        assert reply.reason.startswith("split job malignancy: clinic.noisy-activations")
        send(identity, wire.Shutdown())
        out, _ = daemon.communicate(timeout=30)
    finally:
        daemon.kill()
        router.close(0)
        auth.stop()
        ctx.term()
    assert daemon.returncode == 0 and "Traceback" not in out


def test_a_part_refuses_pii_features_and_request_products_whatever_the_plan_says(tmp_path):
    from meshctl.runtime.governance import evaluate_split

    plan = _tampered(tmp_path)
    products = []
    for p in plan.products:
        if p.id == "lab.nuclei":  # a tampered plan: a feature turned PII, the product behind a grant
            cols = [c.model_copy(update={"pii": "indirect"}) if c.name == "area_mean" else c for c in p.columns]
            p = p.model_copy(update={"columns": cols, "access": "request"})
        products.append(p)
    plan = plan.model_copy(update={"products": products}).with_hash()
    split = plan.split_models[0]
    lab = {d.policy: (d.effect, d.reason) for d in evaluate_split(plan, split, "lab")}
    pii = "the split model reads PII column lab.nuclei.area_mean (pii indirect)"
    assert lab["invariant:no-pii-features"] == ("deny", pii)
    assert lab["invariant:grant-required"][0] == "deny"
    assert lab["research-only"][0] == "allow" and "clinic.noisy-activations" not in lab  # not lab's policy
    clinic = {d.policy: d.effect for d in evaluate_split(plan, split, "clinic")}
    assert clinic["invariant:no-pii-features"] == "allow"  # its key is PII: only blinded, never a feature
    assert clinic["clinic.noisy-activations"] == "deny"
    outsider = {d.policy: d.effect for d in evaluate_split(plan, split, "nowhere")}
    assert outsider["invariant:participant"] == "deny"
    grant = PlanGrant(id="lab.nuclei->model:malignancy", product="lab.nuclei", subject="model:malignancy",
                      purpose="cancer-research", until="2026-06-30")
    granted = plan.model_copy(update={"grants": [grant]})
    for today, effect in ((date(2026, 6, 30), "allow"), (date(2026, 7, 1), "deny")):
        lab = {d.policy: (d.effect, d.reason) for d in evaluate_split(granted, split, "lab", today)}
        assert lab["invariant:grant-required"][0] == effect, lab["invariant:grant-required"]
    assert "expired on 2026-06-30" in lab["invariant:grant-required"][1]
