"""The help screen `?` and F1 open: every key of the screen under it, read from its bindings.

The rows are built from `Screen.active_bindings` when the help opens (the app's keys, the
screen's and the focused widget's, as Textual itself resolves them), so the help cannot drift
from what the keys do. Escape (or `?`, F1, q) closes it."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label

if TYPE_CHECKING:
    from textual.app import App
    from textual.screen import Screen


def key_rows(app: App[object], screen: Screen[object]) -> list[tuple[str, str]]:
    """(key, what it does) for every enabled key of `screen`, one row per key: the app's keys first
    (in binding order), then the screen's, then the focused widget's."""
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    bindings = screen.active_bindings
    rank = {id(app): 0, id(screen): 1}
    for key, active in sorted(bindings.items(), key=lambda kv: rank.get(id(kv[1].node), 2)):
        binding = active.binding
        if not active.enabled or key in seen or binding.system:
            continue
        seen.add(key)
        what = binding.description or binding.action.replace("_", " ")
        rows.append((app.get_key_display(binding), what))
    return rows


class HelpScreen(ModalScreen[None]):
    """A table of the keys of the screen under it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,question_mark,f1,q", "close", "Close help"),
    ]

    def __init__(self, title: str, rows: list[tuple[str, str]]) -> None:
        super().__init__()
        self.title_text = title
        self.rows = rows

    def compose(self) -> ComposeResult:
        with Vertical(id="help-dialog"):
            yield Label(f"Keys: {self.title_text}   (esc closes)", id="help-title")
            table: DataTable[str] = DataTable(id="help-keys", cursor_type="row", zebra_stripes=True)
            table.add_columns("key", "does")
            for key, what in self.rows:
                table.add_row(key, what)
            yield table

    def action_close(self) -> None:
        """Close the help."""
        self.dismiss(None)
