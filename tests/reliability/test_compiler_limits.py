"""Compiler limits: absurd nesting is a diagnostic (MESH107), not a RecursionError, and
rendering many diagnostics is linear in their number (the source is split once, not per one)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshctl.compiler.compile import compile_bytes
from meshctl.compiler.diagnostics import CODES, SHOWN, Diagnostic, render_all
from meshctl.compiler.loader import MAX_DEPTH

HEAD = "apiVersion: meshctl/v1\nmesh: deep\n"
DEEP = {
    "mapping": HEAD + "domains:\n  a: " + "{b: " * 5000 + "1" + "}" * 5000 + "\n",
    "list": HEAD + "domains: " + "[" * 5000 + "]" * 5000 + "\n",
    "block": HEAD + "domains:\n" + "".join(" " * i + "- \n" for i in range(1, 300)),
}


@pytest.mark.parametrize("shape", sorted(DEEP))
def test_nesting_5000_deep_is_a_diagnostic_with_a_position(shape: str, tmp_path: Path) -> None:
    result = compile_bytes(DEEP[shape].encode(), tmp_path / "mesh.yaml")
    assert result.plan is None
    [diag] = result.diagnostics
    assert (diag.code, diag.message) == ("MESH107", f"the document nests deeper than {MAX_DEPTH} levels")
    assert diag.line >= 3 and diag.col >= 1
    assert "MESH107" in CODES


def test_nesting_up_to_the_limit_still_loads(tmp_path: Path) -> None:
    ok = HEAD + "domains: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n"
    result = compile_bytes(ok.encode(), tmp_path / "mesh.yaml")
    assert "MESH107" not in {d.code for d in result.diagnostics}
    assert result.diagnostics  # a list is no domain: schema errors, but no depth error


def test_meshctl_validate_on_a_deep_file_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(DEEP["mapping"])
    out = subprocess.run([sys.executable, "-m", "meshctl", "validate", str(mesh)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 1
    assert f"{mesh}:4:" in out.stderr and "error[MESH107]" in out.stderr, out.stderr
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr


def test_rendering_100k_diagnostics_is_linear() -> None:
    n = 100_000
    source = "".join(f"k{i}: 1\n" for i in range(n))
    diags = [Diagnostic("MESH202", "error", f"unknown key 'k{i}'", "mesh.yaml", i + 1, 1) for i in range(n)]
    start = time.perf_counter()
    text = render_all(diags, source)
    took = time.perf_counter() - start
    assert text.count("error[MESH202]") == n and f"{n} | k{n - 1}: 1" in text
    assert took < 3.0, f"rendering {n} diagnostics took {took:.1f}s"  # quadratic: minutes


def test_text_output_is_capped_and_counts_the_rest() -> None:
    diags = [Diagnostic("MESH202", "error", f"unknown key 'k{i}'", "mesh.yaml", i + 1, 1) for i in range(250)]
    text = render_all(diags, "", limit=SHOWN)
    assert text.count("error[MESH202]") == SHOWN
    assert text.splitlines()[-1] == f"... and {250 - SHOWN} more (--format json lists every one)"
    assert render_all(diags[:3], "", limit=SHOWN).count("\n") == 2  # under the cap: no count line


def test_meshctl_validate_on_100k_unknown_keys_is_fast(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(HEAD + "".join(f"k{i}: 1\n" for i in range(100_000)))
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "meshctl", "validate", str(mesh)], capture_output=True,
                         text=True, timeout=120, check=False)
    took = time.perf_counter() - start
    assert out.returncode == 1 and out.stderr.splitlines()[-1].endswith("errors")
    assert "more (--format json lists every one)" in out.stderr
    assert took < 30, f"validate took {took:.1f}s"  # ~6 s here; > 120 s when rendering was quadratic
