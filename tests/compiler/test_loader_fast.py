"""The loader's fast path (sections of one-line flow items read as JSON) agrees with its
event path and with PyYAML: same data, same diagnostics, same positions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from compiler_util import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_loader_speedups import _paths

from meshctl.compiler import loader
from meshctl.compiler.cache import LoadCache
from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.loader import load_text

sys.path.insert(0, str(ROOT / "benchmarks"))
from compile_scale import write_mesh

TOKENS = ["p0", "d0000", "data/d0000-p0.csv", "c0001@1", "x.y", "_z", "/abs", ".hidden", "a b",
          "rule 10", "10 apples", "yes", "No", "on", "OFF", "y", "n", "true", "True", "FALSE", "null",
          "Null", "~", "0", "-0", "10", "-5", "1.50", "-0.0", "010", "0x1f", "1_000", "+1", "1.",
          ".5", "1.5e+3", "1e5", "-5e3", "-x", "- x", "2024-01-02", "1:30", "a:b", "@x", "a@b",
          "#c", "a #c", "'q'", '"q"', "it's", "<<", "=", "&a", "*a", "!t", "?", "été", "a\tb",
          "x" * 1030, ""]
SEPARATORS = [", ", ", ", ", ", ",", " , ", ",  "]
COLONS = [": ", ": ", ": ", ":", " : ", ":  "]
KEYS = st.sampled_from(["name", "type", "k", "yes", "true", "10", "a b", "name", "<<", "x:y"])


@st.composite
def flow(draw: st.DrawFn, depth: int = 0) -> str:
    """A flow collection as a person (or a generator) might write it, odd spacing included."""
    inner = st.sampled_from(TOKENS) if depth >= 2 else st.one_of(
        st.sampled_from(TOKENS), st.sampled_from(TOKENS), flow(depth + 1))
    pad = draw(st.sampled_from(["", "", "", " "]))
    if draw(st.booleans()):
        items = draw(st.lists(inner, max_size=4))
        return "[" + pad + draw(st.sampled_from(SEPARATORS)).join(items) + pad + "]"
    pairs = draw(st.lists(st.tuples(KEYS, inner), max_size=4))
    colon, sep = draw(st.sampled_from(COLONS)), draw(st.sampled_from(SEPARATORS))
    return "{" + pad + sep.join(k + colon + v for k, v in pairs) + pad + "}"


@st.composite
def document(draw: st.DrawFn) -> str:
    """Top-level sections, most of them one-line flow items, with the odd line in between."""
    lines = []
    for n in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(["products", "domains", "contracts", "x", "true"])) + f"{n}"
        kind = draw(st.sampled_from(["items", "items", "items", "scalar", "block"]))
        if kind == "scalar":
            lines.append(f"{key}: {draw(st.sampled_from(TOKENS))}")
            continue
        lines.append(key + ":" + draw(st.sampled_from(["", "", " ", " # c"])))
        indent = draw(st.sampled_from([2, 2, 4]))
        for _ in range(draw(st.integers(1, 4))):
            if kind == "block":
                lines.append(" " * indent + f"- name: {draw(st.sampled_from(TOKENS))}")
            else:
                lines.append(" " * draw(st.sampled_from([indent] * 5 + [indent + 2]))
                             + "- " + draw(flow()) + draw(st.sampled_from(["", "", " "])))
            lines.append(draw(st.sampled_from(["", "", "", "", "  # note", "# note", "", "  "])))
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n"]))


def _both(text: str, monkeypatch: pytest.MonkeyPatch) -> tuple:
    fast = load_text(text, "f.yaml")
    monkeypatch.setattr(loader, "FLOW_FAST", False)
    slow = load_text(text, "f.yaml")
    monkeypatch.undo()
    return fast, slow


def _agree(text: str, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Assert the two paths agree on `text`; True when the fast path read some of it."""
    (fast, fast_diags), (slow, slow_diags) = _both(text, monkeypatch)
    assert fast_diags == slow_diags
    assert (fast is None) == (slow is None)
    if fast is None:
        return False
    assert repr(fast.data) == repr(slow.data) and fast.text == slow.text
    for path in _paths(fast.data):
        assert fast.map.locate(path) == slow.map.locate(path), path
        assert fast.map.locate(path, key=True) == slow.map.locate(path, key=True), path
    return fast.map.partial


class _Yaml12Bools(yaml.SafeLoader):
    """PyYAML's safe loader with meshctl's booleans: only true and false (yes, no, on, off: str)."""


_Yaml12Bools.add_constructor(
    "tag:yaml.org,2002:bool",
    lambda loader_, node: node.value.lower() == "true" if node.value.lower() in ("true", "false")
    else node.value)


