"""The dashboard: `MeshApp` renders the event stream of one run.

Build it with `make_app(...)`, the one factory the CLI and the tests share. The
app holds a `MeshState`, folds every `EventReceived` into it with `reduce`, and
asks each widget to show the new state. Events come from an event source (the
ZeroMQ `EventBridge`, a `FileReplay` or `PacedReplay`) or from `MeshApp.feed`.

Three tabs, switched with 1/2/3: Overview (rounds, domains, recent events),
Policies (every policy decision) and Events (the whole log, filtered by `/`).
"""

from __future__ import annotations

import time
from typing import ClassVar, Protocol

from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Footer, Input, TabbedContent, TabPane

from meshctl.runtime.events import Event, RunCompleted
from meshctl.tui.messages import BridgeNote, EventReceived, FrameSkipped
from meshctl.tui.state import MeshState, reduce
from meshctl.tui.widgets import (DomainTable, EventLog, EventsView, PolicyTable, RoundsTable,
                                 RunHeader)

__all__ = ["TABS", "EventReceived", "EventSource", "MeshApp", "make_app"]

TABS: tuple[tuple[str, str, str], ...] = (
    ("1", "overview", "Overview"), ("2", "policies", "Policies"), ("3", "events", "Events"),
)
"""(key, pane id, title) of each tab, in order."""


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
        *(Binding(key, f"show_tab('{pane}')", title) for key, pane, title in TABS),
        Binding("slash", "filter_events", "Filter"),
    ]

    def __init__(self, *, title: str = "meshctl", event_source: EventSource | None = None,
                 exit_on_complete: bool = False) -> None:
        super().__init__()
        self.title = title
        self.mesh_state = MeshState()
        """Everything the events have said so far."""
        self.event_source = event_source
        self.exit_on_complete = exit_on_complete

    def compose(self) -> ComposeResult:
        yield RunHeader(id="header")
        with TabbedContent(initial="overview", id="tabs"):
            with TabPane("1 Overview", id="overview"):
                yield RoundsTable(id="rounds")
                yield DomainTable(id="domains")
                yield EventLog(id="log")
            with TabPane("2 Policies", id="policies"):
                yield PolicyTable(id="policy-table")
            with TabPane("3 Events", id="events"):
                yield EventsView(id="events-view")
        yield Footer()

    def on_mount(self) -> None:
        self._show()
        if self.event_source is not None:
            self.event_source.start(self)

    def on_unmount(self) -> None:
        if self.event_source is not None:
            self.event_source.stop()

    @property
    def active_tab(self) -> str:
        """The id of the tab shown now (`overview`, `policies`, `events`)."""
        return self.query_one(TabbedContent).active

    def action_show_tab(self, pane: str) -> None:
        """Show tab `pane` and focus its main widget."""
        self.query_one(TabbedContent).active = pane
        target = {"overview": RoundsTable, "policies": PolicyTable}.get(pane)
        if target is not None:
            self.query_one(target).focus()
        else:
            self.query_one("#all-events").focus()

    def action_filter_events(self) -> None:
        """Show the Events tab and put the cursor in its filter."""
        self.query_one(TabbedContent).active = "events"
        self.query_one("#event-filter", Input).focus()

    def feed(self, event: Event) -> bool:
        """Deliver `event` to the app; safe from any thread. False once the app is closing."""
        return self.post_message(EventReceived(event))

    def on_event_received(self, message: EventReceived) -> None:
        reduce(self.mesh_state, message.event)
        self._show()
        if isinstance(message.event, RunCompleted) and self.exit_on_complete:
            self.exit(self.mesh_state)

    def on_frame_skipped(self, message: FrameSkipped) -> None:
        self.mesh_state.skipped += 1
        self.mesh_state.log("warning", f"skipped a malformed frame: {message.reason}",
                            ts=time.time())
        self._show()

    def on_bridge_note(self, message: BridgeNote) -> None:
        self.mesh_state.log(message.level, message.text, ts=time.time())
        self._show()

    def _show(self) -> None:
        state = self.mesh_state
        self.query_one(RunHeader).show(state)
        self.query_one(RoundsTable).show(state)
        self.query_one(DomainTable).show(state)
        self.query_one("#log", EventLog).show(state)
        self.query_one(PolicyTable).show(state)
        self.query_one(EventsView).show(state)


def make_app(*, title: str = "meshctl", event_source: EventSource | None = None,
             exit_on_complete: bool = False) -> MeshApp:
    """The dashboard app, as the CLI and the tests build it.

    Args:
        title: The terminal title.
        event_source: Started on mount and stopped on unmount (an `EventBridge`
            or a `FileReplay`); None to feed events with `MeshApp.feed`.
        exit_on_complete: Exit when `run_completed` arrives, returning the final
            `MeshState`; otherwise stay open until the user presses q.
    """
    return MeshApp(title=title, event_source=event_source, exit_on_complete=exit_on_complete)
