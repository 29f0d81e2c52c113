"""`meshctl up` in a terminal: the dashboard attached to a run that `up` started."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import replace

from meshctl.runtime.launcher import STOP_SIGNALS, LocalRun, RunResult
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
                   plan=load_plan(run.m.run_dir), ask_on_quit=True, watch=True,
                   alive=lambda: run.proc is None or run.proc.poll() is None)
    app.run_dir = run.m.path
    app.stop_signals = tuple(sig for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN)
    closed = threading.Event()
    app.on_stop_signal = lambda sig: threading.Thread(target=_stop_for, args=(run, sig, closed), name="stop-run",
                                                      daemon=True).start()
    threading.Thread(target=_watch_close, args=(app, run, closed), name="watch-close", daemon=True).start()
    detached = False
    try:
        app.run()
        detached = app.quit_choice == "detach"
    finally:
        closed.set()
        if app.stopped_by is not None:  # the run is stopped in order: a second signal must not cut that short
            for sig in app.stop_signals:
                signal.signal(sig, signal.SIG_IGN)
        if not detached:
            run.stop()  # a no-op when the run already ended
    if app.stopped_by is not None:
        result = run.finish()
        name = signal.Signals(app.stopped_by).name
        return RunResult(False, result.run_dir, f"interrupted by {name}", result.events, signal=app.stopped_by)
    if app.quit_choice == "stop":  # "stop the run" in the quit dialog: stopped on purpose, as Ctrl-C is
        result = run.finish()  # it may have ended by itself while the dialog was open
        return result if result.ok else RunResult(False, result.run_dir, "stopped from the dashboard",
                                                  result.events, signal=signal.SIGINT)
    if detached:
        run.detach()  # `up` exits now: the run must not take that for `up` being killed
        hint = reattach_hint(run.m.path)
        return RunResult(False, run.m.path, f"run {run.m.run} keeps running in the background; "
                         f"re-attach with: {hint}", detached=True)
    return replace(run.finish(), detached=False)


CLOSE_S = 5.0
"""After a stop signal, how long the dashboard may take to close once the run has stopped."""


def _watch_close(app, run: LocalRun, closed: threading.Event) -> None:
    """When the app starts closing but does not finish (Textual can hang on a terminal that went away),
    stop the run in order and leave: a run is never left going with no one attending it."""
    app.unmounted.wait()
    if not closed.wait(CLOSE_S):
        _leave(run, app.stopped_by or signal.SIGHUP)


def _leave(run: LocalRun, sig: int) -> None:
    try:
        run.stop()
        os.write(2, f"\nrun stopped: {run.m.path} (interrupted by {signal.Signals(sig).name})\n".encode())
    except OSError:  # the terminal is gone (EIO): nothing to tell, and still nothing may stay behind
        pass
    finally:
        os._exit(128 + sig)


def _stop_for(run: LocalRun, sig: int, closed: threading.Event) -> None:
    """A stop signal reached `up` in the dashboard: stop the run in order at once, beside the app.

    The app closes in its own loop meanwhile; when its terminal is gone (SIGHUP) it may never
    manage to, so once the run has stopped, `up` leaves without it after CLOSE_S.
    """
    run.stop()
    if not closed.wait(CLOSE_S):
        _leave(run, sig)
