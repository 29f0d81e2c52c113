"""The top bar: which mesh, which run, which plan, and how the run stands."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Static

from meshctl.tui.state import MeshState, progress
from meshctl.tui.widgets._format import fmt_seconds

_STATES = ("starting", "running", "completed", "failed", "lost", "replay")


class RunHeader(Horizontal):
    """Mesh name, run id and plan hash on the left; the run's state on the right."""

    def compose(self) -> ComposeResult:
        yield Static(id="run-info")
        yield Static(id="run-state")

    def show(self, state: MeshState, replay: str = "") -> None:
        """Render `state` into the bar; `replay` (`replay playing`, `replay paused`, …) marks a replay."""
        if not self.query("#run-info") or not self.query("#run-state"):
            return  # not composed yet, or the app is closing (a clock tick can come in between)
        info = Text(no_wrap=True, overflow="ellipsis")  # a narrow terminal cuts the run line, never
        info.append(state.mesh or state.phase or "(waiting for run)", style="bold")  # wraps it over the job line
        if state.run_id:
            info.append("  run ").append(state.run_id, style="bold")
        if state.plan_hash:
            info.append("  plan ").append(state.plan_hash.removeprefix("sha256:")[:12])
        info.append("\n")
        info.append(self._jobs_line(state))
        self.query_one("#run-info", Static).update(info)

        label = state.state.upper()
        if state.state == "lost":
            label = "COORDINATOR LOST"
        # a failed run's reason is in the FailureBanner under the header, whole (here it squeezed
        # the run line out)
        if state.seconds is not None:
            label += f" ({fmt_seconds(state.seconds)})"
        shown = state.state
        if replay:  # a replay is never live: say so, and how the recorded run ended once it has
            ended = state.state in ("completed", "failed")
            label = f"REPLAY · {label}" if ended else replay.upper().replace("REPLAY ", "REPLAY · ")
            shown = state.state if ended else "replay"
        badge = self.query_one("#run-state", Static)
        badge.update(Text(label))
        for name in _STATES:
            badge.set_class(shown == name, f"-{name}")

    @staticmethod
    def _jobs_line(state: MeshState) -> str:
        lost = state.state == "lost"  # a job of a lost coordinator is stalled, not training
        parts = [f"{job.name} {progress(job)}/{job.rounds_total or '?'} "
                 + ("stalled" if lost and job.state in ("waiting", "training") else job.state)
                 for job in state.jobs.values()]
        parts += [f"analysis {a.name} {a.state}" for a in state.analyses.values()]
        extra = []
        if state.rejected:
            extra.append(f"{state.rejected} rejected")
        if state.skipped:
            extra.append(f"{state.skipped} skipped")
        return "  ".join(parts or ["no jobs yet"]) + ("  · " + ", ".join(extra) if extra else "")

    @property
    def text(self) -> str:
        """The bar's plain text (both parts), for tests and screen readers."""
        info = self.query_one("#run-info", Static).render()
        badge = self.query_one("#run-state", Static).render()
        return f"{_plain(info)} {_plain(badge)}"


def _plain(renderable: object) -> str:
    return renderable.plain if hasattr(renderable, "plain") else str(renderable)
