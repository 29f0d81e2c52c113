"""The event log: one line per event, colored by level."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.widgets import RichLog

from meshctl.tui.state import LogLine, MeshState
from meshctl.tui.widgets._format import fmt_clock

LEVELS = ("info", "warning", "error")


class EventLog(RichLog):
    """Writes the lines of a `MeshState` it has not written yet."""

    COMPONENT_CLASSES: ClassVar[set[str]] = (
        {f"event-log--{level}" for level in LEVELS} | {"event-log--time", "event-log--summary"})

    def __init__(self, **kwargs: object) -> None:
        super().__init__(max_lines=2000, wrap=False, markup=False, highlight=False,
                         **kwargs)  # type: ignore[arg-type]
        self._written = 0

    def on_mount(self) -> None:
        self.border_title = "events"

    def show(self, state: MeshState) -> None:
        """Write the state's lines past the last one written."""
        for line in state.events:
            if line.index > self._written:
                self.write(self.render_line_text(line))
                self._written = line.index

    def render_line_text(self, line: LogLine) -> Text:
        """`HH:MM:SS text`, styled by level (and `summary` lines in bold)."""
        level = line.level if line.level in LEVELS else "info"
        style = self.get_component_rich_style(f"event-log--{level}", partial=True)
        if line.kind == "summary":
            style += self.get_component_rich_style("event-log--summary", partial=True)
        text = Text(fmt_clock(line.ts), style=self.get_component_rich_style(
            "event-log--time", partial=True))
        text.append(" ")
        text.append(line.text, style=style)
        return text

    @property
    def plain_lines(self) -> list[str]:
        """The written lines as plain text (what a test or a copy would read)."""
        return [strip.text.rstrip() for strip in self.lines]
