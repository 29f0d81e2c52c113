"""The rounds table: one row per completed round of every job."""

from __future__ import annotations

from textual.widgets import DataTable

from meshctl.tui.state import MeshState, RoundRow
from meshctl.tui.widgets._format import MISSING, fmt_bytes, fmt_float, fmt_seconds

COLUMNS: tuple[tuple[str, str], ...] = (
    ("job", "job"), ("round", "round"), ("participants", "parts"),
    ("train_loss", "train loss"), ("accuracy", "accuracy"), ("test_loss", "test loss"),
    ("bytes_in", "bytes in"), ("bytes_out", "bytes out"), ("seconds", "seconds"),
    ("epsilon", "ε"),
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
        follow = self.cursor_row >= self.row_count - 1
        for row in new:
            self.add_row(*cells(row), key=row_key(row, self._shown))
            self._shown += 1
        if new and follow:
            self.move_cursor(row=self.row_count - 1)

    def reset(self) -> None:
        """Forget every row (the state was rebuilt)."""
        self.clear()
        self._shown = 0

    def selected(self) -> tuple[str, int] | None:
        """(job, round) of the row under the cursor, or None for an empty table."""
        if not self.row_count:
            return None
        key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value or ""
        return parse_key(key)


def row_key(row: RoundRow, index: int) -> str:
    """A unique row key that still says which job and round it is."""
    return f"{row.job}/{row.round}/{index}"


def parse_key(key: str) -> tuple[str, int]:
    """(job, round) of a `row_key`."""
    job, rnd, _ = key.rsplit("/", 2)
    return job, int(rnd)


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
        MISSING if row.epsilon is None else f"{row.epsilon:.2f}",
    )
