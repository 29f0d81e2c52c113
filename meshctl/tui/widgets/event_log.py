"""The event log: one line per event, colored by level."""

from __future__ import annotations

from typing import ClassVar

from rich.style import Style
from rich.text import Text
from textual.widgets import RichLog

from meshctl.tui.state import LogLine, MeshState
from meshctl.tui.widgets._format import fmt_clock

LEVELS = ("info", "warning", "error")


class EventLog(RichLog):
    """Writes the lines of a `MeshState` it has not written yet."""

    COMPONENT_CLASSES: ClassVar[set[str]] = (
        {f"event-log--{level}" for level in LEVELS} | {"event-log--time", "event-log--summary"})

    MAX_WRITE: ClassVar[int] = 60
    """At most this many new lines are written per redraw (the newest; a burst skips older
    ones here, never in the Events tab)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(max_lines=2000, wrap=False, markup=False, highlight=False,
                         **kwargs)  # type: ignore[arg-type]
        self._written = 0
        self._styles: dict[str, Style] = {}
        self._state: MeshState | None = None

    def on_mount(self) -> None:
        self.border_title = "events"
        self.anchor()  # the newest line stays in view however the layout settles (a panel above it
        # shown in the same redraw), until the user scrolls up

    @property
    def on_view(self) -> bool:
        """Whether the log takes space on the screen now (hidden tabs write when shown)."""
        return self.region.height > 0

    def show(self, state: MeshState) -> None:
        """Write the state's lines past the last one written (only while on view)."""
        self._state = state
        if not self.on_view:  # not laid out yet, or on a hidden tab: try once after the refresh
            if self.is_mounted:
                self.call_after_refresh(self._show_if_on_view)
            return
        self._styles = {}
        new = [line for line in state.events if line.index > self._written]
        for line in new[-self.MAX_WRITE:]:
            self.write(self.render_line_text(line))
        if new:
            self._written = new[-1].index

    def _show_if_on_view(self) -> None:
        if self._state is not None and self.on_view:
            self.show(self._state)

    def on_resize(self) -> None:
        if self._state is not None:
            self.show(self._state)

    def reset(self) -> None:
        """Forget every line (the state was rebuilt)."""
        self.clear()
        self._written = 0

    def render_line_text(self, line: LogLine) -> Text:
        """`HH:MM:SS text`, styled by level (and `summary` lines in bold)."""
        level = line.level if line.level in LEVELS else "info"
        style = self.style_of(f"event-log--{level}")
        if line.kind == "summary":
            style += self.style_of("event-log--summary")
        text = Text(fmt_clock(line.ts), style=self.style_of("event-log--time"))
        text.append(" ")
        text.append(line.text, style=style)
        return text

    def style_of(self, component: str) -> Style:
        """A component class's style, looked up once per redraw."""
        if component not in self._styles:
            self._styles[component] = self.get_component_rich_style(component, partial=True)
        return self._styles[component]

    @property
    def plain_lines(self) -> list[str]:
        """The written lines as plain text (what a test or a copy would read)."""
        return [strip.text.rstrip() for strip in self.lines]
