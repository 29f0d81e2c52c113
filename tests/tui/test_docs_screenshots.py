"""docs/dashboard.md shows the states the snapshot tests check: each picture in docs/screenshots/ is a
copy of its snapshot (docs/screenshots/refresh.py writes them) and the page shows every one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _shots() -> dict[str, str]:
    spec = importlib.util.spec_from_file_location("refresh", DOCS / "screenshots" / "refresh.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SHOTS


def test_every_screenshot_is_its_snapshot_and_on_the_page() -> None:
    shots = _shots()
    page = (DOCS / "dashboard.md").read_text(encoding="utf-8")
    snapshots = ROOT / "tests" / "tui" / "__snapshots__" / "test_tui_snapshots"
    stale = [name for name, snap in shots.items()
             if (DOCS / "screenshots" / name).read_bytes() != (snapshots / snap).read_bytes()]
    assert stale == [], "run: .venv/bin/python docs/screenshots/refresh.py"
    assert [name for name in shots if f"(screenshots/{name})" not in page] == []
    assert sorted(p.name for p in (DOCS / "screenshots").glob("*.svg")) == sorted(shots)
