"""The panel a failed run (or one whose coordinator was lost) shows under the header: why it failed,
where, and which log to read.

The header's badge says only FAILED (a long reason there squeezed the run line out); the whole
reason is here, wrapped, never cut: the run's reason, each failed job's, the domains that were
refused or lost, a `file:line` any of them names, and the log files to read."""

from __future__ import annotations

import re
from pathlib import Path

from rich.table import Table
from textual.widgets import Static

from meshctl.tui.state import MeshState, failed_where

_AT = re.compile(r"[\w./-]+\.[A-Za-z]\w*:\d+(?::\d+)?")
"""A `file:line` or `file:line:col` in a reason (`mesh.yaml:12:5`, `model.py:40`)."""

LOGS_DIR = "logs"
COORDINATOR_LOG = "coordinator.log"


def failure_lines(state: MeshState, run_dir: Path | None) -> list[tuple[str, str]]:
    """(label, text) rows that explain a failed run, or one whose coordinator was lost; empty otherwise."""
    if state.state not in ("failed", "lost"):
        return []
    lost = state.state == "lost"
    rows = [("reason", f"coordinator lost: {state.reason}" if lost else state.reason or "unknown")]
    reasons = [state.reason]
    for job in state.jobs.values():
        if job.state == "failed":
            where = failed_where(job).removeprefix("in ")  # (the round that was running, as every view says)
            rows.append(("job", f"{job.name} ({where}): {job.reason or 'failed'}"))
            reasons.append(job.reason)
    blamed = [d for d in state.domains.values() if d.state in ("refused", "lost")]
    for d in blamed:
        cause = f" ({d.cause})" if d.cause else ""
        rows.append(("domain", f"{d.name} {d.state}{cause}: {d.reason}"))
        reasons.append(d.reason)
    at = next((m.group(0) for r in reasons for m in [_AT.search(r or "")] if m), "")
    if at:
        rows.append(("at", at))
    base = run_dir if run_dir is not None else (Path(state.run_dir) if state.run_dir else None)
    if base is not None:
        logs = [base / LOGS_DIR / COORDINATOR_LOG, *(base / LOGS_DIR / f"{d.name}.log" for d in blamed)]
        rows.append(("log", "  ".join(str(p) for p in logs)))
    run = state.run_id or "RUN"
    domains = "".join(f" --domain {d.name}" for d in blamed)
    rows.append(("read", f"meshctl logs {run} --coordinator{domains}"))
    return rows


class FailureBanner(Static):
    """Hidden until the run fails (or its coordinator is lost); then the rows of `failure_lines`,
    wrapped to the width."""

    grid: Table | None = None
    """What the panel shows now (None while hidden)."""

    def show(self, state: MeshState, run_dir: Path | None) -> None:
        """Show why `state`'s run failed (or hide when it did not)."""
        rows = failure_lines(state, run_dir)
        self.display = bool(rows)
        if not rows:
            return
        grid = Table.grid(padding=(0, 1))
        grid.add_column(justify="right", style="bold", no_wrap=True)
        grid.add_column(overflow="fold")  # wrapped under itself, never cut
        self.border_title = "COORDINATOR LOST" if state.state == "lost" else "RUN FAILED"  # a row saved
        for label, line in rows:
            grid.add_row(label, line)
        self.grid = grid
        self.update(grid)
