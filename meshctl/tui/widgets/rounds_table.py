"""The rounds table: one row per completed round of every job."""

from __future__ import annotations

from textual.widgets import DataTable

from meshctl.tui.state import MeshState, RoundRow
from meshctl.tui.widgets._format import fmt_bytes, fmt_float, fmt_seconds

COLUMNS: tuple[tuple[str, str], ...] = (
    ("job", "job"), ("round", "round"), ("participants", "parts"),
    ("train_loss", "train loss"), ("accuracy", "accuracy"), ("test_loss", "test loss"),
    ("bytes_in", "bytes in"), ("bytes_out", "bytes out"), ("seconds", "seconds"),
)
"""(column key, label) in display order."""


class RoundsTable(DataTable[str]):
    """Appends a row for every `round_completed` it has not shown yet."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self._shown = 0

    def on_mount(self) -> None:
        self.border_title = "rounds"
        for key, label in COLUMNS:
            self.add_column(label, key=key)

    def show(self, state: MeshState) -> None:
        """Add the rounds of `state` that are not in the table yet; follow the newest."""
        new = state.rounds[self._shown:]
        for row in new:
            self.add_row(*cells(row), key=f"{row.job}/{row.round}/{self._shown}")
            self._shown += 1
        if new and (self.cursor_row >= self.row_count - len(new) - 1):
            self.move_cursor(row=self.row_count - 1)


def cells(row: RoundRow) -> tuple[str, ...]:
    """A round's cells, in `COLUMNS` order."""
    test_loss = row.metrics.get("loss", row.metrics.get("test_loss"))
    return (
        row.job,
        f"{row.round}/{row.rounds}",
        str(row.participants),
        fmt_float(row.train_loss),
        fmt_float(row.metrics.get("accuracy")),
        fmt_float(test_loss),
        fmt_bytes(row.bytes_in),
        fmt_bytes(row.bytes_out),
        fmt_seconds(row.seconds),
    )
