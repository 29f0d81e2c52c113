"""The dashboard: `MeshApp` renders the event stream of one run.

Build it with `make_app(...)`, the one factory the CLI and the tests share. The
app holds a `MeshState` and folds every event into it with `reduce`; the widgets
are redrawn from that state at most every `refresh_s` (100 ms), so a burst of
events costs one redraw, not one per event. Events come from an event source
(the ZeroMQ `EventBridge`, a `FileReplay`, `PacedReplay` or the scrubbable
`ScrubReplay`) or from `MeshApp.feed`.

Five tabs, switched with 1-5: Overview (coordinator, jobs, domains, recent events),
Rounds (rounds table, contributions, plots), Policies (every decision), Catalog
(products, `/` searches) and Events (the whole log, `/` filters).
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Input, Static, TabbedContent, TabPane

from meshctl.runtime.events import Event, RunCompleted
from meshctl.tui.messages import BridgeNote, EventReceived, FrameSkipped
from meshctl.tui.plan_info import seed
from meshctl.tui.replay import ScrubReplay
from meshctl.tui.state import MeshState, coordinator_lost, lost_after, reduce, reduce_all
from meshctl.tui.widgets import (
    AnalysisTable,
    CatalogView,
    DomainTable,
    EventLog,
    EventsView,
    FailureBanner,
    HelpScreen,
    JobsPanel,
    PolicyTable,
    QuitDialog,
    RoundsView,
    RunHeader,
)
from meshctl.tui.widgets.domain_screen import DomainScreen
from meshctl.tui.widgets.help_screen import key_rows
from meshctl.tui.widgets.jump_dialog import JumpDialog
from meshctl.tui.widgets.log_screen import LogScreen, log_label, run_logs

if TYPE_CHECKING:
    from meshctl.compiler.plan import Plan

SCREENSHOTS_DIR = "screenshots"
"""Where `s` saves screenshots, under the run directory (else the working directory)."""

__all__ = ["TABS", "THEMES", "EventReceived", "EventSource", "MeshApp", "make_app"]

TABS: tuple[tuple[str, str, str], ...] = (
    ("1", "overview", "Overview"), ("2", "rounds", "Rounds"), ("3", "policies", "Policies"),
    ("4", "catalog", "Catalog"), ("5", "events", "Events"),
)
"""(key, pane id, title) of each tab, in order."""

THEMES = ("textual-dark", "textual-light")
"""The dark and the light theme `t` switches between."""

_FOCUS = {"overview": "#domains", "rounds": "#rounds", "policies": "#policy-table",
          "catalog": "#catalog", "events": "#all-events"}

GONE_GRACE_S = 2.0
"""How long after the last event a run whose processes are gone is shown as lost (its last
events may still be on their way)."""

_TAB_ACTIONS = {"show_tab", "search"}
_SCRUB_ACTIONS = {"scrub_toggle", "scrub_round", "scrub_edge", "scrub_speed", "scrub_jump"}


@dataclass(frozen=True)
class _Views:
    """The widgets a redraw updates, found once at mount (a modal screen may be on top)."""

    header: RunHeader
    jobs: JobsPanel
    domains: DomainTable
    log: EventLog
    rounds: RoundsView
    policies: PolicyTable
    catalog: CatalogView
    events: EventsView
    scrubber: Static
    analysis: AnalysisTable
    failure: FailureBanner


class EventSource(Protocol):
    """Feeds events into an app from elsewhere (a thread, a socket, a file)."""

    def start(self, app: MeshApp) -> None:
        """Begin delivering events to `app` (via `app.feed`); must not block."""

    def stop(self) -> None:
        """Stop delivering and release resources; idempotent."""


class MeshApp(App[MeshState]):
    """A live view of one meshctl run."""

    CSS_PATH = "meshctl.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        *(Binding(key, f"show_tab('{pane}')", title, show=False) for key, pane, title in TABS),
        Binding("slash", "search", "Search"),
        Binding("t", "toggle_theme", "Theme"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("f1", "help", "Help", show=False),
        Binding("s", "screenshot", "Screenshot", show=False),
        Binding("l", "logs", "Logs", show=False),
        Binding("space", "scrub_toggle('pause')", "Pause"),
        Binding("space", "scrub_toggle('play')", "Play"),
        Binding("left_square_bracket", "scrub_round(-1)", "-round", key_display="[", show=False),
        Binding("right_square_bracket", "scrub_round(1)", "+round", key_display="]", show=False),
        Binding("j", "scrub_jump", "Jump to round", show=False),
        Binding("g", "scrub_edge(0)", "Start", show=False),
        Binding("G", "scrub_edge(1)", "End", show=False),
        Binding("minus", "scrub_speed(-1)", "Slower", key_display="-", show=False),
        Binding("plus", "scrub_speed(1)", "Faster", key_display="+", show=False),
    ]

    def __init__(self, *, title: str = "meshctl", event_source: EventSource | None = None,
                 exit_on_complete: bool = False, plan: Plan | None = None,
                 clock: Callable[[], float] | None = None, ask_on_quit: bool = False,
                 refresh_s: float = 0.1, watch: bool = False,
                 alive: Callable[[], bool] | None = None) -> None:
        super().__init__()
        self.title = title
        self.plan = plan
        self.mesh_state = seed(MeshState(), plan)
        """Everything the events have said so far."""
        self.event_source = event_source
        self.exit_on_complete = exit_on_complete
        self.clock = clock
        """`now` for heartbeat ages; None: wall time live, the newest event's time in a replay."""
        self.ask_on_quit = ask_on_quit
        self.watch = watch
        """Watch the coordinator: a live run whose coordinator goes silent (or dies) shows as LOST."""
        self.alive = alive
        """Whether the run's processes are still there (checked every second while watching)."""
        self._heard = self._tick()
        self._heard_real = time.monotonic()  # (processes gone: a grace in real time)
        self.run_dir: Path | None = None
        """Where to look for files the events name (an analysis result) when the run's own
        directory is not there any more (a replay of a moved run)."""
        self.quit_choice: str | None = None
        """`stop` or `detach` when the quit dialog answered, else None."""
        self.stop_signals: tuple[int, ...] = ()
        """Signals that close the app (`meshctl up`: SIGTERM, SIGHUP, ...), handled by its event loop."""
        self.stopped_by: int | None = None
        """The first of `stop_signals` that arrived, if one did."""
        self.on_stop_signal: Callable[[int], None] | None = None
        """Called (in the event loop) with the first of `stop_signals`, before the app exits."""
        self.unmounted = threading.Event()
        """Set when the app starts to close (a watchdog can tell a close that never ends)."""
        self.refresh_s = refresh_s
        self.redraws = 0
        """How many times the widgets were redrawn (batched: not once per event)."""
        self._last_flush = 0.0
        self._pending: Timer | bool = False
        self._views: _Views | None = None
        self._clock_timer: Timer | None = None
        self._shown_paused: bool | None = None
        self.last_screenshot: Path | None = None
        """The file the last screenshot went to."""
        self.theme = THEMES[0]

    @property
    def scrubber(self) -> ScrubReplay | None:
        """The replay scrubber, when this app replays a file with one."""
        return self.event_source if isinstance(self.event_source, ScrubReplay) else None

    def compose(self) -> ComposeResult:
        yield RunHeader(id="header")
        yield FailureBanner(id="failure")
        with TabbedContent(initial="overview", id="tabs"):
            with TabPane("1 Overview", id="overview"):
                yield JobsPanel(id="jobs")
                yield AnalysisTable(id="analysis")
                yield DomainTable(id="domains")
                yield EventLog(id="log")
            with TabPane("2 Rounds", id="rounds-tab"):
                yield RoundsView(id="rounds-view")
            with TabPane("3 Policies", id="policies"):
                yield PolicyTable(id="policy-table")
            with TabPane("4 Catalog", id="catalog-tab"):
                yield CatalogView(id="catalog-view")
            with TabPane("5 Events", id="events"):
                yield EventsView(id="events-view")
        yield Static(id="scrubber")
        yield Footer()

    def on_mount(self) -> None:
        self._views = _Views(
            self.query_one(RunHeader), self.query_one(JobsPanel), self.query_one(DomainTable),
            self.query_one("#log", EventLog), self.query_one(RoundsView),
            self.query_one(PolicyTable), self.query_one(CatalogView), self.query_one(EventsView),
            self.query_one("#scrubber", Static), self.query_one(AnalysisTable),
            self.query_one(FailureBanner))
        self._views.scrubber.display = self.scrubber is not None
        self.flush()
        self._clock_timer = self.set_interval(1.0, self._tick_clock)
        if self.event_source is not None:
            self.event_source.start(self)
        loop = asyncio.get_running_loop()
        for sig in self.stop_signals:  # in the loop, not raised into it: the app closes in order
            loop.add_signal_handler(sig, self._stop_signal, sig)

    def _stop_signal(self, sig: int) -> None:
        if self.stopped_by is None:
            self.stopped_by = sig
            if self.on_stop_signal is not None:
                self.on_stop_signal(sig)
        self.exit()

    def on_unmount(self) -> None:
        self.unmounted.set()
        self._views = None  # timers that still fire find nothing to draw
        if self._clock_timer is not None:
            self._clock_timer.stop()
        if self.event_source is not None:
            self.event_source.stop()

    # -- tabs, search, theme -------------------------------------------------------

    @property
    def active_tab(self) -> str:
        """The tab shown now: `overview`, `rounds`, `policies`, `catalog` or `events`."""
        return self.screen_stack[0].query_one(TabbedContent).active.removesuffix("-tab")

    def action_show_tab(self, pane: str) -> None:
        """Show tab `pane` and focus its main widget."""
        self.query_one(TabbedContent).active = pane if pane in ("overview", "policies",
                                                                "events") else f"{pane}-tab"
        self.query_one(_FOCUS[pane]).focus()

    def on_tabbed_content_tab_activated(self) -> None:
        self.call_after_refresh(self.flush)  # logs on a hidden tab write when shown

    def action_search(self) -> None:
        """`/`: search the catalog on the Catalog tab, else filter the Events tab."""
        if self.active_tab == "catalog":
            self.query_one("#catalog-search", Input).focus()
            return
        self.query_one(TabbedContent).active = "events"
        self.query_one("#event-filter", Input).focus()

    def action_toggle_theme(self) -> None:
        """Switch between the dark and the light theme."""
        self.theme = THEMES[1] if self.theme == THEMES[0] else THEMES[0]

    # -- help, palette, screenshots --------------------------------------------------

    def action_help(self) -> None:
        """`?`/F1: the keys of the screen shown now, read from its bindings."""
        if isinstance(self.screen, HelpScreen):
            return
        where = self.screen.__class__.__name__ if self.screen is not self.screen_stack[0] \
            else {pane: title for _, pane, title in TABS}[self.active_tab]
        self.push_screen(HelpScreen(where, key_rows(self, self.screen)))

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        """The command palette (ctrl+p): the dashboard's own commands."""
        for key, pane, title in TABS:
            yield SystemCommand(f"Go to {title}", f"Show the {title} tab (key {key})",
                                lambda pane=pane: self.action_show_tab(pane))
        yield SystemCommand("Filter events", "Filter the Events tab by kind, domain, job, round (/)",
                            self._filter_events)
        for path in run_logs(self.run_path):
            yield SystemCommand(f"Open log: {log_label(path)}", f"Read and follow {path} (l)",
                                lambda path=path: self.action_logs(path.stem))
        for name in self.mesh_state.domains:
            yield SystemCommand(f"Domain {name}", f"Drill into domain {name} (enter on its row)",
                                lambda name=name: self.action_domain(name))
        if self.scrubber is not None:
            yield SystemCommand("Jump to round", "Replay: pause just after round N (j)",
                                self.action_scrub_jump)
        yield SystemCommand("Screenshot", "Save an SVG of the screen into the run directory (s)",
                            lambda: self.call_after_refresh(self.action_screenshot))
        yield SystemCommand("Keys", "Show every key of this screen (? or F1)", self.action_help)
        yield SystemCommand("Theme", "Switch between the dark and the light theme (t)",
                            self.action_toggle_theme)
        yield SystemCommand("Quit", "Quit the dashboard (q)", self.action_quit)

    def _filter_events(self) -> None:
        self.action_show_tab("events")
        self.query_one("#event-filter", Input).focus()

    @property
    def run_path(self) -> Path | None:
        """The run's directory: the one the CLI gave, else the one the run announced."""
        if self.run_dir is not None:
            return self.run_dir
        return Path(self.mesh_state.run_dir) if self.mesh_state.run_dir else None

    def action_logs(self, name: str = "") -> None:
        """`l`: the log viewer on the coordinator's log (or `name`'s: `coordinator` or a domain)."""
        if isinstance(self.screen, LogScreen):
            return
        files = run_logs(self.run_path)
        if not files:
            where = self.run_path / "logs" if self.run_path is not None else "this run (no run directory)"
            self.notify(f"no log files in {where}", severity="warning")
            return
        shown = next((p for p in files if p.stem == name), None)
        self.push_screen(LogScreen(files, shown))

    def on_data_table_row_selected(self, message: DataTable.RowSelected) -> None:
        """Enter on a domain's row: its drill-down."""
        if isinstance(message.data_table, DomainTable) and message.row_key.value is not None:
            self.action_domain(message.row_key.value)

    def action_domain(self, name: str) -> None:
        """The drill-down of domain `name` (products, checks, decisions, rounds, metrics)."""
        if isinstance(self.screen, DomainScreen):
            return
        self.push_screen(DomainScreen(name))

    def screenshot_path(self) -> Path:
        """Where a screenshot taken now goes: `<run>/screenshots/<tab>-<UTC time>.svg`."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        run = self.run_dir or self.run_path  # the announced one only when it is here
        if run is None or (self.run_dir is None and not run.is_dir()):
            run = Path.cwd()
        base = run / SCREENSHOTS_DIR
        path = base / f"{self.active_tab}-{stamp}.svg"
        n = 1
        while path.exists():  # two in one second: keep both
            n += 1
            path = base / f"{self.active_tab}-{stamp}-{n}.svg"
        return path

    def action_screenshot(self, filename: str | None = None, path: str | None = None) -> None:
        """`s`: save an SVG of the screen into the run directory and say where."""
        target = Path(path) / filename if path and filename else self.screenshot_path()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(self.export_screenshot(), encoding="utf-8")
        except OSError as err:
            self.notify(f"screenshot not saved: {target}: {err.strerror or err}", severity="error")
            return
        self.last_screenshot = target
        self.notify(f"screenshot saved to {target}", title="Screenshot")

    # -- quitting ----------------------------------------------------------------

    async def action_quit(self) -> None:
        """Quit; `up`'s dashboard first asks what to do with a run that is still going."""
        if not self.ask_on_quit or self.mesh_state.state in ("completed", "failed"):
            self.exit()
            return

        def answered(choice: str | None) -> None:
            if choice:
                self.quit_choice = None if choice == "close" else choice
                self.exit()

        if not isinstance(self.screen, QuitDialog):
            self.push_screen(QuitDialog(self.mesh_state.run_id), answered)

    # -- the scrubber ----------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Scrubber keys exist only while replaying with a scrubber; the tab keys only on the tabs
        (not under help, the log viewer or a drill-down)."""
        if action in _TAB_ACTIONS and self.screen is not self.screen_stack[0]:
            return False
        if action in _SCRUB_ACTIONS:
            if self.scrubber is None:
                return False
            if action == "scrub_toggle" and parameters:  # the footer offers what space does now
                return (parameters[0] == "play") == self.scrubber.paused
            return True
        return True

    def action_scrub_toggle(self, _what: str = "") -> None:
        """Pause or resume the replay (`pause` / `play` say which the footer offered)."""
        if self.scrubber is not None:
            self.scrubber.toggle()
            self._show_scrubber()

    def action_scrub_round(self, delta: int) -> None:
        """Step the replay one round back (-1) or forward (1)."""
        if self.scrubber is not None:
            self.scrubber.step_round(delta)
            self._show_scrubber()

    def action_scrub_edge(self, end: int) -> None:
        """Jump to the start (0) or the end (1) of the replay."""
        if self.scrubber is not None:
            self.scrubber.paused = True
            self.scrubber.seek(len(self.scrubber.events) if end else 0)
            self._show_scrubber()

    def action_scrub_jump(self) -> None:
        """`j`: ask for a round and jump just after it (paused)."""
        scrubber = self.scrubber
        if scrubber is None or isinstance(self.screen, JumpDialog):
            return

        def jump(n: int | None) -> None:
            if n is not None:
                self.jump_to_round(n)

        self.push_screen(JumpDialog(len(scrubber.marks), bisect.bisect_right(scrubber.marks, scrubber.pos)),
                         jump)

    def jump_to_round(self, n: int) -> None:
        """Replay: pause just after round `n` completed (0: the start)."""
        if self.scrubber is not None:
            self.scrubber.seek_round(n)
            self._show_scrubber()

    def action_scrub_speed(self, delta: int) -> None:
        """Replay slower (-1) or faster (1)."""
        if self.scrubber is not None:
            self.scrubber.change_speed(delta)
            self._show_scrubber()

    # -- events in ------------------------------------------------------------------

    def feed(self, event: Event) -> bool:
        """Deliver `event` to the app; safe from any thread. False once the app is closing."""
        return self.post_message(EventReceived(event))

    def apply_events(self, events: Iterable[Event]) -> None:
        """Reduce `events` now (on the app's thread) and schedule a redraw."""
        for event in events:
            reduce(self.mesh_state, event)
        self._heard = self._tick()
        self._heard_real = time.monotonic()
        self._changed()

    def rebuild(self, events: Iterable[Event]) -> None:
        """Replace the state by one reduced from `events` alone, and redraw everything."""
        self.mesh_state = reduce_all(events, seed(MeshState(), self.plan))
        if self._views is not None:
            v = self._views
            for widget in (v.jobs, v.domains, v.log, v.rounds, v.policies, v.events, v.analysis):
                widget.reset()
        self.flush()

    def on_event_received(self, message: EventReceived) -> None:
        reduce(self.mesh_state, message.event)
        self._heard = self._tick()
        self._heard_real = time.monotonic()
        self._changed()
        if isinstance(message.event, RunCompleted) and self.exit_on_complete:
            self.flush()
            self.exit(self.mesh_state)

    def on_frame_skipped(self, message: FrameSkipped) -> None:
        self.mesh_state.skipped += 1
        self.mesh_state.log("warning", f"skipped a malformed frame: {message.reason}",
                            ts=time.time())
        self._changed()

    def on_bridge_note(self, message: BridgeNote) -> None:
        self.mesh_state.log(message.level, message.text, ts=time.time())
        self._changed()

    # -- redrawing --------------------------------------------------------------------

    def _tick(self) -> float:
        """The clock silence is measured on: the injected clock (tests), else the monotonic one."""
        return self.clock() if self.clock is not None else time.monotonic()

    def now(self) -> float:
        """The time heartbeat ages are measured at."""
        if self.clock is not None:
            return self.clock()
        return self.mesh_state.clock if self.scrubber is not None else time.time()

    def flush(self) -> None:
        """Redraw every widget from the state now (events since the last redraw included)."""
        if isinstance(self._pending, Timer):
            self._pending.stop()
        self._pending = False
        self._last_flush = time.monotonic()
        self.redraws += 1
        if not self._drawable:
            return
        state, v = self.mesh_state, self._views
        assert v is not None
        v.header.show(state)
        v.failure.show(state, self.run_dir)
        v.jobs.show(state)
        v.analysis.show(state, self.run_dir)
        v.domains.flag_silent = self.watch or self.scrubber is not None
        v.domains.show(state, self.now())
        v.log.show(state)
        v.rounds.show(state)
        v.policies.show(state)
        v.catalog.show(state)
        v.events.show(state)
        self._show_scrubber()
        if isinstance(self.screen, DomainScreen):
            self.screen.show(state)
        if isinstance(self.screen, QuitDialog) and state.state in ("completed", "failed"):
            self.screen.run_id = self.screen.run_id or state.run_id  # (asked before the run had one)
            self.screen.ended("completed" if state.state == "completed" else f"failed: {state.reason}")

    def _changed(self) -> None:
        """Something changed: redraw now if the last redraw is old enough, else soon."""
        if self._pending is not False:
            return
        wait = self._last_flush + self.refresh_s - time.monotonic()
        if wait <= 0:
            self._pending = True
            self.call_later(self.flush)
        else:
            self._pending = self.set_timer(wait, self.flush)

    @property
    def _drawable(self) -> bool:
        """Whether the widgets are there to draw on (not before mount, nor while closing)."""
        v = self._views
        return v is not None and not self._exit and v.domains.is_attached and v.log.is_attached

    def check_coordinator(self) -> bool:
        """While watching a run that has not ended: mark it LOST when its processes are gone or
        nothing came for the loss limit (`lost_after`). True when it was marked now."""
        state = self.mesh_state
        if not self.watch or state.state not in ("starting", "running"):
            return False
        quiet = self._tick() - self._heard
        if (self.alive is not None and time.monotonic() - self._heard_real > GONE_GRACE_S
                and not self.alive()):
            coordinator_lost(state, "its processes ended before the run did")
        elif state.state == "running" and quiet > lost_after():
            coordinator_lost(state, f"no event for {quiet:.0f}s")
        else:
            return False
        self.flush()
        return True

    def _tick_clock(self) -> None:
        self.check_coordinator()
        if self._drawable and self._views is not None:
            self._views.domains.show(self.mesh_state, self.now())
            self._show_scrubber()

    def _show_scrubber(self) -> None:
        if self.scrubber is not None and self._drawable and self._views is not None:
            space = "space play" if self.scrubber.paused else "space pause"
            keys = f"{space} · [ ] round · j jump · g/G start/end · -/+ speed"
            bar = self.scrubber.timeline(max(10, self.size.width - 4))
            self._views.scrubber.update(f"{bar}\n{self.scrubber.status()}   {keys}")
            self._views.header.show(self.mesh_state, replay=self.scrubber.status().split(" · ")[0])
            if self.scrubber.paused != self._shown_paused:
                self._shown_paused = self.scrubber.paused
                self.refresh_bindings()


def make_app(*, title: str = "meshctl", event_source: EventSource | None = None,
             exit_on_complete: bool = False, plan: Plan | None = None,
             clock: Callable[[], float] | None = None, ask_on_quit: bool = False,
             watch: bool = False, alive: Callable[[], bool] | None = None) -> MeshApp:
    """The dashboard app, as the CLI and the tests build it.

    Args:
        title: The terminal title.
        event_source: Started on mount and stopped on unmount (an `EventBridge`,
            `FileReplay`, `PacedReplay` or `ScrubReplay`); None to feed events
            with `MeshApp.feed`.
        exit_on_complete: Exit when `run_completed` arrives, returning the final
            `MeshState`; otherwise stay open until the user presses q.
        plan: The run's plan, for facts no event repeats (jurisdictions, reads).
        clock: `now` for heartbeat ages (tests freeze it); see `MeshApp.now`.
        ask_on_quit: Ask whether to stop the run when q is pressed before it ends
            (`meshctl up`); the answer is left in `MeshApp.quit_choice`.
        watch: A live run: show the coordinator as lost when `alive` says its processes are
            gone, or when no event came for the loss limit (15 s) before the run ended.
        alive: Whether the run's processes are still there (e.g. the run lock is held).
    """
    return MeshApp(title=title, event_source=event_source, exit_on_complete=exit_on_complete,
                   plan=plan, clock=clock, ask_on_quit=ask_on_quit, watch=watch, alive=alive)
