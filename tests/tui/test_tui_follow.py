"""Issue 14: the Rounds table keeps up with the run, cursor in view; the Events tab fills at once."""

from __future__ import annotations

import asyncio
import threading
import time

from tui_events import sample_run

from meshctl.tui import make_app
from meshctl.tui.widgets import RoundsTable


def test_rounds_table_follows_a_live_stream_with_the_cursor_in_view() -> None:
    """Events arrive from a thread (as from the bridge), 100 a second, with the Rounds tab shown."""
    events = sample_run(rounds=60)
    app = make_app()
    samples: list[tuple[int, int, bool]] = []

    def sample() -> None:
        table = app.query_one(RoundsTable)
        settled = table.virtual_size.height - table.header_height == table.row_count
        if settled and table.row_count > 12:  # measured, and more rows than fit
            samples.append((table.row_count, table.cursor_row, table.cursor_in_view))

    def feeder() -> None:
        for e in events:
            app.feed(e)
            time.sleep(0.01)

    async def run() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("2")
            app.set_interval(0.2, sample)
            thread = threading.Thread(target=feeder)
            thread.start()
            while thread.is_alive():
                await pilot.pause(0.1)
            await pilot.pause(0.5)
            app.flush()
            await pilot.pause(0.5)
            table = app.query_one(RoundsTable)
            assert table.row_count == 60 and table.cursor_row == 59 and table.cursor_in_view
            await pilot.press("up", "up", "up")  # the user looks at an older round: it stays put
            for e in sample_run(rounds=62)[-20:]:
                app.feed(e)
            await pilot.pause(0.3)
            app.flush()
            await pilot.pause(0.3)
            assert table.row_count > 60 and table.cursor_row == 56

    asyncio.run(run())
    assert len(samples) >= 5, samples
    out_of_view = [s for s in samples if not s[2]]
    assert not out_of_view, f"cursor out of view in {len(out_of_view)} of {len(samples)}: {out_of_view}"
