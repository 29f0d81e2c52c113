"""Copy the dashboard's snapshot SVGs (tests/tui/__snapshots__/) to the names docs/dashboard.md shows.

The snapshots are drawn from a recorded run with the clock frozen and the zone UTC, so the pictures
here are the states the tests check, and reproducible:

    .venv/bin/python -m pytest tests/tui/test_tui_snapshots.py --snapshot-update  # after a change
    .venv/bin/python docs/screenshots/refresh.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SNAPSHOTS = HERE.parents[1] / "tests" / "tui" / "__snapshots__" / "test_tui_snapshots"

SHOTS = {
    "starting.svg": "test_up_while_compiling[120x40].svg",
    "waiting.svg": "test_up_waiting_for_domains[120x40].svg",
    "live.svg": "test_live_run[120x40].svg",
    "overview.svg": "test_screen[overview-120x40].svg",
    "overview-80x24.svg": "test_screen[overview-80x24].svg",
    "overview-light.svg": "test_overview_light_theme.svg",
    "coordinator-lost.svg": "test_dead_coordinator[120x40].svg",
    "analysis.svg": "test_analysis_result[120x40].svg",
    "rounds.svg": "test_rounds_with_a_picked_round.svg",
    "policies.svg": "test_screen[policies-120x40].svg",
    "catalog.svg": "test_screen[catalog-120x40].svg",
    "events.svg": "test_screen[events-120x40].svg",
    "events-filtered.svg": "test_events_filtered_by_kind_domain_and_rounds[120x40].svg",
    "help.svg": "test_help_screen[120x40].svg",
    "failed-80x24.svg": "test_failed_run[80x24].svg",
    "logs.svg": "test_log_viewer[120x40].svg",
    "domain.svg": "test_domain_drill_down[120x40].svg",
    "replay-jump.svg": "test_replay_jumped_to_round_7[120x40].svg",
    "quit-dialog.svg": "test_quit_dialog.svg",
    "quit-dialog-ended.svg": "test_quit_dialog_after_the_run_ended[80x24].svg",
    "replay-scrubber.svg": "test_replay_scrubber_after_three_rounds.svg",
}
"""docs/screenshots/NAME <- the snapshot it is a copy of."""


def main() -> int:
    missing = [snap for snap in SHOTS.values() if not (SNAPSHOTS / snap).is_file()]
    if missing:
        print(f"error: no snapshot {missing[0]} in {SNAPSHOTS} (run the snapshot tests first)", file=sys.stderr)
        return 1
    for name, snap in SHOTS.items():
        shutil.copyfile(SNAPSHOTS / snap, HERE / name)
    print(f"wrote {len(SHOTS)} screenshots to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
