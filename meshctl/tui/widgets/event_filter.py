"""The Events tab: the whole event log, filtered by a substring typed into an Input."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import Input

from meshctl.tui.state import LogLine, MeshState
from meshctl.tui.widgets._format import fmt_clock
from meshctl.tui.widgets.event_log import EventLog


def line_text(line: LogLine) -> str:
    """A log line as the Events tab shows it (and as the filter matches it)."""
    kind = f"{line.kind:<18} " if line.kind else ""
    return f"{fmt_clock(line.ts)} {kind}{line.text}"


def matches(lines: Iterable[LogLine], query: str) -> list[LogLine]:
    """The lines whose shown text contains `query` (case-insensitive); all for ''."""
    needle = query.strip().casefold()
    return [ln for ln in lines if needle in line_text(ln).casefold()] if needle else list(lines)


class FilteredLog(EventLog):
    """Like `EventLog`, but only writes lines matching its query, with the event type shown."""

    MAX_WRITE: ClassVar[int] = 2000

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.query_text = ""
        self.shown_count = 0
        """Lines written under the current query."""

    def on_mount(self) -> None:
        self.border_title = "all events"

    def show(self, state: MeshState) -> None:
        """Write the new lines of `state` that match the query."""
        self._state = state
        if not self.on_view:
            return
        self._styles = {}
        new = [ln for ln in state.events if ln.index > self._written]
        for line in matches(new, self.query_text):
            self.write(self.render_line_text(line))
            self.shown_count += 1
        if new:
            self._written = new[-1].index
        self._subtitle(state)

    def refilter(self, query: str) -> None:
        """Show only the lines containing `query`, from the start of the kept log."""
        self.query_text = query
        self.clear()
        self._written, self.shown_count = 0, 0
        if self._state is not None:
            self.show(self._state)

    def reset(self) -> None:
        """Forget every line (the state was rebuilt)."""
        self.clear()
        self._written, self.shown_count = 0, 0

    def render_line_text(self, line: LogLine) -> Text:
        text = super().render_line_text(line)
        if line.kind:
            # insert the event type after the clock, muted
            head, tail = text[:9], text[9:]
            head.append(f"{line.kind:<18} ", style=self.style_of("event-log--time"))
            return head + tail
        return text

    def _subtitle(self, state: MeshState) -> None:
        shown = f"{self.shown_count} of {len(state.events)}"
        self.border_subtitle = f"{shown} matching “{self.query_text}”" if self.query_text else shown


class EventsView(Vertical):
    """A filter Input above a `FilteredLog`."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "leave_filter", "Leave filter", show=False)]

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter events (substring)…  / to focus, esc to leave",
                    id="event-filter")
        yield FilteredLog(id="all-events")

    def show(self, state: MeshState) -> None:
        """Show the new lines of `state` that match the filter."""
        self.query_one(FilteredLog).show(state)

    def reset(self) -> None:
        """Forget every line (the state was rebuilt)."""
        self.query_one(FilteredLog).reset()

    def on_input_changed(self, message: Input.Changed) -> None:
        if message.input.id == "event-filter":
            message.stop()
            self.query_one(FilteredLog).refilter(message.value)

    def action_leave_filter(self) -> None:
        self.query_one(FilteredLog).focus()
