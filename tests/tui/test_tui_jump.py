"""Replay: jump to round N (`j` and the palette) and the timeline bar."""

from __future__ import annotations

import asyncio

from tui_events import FIXTURES

from meshctl.tui import make_app
from meshctl.tui.plan_info import load_plan
from meshctl.tui.replay import ScrubReplay
from meshctl.tui.state import reduce_all
from meshctl.tui.widgets.jump_dialog import JumpDialog


def test_the_timeline_fills_to_the_position_and_marks_the_rounds() -> None:
    replay = ScrubReplay(FIXTURES / "events.jsonl")
    replay.load()
    assert replay.timeline(30).count("━") == 0 and replay.timeline(30).count("│") == 15
    replay.seek_round(7)
    bar = replay.timeline(30)
    assert replay.pos == replay.marks[6] and replay.paused
    assert bar.count("┃") == 7 and bar.count("│") == 8  # rounds behind / ahead
    assert bar.index("┃") < bar.rindex("━") + 1 <= bar.index("│")
    replay.seek_round(99)
    assert replay.pos == replay.marks[-1]
    assert replay.timeline(8).count("│") + replay.timeline(8).count("┃") <= 8  # too many: evenly spaced


def test_j_asks_for_a_round_and_jumps_there() -> None:
    async def run() -> None:
        replay = ScrubReplay(FIXTURES / "events.jsonl", speed=1.0)
        replay.paused = True
        app = make_app(event_source=replay, plan=load_plan(FIXTURES))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await pilot.press("j")
            await pilot.pause()
            assert isinstance(app.screen, JumpDialog)
            await pilot.press("9", "9", "enter")  # not a round: says so, stays open
            await pilot.pause()
            assert isinstance(app.screen, JumpDialog)
            assert "no round 99" in str(app.screen.query_one("#jump-error").render())
            await pilot.press("backspace", "backspace", "5", "enter")
            await pilot.pause()
            assert not isinstance(app.screen, JumpDialog)
            assert replay.pos == replay.marks[4] and replay.paused
            assert len(app.mesh_state.rounds) == 5
            assert app.mesh_state.rounds == reduce_all(replay.events[: replay.pos]).rounds
            assert "round 5/15" in str(app.query_one("#scrubber").render())
            assert "Jump to round" in [c.title for c in app.get_system_commands(app.screen)]

    asyncio.run(run())


def test_j_does_nothing_live() -> None:
    async def run() -> None:
        app = make_app()
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("j")
            await pilot.pause()
            assert not isinstance(app.screen, JumpDialog)
            assert "Jump to round" not in [c.title for c in app.get_system_commands(app.screen)]

    asyncio.run(run())
