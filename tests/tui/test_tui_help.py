"""The help screen (? and F1), the command palette's own commands, and `s` screenshots, under Pilot."""

from __future__ import annotations

import asyncio
from pathlib import Path

from textual.command import CommandPalette
from textual.widgets import DataTable
from tui_events import sample_run

from meshctl.tui import MeshApp, make_app
from meshctl.tui.widgets import HelpScreen


async def _feed(app: MeshApp, pilot) -> None:
    for event in sample_run():
        assert app.feed(event)
    await pilot.pause()
    app.flush()
    await pilot.pause()


def _help_rows(app: MeshApp) -> dict[str, str]:
    table = app.screen.query_one("#help-keys", DataTable)
    return {str(table.get_row_at(i)[0]): str(table.get_row_at(i)[1]) for i in range(table.row_count)}


def test_question_mark_and_f1_list_every_key_from_the_bindings_and_escape_closes() -> None:
    async def run() -> None:
        app = make_app()
        async with app.run_test(size=(80, 24)) as pilot:
            await _feed(app, pilot)
            for key in ("question_mark", "f1"):
                await pilot.press(key)
                await pilot.pause()
                assert isinstance(app.screen, HelpScreen)
                rows = _help_rows(app)
                for shown, what in (("q", "Quit"), ("1", "Overview"), ("5", "Events"), ("/", "Search"),
                                    ("t", "Theme"), ("s", "Screenshot"), ("?", "Help")):
                    assert rows.get(shown) == what, (shown, rows)
                assert not any(k in rows for k in ("space", "[", "g"))  # scrubber keys: replay only
                await pilot.press("escape")
                await pilot.pause()
                assert not isinstance(app.screen, HelpScreen)
            await pilot.press("2")  # the Rounds tab: its table's keys come with it
            await pilot.press("question_mark")
            await pilot.pause()
            assert "Rounds" in str(app.screen.query_one("#help-title").render())
            assert "q" in _help_rows(app)

    asyncio.run(run())


def test_the_palette_offers_the_dashboards_commands(tmp_path: Path) -> None:
    async def run() -> None:
        app = make_app()
        app.run_dir = tmp_path
        async with app.run_test(size=(120, 40)) as pilot:
            await _feed(app, pilot)
            titles = [c.title for c in app.get_system_commands(app.screen)
                      if not c.title.startswith("Domain ")]
            assert titles == ["Go to Overview", "Go to Rounds", "Go to Policies", "Go to Catalog",
                              "Go to Events", "Filter events", "Screenshot", "Keys", "Theme", "Quit"]
            await pilot.press("ctrl+p")
            await pilot.pause()
            assert isinstance(app.screen, CommandPalette)
            await pilot.press(*"go to policies")
            await pilot.pause(0.3)
            await pilot.press("enter")
            await pilot.pause()
            assert app.active_tab == "policies"
            await pilot.press("ctrl+p")
            await pilot.press(*"screenshot")
            await pilot.pause(0.3)
            await pilot.press("enter")
            await pilot.pause(0.3)
            assert app.last_screenshot is not None
            assert app.last_screenshot.parent == tmp_path / "screenshots"
            assert app.last_screenshot.name.startswith("policies-")

    asyncio.run(run())


def test_s_saves_an_svg_into_the_run_directory_and_says_where(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "no-home"))  # no ~/Downloads: must not matter

    async def run() -> None:
        app = make_app()
        app.run_dir = tmp_path / "run-1"
        async with app.run_test(size=(80, 24)) as pilot:
            await _feed(app, pilot)
            await pilot.press("5", "s")
            await pilot.pause()
            shot = app.last_screenshot
            assert shot is not None and shot.parent == tmp_path / "run-1" / "screenshots"
            assert shot.name.isascii() and shot.name.startswith("events-") and shot.suffix == ".svg"
            assert "<svg" in shot.read_text(encoding="utf-8")
            await pilot.press("s")  # a second one in the same second keeps both
            await pilot.pause()
            assert app.last_screenshot != shot and app.last_screenshot.exists()
            said = [n.message for n in app._notifications]
            assert f"screenshot saved to {shot}" in said
            app.run_dir = tmp_path / "file"  # a run directory that cannot hold one: says so
            app.run_dir.write_text("")
            await pilot.press("s")
            await pilot.pause()
            assert any(n.startswith("screenshot not saved: ") for n in
                       (m.message for m in app._notifications))

    asyncio.run(run())
