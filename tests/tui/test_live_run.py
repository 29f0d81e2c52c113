"""The dashboard attached to a real run: coordinator and daemon processes, Curve XPUB, real app."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from meshctl.compiler.compile import compile_mesh
from meshctl.runtime.launcher import start_run
from meshctl.tui import EventBridge, make_app
from meshctl.tui.widgets.domain_table import DomainTable
from meshctl.tui.widgets.rounds_table import RoundsTable

ROOT = Path(__file__).resolve().parents[2]


def test_dashboard_follows_a_real_run_to_the_end(tmp_path):
    shutil.copy(ROOT / "mesh.yaml", tmp_path / "mesh.yaml")
    shutil.copytree(ROOT / "examples" / "hospitals" / "data", tmp_path / "examples" / "hospitals" / "data")
    plan = compile_mesh(tmp_path / "mesh.yaml").plan
    assert plan is not None
    run = start_run(tmp_path / "mesh.yaml", plan, address="tcp://127.0.0.1:0")
    bridge = EventBridge(run.m.events, curve_serverkey=run.m.coordinator_public.encode(),
                         curve_publickey=run.observer.public, curve_secretkey=run.observer.secret)
    app = make_app(event_source=bridge)

    async def drive() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            deadline = time.monotonic() + 120
            while app.mesh_state.state not in ("completed", "failed") and time.monotonic() < deadline:
                await pilot.pause(0.2)
            app.flush()  # redraws are batched (every refresh_s): draw the last batch now
            rounds = app.query_one(RoundsTable)
            assert rounds.row_count == 15
            assert str(rounds.get_row_at(14)[1]) == "15/15"
            domains = app.query_one(DomainTable)
            assert domains.row_count == 3
            await pilot.press("q")

    try:
        asyncio.run(drive())
    finally:
        run.stop()
    result = run.finish()
    assert result.ok, result.reason
    assert app.mesh_state.state == "completed"
    assert bridge.skipped == 0 and bridge.received > 20
