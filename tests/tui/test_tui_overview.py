"""The Overview tab: domain states, heartbeat ages on a 1 s timer, jobs with progress and ETA."""

from __future__ import annotations

import asyncio

from tui_events import FIXTURES, recorded, sample_run

from meshctl.runtime import events as ev
from meshctl.tui import make_app
from meshctl.tui.plan_info import load_plan
from meshctl.tui.state import coordinator_status, heartbeat_age, job_eta, reduce_all
from meshctl.tui.widgets import DomainTable, JobsPanel


def test_heartbeat_age_and_eta_are_pure_functions_of_events_and_now() -> None:
    events = sample_run(rounds=4)
    upto = next(i for i, e in enumerate(events) if e.type == "round_completed") + 1
    state = reduce_all(events[:upto])
    charite = state.domains["charite"]
    assert heartbeat_age(charite, charite.last_seen + 7.5) == 7.5
    assert heartbeat_age(state.domain("never-seen"), 1e10) is None
    reduce_all([ev.DomainHeartbeat(ts=charite.last_seen + 5, domain="charite", state="idle")],
               state)
    assert heartbeat_age(charite, charite.last_seen + 1) == 1.0 and charite.state == "idle"
    assert job_eta(state.jobs["malignancy"]) == 0.25 * 3  # mean round seconds × rounds left
    assert coordinator_status(state) == "training malignancy, round 1/4"
    waiting = reduce_all(events[:8])
    assert coordinator_status(waiting) == "waiting for quorum for malignancy (2/3 domains)"


def test_overview_shows_states_jurisdiction_heartbeat_and_progress() -> None:
    events = recorded()
    mid = next(i for i, e in enumerate(events)
               if e.type == "round_completed" and e.round == 5) + 1  # type: ignore[attr-defined]
    now = {"t": events[mid - 1].ts + 2.0}

    async def run() -> None:
        app = make_app(plan=load_plan(FIXTURES), clock=lambda: now["t"])
        async with app.run_test(size=(120, 40)) as pilot:
            for e in events[:mid]:
                app.feed(e)
            await pilot.pause()
            app.flush()
            table = app.query_one(DomainTable)
            rows = {r[0]: r for r in table.plain_rows}
            assert set(rows) == {"charite", "karolinska", "amsterdam-umc"}
            assert {r[2] for r in rows.values()} == {"eu"}  # jurisdiction, from the plan
            assert {r[1] for r in rows.values()} <= {"training", "evaluating", "idle"}
            assert all(r[3] in ("2s", "1s") for r in rows.values())  # heartbeat age at `now`
            assert all(r[5].startswith("malignancy r") and "KiB" in r[5] for r in rows.values())
            panel = app.query_one(JobsPanel).text
            assert "malignancy round 6/15 training" in panel and "ETA " in panel
            assert "coordinator training malignancy" in panel and "· eu" in panel
            assert "plan df2c938d61f5" in panel
            now["t"] += 60  # the 1 s timer re-renders ages without any new event
            await pilot.pause(1.3)
            assert {r[3] for r in table.plain_rows} == {"62s"}
            for e in events[mid:]:
                app.feed(e)
            await pilot.pause()
            app.flush()
            await pilot.pause(0.3)
            assert "malignancy 15/15 completed" in app.query_one(JobsPanel).text
            assert "done" in app.query_one(JobsPanel).text
            assert {r[1] for r in table.plain_rows} == {"done"}  # the run ended: final states

    asyncio.run(run())


def test_waiting_for_quorum_and_lost_read_differently() -> None:
    async def run() -> None:
        app = make_app()
        async with app.run_test(size=(120, 40)) as pilot:
            for e in sample_run()[:8]:  # three joins, job started, waiting with two of three
                app.feed(e)
            await pilot.pause()
            app.flush()
            await pilot.pause(0.2)
            states = {r[0]: r[1] for r in app.query_one(DomainTable).plain_rows}
            assert states == {"charite": "waiting for quorum", "karolinska": "waiting for quorum",
                              "vhio": "joined"}
            app.feed(ev.DomainLost(domain="vhio", reason="heartbeat timeout"))
            await pilot.pause()
            app.flush()
            await pilot.pause(0.2)
            rows = {r[0]: r for r in app.query_one(DomainTable).plain_rows}
            assert rows["vhio"][1] == "lost" and rows["vhio"][5] == "heartbeat timeout"

    asyncio.run(run())


def test_a_burst_of_events_is_drawn_in_few_redraws() -> None:
    """50 events/s and faster: redraws are batched (at most one per refresh_s), not per event."""
    events = sample_run(rounds=40)

    async def run() -> None:
        app = make_app()
        async with app.run_test(size=(80, 24)) as pilot:
            before = app.redraws
            for e in events:
                app.feed(e)
            await pilot.pause(0.5)
            assert app.mesh_state.event_count == len(events)
            assert app.redraws - before < len(events) / 10

    asyncio.run(run())