def _marks(node: yaml.Node, data: Any, prefix: tuple = ()) -> dict[tuple, tuple]:
    """(line, col) of each path's value, and ('key', path) of each key, from PyYAML's composer."""
    out = {prefix: (node.start_mark.line + 1, node.start_mark.column + 1)}
    if isinstance(node, yaml.MappingNode):
        for (key_node, value_node), key in zip(node.value, data, strict=True):
            out[("key", (*prefix, key))] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out.update(_marks(value_node, data[key], (*prefix, key)))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.update(_marks(item, data[i], (*prefix, i)))
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=document())
def test_fast_path_agrees_with_the_event_path(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _agree(text, monkeypatch)


@settings(max_examples=60, deadline=None)
@given(text=document())
def test_fast_path_agrees_with_pyyaml(text: str) -> None:
    source, diags = load_text(text, "f.yaml")
    if source is None or diags or "<<" in text or "?" in text:
        return  # (errors: compared with the event path above; PyYAML's nodes keep merge keys;
        # an empty explicit key `[ ? ]` is placed at its `?` by the event path, after it by PyYAML)
    try:
        expected = yaml.load(text, Loader=_Yaml12Bools)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # (a tab in a plain scalar: libyaml reads it, PyYAML's Python scanner does not)
    assert repr(source.data) == repr(expected)
    for where, at in _marks(node, source.data).items():
        if where and where[0] == "key":
            assert source.map.locate(where[1], key=True) == at, where
        else:
            assert source.map.locate(where) == at, where


def test_the_benchmark_mesh_takes_the_fast_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mesh = write_mesh(tmp_path / "one", domains=3, products_per_domain=4, contracts=5, policies=3, models=2)
    assert _agree(mesh.read_text(), monkeypatch)
    split = write_mesh(tmp_path / "split", domains=2, products_per_domain=3, contracts=2, policies=2,
                       models=1, split=True)
    assert _agree((split.parent / "domains" / "d0001.yaml").read_text(), monkeypatch)
    assert not _agree(split.read_text(), monkeypatch)  # (its policies quote their CEL: events)


@pytest.mark.parametrize("text", [
    "products:\n  - {a: 1, a: 2}\n",                 # duplicate key: MESH102 at its place
    "products:\n  - {a: 1}\n    - {b: 2}\n",         # items at two indents: a syntax error
    "a: 'x\nproducts:\n  - {b: 1}\ny'\n",            # a header inside a quoted string
    "{a: 1,\nproducts:\n  - {b: 1}\n}\n",             # ... inside a flow mapping: an error
    "--- {a: 1,\nproducts:\n  - {b: 1}\n}\n",
    "a: [1,\nproducts:\n  - {b}\n]\n",
    "products:\n  - {a: [b}\n",                      # unbalanced
    "products:\n  - {a: 1}\nproducts:\n  - {b: 2}\n",  # the section twice
    "products:\n  - {a: 2024-01-02, b: .5, c: True}\n",
    "products:\n  - [a, b]\n# between\n  - [c]\nnext: 1\n",
])
def test_fast_path_declines_what_it_cannot_read(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _agree(text, monkeypatch)


def test_an_anchored_quoted_number_stays_a_string_and_the_plain_one_a_number() -> None:
    source, diags = load_text('a: &x "123"\nb: 123\nc: [*x, 123]\n', "f.yaml")
    assert diags == [] and source is not None
    assert source.data == {"a": "123", "b": 123, "c": ["123", 123]}


def test_a_cached_fast_file_keeps_no_positions_and_finds_them_again(tmp_path: Path) -> None:
    mesh = write_mesh(tmp_path, domains=2, products_per_domain=3, contracts=2, policies=2, models=1,
                      split=True)
    domain = mesh.parent / "domains" / "d0001.yaml"
    domain.write_text(domain.read_text().replace("domain: d0001, source: data/d0001-p2.csv",
                                                 "domain: d0009, source: data/d0001-p2.csv"))
    cache = LoadCache(tmp_path / "cache")
    cold = compile_mesh(mesh)
    assert "MESH302" in [d.code for d in cold.errors]  # (an unknown domain, in d0001.yaml)
    assert any(d.file.endswith("d0001.yaml") and (d.line, d.col) == (6, 24) for d in cold.errors)
    for _ in range(2):  # a miss that writes the entries, then a hit that reads them
        warm = compile_mesh(mesh, cache=cache)
        assert warm.render_diagnostics() == cold.render_diagnostics()
    assert cache.hits == 3 and cache.misses == 3
    entry = json.loads((tmp_path / "cache" / f"{cache.key(domain.read_bytes())}.json").read_text())
    assert entry["tree"] is None and entry["data"]["products"][2]["domain"] == "d0009"
