"""One resolver and one reader of runs (meshctl.runtime.run): `latest`, ids, paths, errors; a run's
status, jobs and domains from its events; `runs`/`status` rendering; logs; `stop` refusals.
In-process: no process of a run is needed (a held lock stands for a live run)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshctl.cli import main
from meshctl.errors import UserError
from meshctl.runtime import audit
from meshctl.runtime import events as ev
from meshctl.runtime.operate import follow_logs, log_files, read_logs, stop_run
from meshctl.runtime.run import (
    RunDir,
    RunManifest,
    hold_run,
    list_runs,
    resolve_run,
    runs_dir,
)
from meshctl.runview import render_runs, render_status
from meshctl.tui.attach import resolve_run as attach_resolve
from meshctl.tui.replay import find_events

T0 = 1_780_000_000.0


def _make_run(root: Path, run: str, events: list[ev.Event] = (), plan=None, analysis: str = "") -> Path:
    d = root / ".meshctl" / "runs" / run
    (d / "logs").mkdir(parents=True)
    RunManifest(run=run, run_dir=str(d), base_dir=str(root), router="tcp://127.0.0.1:1",
                events="tcp://127.0.0.1:2", coordinator_key="k", coordinator_public="p",
                domain_keys={}, analysis=analysis).write()
    if plan is not None:
        plan.write(d / "plan.toml")
    if events:
        lines = [e.model_copy(update={"seq": i, "ts": T0 + i}).to_json() for i, e in enumerate(events, 1)]
        (d / "events.jsonl").write_text("\n".join(lines) + "\n")
    return d


def _started(jobs=("digits",), domains=("client-0", "client-1")) -> ev.RunStarted:
    return ev.RunStarted(run="r", mesh="m", plan_hash="h", run_dir="d", jobs=list(jobs), domains=list(domains))


# -- resolving ------------------------------------------------------------------------


def test_latest_is_the_newest_run_by_id_then_by_when_its_plan_was_written(tmp_path, make_plan):
    old = _make_run(tmp_path, "20260101-000000-ffff", plan=make_plan())
    new = _make_run(tmp_path, "20260102-000000-0000", plan=make_plan())
    (tmp_path / ".meshctl" / "runs" / "20270101-000000-junk").mkdir()  # no run.json: not a run
    assert resolve_run("latest", tmp_path) == new
    assert list_runs(tmp_path) == [new, old]
    # two runs in the same second: the later plan.toml wins, whatever the random suffix says
    a = _make_run(tmp_path, "20260103-000000-ffff", plan=make_plan())
    b = _make_run(tmp_path, "20260103-000000-0000", plan=make_plan())
    os.utime(a / "plan.toml", (T0, T0))
    os.utime(b / "plan.toml", (T0 + 1, T0 + 1))
    assert resolve_run("latest", tmp_path) == b


def test_a_run_by_id_directory_events_file_and_from_mesh_yaml_or_state_dir(tmp_path, monkeypatch):
    d = _make_run(tmp_path, "20260101-000000-abcd", [_started()])
    assert resolve_run("20260101-000000-abcd", tmp_path) == d
    assert resolve_run(str(d), tmp_path) == d
    assert resolve_run(d / "events.jsonl") == d
    assert resolve_run("latest", tmp_path / "mesh.yaml") == d  # a mesh.yaml that need not exist
    assert resolve_run("latest", tmp_path / ".meshctl") == d
    assert runs_dir(tmp_path / "mesh.yaml") == tmp_path / ".meshctl" / "runs"
    monkeypatch.chdir(tmp_path)
    assert resolve_run("latest") == d and resolve_run("20260101-000000-abcd") == d


def test_resolver_errors_are_one_line_and_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match="no runs yet") as err:
        resolve_run("latest", tmp_path)
    assert "meshctl up" in err.value.render() and "\n" not in err.value.render()
    with pytest.raises(UserError, match="no such run: r-nope") as err:
        resolve_run("r-nope", tmp_path)
    assert "no runs yet under" in err.value.hint
    _make_run(tmp_path, "20260101-000000-abcd")
    _make_run(tmp_path, "20260102-000000-9f3e")
    with pytest.raises(UserError) as err:
        resolve_run("20260101-000000-abce", tmp_path)  # a typo
    assert err.value.hint == "did you mean 20260101-000000-abcd?"
    with pytest.raises(UserError) as err:
        resolve_run("9f3e", tmp_path)  # the random part only
    assert err.value.hint == "did you mean 20260102-000000-9f3e?"
    with pytest.raises(UserError) as err:
        resolve_run("elsewhere", tmp_path)
    assert "`meshctl runs` lists the 2 runs" in err.value.hint
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match=r"not a run directory \(no run.json\)"):
        resolve_run(str(tmp_path / "plain"), tmp_path)


def test_every_command_that_takes_a_run_takes_latest(tmp_path, monkeypatch):
    """audit verify/report, lineage export, dash (attach and replay) and resume resolve alike."""
    d = _make_run(tmp_path, "20260101-000000-abcd", [_started(), ev.RunCompleted(run="r", ok=True, seconds=1.0)])
    assert audit.resolve_run("latest", tmp_path) == d
    assert attach_resolve("latest", root=tmp_path) == d
    assert find_events("latest", root=tmp_path) == d / "events.jsonl"
    with pytest.raises(UserError, match="no such run: nope") as err:
        attach_resolve("nope", root=tmp_path)
    assert "--address" in err.value.hint
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, ["resume", "latest"])  # the latest run, found, is refused: it has ended
    assert out.exit_code == 1 and "run 20260101-000000-abcd has ended" in out.output, out.output
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for args in (["resume"], ["audit", "report", "latest"], ["lineage", "export", "latest"],
                 ["audit", "verify", "latest"], ["status"], ["logs"], ["stop", "latest"]):
        out = CliRunner().invoke(main, args)
        assert out.exit_code == 1, (args, out.output)
        assert out.output.strip().splitlines() == [
            ".meshctl/runs: error: no runs yet (hint: start one with `meshctl up`)"], (args, out.output)


# -- reading one run ------------------------------------------------------------------


def test_status_never_started_running_completed_failed_stopped_killed(tmp_path):
    assert RunDir(_make_run(tmp_path, "r1")).status == ("never started", "")
    live = _make_run(tmp_path, "r2", [_started()])
    fd = hold_run(live)
    try:
        assert RunDir(live).status == ("running", "")
    finally:
        os.close(fd)
    assert RunDir(live).status[0] == "killed"  # no process holds it and it never completed
    done = _make_run(tmp_path, "r3", [_started(), ev.RunCompleted(run="r3", ok=True, seconds=4.0)])
    assert RunDir(done).status == ("completed", "")
    failed = _make_run(tmp_path, "r4", [_started(), ev.RunCompleted(run="r4", ok=False, seconds=1.0,
                                                                     reason="job digits: quorum lost")])
    assert RunDir(failed).status == ("failed", "job digits: quorum lost")
    stopped = _make_run(tmp_path, "r5", [_started(), ev.RunCompleted(run="r5", ok=False, seconds=1.0,
                                                                      reason="stopped by SIGTERM")])
    assert RunDir(stopped).status == ("stopped", "stopped by SIGTERM")
    assert RunDir(done).started == T0 + 1 and RunDir(done).duration == 1.0


def test_jobs_and_domains_from_the_events(tmp_path, make_plan):
    plan = make_plan(n=3, rounds=5)
    d = _make_run(tmp_path, "r", [
        _started(domains=("client-0", "client-1", "client-2")),
        ev.DomainJoined(domain="client-0", pid=11), ev.DomainJoined(domain="client-1", pid=12),
        ev.JobWaiting(job="digits", have=["client-0", "client-1"], need=3),
        ev.DomainJoined(domain="client-2", pid=13),
        ev.JobStarted(job="digits", participants=["client-0"], rounds=5, parameters=10, quorum=3),
        ev.RoundCompleted(job="digits", round=1, rounds=5, participants=[], train_loss=1.0,
                          metrics={"loss": 0.5, "accuracy": 0.75}, bytes_in=1, bytes_out=1, seconds=0.1),
        ev.RoundCompleted(job="digits", round=2, rounds=5, participants=[], train_loss=1.0,
                          metrics={"loss": 0.4, "accuracy": 0.8125}, bytes_in=1, bytes_out=1, seconds=0.1),
        ev.DomainLost(domain="client-1", reason="no heartbeat for 15 s", cause="heartbeat silence"),
        ev.DomainRefused(domain="client-2", reason="cannot read its data"),
        ev.DomainHeartbeat(domain="client-0", state="training"),
    ], plan=plan)
    fd = hold_run(d)
    try:
        run = RunDir(d)
        [job] = run.jobs()
        assert (job.name, job.state, job.done, job.rounds, job.metrics["accuracy"]) == ("digits", "training", 2, 5,
                                                                                        0.8125)
        states = {x.name: (x.state, x.reason, x.pid) for x in run.domains()}
        assert states == {"client-0": ("connected", "", 11),
                          "client-1": ("lost", "heartbeat silence: no heartbeat for 15 s", 12),
                          "client-2": ("refused", "cannot read its data", 13)}
        text = render_status(d)
        assert text.splitlines()[0].startswith("run r: running  (started ")
        assert "domains: 1 connected, 0 missing, 2 lost or refused" in text
        assert "heartbeat silence: no heartbeat for 15 s" in text and "digits  training  2/5" in text
        table = render_runs(tmp_path).splitlines()
        assert table[0].split() == ["RUN", "STATUS", "STARTED", "(UTC)", "DURATION", "JOBS", "ROUNDS", "METRIC",
                                    "REASON"]
        assert table[1].split()[:2] == ["r", "running"] and "2/5" in table[1] and "accuracy 0.8125" in table[1]
    finally:
        os.close(fd)
    waiting = _make_run(tmp_path, "w", [_started(domains=("client-0", "client-1")),
                                        ev.DomainJoined(domain="client-0"),
                                        ev.JobWaiting(job="digits", have=["client-0"], need=2)], plan=make_plan())
    fd = hold_run(waiting)
    try:
        [job] = RunDir(waiting).jobs()
        assert (job.state, job.detail, job.rounds) == ("waiting", "quorum: 1/2 domains", 3)
        assert {x.name: x.state for x in RunDir(waiting).domains()} == {"client-0": "connected",
                                                                      "client-1": "missing"}
        assert "domains: 1 connected, 1 missing, 0 lost or refused" in render_status(waiting)
    finally:
        os.close(fd)
    assert RunDir(waiting).jobs()[0].state == "stopped"  # killed while waiting: nothing goes on


def test_runs_lists_newest_first_and_as_json(tmp_path, make_plan):
    assert render_runs(tmp_path).startswith("no runs yet under ")
    assert json.loads(render_runs(tmp_path, "json")) == []
    _make_run(tmp_path, "20260101-000000-aaaa", [_started(), ev.RunCompleted(run="a", ok=True, seconds=1.0)],
              plan=make_plan())
    _make_run(tmp_path, "20260102-000000-bbbb", [_started(), ev.RunCompleted(
        run="b", ok=False, seconds=1.0, reason="domain client-1 lost")], plan=make_plan())
    lines = render_runs(tmp_path).splitlines()
    assert [ln.split()[:2] for ln in lines[1:]] == [["20260102-000000-bbbb", "failed"],
                                                    ["20260101-000000-aaaa", "completed"]]
    assert lines[1].endswith("domain client-1 lost") and "0/3" in lines[1]
    data = json.loads(render_runs(tmp_path, "json"))
    assert [(r["run"], r["status"], r["reason"]) for r in data] == [
        ("20260102-000000-bbbb", "failed", "domain client-1 lost"), ("20260101-000000-aaaa", "completed", "")]
    assert data[0]["jobs"][0] == {"name": "digits", "state": "pending", "rounds_done": 0, "rounds": 3,
                                  "metrics": {}, "detail": ""}


def test_a_torn_last_line_of_a_live_run_is_skipped(tmp_path):
    d = _make_run(tmp_path, "r", [_started(), ev.DomainJoined(domain="client-0")])
    with (d / "events.jsonl").open("a") as f:
        f.write('{"type":"domain_joined","dom')
    assert [e.type for e in RunDir(d).events] == ["run_started", "domain_joined"]


# -- logs and stop --------------------------------------------------------------------


def test_logs_pick_files_tail_and_follow(tmp_path):
    d = _make_run(tmp_path, "r")
    (d / "logs" / "coordinator.log").write_text("c1\nc2\n")
    (d / "logs" / "client-0.log").write_text("a1\na2\na3\n")
    assert [p.name for p in log_files(d)] == ["coordinator.log", "client-0.log"]
    assert [p.name for p in log_files(d, ("client-0",), True)] == ["coordinator.log", "client-0.log"]
    assert list(read_logs(log_files(d, ("client-0",)), 2)) == ["a2", "a3"]
    assert list(read_logs(log_files(d), 1)) == ["==> logs/coordinator.log <==", "c2",
                                                 "\n==> logs/client-0.log <==", "a3"]
    with pytest.raises(UserError, match="run r has no log of domain nope") as err:
        log_files(d, ("nope",))
    assert err.value.hint.startswith("domains with a log here: client-0;")
    out: list[str] = []
    script = iter([("new\n", True), ("half", True), ("-done\n", False)])

    def live() -> bool:  # the run writes a line, then a half line, then ends after completing it
        text, alive = next(script)
        with (d / "logs" / "client-0.log").open("a") as f:
            f.write(text)
        return alive

    follow_logs(d, log_files(d, ("client-0",)), out.append, n=1, poll_s=0, live=live)
    assert out == ["a3", "new", "half-done"]


def test_stop_refuses_a_run_that_is_not_live_or_whose_coordinator_is_unknown(tmp_path):
    _make_run(tmp_path, "r1", [_started(), ev.RunCompleted(run="r1", ok=True, seconds=1.0)])
    with pytest.raises(UserError, match=r"run r1 is not running \(completed\)"):
        stop_run("r1", tmp_path)
    d = _make_run(tmp_path, "r2", [_started()])
    with pytest.raises(UserError, match=r"run r2 is not running \(killed: "):
        stop_run("r2", tmp_path)
    fd = hold_run(d)
    try:
        (d / "coordinator.pid").write_text(f"{os.getpid()}\n")  # alive, but not a coordinator
        with pytest.raises(UserError, match="its coordinator process is unknown"):
            stop_run("latest", tmp_path)
    finally:
        os.close(fd)
    assert not (d / "stop").exists()
    time.sleep(0)


def test_dash_replays_the_latest_run_once_it_has_ended(tmp_path, monkeypatch, make_plan):
    from meshctl.tui.dash import dash_app
    from meshctl.tui.replay import ScrubReplay

    d = _make_run(tmp_path, "20260101-000000-abcd", [_started(), ev.RunCompleted(run="r", ok=True, seconds=1.0)],
                  plan=make_plan())
    monkeypatch.chdir(tmp_path)
    app = dash_app("latest")
    assert isinstance(app.event_source, ScrubReplay) and app.event_source.path == d / "events.jsonl"
