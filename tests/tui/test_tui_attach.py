"""`meshctl dash RUN`: attach to a live run (real coordinator and daemons), and its errors."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshctl.cli import main
from meshctl.compiler.compile import compile_mesh
from meshctl.runtime.events import read_events
from meshctl.runtime.launcher import start_run
from meshctl.tui.attach import LiveAttach
from meshctl.tui.dash import dash_app, reattach_hint
from meshctl.tui.replay import ScrubReplay
from meshctl.tui.widgets import RoundsTable

ROOT = Path(__file__).resolve().parents[2]


def test_attach_by_run_dir_shows_the_whole_run_once(tmp_path: Path) -> None:
    shutil.copy(ROOT / "mesh.yaml", tmp_path / "mesh.yaml")
    shutil.copytree(ROOT / "examples" / "hospitals" / "data",
                    tmp_path / "examples" / "hospitals" / "data")
    plan = compile_mesh(tmp_path / "mesh.yaml").plan
    assert plan is not None
    run = start_run(tmp_path / "mesh.yaml", plan, address="tcp://127.0.0.1:0")
    assert (run.m.path / "keys" / "observer.key_secret").stat().st_mode & 0o077 == 0
    follower = threading.Thread(target=lambda: list(run.follow()), daemon=True)
    follower.start()  # another observer starts the run; the dashboard attaches late
    log = run.m.path / "events.jsonl"
    deadline = time.monotonic() + 60
    while (not log.exists() or log.read_text().count("\n") < 8) and time.monotonic() < deadline:
        time.sleep(0.02)
    app = dash_app(str(run.m.path))
    source = app.event_source
    assert isinstance(source, LiveAttach)

    async def drive() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            deadline = time.monotonic() + 120
            while app.mesh_state.state not in ("completed", "failed") \
                    and time.monotonic() < deadline:
                await pilot.pause(0.1)
            await pilot.pause(0.3)
            app.flush()
            assert app.query_one(RoundsTable).row_count == 15
            await pilot.press("q")  # not `up`'s dashboard: no question, the run is not stopped

    try:
        asyncio.run(drive())
    finally:
        run.stop()
    follower.join(10)
    result = run.finish()
    assert result.ok, result.reason
    recorded = read_events(str(log))
    assert app.mesh_state.event_count == len(recorded) == source.received  # none twice
    assert [r.round for r in app.mesh_state.rounds] == list(range(1, 16))
    assert app.mesh_state.state == "completed"
    # a finished run is replayed from its file rather than attached to
    assert isinstance(dash_app(str(run.m.path)).event_source, ScrubReplay)


def test_dash_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cases = {
        (): "error: give one of RUN (attach to a live run), --replay RUN or --address",
        ("r-nope",): "error: no such run: r-nope",
        ("--address", "tcp://127.0.0.1:1"): "--server-key: error: --address needs --server-key",
        ("--address", "tcp://127.0.0.1:1", "--server-key", "x" * 40):
            "--key: error: --address needs --key",
        ("--address", "tcp://127.0.0.1:1", "--server-key", "short", "--key", "k"):
            "--server-key: error: bad Curve public key",
    }
    for args, start in cases.items():
        result = CliRunner().invoke(main, ["dash", *args])
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), (args, lines)
    run_dir = tmp_path / ".meshctl" / "runs" / "r-0001"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text("{}")
    bad = CliRunner().invoke(main, ["dash", "r-0001"])
    assert bad.exit_code == 1 and "error: cannot read run.json" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_reattach_hint_uses_the_run_id_from_the_mesh_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / ".meshctl" / "runs" / "r-0001"
    run_dir.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert reattach_hint(run_dir) == "meshctl dash r-0001"
    monkeypatch.chdir(run_dir)
    assert reattach_hint(run_dir) == f"meshctl dash {run_dir}"
