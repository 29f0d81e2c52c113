"""Replay with a scrubber (keys, same state as reducing the prefix), and `up`'s quit dialog."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tui_events import FIXTURES, recorded, sample_run

from meshctl.runtime import events as ev
from meshctl.tui import make_app
from meshctl.tui.replay import SPEEDS, ScrubReplay, round_marks
from meshctl.tui.state import reduce_all
from meshctl.tui.widgets import QuitDialog, RoundsTable


async def _until(pilot, cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the app"
        await pilot.pause(0.05)


def test_recorded_events_reduce_to_the_same_state_fed_live_or_replayed() -> None:
    events = recorded()
    expected = reduce_all(events)

    async def run() -> None:
        live = make_app()
        async with live.run_test(size=(80, 24)) as pilot:
            for e in events:
                live.feed(e)
            await _until(pilot, lambda: live.mesh_state.event_count == len(events))
            assert live.mesh_state == expected
        replay = ScrubReplay(FIXTURES / "events.jsonl", speed=0)
        app = make_app(event_source=replay)
        async with app.run_test(size=(80, 24)) as pilot:
            await _until(pilot, lambda: replay.done)
            assert app.mesh_state == expected

    asyncio.run(run())


def test_scrubber_keys_pause_step_jump_and_change_speed() -> None:
    events = recorded()
    marks = round_marks(events)
    replay = ScrubReplay(FIXTURES / "events.jsonl", speed=1.0)
    replay.paused = True  # starts paused at the first event

    async def run() -> None:
        app = make_app(event_source=replay)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause(0.3)
            assert replay.pos == 0  # paused: nothing advances
            await pilot.press("right_square_bracket")
            assert replay.pos == marks[0]
            await pilot.press("right_square_bracket", "right_square_bracket")
            assert replay.pos == marks[2]
            await pilot.press("left_square_bracket")
            assert replay.pos == marks[1]
            await pilot.pause()
            assert app.mesh_state == reduce_all(events[: replay.pos])  # rebuilt from the prefix
            rounds = app.query_one(RoundsTable)
            assert rounds.row_count == len(app.mesh_state.rounds)
            await pilot.press("G")
            assert replay.pos == len(events) and app.mesh_state.state == "completed"
            await pilot.pause()
            assert rounds.row_count == 15
            await pilot.press("g")
            await pilot.pause()
            assert replay.pos == 0 and app.mesh_state.event_count == 0
            assert rounds.row_count == 0 and app.mesh_state.state == "starting"
            assert "replay paused · 1× · event 0/103 · round 0/15" in str(
                app.query_one("#scrubber").render())
            await pilot.press("plus", "plus")
            assert replay.speed == SPEEDS[SPEEDS.index(1.0) + 2]
            await pilot.press("minus")
            assert replay.speed == SPEEDS[SPEEDS.index(1.0) + 1]
            for _ in SPEEDS:
                await pilot.press("plus")
            assert replay.speed == 0  # the top step: as fast as possible
            await pilot.press("space")
            await _until(pilot, lambda: replay.done)
            assert app.mesh_state == reduce_all(events)

    asyncio.run(run())


def test_ten_thousand_events_replay_to_the_end_without_stalling(tmp_path: Path) -> None:
    events: list[ev.Event] = []
    t0, seq = 1_700_000_000.0, 0
    while len(events) < 10_000:
        for e in sample_run(rounds=40):
            seq += 1
            events.append(e.model_copy(update={"seq": seq, "ts": t0 + seq * 0.01}))
    path = tmp_path / "events.jsonl"
    path.write_text("".join(e.to_json() + "\n" for e in events[:10_000]), encoding="utf-8")
    replay = ScrubReplay(path, speed=0)

    async def run() -> None:
        app = make_app(event_source=replay)
        async with app.run_test(size=(80, 24)) as pilot:
            ticks = []
            await _until(pilot, lambda: ticks.append(1) or replay.done, timeout=120)
            assert app.mesh_state.event_count == 10_000
            assert len(ticks) > 3  # the loop kept running while the replay went on
            await pilot.press("2")  # and still answers keys
            assert app.active_tab == "rounds"

    asyncio.run(run())


# --- the quit dialog of `meshctl up` --------------------------------------------


def _running() -> list[ev.Event]:
    events = sample_run(rounds=3)
    return events[: next(i for i, e in enumerate(events) if e.type == "round_completed") + 1]


def test_quit_while_running_asks_and_cancel_keeps_the_dashboard() -> None:
    async def run() -> None:
        app = make_app(ask_on_quit=True)
        async with app.run_test(size=(80, 24)) as pilot:
            for e in _running():
                app.feed(e)
            await pilot.pause()
            await pilot.press("q")
            await pilot.pause()
            assert isinstance(app.screen, QuitDialog)
            assert "r-0001 is still going" in str(app.screen.query_one("#quit-question").render())
            app.feed(ev.RoundStarted(job="malignancy", round=2, participants=["charite"]))
            await pilot.pause(0.2)  # events still arrive and redraw under the dialog
            assert app.mesh_state.jobs["malignancy"].current_round == 2
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, QuitDialog) and app.is_running
            assert app.quit_choice is None

    asyncio.run(run())


def test_quit_dialog_keep_running_detaches_and_stop_stops() -> None:
    async def choose(keys: tuple[str, ...]) -> str | None:
        app = make_app(ask_on_quit=True)
        async with app.run_test(size=(80, 24)) as pilot:
            for e in _running():
                app.feed(e)
            await pilot.pause()
            await pilot.press(*keys)
            await pilot.pause()
            assert not app.is_running
        return app.quit_choice

    assert asyncio.run(choose(("q", "k"))) == "detach"
    assert asyncio.run(choose(("q", "s"))) == "stop"


def test_quit_dialog_buttons_are_clickable() -> None:
    async def run() -> None:
        app = make_app(ask_on_quit=True)
        async with app.run_test(size=(80, 24)) as pilot:
            for e in _running():
                app.feed(e)
            await pilot.pause()
            await pilot.press("q")
            await pilot.pause()
            await pilot.click("#detach")
            await pilot.pause()
        assert app.quit_choice == "detach"

    asyncio.run(run())


def test_quit_after_the_run_ended_does_not_ask() -> None:
    async def run() -> None:
        app = make_app(ask_on_quit=True)
        async with app.run_test(size=(80, 24)) as pilot:
            for e in sample_run():
                app.feed(e)
            await pilot.pause()
            await pilot.press("q")
            await pilot.pause()
            assert not app.is_running and app.quit_choice is None

    asyncio.run(run())


def test_the_quit_question_follows_the_run_when_it_ends_under_it() -> None:
    """Issue 14: the dialog still said "still going. Stop it?" after the header showed COMPLETED."""
    async def run() -> None:
        app = make_app(ask_on_quit=True)
        events = sample_run(rounds=3)
        running = _running()
        async with app.run_test(size=(80, 24)) as pilot:
            for e in running:
                app.feed(e)
            await pilot.pause()
            await pilot.press("q")
            await pilot.pause()
            dialog = app.screen
            assert isinstance(dialog, QuitDialog)
            await pilot.press("escape")  # cancel, then ask again before the end
            await pilot.pause()
            await pilot.press("q")
            await pilot.pause()
            dialog = app.screen
            for e in events[len(running):]:
                app.feed(e)
            await pilot.pause(0.3)
            question = str(dialog.query_one("#quit-question").render())
            assert "COMPLETED" in str(app.query_one("#run-state").render())
            assert question == "Run r-0001 has completed. Close the dashboard?"
            assert not dialog.query_one("#stop").display and not dialog.query_one("#detach").display
            await pilot.press("s")  # stopping a finished run is no longer offered
            await pilot.pause()
            assert app.is_running and isinstance(app.screen, QuitDialog)
            await pilot.press("q")
            await pilot.pause()
            assert not app.is_running
        assert app.quit_choice is None  # closed: nothing to stop, nothing detached

    asyncio.run(run())


def _footer_keys(app) -> dict[str, str]:
    from textual.widgets._footer import FooterKey

    return {k.key_display or k.key: k.description for k in app.query(FooterKey)}


def test_a_replay_says_replay_and_the_footer_offers_what_space_does(tmp_path: Path) -> None:
    """Issue 14: a replay showed STARTING/RUNNING, and "space Pause" while paused."""
    events = recorded()
    t0 = events[0].ts  # the recorded run, slowed down 100 times: it plays while the test looks
    slow = [e.model_copy(update={"ts": t0 + (e.ts - t0) * 100}) for e in events]
    (tmp_path / "events.jsonl").write_text("".join(e.to_json() + "\n" for e in slow))
    replay = ScrubReplay(tmp_path / "events.jsonl", speed=1.0)
    replay.paused = True

    async def run() -> None:
        app = make_app(event_source=replay)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("right_square_bracket", "right_square_bracket")
            await pilot.pause(0.3)
            badge = str(app.query_one("#run-state").render())
            assert badge == "REPLAY · PAUSED" and app.query_one("#run-state").has_class("-replay")
            assert app.mesh_state.state == "running"  # the recorded state; the badge says replay
            assert _footer_keys(app).get("space") == "Play"
            await pilot.press("space")
            assert str(app.query_one("#run-state").render()) == "REPLAY · PLAYING"
            await pilot.pause()
            assert _footer_keys(app).get("space") == "Pause"
            await pilot.press("space")  # the other binding now: pauses again
            await pilot.pause(0.2)
            assert replay.paused and _footer_keys(app).get("space") == "Play"
            await pilot.press("G")
            await pilot.pause(0.3)
            badge = str(app.query_one("#run-state").render())
            assert badge.startswith("REPLAY · COMPLETED (") and app.query_one("#run-state").has_class("-completed")

    asyncio.run(run())


def test_ctrl_c_asks_the_same_question_as_q() -> None:
    """Issue 14: Ctrl-C showed Textual's "press ctrl+q to quit" toast."""
    async def run(keys: tuple[str, ...]) -> tuple[bool, str | None, int]:
        app = make_app(ask_on_quit=True)
        async with app.run_test(size=(80, 24)) as pilot:
            for e in _running():
                app.feed(e)
            await pilot.pause()
            await pilot.press("ctrl+c")
            await pilot.pause()
            asked = isinstance(app.screen, QuitDialog)
            toasts = len(app._notifications)
            await pilot.press(*keys)
            await pilot.pause()
        return asked, app.quit_choice, toasts

    assert asyncio.run(run(("s",))) == (True, "stop", 0)
    assert asyncio.run(run(("escape", "ctrl+c", "k"))) == (True, "detach", 0)

    async def ended() -> bool:  # after the end (or in `dash`, which never asks) it just closes
        app = make_app(ask_on_quit=True)
        async with app.run_test(size=(80, 24)) as pilot:
            for e in sample_run():
                app.feed(e)
            await pilot.pause()
            await pilot.press("ctrl+c")
            await pilot.pause()
            return app.is_running

    assert asyncio.run(ended()) is False
