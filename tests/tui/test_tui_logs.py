"""The log viewer (`l`): the coordinator's and each domain's log from the run directory, followed live."""

from __future__ import annotations

import asyncio
from pathlib import Path

from textual.widgets import OptionList
from tui_events import sample_run

from meshctl.tui import make_app
from meshctl.tui.widgets.log_screen import LogScreen, run_logs


def _run_dir(tmp_path: Path) -> Path:
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    (logs / "coordinator.log").write_text("coord 1\ncoord 2\n", encoding="utf-8")
    (logs / "charite.log").write_text("charite 1\n", encoding="utf-8")
    (logs / "vhio.log").write_text("vhio 1\nvhio 2\nvhio 3\n", encoding="utf-8")
    return tmp_path / "run"


def test_the_files_are_the_ones_meshctl_logs_reads(tmp_path: Path) -> None:
    from meshctl.runtime.operate import log_files

    run_dir = _run_dir(tmp_path)
    assert run_logs(run_dir) == log_files(run_dir)
    assert run_logs(tmp_path / "nowhere") == [] and run_logs(None) == []


def test_l_shows_the_coordinators_log_follows_it_and_picks_a_domain(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)

    async def run() -> None:
        app = make_app()
        app.run_dir = run_dir
        async with app.run_test(size=(80, 24)) as pilot:
            for event in sample_run():
                app.feed(event)
            await pilot.pause()
            await pilot.press("l")
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, LogScreen)
            assert screen.lines == ["coord 1", "coord 2"]
            with (run_dir / "logs" / "coordinator.log").open("a", encoding="utf-8") as f:
                f.write("coord 3\nhalf a line")  # only complete lines are shown
            await pilot.pause(screen.poll_s * 2 + 0.2)
            assert screen.lines == ["coord 1", "coord 2", "coord 3"]
            screen.query_one(OptionList).focus()
            await pilot.press("down")  # charite
            await pilot.pause()
            assert screen.lines == ["charite 1"]
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, LogScreen)
            app.action_logs("vhio")  # the palette's "Open log: domain vhio"
            await pilot.pause()
            assert app.screen.lines == ["vhio 1", "vhio 2", "vhio 3"]
            titles = [c.title for c in app.get_system_commands(app.screen_stack[0])]
            assert {"Open log: coordinator", "Open log: domain charite",
                    "Open log: domain vhio"} <= set(titles)

    asyncio.run(run())


def test_a_run_without_logs_says_so(tmp_path: Path) -> None:
    async def run() -> None:
        app = make_app()
        app.run_dir = tmp_path
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("l")
            await pilot.pause()
            assert not isinstance(app.screen, LogScreen)
            assert [n.message for n in app._notifications] == [f"no log files in {tmp_path / 'logs'}"]

    asyncio.run(run())


def test_tab_keys_do_nothing_over_the_viewer_help_and_a_drill_down(tmp_path: Path) -> None:
    from meshctl.tui.widgets import HelpScreen
    from meshctl.tui.widgets.domain_screen import DomainScreen

    run_dir = _run_dir(tmp_path)

    async def run() -> None:
        app = make_app()
        app.run_dir = run_dir
        async with app.run_test(size=(80, 24)) as pilot:
            for event in sample_run():
                app.feed(event)
            await pilot.pause()
            for opener, screen in (("l", LogScreen), ("question_mark", HelpScreen)):
                await pilot.press(opener)
                await pilot.pause()
                await pilot.press("2", "slash", "s")  # no tab under it to switch to: ignored
                await pilot.pause()
                assert isinstance(app.screen, screen) and app.active_tab == "overview"
                await pilot.press("escape")
                await pilot.pause()
            app.action_domain("vhio")
            await pilot.pause()
            await pilot.press("3")
            await pilot.pause()
            assert isinstance(app.screen, DomainScreen) and app.active_tab == "overview"
            assert app.last_screenshot is not None and app.last_screenshot.name.startswith("overview-")

    asyncio.run(run())
