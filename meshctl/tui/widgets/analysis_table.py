"""The Overview's analysis result: one row per group, one column per metric.

The numbers come from the result file the coordinator wrote and named in
`analysis_completed` (`analyses/NAME.json` in the run directory); this widget only
reads and lays them out, as `meshctl analyze` prints them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from textual.widgets import DataTable

from meshctl.tables import cell as table_cell
from meshctl.tui.state import AnalysisView, MeshState
from meshctl.tui.widgets._format import MISSING


class AnalysisTable(DataTable[str]):
    """The result of the run's newest completed analysis; hidden until there is one."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self.shown: str = ""
        """The result file shown, '' for none."""
        self.problem: str = ""
        """Why a result could not be shown ('' when it was)."""

    def on_mount(self) -> None:
        self.display = False

    def show(self, state: MeshState, run_dir: Path | None = None) -> None:
        """Show the newest completed analysis of `state` whose result file can be read.

        The file is looked up under the run directory the run announced, else `run_dir`
        (a replay of a run directory that has moved)."""
        done = [a for a in state.analyses.values() if a.state == "completed" and a.result_path]
        if not done:
            return
        analysis = done[-1]
        bases = [Path(b) for b in (state.run_dir, run_dir) if b]
        paths = [b / analysis.result_path for b in bases]
        path = next((p for p in paths if p.is_file()), paths[0] if paths else Path(analysis.result_path))
        if str(path) == self.shown:
            return
        self.shown = str(path)
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
            head, rows = result_rows(result)
        except (OSError, ValueError, KeyError, TypeError) as err:
            self.problem = f"cannot read the result {path}: {getattr(err, 'strerror', None) or err}"
            self.border_title = f"analysis {analysis.name}"
            self.border_subtitle = self.problem
            self.display = True
            return
        self.problem = ""
        self.clear(columns=True)
        for i, label in enumerate(head):
            self.add_column(label, key=str(i))
        self.add_rows(rows)
        self.border_title = f"analysis {analysis.name}"
        self.border_subtitle = caption(analysis, result)
        self.display = True

    def reset(self) -> None:
        """Forget the result (the state was rebuilt)."""
        self.clear(columns=True)
        self.shown = ""
        self.display = False

    @property
    def plain_rows(self) -> list[list[str]]:
        """The rows as plain text, top to bottom (for tests)."""
        return [[str(c) for c in self.get_row_at(i)] for i in range(self.row_count)]

    @property
    def labels(self) -> list[str]:
        """The column labels, left to right."""
        return [str(c.label) for c in self.ordered_columns]


def result_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(column labels, rows) of an analysis result: group keys, metrics, how many domains."""
    head = [*result["group_by"], *result["metrics"], "domains"]
    rows = [[*(str(g["key"][c]) for c in result["group_by"]),
             *(cell(g["values"].get(m)) for m in result["metrics"]), str(len(g["domains"]))]
            for g in result["groups"]]
    return head, rows


def caption(analysis: AnalysisView, result: dict[str, Any]) -> str:
    """`2 groups · 0 suppressed · DP ε 1`: what the table's rows do not say."""
    dp = result.get("dp")
    eps = f" · DP ε {dp['epsilon']:g}" if isinstance(dp, dict) and "epsilon" in dp else ""
    return f"{analysis.groups} groups · {analysis.suppressed} suppressed{eps}"


def cell(value: Any) -> str:
    """One metric value, as `meshctl analyze` prints it (the dashboard's dash for a missing one)."""
    return table_cell(value, MISSING)
