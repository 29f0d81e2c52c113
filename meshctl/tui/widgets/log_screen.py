"""The log viewer `l` opens: the coordinator's log and each domain's, as `meshctl logs` reads them.

The files are `<run>/logs/coordinator.log` and `<run>/logs/DOMAIN.log` (coordinator first, then
the domains by name). The list on the left picks one; the right shows its lines and follows
new ones (the file is polled every `poll_s` for complete lines) while the screen is open.
Escape goes back to the dashboard."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Label, OptionList, RichLog
from textual.widgets.option_list import Option

LOGS_DIR = "logs"
COORDINATOR_LOG = "coordinator.log"
MAX_LINES = 20_000
"""Lines the viewer keeps (the oldest go first); the file itself is untouched."""


def run_logs(run_dir: Path | None) -> list[Path]:
    """The run's log files, the coordinator's first; empty when there are none."""
    if run_dir is None:
        return []
    present = [p for p in (run_dir / LOGS_DIR).glob("*.log") if p.is_file()]
    return sorted(present, key=lambda p: (p.name != COORDINATOR_LOG, p.name))


def log_label(path: Path) -> str:
    """`coordinator` or `domain NAME`."""
    return "coordinator" if path.name == COORDINATOR_LOG else f"domain {path.stem}"


class LogScreen(Screen[None]):
    """One run's logs: pick a file on the left, read (and follow) it on the right."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,l", "close", "Back"),
        Binding("f", "toggle_follow", "Follow"),
    ]

    def __init__(self, files: list[Path], shown: Path | None = None, *, poll_s: float = 0.5) -> None:
        super().__init__()
        self.files = files
        self.shown = shown if shown in files else (files[0] if files else None)
        """The file on the right."""
        self.poll_s = poll_s
        self.follow = True
        """Whether new lines are read as they are written."""
        self._offset = 0
        self._lines: deque[str] = deque(maxlen=MAX_LINES)

    def compose(self) -> ComposeResult:
        yield Label(id="log-title")
        with Horizontal(id="log-body"):
            yield OptionList(*(Option(p.stem, id=p.name) for p in self.files), id="log-files")
            yield RichLog(id="log-lines", max_lines=MAX_LINES, wrap=True, min_width=20, markup=False,
                          highlight=False)
        yield Footer()

    def on_mount(self) -> None:
        files = self.query_one("#log-files", OptionList)
        if self.shown is not None:
            files.highlighted = self.files.index(self.shown)
        self._load()
        self.set_interval(self.poll_s, self.poll)
        self.query_one("#log-lines", RichLog).focus()

    def on_option_list_option_highlighted(self, message: OptionList.OptionHighlighted) -> None:
        path = self.files[message.option_index]
        if path != self.shown:
            self.shown = path
            self._load()

    def _load(self) -> None:
        self.query_one("#log-lines", RichLog).clear()
        self._lines.clear()
        self._offset = 0
        self.poll()
        self._title()

    def _title(self) -> None:
        if self.shown is None:
            text = "no log files"
        else:
            follow = "following" if self.follow else "paused (f follows)"
            text = f"{log_label(self.shown)}: {self.shown.parent.name}/{self.shown.name}  · {follow}"
        self.query_one("#log-title", Label).update(text)

    def poll(self) -> int:
        """Read the complete lines written since the last read; how many there were."""
        if self.shown is None or (not self.follow and self._offset):
            return 0
        try:
            with self.shown.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return 0
        end = data.rfind(b"\n") + 1
        if not end:
            return 0
        self._offset += end
        lines = data[:end].decode("utf-8", errors="replace").splitlines()
        log = self.query_one("#log-lines", RichLog)
        for line in lines:
            log.write(Text(line))  # plain text: a log line is never read as markup
        self._lines.extend(lines)
        return len(lines)

    @property
    def lines(self) -> list[str]:
        """The lines shown now."""
        return list(self._lines)

    def action_toggle_follow(self) -> None:
        """Stop or resume reading new lines."""
        self.follow = not self.follow
        self._title()
        if self.follow:
            self.poll()

    def action_close(self) -> None:
        """Back to the dashboard."""
        self.dismiss(None)
