"""The dashboard under Pilot: events in, table rows, log lines and header out."""

from __future__ import annotations

import asyncio

from tui_events import sample_run

from meshctl.runtime import events as ev
from meshctl.tui import MeshApp, MeshState, make_app
from meshctl.tui.widgets import DomainTable, EventLog, JobsPanel, RoundsTable, RunHeader
from meshctl.tui.widgets._format import fmt_clock


async def _feed(app: MeshApp, pilot, events: list[ev.Event]) -> None:
    for event in events:
        assert app.feed(event)
    await pilot.pause()  # the app reduces what was posted
    app.flush()  # redraws are batched (every refresh_s): draw now, whatever the machine's load
    await pilot.pause()


def test_rounds_domains_log_and_header_at_120x40() -> None:
    async def run() -> None:
        app = make_app()
        async with app.run_test(size=(120, 40)) as pilot:
            header = app.query_one(RunHeader)
            assert "STARTING" in header.text
            events = sample_run(rounds=3)
            first_round_done = next(i for i, e in enumerate(events) if e.type == "round_completed")
            await _feed(app, pilot, events[: first_round_done + 1])

            assert "oncology-network" in header.text and "r-0001" in header.text
            assert "RUNNING" in header.text
            rounds = app.query_one(RoundsTable)
            assert rounds.row_count == 1
            assert rounds.get_row_at(0) == ["malignancy", "1/3", "3", "0.7000", "0.8100",
                                            "0.6000", "25.9 KiB", "25.9 KiB", "0.250s", "–"]

            await _feed(app, pilot, events[first_round_done + 1:])
            assert rounds.row_count == 3
            assert [rounds.get_row_at(i)[1] for i in range(3)] == ["1/3", "2/3", "3/3"]

            domains = app.query_one(DomainTable)
            assert domains.row_count == 3
            assert str(domains.get_cell("vhio", "state")) == "lost"
            assert domains.get_cell("vhio", "update") == "heartbeat timeout"
            assert str(domains.get_cell("charite", "state")) == "done"  # the run ended
            clock = fmt_clock(events[-1].ts)  # not the last event, but the same second
            update = domains.get_cell("charite", "update")
            assert update.startswith("malignancy r3 · 8.6 KiB · ") and len(update) == len(
                f"malignancy r3 · 8.6 KiB · {clock}")
            assert str(domains.get_cell("charite", "jurisdiction")) == "–"  # no plan given

            log = app.query_one(EventLog).plain_lines
            texts = [line[9:] for line in log]  # drop the HH:MM:SS clock
            assert texts[: len(events)] == [e.message() for e in events]
            assert texts[-2] == "summary: run r-0001 completed in 2.00s"
            assert "COMPLETED" in header.text
            assert app.query_one("#run-state").has_class("-completed")

            await pilot.press("q")
            await pilot.pause()
        assert app.return_value is None

    asyncio.run(run())


def test_log_lines_are_colored_by_level() -> None:
    async def run() -> None:
        app = make_app()
        async with app.run_test(size=(120, 40)) as pilot:
            await _feed(app, pilot, [ev.DomainLost(domain="a", reason="x"),
                                     ev.MessageRejected(sender="a", reason="y"),
                                     ev.DomainJoined(domain="a")])
            log = app.query_one(EventLog)
            styles = [
                next(seg.style for seg in strip if seg.text.startswith(("domain", "message")))
                for strip in log.lines]
            error, warning, info = styles
            assert error.color != info.color and warning.color != info.color
            assert error.color != warning.color
            assert error.bold

    asyncio.run(run())


def test_stays_open_after_run_completed_until_q() -> None:
    async def run() -> None:
        app = make_app()
        async with app.run_test(size=(120, 40)) as pilot:
            await _feed(app, pilot, sample_run())
            await pilot.pause(0.05)
            assert app.is_running
            await pilot.press("q")
            await pilot.pause()
            assert not app.is_running

    asyncio.run(run())


def test_exit_on_complete_returns_the_final_state() -> None:
    async def run() -> MeshState | None:
        app = make_app(exit_on_complete=True)
        async with app.run_test(size=(120, 40)) as pilot:
            await _feed(app, pilot, sample_run(ok=False))
            await pilot.pause()
        return app.return_value

    state = asyncio.run(run())
    assert isinstance(state, MeshState)
    assert state.state == "failed"
    assert len(state.rounds) == 2


def test_small_terminal_80x24_shows_everything() -> None:
    async def run() -> None:
        app = make_app(title="meshctl test")
        async with app.run_test(size=(80, 24)) as pilot:
            await _feed(app, pilot, sample_run())
            for widget in (RunHeader, JobsPanel, DomainTable, EventLog):
                region = app.query_one(widget).region
                assert region.width > 0 and region.height >= 2, widget
                assert region.right <= 80 and region.bottom <= 24, widget
            assert app.query_one(RoundsTable).row_count == 2  # on the Rounds tab
            assert "malignancy 2/2 completed" in app.query_one(JobsPanel).text
            assert "COMPLETED" in app.query_one(RunHeader).text
            screen = app.export_screenshot()
            assert "oncology-network" in screen
            await pilot.press("q")
        assert not app.is_running

    asyncio.run(run())
