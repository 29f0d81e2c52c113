"""`meshctl up` in a terminal: the dashboard attached to a run that `up` started."""

from __future__ import annotations

from meshctl.runtime.launcher import LocalRun, RunResult
from meshctl.tui.app import make_app
from meshctl.tui.bridge import EventBridge


def run_dashboard(run: LocalRun) -> RunResult:
    """Show the run live until the user quits; quitting before the end stops the run."""
    bridge = EventBridge(run.m.events, curve_serverkey=run.m.coordinator_public.encode(),
                         curve_publickey=run.observer.public, curve_secretkey=run.observer.secret)
    app = make_app(title=f"meshctl · {run.m.run}", event_source=bridge)
    try:
        app.run()
    finally:
        run.stop()  # a no-op when the run already ended
    return run.finish()
