"""Client sampling (issue 13): each round trains a seeded sample of the active participants; the
others sit the round out and still evaluate. The round template runs on the in-memory hub with a
fake clock (tests/runtime/rooms/conftest.py: scripted domains, no processes); the compile side
through `compile_mesh` on the digits mesh."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.diagnostics import render_all
from meshctl.compiler.plan import PlanSampling
from meshctl.runtime import events as ev
from meshctl.runtime import wire
from meshctl.runtime.coordinator.training import sample_round

_spec = importlib.util.spec_from_file_location("rooms_conftest", Path(__file__).parent / "rooms" / "conftest.py")
rooms = importlib.util.module_from_spec(_spec)
sys.modules["rooms_conftest"] = rooms  # (its dataclasses look their module up)
_spec.loader.exec_module(rooms)
room = rooms.room  # the fixture: `room(n=..., quorum=..., ...)`

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
SAMPLING: dict[str, PlanSampling | None] = {"now": None}


@pytest.fixture
def make_plan(make_plan):
    """The digits plan builder, with SAMPLING["now"] as the job's sampling."""
    def build(n: int = 2, rounds: int = 3):
        plan = make_plan(n=n, rounds=rounds)
        job = plan.jobs[0].model_copy(update={"sampling": SAMPLING["now"]})
        return plan.model_copy(update={"jobs": [job]}).with_hash()
    return build


def _sampled(r) -> dict[int, list[str]]:
    """Round -> the domains a TrainIns of that round reached."""
    out: dict[int, list[str]] = {}
    for name, d in sorted(r.domains.items()):
        for m, _ in d.instructions():
            if isinstance(m, wire.TrainIns):
                out.setdefault(m.round, []).append(name)
    return out


def _run_sampled(room, seed: int, rounds: int = 8, **kw):
    SAMPLING["now"] = PlanSampling(per_round=3, seed=seed)
    r = room(n=8, quorum=3, rounds=rounds, **kw)
    assert r.run() == ""
    return r


def test_eight_domains_three_per_round_the_same_with_the_same_seed_and_each_one_sampled(room):
    one = _run_sampled(room, seed=5)
    rounds = _sampled(one)
    assert sorted(rounds) == list(range(1, 9)) and all(len(v) == 3 for v in rounds.values())
    started = {e.round: (e.participants, e.idle) for e in one.sink.of(ev.RoundStarted)}
    assert all(sorted(started[k][0]) == rounds[k] and len(started[k][1]) == 5 for k in rounds)
    assert {e.round: sorted(e.participants) for e in one.sink.of(ev.RoundCompleted)} == rounds
    assert set().union(*rounds.values()) == {f"client-{i}" for i in range(8)}  # every domain over the run
    # every active domain evaluates every round, sampled or not
    evals = [e for e in one.sink.events if isinstance(e, ev.RoundCompleted)]
    assert all(len(e.domain_examples) == 8 for e in evals)
    assert _sampled(_run_sampled(room, seed=5)) == rounds
    assert _sampled(_run_sampled(room, seed=6)) != rounds


def test_the_dashboard_names_the_sample_and_shows_the_others_idle(room):
    from meshctl.tui.state import coordinator_status, reduce_all

    r = _run_sampled(room, seed=5, rounds=2)
    started = r.sink.of(ev.RoundStarted)[0]
    state = reduce_all([e for e in r.sink.events if not isinstance(e, (ev.RoundCompleted, ev.JobCompleted,
                                                                          ev.RunCompleted))
                        and (not isinstance(e, ev.RoundStarted) or e.round == 1)])
    state = reduce_all([started], state)
    assert f"sampled {', '.join(started.participants)}" in coordinator_status(state)
    assert all(state.domains[d].state == "idle" for d in started.idle)
    assert started.message().endswith("started with 3 participants (sampled; 5 idle)")


def test_the_sample_is_drawn_from_the_active_domains_only():
    SAMPLING["now"] = None
    job = type("Job", (), {"sampling": PlanSampling(per_round=3, seed=1)})()
    names = [f"d{i}" for i in range(8)]
    assert sample_round(job, names, 4) == sample_round(job, list(reversed(names)), 4)[::-1]
    assert sample_round(job, names[:2], 4) == names[:2]  # fewer active than per_round: all of them
    assert sample_round(type("Job", (), {"sampling": None})(), names, 4) == names


