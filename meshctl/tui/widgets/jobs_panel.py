"""The Overview's top panel: the coordinator's state and plan, and a progress bar per job."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar, Static

from meshctl.tui.state import AnalysisView, JobView, MeshState, coordinator_status, job_eta
from meshctl.tui.widgets._format import fmt_eta, fmt_seconds


class JobRow(Horizontal):
    """One job: its name and round, a progress bar, and its ETA."""

    def __init__(self, job: JobView, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.job = job.name
        self._latest: tuple[JobView, bool] = (job, False)
        """What to show once mounted: the newest (view, lost) asked for before."""

    def on_mount(self) -> None:
        self.show(*self._latest)

    def compose(self) -> ComposeResult:
        yield Label(classes="job-label")
        yield ProgressBar(total=None, show_eta=False, show_percentage=False,
                          classes="job-bar")
        yield Label(classes="job-eta")

    def show(self, job: JobView, lost: bool = False) -> None:
        """Render `job`'s progress (nothing before its parts are mounted); `lost`: the
        coordinator was lost, so nothing is going on and there is no ETA."""
        self._latest = (job, lost)
        if not self.query(".job-eta"):
            return
        total = job.rounds_total or None
        done = job.done  # rounds completed (state.progress)
        total_text = job.rounds_total or "?"
        label = (f"{job.name} {job.unit} {job.current_round}/{total_text} training"
                 if job.state == "training" else f"{job.name} {done}/{total_text} {job.state}")
        live = job.state in ("waiting", "training")
        if lost and live:
            label = f"{job.name} {done}/{total_text} stalled"
        self.query_one(".job-label", Label).update(label)
        self.query_one(".job-bar", ProgressBar).update(total=total or (None if live and not lost else 1),
                                                       progress=done)
        self.query_one(".job-eta", Label).update(fmt_eta(None if lost and live else job_eta(job)))

    @property
    def text(self) -> str:
        """The row's label and ETA as plain text."""
        label = self.query_one(".job-label", Label).render()
        eta = self.query_one(".job-eta", Label).render()
        return f"{_plain(label)} {_plain(eta)}"


class AnalysisRow(JobRow):
    """One analysis: its name and state, a bar (moving while it runs), and what it found."""

    def __init__(self, analysis: AnalysisView, **kwargs: object) -> None:
        Horizontal.__init__(self, **kwargs)  # type: ignore[arg-type]
        self.job = analysis.name
        self._latest = (analysis, False)  # type: ignore[assignment]

    def show(self, analysis: AnalysisView, lost: bool = False) -> None:  # type: ignore[override]
        """Render `analysis` (nothing before its parts are mounted)."""
        self._latest = (analysis, lost)  # type: ignore[assignment]
        if not self.query(".job-eta"):
            return
        live = analysis.state in ("waiting", "running")
        state = "stalled" if lost and live else analysis.state
        self.query_one(".job-label", Label).update(f"analysis {analysis.name} {state}")
        self.query_one(".job-bar", ProgressBar).update(
            total=None if live and not lost else 1, progress=1 if analysis.state == "completed" else 0)
        found = (f"{analysis.groups} groups, {analysis.suppressed} suppressed, "
                 f"{fmt_seconds(analysis.seconds)}" if analysis.state == "completed" else "")
        self.query_one(".job-eta", Label).update(found)


class JobsPanel(Vertical):
    """The coordinator line, then one `JobRow` per job."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._rows: dict[str, JobRow] = {}

    def compose(self) -> ComposeResult:
        yield Static(id="coordinator")

    def on_mount(self) -> None:
        self.border_title = "coordinator and jobs"

    def show(self, state: MeshState) -> None:
        """Render the coordinator's state and every job's progress."""
        line = Text()
        line.append("coordinator ", style="bold").append(coordinator_status(state))
        if state.coordinator_jurisdiction:
            line.append(f"  · {state.coordinator_jurisdiction}")
        if state.plan_hash:
            line.append("  · plan ").append(state.plan_hash.removeprefix("sha256:")[:12])
        self.query_one("#coordinator", Static).update(line)
        for name, job in state.jobs.items():
            row = self._rows.get(name)
            if row is None:
                row = self._rows[name] = JobRow(job)
                self.mount(row)
            row.show(job, lost=state.state == "lost")  # drawn now, or kept for its mount
        for name, analysis in state.analyses.items():
            key = f"analysis:{name}"
            row = self._rows.get(key)
            if row is None:
                row = self._rows[key] = AnalysisRow(analysis)
                self.mount(row)
            row.show(analysis, lost=state.state == "lost")  # type: ignore[arg-type]

    def reset(self) -> None:
        """Remove every job row (the state was rebuilt)."""
        for row in self._rows.values():
            row.remove()
        self._rows.clear()

    @property
    def text(self) -> str:
        """The coordinator line and each job row, as plain text."""
        lines = [_plain(self.query_one("#coordinator", Static).render())]
        lines += [row.text for row in self._rows.values() if row.is_mounted]
        return "\n".join(lines)


def _plain(renderable: object) -> str:
    return renderable.plain if hasattr(renderable, "plain") else str(renderable)
