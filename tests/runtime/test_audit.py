"""The hash-chained audit log: the coordinator's EventSink, the verifier, the mesh-wide log.

These tests write real files and publish on a real ZeroMQ socket; the end-to-end tests
with `meshctl up` are in tests/e2e/test_audit_cli.py.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
import zmq

from meshctl.errors import UserError
from meshctl.runtime import audit
from meshctl.runtime import events as ev
from meshctl.runtime.coordinator import EventSink
from meshctl.runtime.run import RunManifest


def _run_dir(root: Path, plan, run: str = "r-0001") -> Path:
    """A run directory as `meshctl up` lays it out: plan.toml and run.json."""
    d = root / ".meshctl" / "runs" / run
    d.mkdir(parents=True)
    plan.write(d / "plan.toml")
    RunManifest(
        run=run,
        run_dir=str(d),
        base_dir=str(root),
        router="tcp://127.0.0.1:1",
        events="tcp://127.0.0.1:2",
        coordinator_key="k",
        coordinator_public="p",
        domain_keys={},
    ).write()
    return d


def _record(run_dir: Path, n_rounds: int = 3) -> list[str]:
    """Emit a small run through a real EventSink on a real XPUB/SUB pair; return what SUB got."""
    ctx = zmq.Context.instance()
    pub, sub = ctx.socket(zmq.XPUB), ctx.socket(zmq.SUB)
    endpoint = f"inproc://audit-{run_dir.name}-{time.monotonic_ns()}"
    pub.bind(endpoint)
    sub.connect(endpoint)
    sub.subscribe(b"")
    pub.recv()  # the subscription: nothing is published before a subscriber is there
    sink = EventSink(run_dir / "events.jsonl", pub)
    sink.emit(
        ev.RunStarted(
            run=run_dir.name,
            mesh="m",
            plan_hash="x",
            run_dir=str(run_dir),
            jobs=["digits"],
            domains=["a", "b"],
        )
    )
    for r in range(1, n_rounds + 1):
        sink.emit(ev.RoundStarted(job="digits", round=r, participants=["a", "b"]))
    sink.emit(ev.RunCompleted(run=run_dir.name, ok=True, seconds=1.0))
    sink.close()
    got = [sub.recv_string() for _ in range(n_rounds + 2)]
    sub.close()
    pub.close()
    return got


def test_entry_hash_is_over_canonical_json_with_prev_and_without_hash():
    a = audit.seal({"type": "x", "b": 1, "a": [1, 2]}, "sha256:p")
    b = audit.seal({"a": [1, 2], "type": "x", "b": 1}, "sha256:p")
    assert a["hash"] == b["hash"]  # key order does not matter
    assert a["hash"] == audit.sha256_text('{"a":[1,2],"b":1,"prev":"sha256:p","type":"x"}')
    assert (
        audit.seal({"type": "x"}, "sha256:q")["hash"]
        != audit.seal({"type": "x"}, "sha256:p")["hash"]
    )
    assert audit.run_anchor("sha256:plan", "r-1") == audit.sha256_text("sha256:planr-1")


def test_event_sink_chains_publishes_and_records_the_head(tmp_path, make_plan):
    plan = make_plan()
    d = _run_dir(tmp_path, plan)
    published = _record(d)
    lines = (d / "events.jsonl").read_text().splitlines()
    assert published == lines  # subscribers get the chained line itself
    first = json.loads(lines[0])
    assert first["prev"] == audit.run_anchor(plan.plan.hash, "r-0001")
    assert all(json.loads(b)["prev"] == json.loads(a)["hash"] for a, b in itertools.pairwise(lines))
    assert [type(ev.parse_event(x)).__name__ for x in lines] == [  # readers ignore prev/hash
        "RunStarted",
        "RoundStarted",
        "RoundStarted",
        "RoundStarted",
        "RunCompleted",
    ]
    manifest = RunManifest.read(d)
    assert manifest.audit_head == json.loads(lines[-1])["hash"] and manifest.audit_entries == 5
    result = audit.verify_run(d)
    assert result.ok and result.entries == 5 and result.head == manifest.audit_head
    assert result.summary() == f"5 entries verified, head {manifest.audit_head}"


def test_mesh_log_chains_runs_and_appends_each_entry_once(tmp_path, make_plan):
    plan = make_plan()
    d1, d2 = _run_dir(tmp_path, plan, "r-0001"), _run_dir(tmp_path, plan, "r-0002")
    _record(d1, 2)
    _record(d2, 1)
    log = tmp_path / ".meshctl" / "audit.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(r["run"], r["n"]) for r in rows] == [("r-0001", i) for i in range(1, 5)] + [
        ("r-0002", i) for i in range(1, 4)
    ]
    assert rows[0]["prev"] == audit.GENESIS and rows[4]["prev"] == rows[3]["hash"]
    entries = [json.loads(x) for x in (d1 / "events.jsonl").read_text().splitlines()]
    assert audit.append_to_mesh_log(log, "r-0001", entries) == 0  # already there
    result = audit.verify_mesh(tmp_path / ".meshctl")
    assert result.ok, result.problems
    assert result.summary().startswith("7 entries verified across 2 runs, head sha256:")


def test_sink_continues_the_chain_of_an_existing_log(tmp_path, make_plan):
    d = _run_dir(tmp_path, make_plan())
    _record(d, 1)
    _record(d, 1)  # a resumed coordinator appends to the same file
    result = audit.verify_run(d)
    assert result.ok and result.entries == 6, result.problems
    mesh = [json.loads(x) for x in (tmp_path / ".meshctl" / "audit.jsonl").read_text().splitlines()]
    assert [m["n"] for m in mesh] == list(range(1, 7))


def _write_chain(path: Path, n: int, anchor: str = "sha256:a") -> list[str]:
    chain = audit.Chain(anchor)
    lines = [chain.seal({"type": "round_started", "round": i}) for i in range(1, n + 1)]
    path.write_text("\n".join(lines) + "\n")
    return lines


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda ls: ls[:1] + [ls[1].replace('"round":2', '"round":7')] + ls[2:],
            ["x.jsonl:2: entry 2: hash mismatch (changed?)"],
        ),
        (
            lambda ls: ls[:1] + ls[2:],
            ["x.jsonl:2: entry 2: prev does not match entry 1 (removed or reordered?)"],
        ),
        (
            lambda ls: [ls[1], ls[0]] + ls[2:],
            [
                "x.jsonl:1: entry 1: prev does not match the chain's anchor (first entry removed?)",
                "x.jsonl:2: entry 2: prev does not match entry 1 (removed or reordered?)",
                "x.jsonl:3: entry 3: prev does not match entry 2 (removed or reordered?)",
            ],
        ),
        (
            lambda ls: ls[:2] + ['{"type":"round_started","rou'] + ls[3:],
            ["x.jsonl:3: entry 3: not valid JSON (changed or cut?)"],
        ),
        (
            lambda ls: ls[:2] + ['{"type":"forged"}'] + ls[2:],
            ["x.jsonl:3: entry 3: no prev/hash fields (not an audit entry)"],
        ),
    ],
)
def test_check_chain_names_the_line_of_each_problem(tmp_path, monkeypatch, edit, expected):
    monkeypatch.chdir(tmp_path)
    lines = _write_chain(tmp_path / "x.jsonl", 4)
    (tmp_path / "x.jsonl").write_text("\n".join(edit(lines)) + "\n")
    assert audit.check_chain(tmp_path / "x.jsonl", "sha256:a").problems == expected


def test_a_byte_that_is_not_utf8_is_a_problem_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_chain(tmp_path / "x.jsonl", 3)
    raw = bytearray((tmp_path / "x.jsonl").read_bytes())
    raw[raw.index(b"round_started") + 2] = 0xFF
    (tmp_path / "x.jsonl").write_bytes(bytes(raw))
    assert audit.check_chain(tmp_path / "x.jsonl", "sha256:a").problems == [
        "x.jsonl:1: entry 1: not UTF-8 (changed?)"
    ]


def test_verify_run_detects_truncation_and_a_changed_plan(tmp_path, make_plan):
    d = _run_dir(tmp_path, make_plan())
    _record(d)
    events = d / "events.jsonl"
    lines = events.read_text().splitlines(keepends=True)
    events.write_text("".join(lines[:-1]))
    problems = audit.verify_run(d).problems
    assert (
        len(problems) == 1
        and "ends at entry 4" in problems[0]
        and "records 5 entries" in problems[0]
    )
    events.write_text("".join(lines))
    plan = d / "plan.toml"
    plan.write_text(plan.read_text().replace("rounds = 3", "rounds = 4"))
    assert audit.verify_run(d).problems == [
        f"{audit.show_path(plan)}: content does not match its hash (changed after the run?)"
    ]


def test_a_run_without_a_recorded_head_verifies_with_a_note(tmp_path, make_plan):
    d = _run_dir(tmp_path, make_plan())
    _record(d)
    m = RunManifest.read(d)
    m.model_copy(update={"audit_head": "", "audit_entries": 0}).write()
    result = audit.verify_run(d)
    assert result.ok and len(result.notes) == 1 and "no head recorded" in result.notes[0]


def test_mesh_verify_notices_a_run_missing_from_the_mesh_log(tmp_path, make_plan):
    plan = make_plan()
    _record(_run_dir(tmp_path, plan, "r-0001"), 1)
    _record(_run_dir(tmp_path, plan, "r-0002"), 1)
    log = tmp_path / ".meshctl" / "audit.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:3]))  # the whole of r-0002 cut from the mesh log
    problems = audit.verify_mesh(tmp_path / ".meshctl").problems
    missing = "run r-0002 ended but is missing from the mesh log (mesh log cut or edited?)"
    assert problems == [f"{audit.show_path(log)}: {missing}"]


def test_resolve_run_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no such run: r-nope") as err:
        audit.resolve_run("r-nope", tmp_path)
    assert "\n" not in err.value.render()
    with pytest.raises(UserError, match=r"not a run directory \(no run.json\)"):
        audit.resolve_run(str(tmp_path), tmp_path)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "run.json").write_text("{not json")
    with pytest.raises(UserError, match="not a run manifest"):
        audit.verify_run(audit.resolve_run(str(tmp_path / "r")))


def test_an_entry_interrupted_before_its_write_does_not_break_the_chain(tmp_path):
    """A stop signal's exception between sealing and writing: the head goes back to the file's."""
    path = tmp_path / "x.jsonl"
    lines = _write_chain(path, 2)
    chain = audit.Chain.open(path, "sha256:a")
    chain.seal({"type": "never_written"})  # the head moved, the line never reached the file
    chain.resync(path)
    with path.open("a") as f:
        f.write(chain.seal({"type": "round_started", "round": 3}) + "\n")
    assert chain.hashes[:2] == [json.loads(x)["hash"] for x in lines]
    assert audit.check_chain(path, "sha256:a").ok
