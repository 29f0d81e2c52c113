"""Snapshots of every screen at 80×24 and 120×40, from the recorded run (clock and zone frozen).

Regenerate after a deliberate change with
`.venv/bin/python -m pytest tests/tui/test_tui_snapshots.py --snapshot-update`, then look at
the SVGs in tests/tui/__snapshots__/.
"""

from __future__ import annotations

import time

import pytest
from tui_events import FIXTURES, recorded_with_catalog

from meshctl.tui import MeshApp, make_app
from meshctl.tui.plan_info import load_plan
from meshctl.tui.replay import ScrubReplay

SIZES = [(80, 24), (120, 40)]
TABS = ["1", "2", "3", "4", "5"]


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch):
    """Event clocks render in UTC, whatever the machine's zone."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _app(**kwargs: object) -> tuple[MeshApp, object]:
    events = recorded_with_catalog()
    app = make_app(plan=load_plan(FIXTURES), clock=lambda: events[-1].ts + 4.0,
                   **kwargs)  # type: ignore[arg-type]

    async def fed(pilot) -> None:
        app.refresh_s = 1e9  # no redraw while feeding (the clock would decide when): one flush
        for e in events:
            app.feed(e)
        await pilot.pause()
        app.flush()
        await pilot.pause(0.2)  # let the logs and plots lay out what the flush wrote
        await pilot.pause()

    return app, fed


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("tab", TABS, ids=["overview", "rounds", "policies", "catalog",
                                           "events"])
def test_screen(snap_compare, tab: str, size: tuple[int, int]) -> None:
    app, fed = _app()
    assert snap_compare(app, press=[tab], terminal_size=size, run_before=fed)


def test_overview_light_theme(snap_compare) -> None:
    app, fed = _app()

    async def light(pilot) -> None:
        await pilot.press("t")  # the key under test; then settle before drawing the events
        await pilot.pause(0.2)
        assert app.theme == "textual-light"
        await fed(pilot)
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=(80, 24), run_before=light)


def test_rounds_with_a_picked_round(snap_compare) -> None:
    app, fed = _app()
    assert snap_compare(app, press=["2", "up", "up", "enter"], terminal_size=(120, 40),
                        run_before=fed)


def test_quit_dialog(snap_compare) -> None:
    events = recorded_with_catalog()
    running = events[: len(events) // 2]
    app = make_app(plan=load_plan(FIXTURES), clock=lambda: running[-1].ts + 1.0,
                   ask_on_quit=True)

    async def fed(pilot) -> None:
        app.refresh_s = 1e9
        for e in running:
            app.feed(e)
        await pilot.pause()
        app.flush()
        await pilot.pause(0.2)
        await pilot.pause()

    assert snap_compare(app, press=["q"], terminal_size=(80, 24), run_before=fed)


def test_replay_scrubber_after_three_rounds(snap_compare) -> None:
    replay = ScrubReplay(FIXTURES / "events.jsonl", speed=1.0)
    replay.paused = True
    app = make_app(event_source=replay, plan=load_plan(FIXTURES))
    keys = ["right_square_bracket"] * 3
    assert snap_compare(app, press=[*keys, "2"], terminal_size=(80, 24))
