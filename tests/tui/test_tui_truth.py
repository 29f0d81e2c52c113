"""Issue 14, "State that lies": a dead coordinator, a finished run, an analysis run and a
domain that could not read its data each read as what they are."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tui_events import DOMAINS, sample_run

from meshctl.runtime import events as ev
from meshctl.runtime.run import run_live
from meshctl.tui import make_app
from meshctl.tui.state import reduce_all
from meshctl.tui.widgets import AnalysisTable, DomainTable, JobsPanel, RunHeader

HOLD = ("import sys, time\nfrom meshctl.runtime.run import hold_run\n"
        "hold_run(sys.argv[1]); print('held', flush=True); time.sleep(600)\n")


def _mid_run() -> list[ev.Event]:
    """Up to the second round started: training, an ETA, no end."""
    events = sample_run(rounds=3)
    second = [i for i, e in enumerate(events) if e.type == "round_started"][1]
    return events[: second + 1]


async def _feed(app, pilot, events) -> None:
    for e in events:
        app.feed(e)
    await pilot.pause()
    app.flush()
    await pilot.pause()


async def _until(pilot, cond, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the app"
        await pilot.pause(0.1)


def test_a_killed_coordinator_shows_lost_not_training(tmp_path: Path) -> None:
    """The run's lock is held by a real process; SIGKILL it and the dashboard says so."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
        events = _mid_run()
        app = make_app(watch=True, alive=lambda: run_live(tmp_path), clock=lambda: events[-1].ts + 1)

        async def run() -> None:
            async with app.run_test(size=(120, 40)) as pilot:
                await _feed(app, pilot, events)
                await pilot.pause(2.5)  # past the grace: the lock is held, nothing is lost
                header, jobs = app.query_one(RunHeader), app.query_one(JobsPanel)
                assert "RUNNING" in header.text and "LOST" not in header.text
                assert "malignancy round 2/3 training" in jobs.text and "ETA 0.5s" in jobs.text

                os.kill(holder.pid, signal.SIGKILL)
                holder.wait()
                await _until(pilot, lambda: app.mesh_state.state == "lost")
                await pilot.pause()
                assert "COORDINATOR LOST" in header.text and "RUNNING" not in header.text
                assert app.query_one("#run-state").has_class("-lost")
                assert "coordinator lost: its processes ended before the run did" in jobs.text
                assert "training" not in jobs.text and "malignancy 1/3 stalled ETA –" in jobs.text

        asyncio.run(run())
    finally:
        holder.kill()
        holder.wait()


def test_silence_beyond_the_loss_limit_is_lost_and_an_event_brings_it_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHCTL_HEARTBEAT_TIMEOUT_S", "1")
    events = _mid_run()
    now = {"t": events[-1].ts + 0.5}
    app = make_app(watch=True, clock=lambda: now["t"])

    async def run() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await _feed(app, pilot, events)
            table = app.query_one(DomainTable)
            assert app.mesh_state.state == "running"
            now["t"] += 5  # the domains said nothing for 5 s, past the 1 s limit: flagged
            await _until(pilot, lambda: app.mesh_state.state == "lost")
            await pilot.pause(1.2)
            assert {r[1] for r in table.plain_rows} == {"silent"}
            assert "no event for" in app.mesh_state.reason
            monkeypatch.setenv("MESHCTL_HEARTBEAT_TIMEOUT_S", "60")  # no new loss while we look
            beat = ev.DomainHeartbeat(seq=999, ts=now["t"], domain="charite", state="training")
            await _feed(app, pilot, [beat])
            assert app.mesh_state.state == "running" and "RUNNING" in app.query_one(RunHeader).text
            assert {r[0]: r[1] for r in table.plain_rows}["charite"] == "training"

    asyncio.run(run())


def test_a_replay_or_an_unwatched_app_is_never_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHCTL_HEARTBEAT_TIMEOUT_S", "0.5")
    app = make_app()

    async def run() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await _feed(app, pilot, _mid_run())
            await pilot.pause(1.5)
            assert app.mesh_state.state == "running"

    asyncio.run(run())


def test_after_a_normal_finish_domains_show_final_states_and_ages_stop() -> None:
    events = sample_run()
    now = {"t": events[-1].ts + 3}
    app = make_app(clock=lambda: now["t"])

    async def run() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await _feed(app, pilot, events)
            table = app.query_one(DomainTable)
            rows = {r[0]: r for r in table.plain_rows}
            assert rows["charite"][1] == rows["karolinska"][1] == "done"
            assert rows["vhio"][1] == "lost"
            ages = [r[3] for r in table.plain_rows]
            now["t"] += 600  # ten minutes later, on the 1 s timer
            await pilot.pause(1.3)
            assert [r[3] for r in table.plain_rows] == ages
            assert "silent" not in {r[1] for r in table.plain_rows}

    asyncio.run(run())


# -- an analysis run ---------------------------------------------------------------------

