"""Shared fixtures for the dashboard tests."""

from __future__ import annotations

import pytest
from tui_events import sample_run

from meshctl.runtime import events as ev


@pytest.fixture
def events() -> list[ev.Event]:
    return sample_run()


async def settle(pilot, tries: int = 60) -> None:
    """Wait until two screenshots 50 ms apart agree: a tab switch lays out its plots and tables
    over a few refreshes, and a loaded machine (CI, 2 cores, 3 workers) can be caught between."""
    await pilot.wait_for_scheduled_animations()
    last = None
    for _ in range(tries):
        await pilot.pause(0.05)
        shot = pilot.app.export_screenshot()
        if shot == last:
            return
        last = shot
    raise AssertionError(f"the screen kept changing for {tries * 0.05:.0f} s")


@pytest.fixture
def snap_compare(snap_compare):
    """The plugin's `snap_compare`, but the keys are pressed inside `run_before` and the
    screenshot waits until the screen has settled (see `settle`)."""

    def compare(app, *, press=(), run_before=None, **kwargs):
        async def before(pilot) -> None:
            if run_before is not None:
                await run_before(pilot)
            await pilot.pause()
            if press:
                await pilot.press(*press)
            await settle(pilot)

        return snap_compare(app, run_before=before, **kwargs)

    return compare
