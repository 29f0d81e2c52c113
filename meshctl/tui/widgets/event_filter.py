"""The Events tab: every event of the run, filtered by what is typed into an Input.

The list is virtual: it keeps every line of the run (none is dropped) and renders only
the rows on screen, so a 3,000-event run fills the tab at once. A filter is words and
fields, all of which a line must match:

- `kind:policy` (the event type contains it), `domain:charite`, `job:malignancy`
  (contain it, case-insensitive), `round:3` or `round:3-5`;
- any other word: the shown line contains it (case-insensitive).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import Input

from meshctl.tui.state import LogLine, MeshState
from meshctl.tui.widgets._format import fmt_clock

LEVELS = ("info", "warning", "error")
FIELDS = ("kind", "domain", "job", "round")
"""The fields a filter may name (`field:value`)."""


def line_text(line: LogLine) -> str:
    """A log line as the Events tab shows it (and as the filter's words match it)."""
    kind = f"{line.kind:<18} " if line.kind else ""
    return f"{fmt_clock(line.ts)} {kind}{line.text}"


@dataclass(frozen=True)
class EventFilter:
    """A parsed filter: field values and free words, all of which must match."""

    words: tuple[str, ...] = ()
    fields: dict[str, str] = field(default_factory=dict)
    rounds: tuple[int, int] | None = None

    @classmethod
    def parse(cls, query: str) -> EventFilter:
        """`kind:policy domain:charite round:3-5 deny` -> a filter; unknown `x:y` is a word."""
        words: list[str] = []
        fields: dict[str, str] = {}
        rounds: tuple[int, int] | None = None
        for token in query.casefold().split():
            name, sep, value = token.partition(":")
            if sep and name == "type":
                name = "kind"
            if sep and name == "round" and _round_range(value) is not None:
                rounds = _round_range(value)
            elif sep and name in FIELDS and name != "round" and value:
                fields[name] = value
            else:
                words.append(token)
        return cls(tuple(words), fields, rounds)

    def __call__(self, line: LogLine) -> bool:
        """Whether `line` matches every part of the filter."""
        for name, value in self.fields.items():
            if value not in str(getattr(line, name)).casefold():
                return False
        if self.rounds is not None and not self.rounds[0] <= line.round <= self.rounds[1]:
            return False
        if self.words:
            text = line_text(line).casefold()
            return all(w in text for w in self.words)
        return True


def _round_range(value: str) -> tuple[int, int] | None:
    low, _, high = value.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        return None


def matches(lines: Iterable[LogLine], query: str) -> list[LogLine]:
    """The lines that match `query` (see the module's doc); all of them for ''."""
    keep = EventFilter.parse(query)
    return [ln for ln in lines if keep(ln)]


class FilteredLog(ScrollView, can_focus=True):
    """Every line of a `MeshState` that matches its query, the event type shown; virtual."""

    COMPONENT_CLASSES: ClassVar[set[str]] = (
        {f"event-log--{level}" for level in LEVELS} | {"event-log--time", "event-log--summary"})

    CACHE_LINES: ClassVar[int] = 2000
    """Rendered rows kept (rendering is the costly part; only rows on screen are rendered)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.query_text = ""
        self.shown: list[LogLine] = []
        """The lines that match the query, oldest first."""
        self._filter = EventFilter()
        self._seen = 0
        self._state: MeshState | None = None
        self._width = 0
        self._cache: dict[int, Strip] = {}
        self._styles: dict[str, Style] = {}
        self.following = True
        """Whether the view stays on the newest line (until the user scrolls away from it)."""

    def on_mount(self) -> None:
        self.border_title = "all events"

    @property
    def shown_count(self) -> int:
        """Lines that match the current query."""
        return len(self.shown)

    def show(self, state: MeshState) -> None:
        """Take in the new lines of `state` that match the query (nothing is rendered here)."""
        if state is not self._state or len(state.events) < self._seen:
            self._state, self._seen = state, 0
            self.shown = []
        new = state.events[self._seen:]
        self._seen = len(state.events)
        keep = self._filter
        added = [ln for ln in new if keep(ln)]
        if added:
            if self.size.height > 0:  # on screen: follow the end only if the user is there
                self.following = self.scroll_offset.y >= self.max_scroll_y
            self.shown.extend(added)
            self._width = max(self._width, *(len(line_text(ln)) for ln in added))
            self.virtual_size = Size(self._width, len(self.shown))
            if self.following:
                self._to_end()
            self.refresh()
        self._subtitle(state)

    def refilter(self, query: str) -> None:
        """Show only the lines matching `query`, from the start of the run."""
        self.query_text = query
        self._filter = EventFilter.parse(query)
        state, self._state = self._state, None
        self._width = 0
        self.shown = []
        self.virtual_size = Size(0, 0)
        if state is not None:
            self.show(state)
        self.following = True
        self._to_end()
        self.refresh()

    def on_resize(self) -> None:
        if self.following:  # shown for the first time, or resized: the newest lines in view
            self.call_after_refresh(self._to_end)

    def _to_end(self) -> None:
        self.scroll_to(y=self.max_scroll_y, animate=False, immediate=True, force=True)

    def reset(self) -> None:
        """Forget every line (the state was rebuilt)."""
        self._state, self._seen, self._width = None, 0, 0
        self.shown = []
        self.virtual_size = Size(0, 0)
        self.refresh()

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._cache.clear()
        self._styles = {}

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width
        index = scroll_y + y
        if index >= len(self.shown):
            return Strip.blank(width, self.rich_style)
        line = self.shown[index]
        strip = self._cache.get(line.index)
        if strip is None:
            if len(self._cache) >= self.CACHE_LINES:
                self._cache.clear()
            segments = self.render_line_text(line).render(self.app.console)
            strip = Strip([s for s in segments if s.text != "\n"] or [Segment("")])
            self._cache[line.index] = strip
        return strip.crop_extend(scroll_x, scroll_x + width, self.rich_style)

    def render_line_text(self, line: LogLine) -> Text:
        """`HH:MM:SS kind text`, styled by level (and `summary` lines in bold)."""
        level = line.level if line.level in LEVELS else "info"
        style = self.style_of(f"event-log--{level}")
        if line.kind == "summary":
            style += self.style_of("event-log--summary")
        muted = self.style_of("event-log--time")
        text = Text(fmt_clock(line.ts), style=muted, no_wrap=True, end="")
        text.append(" ")
        if line.kind:
            text.append(f"{line.kind:<18} ", style=muted)
        text.append(line.text, style=style)
        return text

    def style_of(self, component: str) -> Style:
        """A component class's style, looked up once per theme."""
        if component not in self._styles:
            self._styles[component] = self.get_component_rich_style(component, partial=True)
        return self._styles[component]

    @property
    def plain_lines(self) -> list[str]:
        """Every matching line as plain text (what a test or a copy would read)."""
        return [line_text(ln).rstrip() for ln in self.shown]

    def _subtitle(self, state: MeshState) -> None:
        shown = f"{len(self.shown)} of {len(state.events)}"
        self.border_subtitle = f"{shown} matching “{self.query_text}”" if self.query_text else shown


class EventsView(Vertical):
    """A filter Input above a `FilteredLog`."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "leave_filter", "Leave filter", show=False)]

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter: words, kind: domain: job: round:3-5  (/ focus, esc leave)",
                    id="event-filter")
        yield FilteredLog(id="all-events")

    def show(self, state: MeshState) -> None:
        """Take in the new lines of `state` that match the filter."""
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