RESULT = {
    "analysis": "sizes", "group_by": ["diagnosis"],
    "metrics": ["count", "mean(radius_mean)", "histogram(age)"],
    "participants": DOMAINS, "dp": None,
    "groups": [
        {"key": {"diagnosis": "benign"}, "count": 357, "domains": DOMAINS,
         "values": {"count": 357, "mean(radius_mean)": 12.146523809, "histogram(age)": {"counts": [3, 5]}}},
        {"key": {"diagnosis": "malignant"}, "count": 212, "domains": DOMAINS[:2],
         "values": {"count": 212, "mean(radius_mean)": 17.4628301, "histogram(age)": {"counts": [1, 2]}}},
    ],
    "suppressed": {"by_domain": {d: 0 for d in DOMAINS}, "merged": 1},
}


def analysis_run(run_dir: Path, *, done: bool = True) -> list[ev.Event]:
    """An analysis run as the coordinator publishes it (run_started names `analysis:NAME`)."""
    t0 = 1_700_000_000.0
    out: list[ev.Event] = [ev.RunStarted(seq=1, ts=t0, run="r-a", mesh="m", plan_hash="h", run_dir=str(run_dir),
                                         jobs=["analysis:sizes"], domains=DOMAINS)]
    out += [ev.DomainJoined(seq=2 + i, ts=t0 + 1, domain=d, products=[f"{d}.biopsies"]) for i, d in enumerate(DOMAINS)]
    out.append(ev.AnalysisStarted(seq=5, ts=t0 + 2, analysis="sizes", participants=DOMAINS,
                                  metrics=RESULT["metrics"]))
    if done:
        (run_dir / "analyses").mkdir(parents=True, exist_ok=True)
        (run_dir / "analyses" / "sizes.json").write_text(json.dumps(RESULT), encoding="utf-8")
        out.append(ev.AnalysisCompleted(seq=6, ts=t0 + 3, analysis="sizes", groups=2, suppressed=1,
                                        result_path="analyses/sizes.json", seconds=1.25))
        out.append(ev.RunCompleted(seq=7, ts=t0 + 3, run="r-a", ok=True, seconds=3.0))
    return out


def test_an_analysis_run_is_no_waiting_job_and_its_result_is_shown(tmp_path: Path) -> None:
    events = analysis_run(tmp_path)
    state = reduce_all(events[:-2])
    assert not state.jobs and state.analyses["sizes"].state == "running"
    app = make_app(clock=lambda: events[-1].ts)

    async def run() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await _feed(app, pilot, events[:-2])
            jobs, table = app.query_one(JobsPanel), app.query_one(AnalysisTable)
            assert "0/?" not in jobs.text and "waiting" not in jobs.text
            assert "analysis sizes running" in jobs.text and "running analysis sizes" in jobs.text
            assert not table.display
            await _feed(app, pilot, events[-2:])
            await pilot.pause(0.2)
            assert "analysis sizes completed 2 groups, 1 suppressed, 1.250s" in jobs.text
            assert table.display and table.region.height > 0  # on screen, not only built
            assert table.labels == ["diagnosis", "count", "mean(radius_mean)", "histogram(age)", "domains"]
            assert table.plain_rows == [["benign", "357", "12.15", "[3 5]", "3"],
                                        ["malignant", "212", "17.46", "[1 2]", "2"]]
            assert table.border_subtitle == "2 groups · 1 suppressed"
            assert "COMPLETED" in app.query_one(RunHeader).text

    asyncio.run(run())


def test_a_result_file_that_is_gone_is_one_line_in_the_table(tmp_path: Path) -> None:
    events = analysis_run(tmp_path)
    (tmp_path / "analyses" / "sizes.json").unlink()
    app = make_app()

    async def run() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await _feed(app, pilot, events)
            table = app.query_one(AnalysisTable)
            assert table.display and table.row_count == 0
            assert table.problem.startswith("cannot read the result ") and "sizes.json" in table.problem

    asyncio.run(run())


# -- a domain that could not read its data ---------------------------------------------


def test_the_dashboard_takes_a_lost_domains_cause_from_the_event_not_a_guess() -> None:
    """Issue 14: DomainLost.cause, set by the coordinator, is what the dashboard shows."""
    t0 = 1_700_000_000.0
    events = [
        ev.RunStarted(seq=1, ts=t0, run="r", mesh="m", plan_hash="h", run_dir="/x", jobs=["j"], domains=DOMAINS),
        ev.DomainJoined(seq=2, ts=t0 + 1, domain="charite", products=["charite.biopsies"]),
        ev.DomainHeartbeat(seq=3, ts=t0 + 2, domain="charite", state="idle"),
        ev.DomainLost(seq=4, ts=t0 + 3, domain="charite", reason="daemon exited with code 3: cannot read x",
                      cause="data refused"),
        ev.DomainLost(seq=5, ts=t0 + 3, domain="vhio", reason="unreachable: closed", cause="connection closed"),
    ]
    state = reduce_all(events)
    assert (state.domains["charite"].state, state.domains["charite"].cause) == ("refused", "data")
    assert (state.domains["vhio"].state, state.domains["vhio"].cause) == ("lost", "connection closed")



