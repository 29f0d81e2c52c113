"""`meshctl dash`: build the dashboard for a live run, an address, or a replay."""

from __future__ import annotations

from pathlib import Path

from meshctl.errors import UserError
from meshctl.runtime.run import run_live
from meshctl.tui.app import MeshApp, make_app
from meshctl.tui.attach import (
    LiveAttach,
    resolve_run,
    run_finished,
    target_for_address,
    target_for_run,
)
from meshctl.tui.plan_info import load_plan
from meshctl.tui.replay import RUNS_DIR, ScrubReplay, find_events

__all__ = ["dash_app", "reattach_hint"]


def dash_app(run: str | None = None, *, replay: str | None = None, speed: float = 10.0,
             address: str | None = None, server_key: str | None = None,
             key_file: Path | None = None) -> MeshApp:
    """The app `meshctl dash` runs: attached to RUN or ADDRESS live, or replaying `replay`.

    A RUN that has already ended is replayed (at `speed`) instead of attached to.

    Raises:
        UserError: not exactly one of RUN, --replay, --address; or the run cannot be found.
    """
    given = [x for x in (run, replay, address) if x]
    if len(given) != 1:
        raise UserError("give one of RUN (attach to a live run), --replay RUN or --address",
                        hint="meshctl dash RUN_ID | meshctl dash --replay RUN_ID")
    if replay or (run and run_finished(_run_dir_or_none(run) or Path("/nonexistent"))):
        path = find_events(replay or run or "")
        app = make_app(title=f"meshctl · replay {path.parent.name}",
                       event_source=ScrubReplay(path, speed=speed), plan=load_plan(path.parent))
        app.run_dir = path.parent
        return app
    if run:
        run_dir = resolve_run(run)
        target = target_for_run(run_dir)
        app = make_app(title=f"meshctl · {run_dir.name}", event_source=LiveAttach(target),
                       plan=load_plan(run_dir), watch=True, alive=lambda: run_live(run_dir))
        app.run_dir = run_dir
        return app
    target = target_for_address(address or "", server_key, key_file)
    return make_app(title=f"meshctl · {address}", event_source=LiveAttach(target), watch=True)


def reattach_hint(run_dir: Path) -> str:
    """The command that re-attaches to the run in `run_dir` from the current directory."""
    by_id = Path.cwd() / RUNS_DIR / run_dir.name
    same = by_id.exists() and by_id.resolve() == run_dir.resolve()
    return f"meshctl dash {run_dir.name if same else run_dir}"


def _run_dir_or_none(run: str) -> Path | None:
    try:
        return resolve_run(run)
    except UserError:
        return None