def test_secure_aggregation_masks_among_the_sampled_only(room):
    SAMPLING["now"] = PlanSampling(per_round=3, seed=2)
    r = room(n=6, quorum=3, rounds=1, secure_aggregation=True)
    r.run()  # (the scripted domains share no masks, so the unmasking fails: round 1's TrainIns is the point)
    asked = [d.name for d in r.domains.values() if any(isinstance(m, wire.TrainIns) for m, _ in d.instructions())]
    assert len(asked) == 3
    for name in asked:
        for m, _ in r.domains[name].instructions():
            if isinstance(m, wire.TrainIns):
                assert sorted(m.participants) == sorted(asked) and sorted(m.peer_keys) == sorted(asked)


def test_a_sampled_domain_lost_and_back_reruns_the_round_with_the_same_sample(room):
    SAMPLING["now"] = PlanSampling(per_round=3, seed=5)
    r = room(n=8, quorum=3, rounds=3)
    first = sample_round(r.coordinator.plan.jobs[0], [f"client-{i}" for i in range(8)], 2)
    lost = first[0]
    d = r.domains[lost]
    on = d._on_message

    def cut(conn, msg, tensors):
        if isinstance(msg, wire.TrainIns) and msg.round == 2 and conn is d.conn:
            d.alive = False
            return
        on(conn, msg, tensors)
    d.conn.on_message = cut

    def watch() -> bool:
        if lost not in r.coordinator.failed:
            return True
        r.hub.after(5.0, lambda: (setattr(d, "alive", True), setattr(d, "pid", 999), d.connect()))
        return False
    r.hub.every(0.5, watch)
    assert r.run() == ""
    retried = r.sink.of(ev.RoundRetried)
    assert [(e.round, e.phase, e.domains) for e in retried] == [(2, "train", [lost])]
    done = {e.round: sorted(e.participants) for e in r.sink.of(ev.RoundCompleted)}
    assert done[2] == sorted(first) and all(len(v) == 3 for v in done.values())


def _compile(tmp_path: Path, sampling: str, extra: str = "") -> tuple[str, object]:
    sys.path.insert(0, str(DIGITS))
    from make_data import write_mesh

    mesh = write_mesh(tmp_path / "m", 8, rounds=2)
    mesh.write_text(mesh.read_text().replace("aggregation: {strategy: fedavg}",
                                             f"aggregation: {{strategy: fedavg}}\n    sampling: {sampling}{extra}"))
    result = compile_mesh(mesh)
    return render_all(result.diagnostics, result.source), result


def test_fraction_compiles_to_per_round_rounded_up_with_the_training_seed_and_the_sample_as_quorum(tmp_path):
    out, result = _compile(tmp_path, "{fraction: 0.3}")
    assert "error" not in out.lower(), out
    job = result.plan.jobs[0]
    assert job.sampling == PlanSampling(per_round=3, seed=0) and job.quorum == 3


def test_sampling_more_than_the_participants_or_below_the_quorum_is_refused(tmp_path):
    out, _ = _compile(tmp_path, "{per_round: 9}")
    assert "MESH551" in out and "samples 9 participants per round but has 8" in out
    out, _ = _compile(tmp_path, "{per_round: 2}", "\n    quorum: 4")
    assert "MESH551" in out and "quorum 4" in out
    out, _ = _compile(tmp_path, "{per_round: 2, fraction: 0.5}")
    assert "exactly one of `fraction` and `per_round`" in out


def test_sampling_below_what_krum_needs_is_refused(tmp_path):
    sys.path.insert(0, str(DIGITS))
    out, _ = _compile(tmp_path / "k", "{per_round: 4}")
    assert "MESH551" not in out
    from make_data import write_mesh

    mesh = write_mesh(tmp_path / "k2", 8, rounds=2)
    mesh.write_text(mesh.read_text().replace("aggregation: {strategy: fedavg}",
                                             "aggregation: {strategy: krum}\n    sampling: {per_round: 4}"))
    result = compile_mesh(mesh)
    out = render_all(result.diagnostics, result.source)
    assert "MESH551" in out and "krum needs 5 updates per round" in out
