"""Client-level DP (DP-FedAvg) end to end: the language refuses what its noise does not cover, and
through real processes (`meshctl up --headless`, DuckDB, ZeroMQ) every product's ledger holds the ε
the accountant says, with server noise and with domain noise under secure aggregation."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from rooms import conftest as rooms

from meshctl.cli import main
from meshctl.compiler.compile import compile_mesh
from meshctl.runtime import events as ev
from meshctl.runtime.kernels import client_dp
from meshctl.runtime.ledger import Ledger, ledger_path

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
ROUNDS = 3
room = rooms.room
"""The in-memory room fixture (tests/runtime/rooms/conftest.py)."""


@pytest.fixture(scope="module")
def digits4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmark's digits mesh over 4 domains, 3 rounds, a small MLP."""
    sys.path.insert(0, str(DIGITS))
    from make_data import write_mesh

    return write_mesh(tmp_path_factory.mktemp("digits4"), 4, rounds=ROUNDS, hidden=[16])


def _variant(mesh: Path, model: str, name: str = "variant") -> Path:
    text = mesh.read_text().replace("    aggregation: {strategy: fedavg}\n", model, 1)
    spec = mesh.parent / f"{name}.yaml"
    spec.write_text(text)
    return spec


CDP = "    privacy: {client_dp: {epsilon: 4.0, clip: 0.5}}\n"


def test_the_plan_carries_client_dp_and_other_plans_stay_as_they_were(digits4):
    result = compile_mesh(_variant(digits4, "    aggregation: {strategy: fedavg}\n" + CDP))
    assert result.errors == [], result.render_diagnostics()
    cdp = result.plan.jobs[0].privacy.client_dp
    assert (cdp.epsilon, cdp.delta, cdp.clip, cdp.adaptive, cdp.noise) == (4.0, 1e-5, 0.5, None, "server")
    plain = compile_mesh(digits4)
    assert "client_dp" not in plain.plan.to_toml()


@pytest.mark.parametrize(("model", "code", "words"), [
    ("    aggregation: {strategy: fedavg}\n    privacy: {dp: {epsilon: 2.0}, client_dp: {epsilon: 4.0}}\n",
     "MESH546", "both record-level `dp`"),
    ("    aggregation: {strategy: median}\n" + CDP, "MESH547", "strategy median needs more than that mean"),
    ("    aggregation: {strategy: fedavg}\n    privacy: {client_dp: {epsilon: 4.0, noise: domain}}\n",
     "MESH548", "unless secure aggregation masks it"),
])
def test_combinations_its_noise_does_not_cover_are_refused(digits4, model, code, words):
    result = compile_mesh(_variant(digits4, model))
    assert [e.code for e in result.errors] == [code], result.render_diagnostics()
    assert words in result.errors[0].message and result.plan is None


@pytest.mark.parametrize("code", ["MESH546", "MESH547", "MESH548"])
def test_explain_the_codes(code):
    out = CliRunner().invoke(main, ["explain", code])
    assert out.exit_code == 0 and "client-level dp" in out.output.replace("\n", " ").lower()


def _up(mesh: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshctl", "up", "--headless", "--address", "tcp://127.0.0.1:0",
                           str(mesh.name)], cwd=mesh.parent, capture_output=True, text=True, timeout=240,
                          check=False)


SECURE = "{secure_aggregation: true, client_dp: {epsilon: 300.0, clip: 0.5, noise: domain, adaptive: {}}}"


def _two_jobs(mesh: Path) -> Path:
    """digits-mlp with server noise and adaptive clipping (ε 4), then digits-secure: secure aggregation, domain noise, adaptive
    clipping (ε 300: 4 domains need little noise to train), in one run."""
    text = mesh.read_text()
    model = text[text.index("  - name: digits-mlp"):]
    second = model.replace("name: digits-mlp", "name: digits-secure").replace(
        "    aggregation: {strategy: fedavg}\n", f"    aggregation: {{strategy: fedavg}}\n    privacy: {SECURE}\n")
    first = model.replace("    aggregation: {strategy: fedavg}\n",
                          "    aggregation: {strategy: fedavg}\n    privacy: {client_dp: {epsilon: 4.0, clip: 0.5, "
                          "adaptive: {target_quantile: 0.3}}}\n")
    mesh.write_text(text[:text.index("  - name: digits-mlp")] + first + second.rstrip("\n") + "\n")
    return mesh