def test_a_domain_that_could_not_read_its_data_is_refused_data_not_lost() -> None:
    t0 = 1_700_000_000.0
    events = [
        ev.RunStarted(seq=1, ts=t0, run="r", mesh="m", plan_hash="h", run_dir="/x", jobs=["j"], domains=DOMAINS),
        ev.DomainJoined(seq=2, ts=t0 + 1, domain="charite", products=["charite.biopsies"]),
        ev.DomainJoined(seq=3, ts=t0 + 1, domain="vhio", products=["vhio.biopsies"]),
        # karolinska's daemon cannot read its parquet file: it never joins (coordinator: DomainLost)
        ev.DomainLost(seq=4, ts=t0 + 2, domain="karolinska",
                      reason="cannot read product karolinska.biopsies: its parquet source is unreadable"),
        # vhio joined, but its own data policy refused the job (NaN values)
        ev.PolicyDecided(seq=5, ts=t0 + 2, policy="data", scope="model", subject="model.j", effect="deny",
                         reason="vhio.biopsies: 4 NaN values in radius_mean", stage="runtime", domain="vhio"),
        ev.RoundStarted(seq=6, ts=t0 + 3, job="j", round=1, participants=["charite", "vhio"]),
        ev.DomainLost(seq=7, ts=t0 + 20, domain="charite", reason="no heartbeat for 16s"),
    ]
    state = reduce_all(events)
    assert (state.domains["karolinska"].state, state.domains["karolinska"].cause) == ("refused", "data")
    assert (state.domains["vhio"].state, state.domains["vhio"].cause) == ("refused", "data")
    assert (state.domains["charite"].state, state.domains["charite"].cause) == ("lost", "")
    app = make_app(clock=lambda: t0 + 21)

    async def run() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await _feed(app, pilot, events)
            rows = {r[0]: r for r in app.query_one(DomainTable).plain_rows}
            assert rows["karolinska"][1] == "refused (data)"
            assert rows["karolinska"][5] == ("data: cannot read product karolinska.biopsies: "
                                             "its parquet source is unreadable")
            assert rows["vhio"][1] == "refused (data)"
            assert rows["vhio"][5] == "data: vhio.biopsies: 4 NaN values in radius_mean"
            assert rows["charite"][1] == "lost" and rows["charite"][5] == "no heartbeat for 16s"

    asyncio.run(run())


# -- end to end: a real run whose coordinator is killed under an attached dashboard ------------

ROOT = Path(__file__).resolve().parents[2]


def test_dash_attached_to_a_real_run_shows_its_killed_coordinator_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from meshctl.compiler.compile import compile_mesh
    from meshctl.runtime.launcher import release_run, start_run
    from meshctl.tui.dash import dash_app

    text = (ROOT / "mesh.yaml").read_text()
    assert "training: {rounds: 15," in text
    (tmp_path / "mesh.yaml").write_text(text.replace("training: {rounds: 15,", "training: {rounds: 5000,"))
    shutil.copytree(ROOT / "examples" / "hospitals" / "data", tmp_path / "examples" / "hospitals" / "data")
    plan = compile_mesh(tmp_path / "mesh.yaml").plan
    assert plan is not None
    run = start_run(tmp_path / "mesh.yaml", plan, address="tcp://127.0.0.1:0")
    release_run(run.m.path)  # only the run's own processes hold its lock now, as after `up` detached
    monkeypatch.setenv("MESHCTL_HEARTBEAT_TIMEOUT_S", "4")  # for this dashboard (the run has started)
    try:
        app = dash_app(str(run.m.path))

        async def drive() -> None:
            async with app.run_test(size=(120, 40)) as pilot:
                await _until(pilot, lambda: len(app.mesh_state.rounds) >= 2, timeout=90)
                app.flush()
                assert "RUNNING" in app.query_one(RunHeader).text
                assert run.proc is not None
                os.killpg(run.proc.pid, signal.SIGKILL)  # supervisor, coordinator, daemons: all gone
                run.proc.wait()
                await _until(pilot, lambda: app.mesh_state.state == "lost", timeout=30)
                assert app.mesh_state.reason == "its processes ended before the run did"
                await pilot.pause(1.2)
                header, jobs = app.query_one(RunHeader).text, app.query_one(JobsPanel).text
                assert "COORDINATOR LOST" in header and "RUNNING" not in header
                assert "stalled" in jobs and "training" not in jobs and "ETA –" in jobs
                table = app.query_one(DomainTable)  # past the (4 s) loss limit, no domain reads as live
                await _until(pilot, lambda: {r[1] for r in table.plain_rows} == {"silent"}, timeout=15)
                await pilot.press("q")

        asyncio.run(drive())
    finally:
        if run.proc is not None:
            try:
                os.killpg(run.proc.pid, signal.SIGKILL)  # the daemons the coordinator left
            except ProcessLookupError:
                pass
            run.proc.wait()

