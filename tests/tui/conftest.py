"""Shared fixtures for the dashboard tests."""

from __future__ import annotations

import pytest
from tui_events import sample_run

from meshctl.runtime import events as ev


@pytest.fixture
def events() -> list[ev.Event]:
    return sample_run()
