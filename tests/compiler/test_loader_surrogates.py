r"""A `"\ud83d"` escape names half of a UTF-16 surrogate pair: YAML's characters exclude it and no UTF-8
text (a plan) can hold it. It was loaded, and `meshctl plan` ended in `internal error:
UnicodeEncodeError` (what a reviewer found); now it is a MESH101 at the string, on either loader path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshctl.compiler import loader
from meshctl.compiler.loader import load_text

HEAD = "apiVersion: meshctl/v1\nmesh: {name: m, coordinator: {address: local}}\n"


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(("body", "where"), [
    ('domains:\n  - {name: a, description: "caf\\ud83d"}\n', (4, 28)),          # flow item, a value
    ('domains:\n  - name: a\n    description: "x \\uDC00 y"\n', (5, 18)),       # block, a low half
    ('domains:\n  - name: a\n    "k\\ud800": 1\n', (5, 5)),                      # a key
])
def test_a_surrogate_escape_is_a_mesh101_at_its_string(fast: bool, body: str, where: tuple[int, int],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "FLOW_FAST", fast)
    source, diagnostics = load_text(HEAD + body, "mesh.yaml")
    assert source is None
    [d] = diagnostics
    assert (d.code, d.line, d.col) == ("MESH101", *where)
    assert "surrogate" in d.message and "\\u" in d.message


@pytest.mark.parametrize("body", [
    'domains:\n  - {name: a, description: "caf\\U0001F600"}\n',        # one 8-digit escape: a character
    "domains:\n  - {name: a, description: 'caf\\ud83d'}\n",            # single quotes: no escapes
    'domains:\n  - {name: a}  # "\\ud83d" in a comment\n',
])
def test_characters_and_text_that_only_look_like_the_escape_load(body: str) -> None:
    source, diagnostics = load_text(HEAD + body, "mesh.yaml")
    assert source is not None and diagnostics == []


def test_the_command_says_it_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(HEAD + 'domains:\n  - {name: a, owner: o, jurisdiction: eu, address: local,'
                    ' description: "caf\\ud83d"}\n')
    out = subprocess.run([sys.executable, "-m", "meshctl", "plan"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, check=False, env={"MESHCTL_NO_SERVER": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 1
    assert out.stderr.startswith("mesh.yaml:4:") and "error[MESH101]" in out.stderr.splitlines()[0]
    assert "Traceback" not in out.stderr and "internal error" not in out.stderr
    assert not (tmp_path / "mesh.plan.toml").exists()
