"""The Overview's top panel: the coordinator's state and plan, and a progress bar per job."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar, Static

from meshctl.tui.state import JobView, MeshState, coordinator_status, job_eta
from meshctl.tui.widgets._format import fmt_eta


class JobRow(Horizontal):
    """One job: its name and round, a progress bar, and its ETA."""

    def __init__(self, job: JobView, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.job = job.name
        self._first = job

    def on_mount(self) -> None:
        self.show(self._first)

    def compose(self) -> ComposeResult:
        yield Label(classes="job-label")
        yield ProgressBar(total=None, show_eta=False, show_percentage=False,
                          classes="job-bar")
        yield Label(classes="job-eta")

    def show(self, job: JobView) -> None:
        """Render `job`'s progress (nothing before its parts are mounted)."""
        if not self.query(".job-eta"):
            return
        total = job.rounds_total or None
        done = job.rounds[-1].round if job.rounds else 0
        if job.state == "completed":
            done = job.rounds_total or done
        total_text = job.rounds_total or "?"
        label = (f"{job.name} round {job.current_round}/{total_text} training"
                 if job.state == "training" else f"{job.name} {done}/{total_text} {job.state}")
        self.query_one(".job-label", Label).update(label)
        self.query_one(".job-bar", ProgressBar).update(total=total, progress=done)
        self.query_one(".job-eta", Label).update(fmt_eta(job_eta(job)))

    @property
    def text(self) -> str:
        """The row's label and ETA as plain text."""
        label = self.query_one(".job-label", Label).render()
        eta = self.query_one(".job-eta", Label).render()
        return f"{_plain(label)} {_plain(eta)}"


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
                self._rows[name] = JobRow(job)
                self.mount(self._rows[name])
            elif row.is_mounted:
                row.show(job)

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
