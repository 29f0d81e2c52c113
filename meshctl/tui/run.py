"""`meshctl up` in a terminal: the dashboard attached to a run that `up` started."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import replace

from meshctl.runtime.launcher import STOP_SIGNALS, Interrupted, LocalRun, RunResult
from meshctl.tui.app import MeshApp, make_app
from meshctl.tui.bridge import EventBridge
from meshctl.tui.dash import reattach_hint
from meshctl.tui.plan_info import load_plan, seed


def run_dashboard(run: LocalRun) -> RunResult:
    """Show the run live until the user quits.

    Quitting after the run ended just closes; quitting before asks (stop the run /
    keep it running in the background / cancel). Keeping it running returns at once
    with `detached` set and the re-attach command as the reason; the coordinator goes
    on in its own session.
    """
    app = make_app(title=f"meshctl · {run.m.run}", event_source=_bridge(run),
                   plan=load_plan(run.m.run_dir), ask_on_quit=True, watch=True,
                   alive=lambda: run.proc is None or run.proc.poll() is None)
    app.run_dir = run.m.path
    return _attend(app, lambda: run)


def start_dashboard(start: Callable[[Callable[[str], None]], LocalRun], phase: str) -> RunResult:
    """Show the dashboard at once, and start the run beside it.

    `start(say)` compiles, prepares and spawns the run (saying what it is doing with `say`, shown in
    the header while nothing else is) and returns it; the app shows `phase` until then, and fills in
    as the run's events come. An exception from `start` (a mesh that does not compile) closes the app
    and is raised here, once the terminal is back.
    """
    starter = _Starter(start)
    app = make_app(title="meshctl", event_source=starter, ask_on_quit=True, watch=True,
                   alive=starter.alive)
    app.mesh_state.phase = phase
    return _attend(app, starter.wait)


def _bridge(run: LocalRun) -> EventBridge:
    return EventBridge(run.m.events, curve_serverkey=run.m.coordinator_public.encode(),
                       curve_publickey=run.observer.public, curve_secretkey=run.observer.secret)


class StartCancelled(Exception):
    """The dashboard closed before the run was started: none was."""


class _Starter:
    """The event source of `start_dashboard`: starts the run in a thread, then the bridge to its events."""

    def __init__(self, start: Callable[[Callable[[str], None]], LocalRun]) -> None:
        self.start_run = start
        self.run: LocalRun | None = None
        self.error: BaseException | None = None
        self.bridge: EventBridge | None = None
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.app: MeshApp | None = None

    def alive(self) -> bool:
        """The run's processes are there (or not started yet)."""
        run = self.run
        return run is None or run.proc is None or run.proc.poll() is None

    def start(self, app: MeshApp) -> None:
        self.app = app
        self.thread = threading.Thread(target=self._go, args=(app,), name="start-run", daemon=True)
        app.call_after_refresh(self.thread.start)  # the first frame first: the compiler holds the GIL

    def stop(self) -> None:
        if self.run is None and self.app is not None and self.app.quit_choice == "detach":
            return  # "keep running" before the run started: it starts, and `up` leaves it running
        self.stopped.set()
        if self.bridge is not None:
            self.bridge.stop()

    def wait(self) -> LocalRun:
        """The started run, once `start` returned; raises what it raised."""
        if self.thread is not None and self.thread.ident is not None:
            self.thread.join()
        elif self.error is None and self.run is None:  # the app closed before its first frame
            raise StartCancelled
        if self.error is not None:
            raise self.error
        assert self.run is not None
        return self.run

    def _go(self, app: MeshApp) -> None:
        def say(text: str) -> None:
            if self.stopped.is_set():  # the app closed (q, Ctrl-C) before the run started: start none
                raise StartCancelled
            _call(app, _set_phase, app, text)

        try:
            self.run = self.start_run(say)
        except BaseException as err:  # noqa: BLE001 - raised again by `wait`, on the main thread
            self.error = err
            if not self.stopped.is_set():  # (a closed app has nothing to close)
                _call(app, app.exit)
            return
        if not self.stopped.is_set():
            _call(app, self._attach, app, self.run)

    def _attach(self, app: MeshApp, run: LocalRun) -> None:
        """On the app's thread: what the run's directory says, then its events."""
        if self.stopped.is_set():
            return
        app.plan = load_plan(run.m.run_dir)
        seed(app.mesh_state, app.plan)
        app.run_dir = run.m.path
        app.title = f"meshctl · {run.m.run}"
        _set_phase(app, "starting the coordinator and the domains")
        self.bridge = _bridge(run)
        self.bridge.start(app)