def test_meshctl_up_charges_every_product_what_the_accountant_says(digits4, tmp_path):
    import shutil

    shutil.copytree(digits4.parent, tmp_path / "mesh", ignore=shutil.ignore_patterns(".meshctl", "variant*"))
    mesh = _two_jobs(tmp_path / "mesh" / "mesh.yaml")
    out = _up(mesh)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    assert "Traceback" not in out.stderr
    ledger = Ledger(ledger_path(mesh.parent))
    for job, epsilon in (("digits-mlp", 4.0), ("digits-secure", 300.0)):
        want = client_dp.plan_noise(epsilon, 1e-5, ROUNDS, 4, adaptive=True).epsilon(ROUNDS)
        assert 0.99 * epsilon < want <= epsilon
        last = [ln for ln in out.stdout.splitlines() if re.search(rf"^{job} +round +{ROUNDS}/{ROUNDS} ", ln)]
        eps = re.search(r" ε (\d+\.\d+) ", last[0] if last else "")
        assert eps and float(eps.group(1)) == pytest.approx(want, abs=0.01), out.stdout[-2000:]
        for i in range(4):
            assert ledger.spent(f"client-{i}.digits", subject=f"model:{job}") == pytest.approx(want, rel=1e-9)
        [events] = (mesh.parent / ".meshctl" / "runs").glob("*/events.jsonl")
        notes = [e["aggregation"] for e in map(json.loads, events.read_text().splitlines())
                 if e["type"] == "round_completed" and e["job"] == job]
        assert len(notes) == ROUNDS and all(n.startswith("client DP: clip ") and "next clip" in n for n in notes)
        if job == "digits-secure":  # with little noise, the masked, domain-noised mean trains (chance: 0.1)
            acc = re.search(r"accuracy (\d\.\d+)", last[0])
            assert acc and float(acc.group(1)) > 0.3, last[0]


# -- the coordinator's round, on the in-memory hub (no processes) ---------------------------------------

def _client_dp_room(room, adaptive: bool, bit: float | None):
    from meshctl.compiler.plan import PlanAdaptiveClip, PlanClientDp, PlanPrivacy
    from meshctl.runtime import wire

    r = room(n=3, rounds=3)
    job = r.coordinator.plan.jobs[0]
    cdp = PlanClientDp(epsilon=1e9, clip=2.0, adaptive=PlanAdaptiveClip() if adaptive else None)
    job = job.model_copy(update={"privacy": PlanPrivacy(client_dp=cdp)})
    r.coordinator.plan = r.coordinator.plan.model_copy(update={"jobs": [job]})
    clips, sent = [], []
    for d in r.domains.values():  # each domain sends w + 0.01 everywhere, and says its update was unclipped
        def answer(conn, msg, tensors, d=d):
            if isinstance(msg, wire.TrainIns) and conn is d.conn:
                if tensors:
                    d.weights = dict(tensors)
                clips.append(msg.clip)
                sent.append({k: v.clone() for k, v in d.weights.items()})
                conn.send(wire.TrainRes(job=msg.job, round=msg.round, examples=10, loss=0.5, seconds=0.01,
                                        attempt=msg.attempt, clip_bit=bit), {k: v + 0.01 for k, v in d.weights.items()})
                return
            d._on_message(conn, msg, tensors)
        d.conn.on_message = answer
    return r, clips, sent


def test_the_coordinator_noises_the_mean_and_adapts_the_clip_to_the_bits(room):
    import torch

    r, clips, sent = _client_dp_room(room, adaptive=True, bit=0.5)
    assert r.run() == ""
    noise = client_dp.plan_noise(1e9, 1e-5, 3, 3, adaptive=True)
    assert clips[:3] == [2.0] * 3  # round 1: the plan's clip
    # every update unclipped (b̄ ≈ 1 up to the count's noise): C shrinks by exp(-0.2 (1 - 0.5)) a round
    assert clips[3] == pytest.approx(2.0 * math.exp(-0.1), abs=2.0 * 0.2 * 6 * noise.sigma_bit / 3)
    assert len(set(clips[3:6])) == 1 and clips[6] < clips[3]
    step = torch.cat([(sent[3][k] - sent[0][k]).reshape(-1) for k in sent[0]])  # round 1's mean update
    std = noise.z_delta * 2.0 / 3
    assert float(step.mean()) == pytest.approx(0.01, abs=5 * std / math.sqrt(step.numel()))
    assert float(step.std()) == pytest.approx(std, rel=0.2)
    notes = [e.aggregation for e in r.sink.of(ev.RoundCompleted)]
    assert notes[0].startswith("client DP: clip 2, noise std") and "next clip" in notes[0]


def test_an_update_without_its_clipping_bit_fails_the_round_in_one_line(room):
    r, _, _ = _client_dp_room(room, adaptive=True, bit=None)
    assert r.run() == "job digits round 1: client-level DP: an update came without its adaptive clipping bit"


def test_a_policy_can_require_client_dp(digits4):
    policy = ("  - {name: client-dp, scope: model, effect: deny, "
              "require: 'model.privacy.client_dp.epsilon > 0.0 && model.privacy.client_dp.epsilon <= 8.0'}\n")

    def compiled(model: str):
        spec = _variant(digits4, model)
        spec.write_text(spec.read_text().replace("policies:\n", "policies:\n" + policy, 1))
        return compile_mesh(spec)

    ok = compiled("    aggregation: {strategy: fedavg}\n" + CDP)
    assert ok.errors == [], ok.render_diagnostics()
    assert [d.effect for d in ok.plan.decisions if d.policy == "client-dp"] == ["allow"]
    plain = compiled("    aggregation: {strategy: fedavg}\n")
    assert any(d.policy == "client-dp" and d.effect == "deny" for d in plain.plan.decisions) \
        if plain.plan is not None else "client-dp" in plain.render_diagnostics()
