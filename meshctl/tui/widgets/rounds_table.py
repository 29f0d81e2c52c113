"""The rounds table: one row per completed round of every job."""

from __future__ import annotations

from textual import events
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
    """Appends a row for every `round_completed` it has not shown yet.

    The cursor stays on the newest row, in view, unless the user moved it elsewhere."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self._shown = 0
        self.following = True
        """Keep the newest row in view (until the user scrolls the table with the mouse)."""

    def on_mount(self) -> None:
        self.border_title = "rounds"
        for key, label in COLUMNS:
            self.add_column(label, key=key)

    def show(self, state: MeshState) -> None:
        """Add the rounds of `state` that are not in the table yet; follow the newest."""
        new = state.rounds[self._shown:]
        if not new:
            return
        follow = self.cursor_row >= self.row_count - 1
        for row in new:
            self.add_row(*cells(row), key=row_key(row, self._shown))
            self._shown += 1
        if follow:
            # the rows' height is only known once the table has measured them (on idle), and a
            # scrollbar may come with them: put the cursor there now, scroll once they are laid out
            self.move_cursor(row=self.row_count - 1, scroll=False)
            self.following = True

    async def _on_idle(self, event: events.Idle) -> None:
        await super()._on_idle(event)
        if (self.following and not self._require_update_dimensions and self.row_count
                and self.cursor_row == self.row_count - 1 and not self.cursor_in_view):
            self.scroll_to(y=self.max_scroll_y, animate=False, immediate=True, force=True)

    def on_mouse_scroll_up(self) -> None:
        self.following = False

    def on_mouse_scroll_down(self) -> None:
        self.following = False

    @property
    def cursor_in_view(self) -> bool:
        """Whether the cursor's row is inside the table's visible rows."""
        top = self.scroll_offset.y
        return top <= self.cursor_row < top + self.scrollable_content_region.height - self.header_height

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