def _set_phase(app: MeshApp, text: str) -> None:
    app.mesh_state.phase = text
    app.flush()


def _call(app: MeshApp, fn: Callable[..., object], *args: object) -> None:
    """`fn(*args)` on the app's thread; nothing once the app has closed."""
    loop = getattr(app, "_loop", None)
    if loop is not None and loop.is_closed():  # (Textual would make the call's coroutine, then fail to post
        return                                  # it: a RuntimeError and a never-awaited coroutine warning)
    try:
        app.call_from_thread(fn, *args)
    except RuntimeError:  # the app is not running (any more)
        pass


def _attend(app: MeshApp, started: Callable[[], LocalRun]) -> RunResult:
    """Run `app` until the user quits, then end, stop or leave the run `started()` returns."""
    app.stop_signals = tuple(sig for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN)
    closed = threading.Event()
    app.on_stop_signal = lambda sig: threading.Thread(target=_stop_for, args=(started, sig, closed),
                                                      name="stop-run", daemon=True).start()
    threading.Thread(target=_watch_close, args=(app, started, closed), name="watch-close", daemon=True).start()
    detached = False
    try:
        app.run()
        detached = app.quit_choice == "detach"
    except KeyboardInterrupt as err:  # a stop signal before the app took them over: stop the run
        app.stopped_by = getattr(err, "signum", signal.SIGINT)
    finally:
        closed.set()
        if app.stopped_by is not None:  # the run is stopped in order: a second signal must not cut that short
            for sig in app.stop_signals:
                signal.signal(sig, signal.SIG_IGN)
    try:
        run = started()
    except StartCancelled:
        raise Interrupted(app.stopped_by or signal.SIGINT) from None
    if not detached:
        run.stop(signum=app.stopped_by or 0)  # a no-op when the run already ended
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


def _watch_close(app, started: Callable[[], LocalRun], closed: threading.Event) -> None:
    """When the app starts closing but does not finish (Textual can hang on a terminal that went away),
    stop the run in order and leave: a run is never left going with no one attending it."""
    app.unmounted.wait()
    if not closed.wait(CLOSE_S):
        _leave(started, app.stopped_by or signal.SIGHUP)


def _leave(started: Callable[[], LocalRun], sig: int) -> None:
    try:
        with contextlib.suppress(Exception):  # the terminal is gone (EIO), or the run never started:
            run = started()                   # nothing to tell, and still nothing may stay behind
            run.stop(signum=sig)
            os.write(2, f"\nrun stopped: {run.m.path} (interrupted by {signal.Signals(sig).name})\n".encode())
    finally:
        os._exit(128 + sig)


def _stop_for(started: Callable[[], LocalRun], sig: int, closed: threading.Event) -> None:
    """A stop signal reached `up` in the dashboard: stop the run in order at once, beside the app.

    The app closes in its own loop meanwhile; when its terminal is gone (SIGHUP) it may never
    manage to, so once the run has stopped, `up` leaves without it after CLOSE_S.
    """
    with contextlib.suppress(Exception):  # it never started (the main thread raises why)
        started().stop(signum=sig)
    if not closed.wait(CLOSE_S):
        _leave(started, sig)
