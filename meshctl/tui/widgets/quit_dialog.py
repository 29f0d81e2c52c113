"""The question `up`'s dashboard asks when it is closed while the run still goes on."""

from __future__ import annotations

from typing import ClassVar, Literal

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label

QuitChoice = Literal["stop", "detach"]


class QuitDialog(ModalScreen["QuitChoice | None"]):
    """Stop the run, keep it running in the background, or cancel (dismisses with None)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "choose('stop')", "Stop the run"),
        Binding("k", "choose('detach')", "Keep running"),
        Binding("escape,c", "choose('')", "Cancel"),
    ]

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id

    def compose(self) -> ComposeResult:
        with Vertical(id="quit-dialog"):
            yield Label(f"Run {self.run_id or ''} is still going. Stop it?", id="quit-question")
            with Horizontal(id="quit-buttons"):
                yield Button("Stop the run (s)", id="stop", variant="error")
                yield Button("Keep running (k)", id="detach", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.action_choose("" if event.button.id == "cancel" else str(event.button.id))

    def action_choose(self, choice: str) -> None:
        """Dismiss with `stop`, `detach`, or None for ''."""
        self.dismiss(choice or None)  # type: ignore[arg-type]
