"""The Rounds tab: the rounds table, the selected round's contributions, and plots."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult, RenderResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable
from textual_plotext import PlotextPlot

from meshctl.tui.state import Contribution, MeshState, RoundRow
from meshctl.tui.widgets._format import MISSING, fmt_bytes, fmt_float, fmt_seconds
from meshctl.tui.widgets.rounds_table import RoundsTable, parse_key

CONTRIBUTION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("domain", "domain"), ("examples", "examples"), ("loss", "loss"),
    ("norm", "norm"), ("seconds", "secs"), ("bytes", "bytes"),
)
"""(column key, label) in display order."""


class ContributionTable(DataTable[str]):
    """Each domain's update in one round and, once the round is evaluated, each domain's own test
    metrics with the holdout examples behind them (`test n` and `test <metric>` columns)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", **kwargs)  # type: ignore[arg-type]
        self.round: tuple[str, int] | None = None
        """(job, round) shown, or None before the first update."""
        self._metrics: list[str] = []

    def on_mount(self) -> None:
        self.border_title = "contributions"
        for key, label in CONTRIBUTION_COLUMNS:
            self.add_column(label, key=key)

    def show(self, state: MeshState, job_round: tuple[str, int] | None) -> None:
        """Show the contributions of `job_round` (job, round) from `state`, and its per-domain metrics."""
        self.round = job_round
        updates = state.contributions.get(job_round, []) if job_round else []
        done = next((r for r in reversed(state.rounds) if (r.job, r.round) == job_round), None)
        evals = done.domain_metrics if done is not None else {}
        names = list(dict.fromkeys(k for m in evals.values() for k in m))
        if names != self._metrics:
            self.clear(columns=True)
            for key, label in CONTRIBUTION_COLUMNS:
                self.add_column(label, key=key)
            if names:
                self.add_column("test n", key="test_examples")
            for name in names:
                self.add_column(f"test {name}", key=f"test_{name}")
            self._metrics = names
        else:
            self.clear()
        for i, c in enumerate(updates):
            self.add_row(*contribution_cells(c), *_eval_cells(done, c.domain, names), key=f"{i}/{c.domain}")
        shown = {c.domain for c in updates}
        for domain in evals:  # evaluated the round without an update in it
            if domain not in shown:
                self.add_row(domain, *[MISSING] * (len(CONTRIBUTION_COLUMNS) - 1),
                             *_eval_cells(done, domain, names), key=f"eval/{domain}")
        self.border_title = f"round {job_round[1]}" if job_round else "contributions"

    @property
    def plain_rows(self) -> list[list[str]]:
        """The rows as plain text, top to bottom (for tests)."""
        return [[str(c) for c in self.get_row_at(i)] for i in range(self.row_count)]


def _eval_cells(done: RoundRow | None, domain: str, names: list[str]) -> tuple[str, ...]:
    """A domain's `test n` and metric cells (none when the round has no per-domain metrics)."""
    if not names or done is None:
        return ()
    values = done.domain_metrics.get(domain, {})
    n = done.domain_examples.get(domain)
    return (MISSING if n is None else str(n), *(fmt_float(values.get(m)) for m in names))


def contribution_cells(c: Contribution) -> tuple[str, ...]:
    """A contribution's cells, in `CONTRIBUTION_COLUMNS` order."""
    return (c.domain, str(c.examples), fmt_float(c.loss), fmt_float(c.update_norm),
            fmt_seconds(c.seconds), fmt_bytes(c.bytes))


class RoundPlot(PlotextPlot):
    """A line plot of some per-round series of one job."""

    series: dict[str, tuple[list[int], list[float]]] = {}  # noqa: RUF012 (replaced, never mutated)
    """What is plotted now: label -> (rounds, values)."""
    _title = ""

    def plot(self, title: str, series: dict[str, tuple[list[int], list[float]]]) -> None:
        """Replace the plot with `series` (label -> (rounds, values))."""
        self.series = series
        self._title = title
        self.best = best_round(series)
        xs = sorted({x for x, _ in series.values() for x in x})
        self.ticks = tuple(round_ticks(xs[0], xs[-1])) if xs else ()
        self.refresh()

    def render(self) -> RenderResult:
        """The figure drawn afresh at this size: plotext keeps state from earlier draws (ticks
        chosen for an older size), so the same series at the same size must not depend on which
        sizes the widget passed through while the layout settled."""
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        series = self.series
        plt.title(self._title)
        for label, (xs, ys) in series.items():
            if xs:
                plt.plot(xs, ys, label=label, marker="braille")
        ys = [y for _, values in series.values() for y in values]
        if self.ticks:
            plt.xticks(list(self.ticks), [str(t) for t in self.ticks])
        if ys:  # headroom on top: the legend (top left) sits above the curves, not on them
            lo, hi = min(ys), max(ys)
            span = (hi - lo) or abs(hi) or 1.0
            plt.ylim(lo - span * 0.05, hi + span * 0.45)
        if self.best:
            plt.vline(self.best[0], "green")
        plt.xlabel(f"round (best {self.best[0]})" if self.best else "round")
        return super().render()

    best: tuple[int, str] | None = None
    """(round, series) of the best value plotted, or None."""
    ticks: tuple[int, ...] = ()
    """The round ticks on the x axis (integers)."""


