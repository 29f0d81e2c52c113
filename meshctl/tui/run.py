"""`meshctl up` in a terminal: the dashboard attached to a run that `up` started."""

from __future__ import annotations

from dataclasses import replace

from meshctl.runtime.launcher import LocalRun, RunResult
from meshctl.tui.app import make_app
from meshctl.tui.bridge import EventBridge
from meshctl.tui.dash import reattach_hint
from meshctl.tui.plan_info import load_plan


def run_dashboard(run: LocalRun) -> RunResult:
    """Show the run live until the user quits.

    Quitting after the run ended just closes; quitting before asks (stop the run /
    keep it running in the background / cancel). Keeping it running returns at once
    with `detached` set and the re-attach command as the reason; the coordinator goes
    on in its own session.
    """
    bridge = EventBridge(run.m.events, curve_serverkey=run.m.coordinator_public.encode(),
                         curve_publickey=run.observer.public, curve_secretkey=run.observer.secret)
    app = make_app(title=f"meshctl · {run.m.run}", event_source=bridge,
                   plan=load_plan(run.m.run_dir), ask_on_quit=True)
    detached = False
    try:
        app.run()
        detached = app.quit_choice == "detach"
    finally:
        if not detached:
            run.stop()  # a no-op when the run already ended
    if detached:
        run.detach()  # `up` exits now: the run must not take that for `up` being killed
        hint = reattach_hint(run.m.path)
        return RunResult(False, run.m.path, f"run {run.m.run} keeps running in the background; "
                         f"re-attach with: {hint}", detached=True)
    return replace(run.finish(), detached=False)
