"""The question `j` asks in a replay: which round to jump to."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label


class JumpDialog(ModalScreen["int | None"]):
    """Asks for a round 0..`rounds` (0: the start); dismisses with it, or None on escape."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, rounds: int, current: int) -> None:
        super().__init__()
        self.rounds = rounds
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="jump-dialog"):
            yield Label(f"Jump to round (0-{self.rounds}, now {self.current}), enter; esc cancels",
                        id="jump-question")
            yield Input(placeholder=f"0-{self.rounds}", type="integer", id="jump-round")
            yield Label("", id="jump-error")

    def on_input_submitted(self, message: Input.Submitted) -> None:
        text = message.value.strip()
        if not text.isdigit() or int(text) > self.rounds:
            self.query_one("#jump-error", Label).update(f"no round {text or '(empty)'}: 0-{self.rounds}")
            return
        self.dismiss(int(text))

    def action_cancel(self) -> None:
        """Close without jumping."""
        self.dismiss(None)
