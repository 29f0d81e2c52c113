"""The question `up`'s dashboard asks when it is closed while the run still goes on.

The question follows the run: when the run ends while it is open, it turns into
"Run R completed. Close the dashboard?" with only Close and Cancel."""

from __future__ import annotations

from typing import ClassVar, Literal

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label

QuitChoice = Literal["stop", "detach", "close"]


class QuitDialog(ModalScreen["QuitChoice | None"]):
    """Stop the run, keep it running in the background, or cancel (dismisses with None);
    once the run has ended: close (dismisses with `close`) or cancel."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "choose('stop')", "Stop the run"),
        Binding("k", "choose('detach')", "Keep running"),
        Binding("q,enter", "choose('close')", "Close", show=False),
        Binding("escape,c", "choose('')", "Cancel"),
    ]

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.outcome = ""
        """How the run ended ('' while it goes on)."""

    def compose(self) -> ComposeResult:
        with Vertical(id="quit-dialog"):
            yield Label(f"{self.named} is still going. Stop it?", id="quit-question")
            with Horizontal(id="quit-buttons"):
                yield Button("Stop the run (s)", id="stop", variant="error")
                yield Button("Keep running (k)", id="detach", variant="primary")
                yield Button("Close (q)", id="close", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    @property
    def named(self) -> str:
        """`Run R`, or `The run` while it has no id yet (asked while `up` was still compiling)."""
        return f"Run {self.run_id}" if self.run_id else "The run"

    def on_mount(self) -> None:
        self.query_one("#close", Button).display = False

    def ended(self, outcome: str) -> None:
        """The run ended (`completed`, `failed: …`) while the question was open: ask to close instead."""
        if outcome == self.outcome:
            return
        self.outcome = outcome
        self.query_one("#quit-question", Label).update(
            f"{self.named} has {outcome}. Close the dashboard?")
        self.query_one("#stop", Button).display = False
        self.query_one("#detach", Button).display = False
        self.query_one("#close", Button).display = True
        self.query_one("#close", Button).focus()
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Stop and keep running only while the run goes on; close only once it has ended."""
        if action == "choose" and parameters:
            return (parameters[0] == "close") == bool(self.outcome) or parameters[0] == ""
        return True

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.action_choose("" if event.button.id == "cancel" else str(event.button.id))

    def action_choose(self, choice: str) -> None:
        """Dismiss with `stop`, `detach`, or None for ''."""
        self.dismiss(choice or None)  # type: ignore[arg-type]
