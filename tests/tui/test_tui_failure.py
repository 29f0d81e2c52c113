"""A failed run: the header stays, and a panel under it says why, where and which log, uncut."""

from __future__ import annotations

import asyncio
import html
import re
from pathlib import Path

import pytest
from tui_events import sample_run

from meshctl.runtime import events as ev
from meshctl.tui import make_app
from meshctl.tui.state import reduce_all
from meshctl.tui.widgets import FailureBanner, RunHeader
from meshctl.tui.widgets.failure_banner import failure_lines

LONG = ("contract vhio.labs: column creatinine failed rule range(0, 20) on 312 of 4,100 rows "
        "(mesh.yaml:12:5)")


def _failed() -> list[ev.Event]:
    events = sample_run(ok=False)
    events.insert(-2, ev.DomainRefused(seq=98, ts=events[-3].ts, domain="charite", reason=LONG))
    return events


def test_the_rows_name_the_reason_the_job_the_domains_the_place_and_the_logs(tmp_path: Path) -> None:
    rows = dict(failure_lines(reduce_all(_failed()), tmp_path))
    assert rows["reason"] == "job malignancy failed"
    assert rows["job"] == "malignancy (round 2): quorum lost"
    assert rows["at"] == "mesh.yaml:12:5"
    assert rows["log"].split("  ") == [str(tmp_path / "logs" / f) for f in
                                       ("coordinator.log", "charite.log", "vhio.log")]
    assert rows["read"] == "meshctl logs r-0001 --coordinator --domain charite --domain vhio"
    assert failure_lines(reduce_all(sample_run()), tmp_path) == []  # a run that completed: none


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_panel_is_whole_and_the_header_keeps_its_job_line(size: tuple[int, int]) -> None:
    run_dir = Path("/srv/runs/r-0001")  # short: a path longer than the screen would fold

    async def run() -> None:
        app = make_app()
        app.run_dir = run_dir
        async with app.run_test(size=size) as pilot:
            for event in _failed():
                app.feed(event)
            await pilot.pause()
            app.flush()
            await pilot.pause()
            banner = app.query_one(FailureBanner)
            assert banner.display and banner.region.height > 0
            rows = failure_lines(app.mesh_state, run_dir)
            # every word of every row is on the screen: nothing is cut at the edge or the bottom
            shown = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", app.export_screenshot())).split())
            for _, line in rows:
                for word in line.split():
                    assert word in shown, (word, shown)
            assert banner.grid is not None  # all its lines fit in it: none cut at the bottom
            lines = app.console.render_lines(banner.grid, app.console.options.update_width(
                banner.content_region.width), pad=False)
            assert len(lines) == banner.content_region.height
            assert banner.region.bottom < size[1] - 2  # the tabs are still there under it
            header = app.query_one(RunHeader)
            assert "malignancy 2/2 failed" in header.text and "FAILED" in header.text
            assert header.region.y == 0 and banner.region.y >= header.region.bottom

    asyncio.run(run())


def test_a_lost_coordinator_shows_the_panel_with_its_cause_and_log(tmp_path: Path) -> None:
    from meshctl.tui.state import coordinator_lost

    running = sample_run()[:12]  # round 1 under way
    state = coordinator_lost(reduce_all(running), "its processes ended before the run did")
    rows = failure_lines(state, tmp_path)
    assert rows[0] == ("reason", "coordinator lost: its processes ended before the run did")
    assert dict(rows)["log"] == str(tmp_path / "logs" / "coordinator.log")
    assert dict(rows)["read"] == "meshctl logs r-0001 --coordinator"
