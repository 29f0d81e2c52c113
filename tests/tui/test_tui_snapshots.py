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
        app.apply_events(events)  # reduced now: posted events could outlast one pause under load
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
        app.apply_events(running)  # reduced now: posted events could outlast one pause under load
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


# -- issue 14: the states that used to lie ---------------------------------------------------


def _fed(app: MeshApp, events: list, then=None):
    async def fed(pilot) -> None:
        app.refresh_s = 1e9
        app.apply_events(events)  # reduced now: posted events could outlast one pause under load
        await pilot.pause()
        if then is not None:
            then()
        app.flush()
        await pilot.pause(0.2)
        await pilot.pause()

    return fed


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dead_coordinator(snap_compare, size: tuple[int, int]) -> None:
    events = recorded_with_catalog()
    running = events[: len(events) // 2]
    app = make_app(plan=load_plan(FIXTURES), clock=lambda: running[-1].ts + 40.0, watch=True,
                   alive=lambda: False)

    def killed() -> None:
        app.watch = True  # from now on (not while feeding, however slow the machine)
        app._heard -= 10  # its last event was 10 s ago, and its processes are gone
        app._heard_real -= 10
        assert app.check_coordinator()

    app.watch = False
    assert snap_compare(app, terminal_size=size, run_before=_fed(app, running, killed))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_analysis_result(snap_compare, size: tuple[int, int], tmp_path) -> None:
    from test_tui_truth import analysis_run

    events = analysis_run(tmp_path)
    app = make_app(clock=lambda: events[-1].ts)
    assert snap_compare(app, terminal_size=size, run_before=_fed(app, events))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_quit_dialog_after_the_run_ended(snap_compare, size: tuple[int, int]) -> None:
    events = recorded_with_catalog()
    half = len(events) // 2
    app = make_app(plan=load_plan(FIXTURES), clock=lambda: events[-1].ts + 1.0, ask_on_quit=True)

    async def asked_then_ended(pilot) -> None:
        await _fed(app, events[:half])(pilot)
        await pilot.press("q")
        await _fed(app, events[half:])(pilot)

    assert snap_compare(app, terminal_size=size, run_before=asked_then_ended)


def test_replay_paused_at_120x40(snap_compare) -> None:
    replay = ScrubReplay(FIXTURES / "events.jsonl", speed=1.0)
    replay.paused = True
    app = make_app(event_source=replay, plan=load_plan(FIXTURES))
    assert snap_compare(app, press=["right_square_bracket"] * 5, terminal_size=(120, 40))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_events_filtered_by_kind_domain_and_rounds(snap_compare, size: tuple[int, int]) -> None:
    app, fed = _app()

    async def steady(pilot) -> None:
        from textual.widgets import Input

        await fed(pilot)
        app.query_one("#event-filter", Input).cursor_blink = False  # (a loaded machine caught it off)

    assert snap_compare(app, press=["5", "slash", *"kind:update domain:charite round:3-5"],
                        terminal_size=size, run_before=steady)


# -- issue 14: the console people want ------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_help_screen(snap_compare, size: tuple[int, int]) -> None:
    app, fed = _app()

    async def opened(pilot) -> None:  # the help screen drawn whole before the snapshot, not mid-push
        await fed(pilot)  # over the Overview: the Rounds tab's plot may still be catching up behind it
        await pilot.press("question_mark")
        await pilot.pause(0.3)
        await pilot.wait_for_scheduled_animations()

    assert snap_compare(app, terminal_size=size, run_before=opened)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_failed_run(snap_compare, size: tuple[int, int]) -> None:
    from pathlib import Path

    from test_tui_failure import _failed

    events = _failed()
    app = make_app(clock=lambda: events[-1].ts + 1.0)
    app.run_dir = Path("/srv/runs/r-0001")
    assert snap_compare(app, terminal_size=size, run_before=_fed(app, events))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_log_viewer(snap_compare, size: tuple[int, int]) -> None:
    app, fed = _app()
    app.run_dir = FIXTURES  # tests/tui/fixtures/logs/*.log

    async def opened(pilot) -> None:
        await fed(pilot)
        await pilot.press("l")
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=size, run_before=opened)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_domain_drill_down(snap_compare, size: tuple[int, int]) -> None:
    app, fed = _app()

    async def opened(pilot) -> None:
        from meshctl.tui.widgets import DomainTable

        await fed(pilot)
        app.query_one(DomainTable).focus()
        await pilot.press("down", "enter")
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=size, run_before=opened)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_replay_jumped_to_round_7(snap_compare, size: tuple[int, int]) -> None:
    replay = ScrubReplay(FIXTURES / "events.jsonl", speed=1.0)
    replay.paused = True
    app = make_app(event_source=replay, plan=load_plan(FIXTURES))
    assert snap_compare(app, press=["j", "7", "enter", "2"], terminal_size=size)


# -- issue 14, what was left: the live run, and `up` before its run speaks -----------------------


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_live_run(snap_compare, size: tuple[int, int]) -> None:
    events = recorded_with_catalog()
    running = events[: len(events) // 2]  # round 7 of 15 under way
    app = make_app(plan=load_plan(FIXTURES), clock=lambda: running[-1].ts + 1.0, ask_on_quit=True)
    assert snap_compare(app, terminal_size=size, run_before=_fed(app, running))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_up_while_compiling(snap_compare, size: tuple[int, int]) -> None:
    """`meshctl up` shows the app at once: what it is doing until the run's first event."""
    app = make_app(ask_on_quit=True, watch=True, alive=lambda: True)
    app.mesh_state.phase = "compiling mesh.yaml"
    assert snap_compare(app, terminal_size=size)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_up_waiting_for_domains(snap_compare, size: tuple[int, int]) -> None:
    events = recorded_with_catalog()
    joined = next(i for i, e in enumerate(events) if e.type == "domain_joined")
    app = make_app(plan=load_plan(FIXTURES), clock=lambda: events[joined].ts + 1.0, ask_on_quit=True)
    app.animation_level = "none"  # the waiting job's bar is still, not caught mid-sweep
    assert snap_compare(app, terminal_size=size, run_before=_fed(app, events[: joined + 1]))
