"""The import graph of meshctl: no cycles, and nothing imports upward (cli -> tui -> runtime -> compiler).

Built with `ast` from the source, so a lazy import inside a function counts as well.
`from pkg import mod` is an edge to pkg.mod; the parent packages Python imports on
the way are not edges of their own.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[3] / "meshctl"
LAYERS = {"compiler": 0, "runtime": 1, "tui": 2, "cli": 3}
KNOWN_CYCLES: set[tuple[str, ...]] = set()
"""No cycle is known: every import, lazy or typing-only, points one way (the last four went in
issue 10: compiler.resolved under resolve/analyses/grants, tui.messages.EventHost under app/bridge/replay,
and the analysis room beside training instead of a Coordinator subclass in runtime.analytics)."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


@functools.cache
def _graph(top_level_only: bool) -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in tree.body if top_level_only else ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Every elementary cycle found by depth-first search, as the sorted set of its modules."""
    found: set[tuple[str, ...]] = set()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                found.add(tuple(sorted(path[path.index(nxt):])))
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    return found


def _layer(module: str) -> int | None:
    if module in ("meshctl.cli", "meshctl.__main__"):
        return LAYERS["cli"]
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_no_module_level_import_cycle() -> None:
    assert _cycles(_graph(top_level_only=True)) == set()


def test_no_import_cycle_even_through_lazy_or_typing_imports() -> None:
    assert _cycles(_graph(top_level_only=False)) - KNOWN_CYCLES == set()


def test_the_analysis_is_a_workflow_of_the_service_not_a_coordinator() -> None:
    from meshctl.runtime.coordinator import Coordinator
    from meshctl.runtime.coordinator.analysis import Analysis

    assert not issubclass(Analysis, Coordinator)
    assert "meshctl.runtime.coordinator.analysis" in _graph(top_level_only=True)["meshctl.runtime.coordinator.service"]


def test_nothing_imports_upward() -> None:
    upward = [(m, t) for m, targets in _graph(top_level_only=False).items() for t in targets
              if None not in (_layer(m), _layer(t)) and _layer(t) > _layer(m)]
    assert upward == []
