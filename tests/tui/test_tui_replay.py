"""`meshctl dash --replay`: run lookup, pacing, and the same reducer live and replayed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from tui_events import sample_run

from meshctl.cli import main
from meshctl.errors import UserError
from meshctl.runtime import events as ev
from meshctl.tui import make_app
from meshctl.tui.replay import PacedReplay, ScrubReplay, find_events, schedule
from meshctl.tui.state import reduce_all
from meshctl.tui.widgets import RoundsTable
from meshctl.tui.widgets.rounds_table import cells


def _record(path: Path, events: list[ev.Event]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(e.to_json() + "\n" for e in events), encoding="utf-8")
    return path


async def _until(pilot, cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the app"
        await pilot.pause(0.02)


# --- pure logic ----------------------------------------------------------------


def test_schedule_scales_gaps_and_never_goes_back() -> None:
    assert schedule([100.0, 101.0, 103.0], 1.0) == [0.0, 1.0, 3.0]
    assert schedule([100.0, 101.0, 103.0], 10.0) == pytest.approx([0.0, 0.1, 0.3])
    assert schedule([100.0, 101.0, 103.0], 0) == [0.0, 0.0, 0.0]
    # unknown (0) and out-of-order timestamps add no delay
    assert schedule([100.0, 0.0, 99.0, 101.0], 1.0) == [0.0, 0.0, 0.0, 2.0]
    assert schedule([], 10.0) == []
    with pytest.raises(ValueError):
        schedule([1.0], -1)


def test_find_events_by_file_dir_and_run_id(tmp_path: Path) -> None:
    run_dir = tmp_path / ".meshctl" / "runs" / "r-0001"
    events = _record(run_dir / "events.jsonl", sample_run())
    assert find_events(events) == events
    assert find_events(run_dir) == run_dir / "events.jsonl"
    assert find_events("r-0001", root=tmp_path) == run_dir / "events.jsonl"
    with pytest.raises(UserError, match="no such run: r-9999"):
        find_events("r-9999", root=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no events.jsonl"):
        find_events(tmp_path / "empty")


# --- the app fed by a replay -----------------------------------------------------


@pytest.mark.parametrize("speed", [0.0, 100.0])
def test_replay_gives_the_same_state_as_reduce_all(tmp_path: Path, speed: float) -> None:
    events = sample_run(rounds=3)  # one event per second: ~0.3 s at 100x
    path = _record(tmp_path / "events.jsonl", events)
    expected = reduce_all(events)
    replay = PacedReplay(path, speed=speed)

    async def run() -> None:
        app = make_app(event_source=replay)
        async with app.run_test(size=(120, 40)) as pilot:
            await _until(pilot, lambda: app.mesh_state.state == "completed")
            await _until(pilot, replay.done.is_set)  # set by the thread just after its last post
            assert replay.done.is_set()
            assert (replay.received, replay.skipped) == (len(events), 0)
            assert app.mesh_state == expected
            table = app.query_one(RoundsTable)  # redrawn within refresh_s of the last event
            await _until(pilot, lambda: table.row_count == len(expected.rounds))
            assert [table.get_row_at(i) for i in range(table.row_count)] == \
                [list(cells(r)) for r in expected.rounds]
            await pilot.press("q")

    t0 = time.monotonic()
    asyncio.run(run())
    if speed:
        span = (events[-1].ts - events[0].ts) / speed
        assert time.monotonic() - t0 >= span * 0.9  # the recorded timing was honoured


def test_replay_skips_bad_lines_and_stops_promptly(tmp_path: Path) -> None:
    events = sample_run()
    path = tmp_path / "events.jsonl"
    lines = [e.to_json() for e in events]
    lines.insert(1, "{broken")
    path.write_text("\n".join(lines) + "\n")
    replay = PacedReplay(path, speed=0.5)  # 2 s between events: it must be stopped mid-way

    async def run() -> None:
        app = make_app(event_source=replay)
        async with app.run_test(size=(80, 24)) as pilot:
            await _until(pilot, lambda: replay.skipped == 1)
            assert app.mesh_state.skipped == 1
            assert app.mesh_state.state == "running"
            t0 = time.monotonic()
            await pilot.press("q")
        assert time.monotonic() - t0 < 3.0

    asyncio.run(run())
    assert not replay.running
    assert replay.received < len(events)


# --- the CLI -----------------------------------------------------------------------


def test_dash_missing_run_is_one_line_and_exit_1(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["dash", "--replay", "r-nope"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        ("error: no such run: r-nope (hint: pass a run directory, its events.jsonl, "
         "or a run id under .meshctl/runs/)")]


def test_dash_replays_a_run_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command resolves the run and hands a paced replay to the app (app.run stubbed)."""
    import meshctl.tui.app as app_module

    _record(tmp_path / ".meshctl" / "runs" / "r-0001" / "events.jsonl", sample_run())
    seen: dict[str, object] = {}

    def fake_run(self) -> None:
        seen["source"], seen["title"] = self.event_source, self.title

    monkeypatch.setattr(app_module.MeshApp, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["dash", "--replay", "r-0001", "--speed", "0"])
    assert result.exit_code == 0, result.output
    source = seen["source"]
    assert isinstance(source, ScrubReplay) and source.speed == 0
    assert source.path.resolve() == (tmp_path / ".meshctl/runs/r-0001/events.jsonl").resolve()
    assert seen["title"] == "meshctl · replay r-0001"
    bad = CliRunner().invoke(main, ["dash", "--replay", "r-0001", "--speed", "-1"])
    assert bad.exit_code == 2
