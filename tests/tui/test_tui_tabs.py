"""The tabs under Pilot: Overview, Policies (every decision), Events (filterable log)."""

from __future__ import annotations

import asyncio

from textual.widgets import Tab
from tui_events import sample_run

from meshctl.runtime import events as ev
from meshctl.tui import MeshApp, make_app
from meshctl.tui.widgets import FilteredLog, JobsPanel, PolicyTable, RunHeader
from meshctl.tui.widgets.event_filter import matches

DENY = ev.PolicyDecided(seq=99, ts=1_700_000_003.5, policy="no-export", scope="product",
                        subject="vhio.raw", effect="deny", reason="raw rows may not leave",
                        at="mesh.yaml:42:5", stage="compile")


def _events() -> list[ev.Event]:
    events = sample_run()
    events.insert(3, DENY)
    return events


async def _feed(app: MeshApp, pilot, events: list[ev.Event]) -> None:
    for event in events:
        assert app.feed(event)
    await pilot.pause()  # the app reduces what was posted
    app.flush()  # redraws are batched (every refresh_s): draw now, whatever the machine's load
    await pilot.pause()


def test_number_keys_switch_tabs_and_the_tab_bar_shows_them() -> None:
    async def run() -> None:
        app = make_app()
        async with app.run_test(size=(80, 24)) as pilot:
            await _feed(app, pilot, _events())
            assert app.active_tab == "overview"
            assert app.query_one(JobsPanel).region.height > 0
            for key, tab in (("2", "rounds"), ("3", "policies"), ("4", "catalog"),
                             ("5", "events"), ("1", "overview")):
                await pilot.press(key)
                await pilot.pause()
                assert app.active_tab == tab
            await pilot.press("3")
            await pilot.pause()
            assert app.query_one(PolicyTable).region.height > 0
            assert app.query_one(JobsPanel).region.height == 0  # hidden with its tab
            labels = [str(t.label) for t in app.query(Tab)]
            assert labels == ["1 Overview", "2 Rounds", "3 Policies", "4 Catalog", "5 Events"]
            shown = {key: b.binding.description for key, b in app.active_bindings.items()
                     if b.binding.show}
            assert {"q": "Quit", "slash": "Search", "t": "Theme"}.items() <= shown.items()
            assert "space" not in shown  # scrubber keys only in a replay
            assert "oncology-network" in app.query_one(RunHeader).text  # header stays on top

    asyncio.run(run())


def test_policies_tab_lists_every_decision_and_styles_denials() -> None:
    async def run() -> None:
        app = make_app()
        async with app.run_test(size=(80, 24)) as pilot:
            await _feed(app, pilot, _events())
            await pilot.press("3")
            await pilot.pause()
            table = app.query_one(PolicyTable)
            assert table.plain_rows == [
                ["allow", "minimum-cohort", "–", "compiler", "malignancy", "3 participants"],
                ["warn", "fresh-data", "–", "coordinator", "vhio.biopsies", "data is 9 days old"],
                ["deny", "no-export", "mesh.yaml:42:5", "compiler", "vhio.raw", "raw rows may not leave"],
            ]
            assert table.border_subtitle == "3 decisions, 1 denied"
            allow, warn, deny = (table.get_row_at(i)[0].style for i in range(3))
            assert deny != allow and deny != warn and warn != allow
            assert deny.bold and deny.color != allow.color
            # new decisions arrive as rows too
            await _feed(app, pilot, [DENY.model_copy(update={"subject": "karolinska.raw"})])
            assert table.row_count == 4 and table.plain_rows[-1][4] == "karolinska.raw"

    asyncio.run(run())


def test_events_tab_filter_reduces_the_visible_lines() -> None:
    async def run() -> None:
        app = make_app()
        async with app.run_test(size=(80, 24)) as pilot:
            events = _events()
            await _feed(app, pilot, events)
            await pilot.press("5")
            await pilot.pause()
            log = app.query_one(FilteredLog)
            total = len(app.mesh_state.events)
            assert log.shown_count == total and len(log.plain_lines) == total
            assert any("round_completed" in line for line in log.plain_lines)

            await pilot.press("slash")  # focus the filter
            await pilot.press(*"UPDATE")
            await pilot.pause()
            assert log.shown_count == 6 < total  # 3 domains x 2 rounds, case-insensitive
            assert len(log.plain_lines) == 6
            assert all("update_received" in line for line in log.plain_lines)
            assert "6 of" in str(log.border_subtitle)

            # lines that arrive while filtered are filtered too
            await _feed(app, pilot, [ev.UpdateReceived(job="j", round=9, domain="x", examples=1,
                                                       loss=0.1, seconds=0.1, bytes=1),
                                     ev.DomainJoined(domain="y")])
            assert log.shown_count == 7 and len(log.plain_lines) == 7

            await pilot.press("ctrl+u")  # clear the filter
            await pilot.pause()
            assert log.shown_count == len(app.mesh_state.events)  # empty filter: everything
            await pilot.press("escape")  # leave the filter; number keys switch tabs again
            assert app.focused is log
            await pilot.press("1")
            await pilot.pause()
            assert app.active_tab == "overview"

    asyncio.run(run())


def test_matches_is_a_case_insensitive_substring_filter(events: list[ev.Event]) -> None:
    from meshctl.tui.state import reduce_all

    lines = list(reduce_all(events).events)
    assert matches(lines, "") == lines
    assert [ln.kind for ln in matches(lines, "DOMAIN_LOST")] == ["domain_lost"]
    assert matches(lines, "no such text") == []
