"""Golden diagnostics: each invalid spec renders exactly its .expected.txt.

Regenerate with MESHCTL_UPDATE_GOLDENS=1 after a deliberate change, and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from compiler_util import SPECS, rendered

from meshctl.compiler.compile import compile_mesh

INVALID = sorted((SPECS / "invalid").glob("*.yaml"))
VALID = sorted((SPECS / "valid").glob("*.yaml"))


@pytest.mark.parametrize("spec", INVALID, ids=lambda p: p.stem)
def test_invalid_spec_renders_expected_diagnostics(spec: Path) -> None:
    expected = spec.with_suffix(".expected.txt")
    text = rendered(spec)
    if os.environ.get("MESHCTL_UPDATE_GOLDENS") == "1":
        expected.write_text(text, encoding="utf-8")
    assert expected.exists(), f"no golden file {expected.name}; run with MESHCTL_UPDATE_GOLDENS=1"
    assert text == expected.read_text(encoding="utf-8")
    assert compile_mesh(spec).plan is None


@pytest.mark.parametrize("spec", VALID, ids=lambda p: p.stem)
def test_valid_spec_compiles_without_errors(spec: Path) -> None:
    result = compile_mesh(spec)
    assert result.errors == [], result.render_diagnostics()
    assert result.plan is not None


def test_there_are_enough_goldens() -> None:
    assert len(INVALID) >= 45
    assert all(p.with_suffix(".expected.txt").exists() for p in INVALID)
