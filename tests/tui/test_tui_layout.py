"""Layout at 80x24 and 120x40: the Policies `at` and `decided by`, the Catalog checks and the
header's job line are on the screen, not cut off."""

from __future__ import annotations

import asyncio
import html
import re

import pytest
from tui_events import FIXTURES, recorded_with_catalog

from meshctl.runtime import events as ev
from meshctl.tui import make_app
from meshctl.tui.plan_info import load_plan
from meshctl.tui.widgets import RunHeader


def _screen_text(app) -> str:
    svg = app.export_screenshot()
    rows: dict[str, list[tuple[float, str]]] = {}
    for m in re.finditer(r'<text class="[^"]*" x="([\d.]+)" y="([\d.]+)"[^>]*>(.*?)</text>', svg):
        rows.setdefault(m.group(2), []).append((float(m.group(1)), html.unescape(m.group(3)).replace("\xa0", " ")))
    return "\n".join("".join(t for _, t in sorted(r)) for _, r in sorted(rows.items(), key=lambda kv: float(kv[0])))


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_columns_that_matter_are_not_cut(size: tuple[int, int]) -> None:
    events = recorded_with_catalog()
    events.insert(5, ev.PolicyDecided(seq=0, ts=events[4].ts, policy="no-export", scope="product",
                                      subject="charite.biopsies", effect="deny",
                                      reason="raw rows may not leave the hospital's jurisdiction, ever",
                                      at="mesh.yaml:12:5", stage="runtime", domain="charite"))

    async def run() -> None:
        app = make_app(plan=load_plan(FIXTURES), clock=lambda: events[-1].ts)
        async with app.run_test(size=size) as pilot:
            for e in events:
                app.feed(e)
            await pilot.pause()
            app.flush()
            await pilot.pause()
            header = _screen_text(app).splitlines()[:2]
            assert "malignancy 15/15 completed" in header[1]  # the job line stays under the run line
            assert "oncology-network" in header[0] and "plan df2c938d61f5" in app.query_one(RunHeader).text
            await pilot.press("3")
            await pilot.pause()
            text = _screen_text(app)
            assert "decided by" in text and "mesh.yaml:12:5" in text and "domain charite" in text
            assert "compiler" in text
            await pilot.press("4")
            await pilot.pause()
            text = _screen_text(app)
            assert "failed 1/2" in text and text.count("passed 2/2") == 2

    asyncio.run(run())