def round_ticks(first: int, last: int, most: int = 5) -> list[int]:
    """At most `most` integer ticks from `first` to `last`, both ends included, never closer than
    one step: two labels closer than that would collide on a narrow plot, and which one plotext
    then drops is not something to leave to it."""
    if last <= first:
        return [first]
    step = max(1, -(-(last - first) // (most - 1)))
    ticks = list(range(first, last, step))
    return ticks + [last] if last - ticks[-1] >= step or len(ticks) == 1 else ticks[:-1] + [last]


_LOWER = ("loss", "error", "mse", "mae", "rmse")


def best_round(series: dict[str, tuple[list[int], list[float]]]) -> tuple[int, str] | None:
    """(round, series): where the first series worth judging is best: the test loss (lowest), else
    the first metric (lowest for a loss or an error, else highest). None when nothing is plotted."""
    names = [n for n, (xs, _) in series.items() if xs]
    if not names:
        return None
    name = "test" if "test" in names else names[0]
    xs, ys = series[name]
    lower = name in ("test", "train") or any(w in name.lower() for w in _LOWER)
    i = min(range(len(ys)), key=lambda k: (ys[k] if lower else -ys[k], xs[k]))
    return xs[i], name


def loss_series(rows: list[RoundRow]) -> dict[str, tuple[list[int], list[float]]]:
    """Train loss and test loss per round."""
    xs = [r.round for r in rows]
    out = {"train": (xs, [r.train_loss for r in rows])}
    test = [(r.round, r.metrics.get("loss", r.metrics.get("test_loss"))) for r in rows]
    pts = [(x, y) for x, y in test if y is not None]
    out["test"] = ([x for x, _ in pts], [float(y) for _, y in pts])
    return out


def metric_series(rows: list[RoundRow]) -> dict[str, tuple[list[int], list[float]]]:
    """Every test metric except the loss, per round."""
    names = sorted({k for r in rows for k in r.metrics} - {"loss", "test_loss"})
    return {n: ([r.round for r in rows if n in r.metrics],
                [r.metrics[n] for r in rows if n in r.metrics]) for n in names}


class RoundsView(Vertical):
    """Rounds table on top; contributions of the selected round and two plots below."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.picked: tuple[str, int] | None = None
        """The round the user selected (Enter or click); None follows the newest."""
        self._state: MeshState | None = None
        self._plotted: tuple[str, int] = ("", -1)

    def compose(self) -> ComposeResult:
        yield RoundsTable(id="rounds")
        with Horizontal(id="round-detail"):
            yield ContributionTable(id="contributions")
            yield RoundPlot(id="loss-plot")
            yield RoundPlot(id="metric-plot")

    def show(self, state: MeshState) -> None:
        """Render `state`: new rounds, the shown round's contributions, and the plots."""
        self._state = state
        self.query_one(RoundsTable).show(state)
        target = self.picked or _newest(state)
        self.query_one(ContributionTable).show(state, target)
        job = target[0] if target else next(iter(state.jobs), "")
        rows = state.jobs[job].rounds if job in state.jobs else []
        if self._plotted != (job, len(rows)):
            self._plotted = (job, len(rows))
            self.query_one("#loss-plot", RoundPlot).plot(f"{job} loss", loss_series(rows))
            self.query_one("#metric-plot", RoundPlot).plot(f"{job} metrics", metric_series(rows))

    def reset(self) -> None:
        """Forget the rows (the state was rebuilt); keep the picked round if it still exists."""
        self.query_one(RoundsTable).reset()
        self._plotted = ("", -1)

    @on(DataTable.RowSelected, "#rounds")
    def _pick(self, message: DataTable.RowSelected) -> None:
        self.picked = parse_key(message.row_key.value or "")
        if self._state is not None:
            self.query_one(ContributionTable).show(self._state, self.picked)


def _newest(state: MeshState) -> tuple[str, int] | None:
    """(job, round) of the newest round any domain has sent an update for."""
    return next(reversed(state.contributions), None) if state.contributions else None
