"""The event-driven loader: same data, positions and diagnostics with or without libyaml."""

from __future__ import annotations

import gc

import pytest
import yaml
from compiler_util import ROOT_MESH, SPECS

from meshctl.compiler import loader
from meshctl.compiler.loader import load_text

SNIPPETS = {
    "aliases": "a: &x [1, 2, {b: c}]\nd: *x\ne: {f: *x}\n",
    "merge": "base: &b {x: 1, y: 2}\nm: {<<: *b, y: 3}\nn: {y: 4, <<: *b}\n",
    "merge_list": "a: &a {x: 1}\nb: &b {x: 2, z: 3}\nm:\n  <<: [*a, *b]\n  w: 1\n",
    "merge_bad": "a: &a [1]\nm:\n  <<: *a\n  k: 1\nn: {<<: 3}\n",
    "duplicates": "a: 1\nb: 2\na: 3\nc: {x: 1, x: 2}\n",
    "scalars": "a: !!str 3\nb: !!int '7'\nd: !foo bar\ne: yes\nf: ~\ng: 2024-01-02\nh: 0x1f\n"
               "i: .inf\nj: ''\nk:\nl: '<<'\n",
    "keys": "? [1, 2]\n: v\n1: one\ntrue: t\nnull: n\n",
    "alias_key": "a: &k kk\n*k : 2\nb: &m {x: 1}\n*m : 3\n",
    "undefined_alias": "a: *nope\n",
    "duplicate_anchor": "a: &x 1\nb: &x 2\n",
    "two_documents": "a: 1\n---\nb: 2\n",
    "syntax": "a: [1, 2\nb: 3\n",
    "tab": "a:\n\tb: 1\n",
    "control_char": "a: \x07\n",
}


def _load_both(text: str, monkeypatch: pytest.MonkeyPatch) -> tuple:
    fast = load_text(text, "f.yaml")
    monkeypatch.setattr(loader, "_FAST_LOADER", None)
    slow = load_text(text, "f.yaml")
    monkeypatch.undo()
    return fast, slow


def _paths(data: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, (*prefix, i))
    return out


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="needs libyaml to compare with")
@pytest.mark.parametrize("name", [*SNIPPETS, "mesh.yaml", "many_errors", "tab_indent"])
def test_libyaml_and_pure_python_agree(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if name == "mesh.yaml":
        text = ROOT_MESH.read_text()
    elif name in SNIPPETS:
        text = SNIPPETS[name]
    else:
        text = (SPECS / "invalid" / f"{name}.yaml").read_text()
    (fast, fast_diags), (slow, slow_diags) = _load_both(text, monkeypatch)
    assert fast_diags == slow_diags
    assert (fast is None) == (slow is None)
    if fast is not None:
        assert repr(fast.data) == repr(slow.data)
        for path in _paths(fast.data):
            assert fast.map.locate(path) == slow.map.locate(path), path
            assert fast.map.locate(path, key=True) == slow.map.locate(path, key=True), path


def test_merge_keeps_explicit_keys_and_positions() -> None:
    source, diags = load_text(SNIPPETS["merge"], "f.yaml")
    assert diags == [] and source is not None
    assert source.data["m"] == {"y": 3, "x": 1} and source.data["n"] == {"y": 4, "x": 1}
    assert source.map.locate(("m", "x")) == (1, 14)  # inside the anchored mapping
    assert source.map.locate(("m", "y"), key=True) == (2, 13)


def test_alias_copies_are_independent_and_placed_at_the_alias() -> None:
    source, _ = load_text(SNIPPETS["aliases"], "f.yaml")
    assert source is not None and source.data["d"] == source.data["a"]
    assert source.data["d"] is not source.data["a"]
    assert source.map.locate(("d",)) == (2, 4)
    assert source.map.locate(("d", 2, "b")) == (1, 18)


def test_empty_value_is_null_and_bad_tagged_value_is_a_diagnostic() -> None:
    source, diags = load_text("a:\nb: !!int abc\nc: !!timestamp 2024-13-45\n", "f.yaml")
    assert source is not None and source.data == {"a": None, "b": None, "c": None}
    assert [(d.code, d.line, d.col) for d in diags] == [("MESH101", 2, 4), ("MESH101", 3, 4)]


def test_billion_laughs_stops_at_the_alias() -> None:
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i, name in enumerate("bcdefg"):
        prev = "abcdefg"[i]
        text += f"{name}: &{name} [{', '.join([f'*{prev}'] * 10)}]\n"
    _, diags = load_text(text, "f.yaml")
    assert [d.code for d in diags] == ["MESH106"]
    assert "too many nodes" in diags[0].message and diags[0].line == 6


def test_recursive_alias_is_reported_once() -> None:
    source, diags = load_text("a: &a [1, *a]\nb: *a\n", "f.yaml")
    assert [(d.code, d.line, d.col) for d in diags] == [("MESH106", 1, 11)]
    assert source is not None and source.data == {"a": [1, None], "b": [1, None]}


def test_a_large_document_without_aliases_is_not_limited() -> None:
    items = ", ".join(f"{{n: {i}, v: [a, b]}}" for i in range(60_000))  # 300,000 nodes
    text = f"items: [{items}]\n"
    source, diags = load_text(text, "f.yaml")
    assert diags == [] and source is not None and len(source.data["items"]) == 60_000
    last = text.index("{n: 59999, v: [a, b]}") + len("{n: 59999, v: [a, ")
    assert source.map.locate(("items", 59_999, "v", 1)) == (1, last + 1)


def test_garbage_collector_state_is_restored() -> None:
    assert gc.isenabled()
    load_text(ROOT_MESH.read_text(), "mesh.yaml")
    assert gc.isenabled()
    gc.disable()
    try:
        load_text("a: 1\n", "f.yaml")
        assert not gc.isenabled()
    finally:
        gc.enable()
