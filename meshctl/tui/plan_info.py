"""What the dashboard takes from a run's plan: the static facts no event repeats.

Jurisdictions and owners of domains, the coordinator's jurisdiction, and which
products each model and analysis reads (for the catalog's lineage). `seed`
writes them into a fresh `MeshState` before any event is reduced; the reducer
never reads the plan itself.
"""

from __future__ import annotations

from pathlib import Path

from meshctl.compiler.plan import Plan
from meshctl.tui.state import MeshState

__all__ = ["load_plan", "seed"]


def seed(state: MeshState, plan: Plan | None) -> MeshState:
    """Write `plan`'s static facts into `state` (in place) and return it; no-op for None."""
    if plan is None:
        return state
    state.coordinator_jurisdiction = plan.coordinator.jurisdiction
    for d in plan.domains:
        view = state.domain(d.name)
        view.jurisdiction, view.owner = d.jurisdiction, d.owner
    for job in plan.jobs:
        state.reads[f"model {job.name}"] = [r.product for r in job.reads]
        state.planned_rounds[job.name] = job.training.rounds
    for split in plan.split_models:
        state.reads[f"model {split.name}"] = [p.product for p in split.parts]
        state.planned_rounds[split.name] = split.epochs
        state.epochs.add(split.name)
    for analysis in plan.analyses:
        state.reads[f"analysis {analysis.name}"] = [r.product for r in analysis.reads]
    return state


def load_plan(run_dir: str | Path) -> Plan | None:
    """The `plan.toml` a run directory keeps, or None if it has none or it does not parse."""
    path = Path(run_dir) / "plan.toml"
    try:
        return Plan.read(path)
    except (OSError, ValueError):
        return None
