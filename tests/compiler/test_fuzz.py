"""Mutating the root mesh.yaml, or the fixture that uses every construct (grants,
analyses, request-access products, masking, quality rules, policies of every
scope), yields a plan or diagnostics, never an exception."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from compiler_util import ROOT_MESH, SPECS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshctl.compiler.compile import compile_bytes

BASE = yaml.safe_load(ROOT_MESH.read_text())
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=False),
                 st.text(max_size=12), st.just([]), st.just({}), st.just("all"),
                 st.just("size(model.participants) >"), st.just("direct"),
                 st.just("request"), st.just("histogram(age, 3)"), st.just("beta.visits"),
                 st.just("generalize"), st.just("prefix:2"), st.just("2020-01-01"))
FULL = SPECS / "valid" / "full.yaml"
FULL_BASE = yaml.safe_load(FULL.read_text())
NEW_SECTIONS = ("grants", "analyses", "products", "contracts", "policies", "domains")


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


PATHS = _paths(BASE)[1:]
FULL_PATHS = [p for p in _paths(FULL_BASE)[1:] if p[0] in NEW_SECTIONS]


def _mutate(data: Any, path: tuple, op: str, value: Any) -> Any:
    data = copy.deepcopy(data)
    parent = data
    for el in path[:-1]:
        parent = parent[el]
    key = path[-1]
    if op == "delete":
        del parent[key]
    elif op == "retype":
        parent[key] = value
    elif op == "rename" and isinstance(parent, dict):
        parent[f"{key}x" if isinstance(key, str) else str(value)] = parent.pop(key)
    elif op == "duplicate" and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[key]))
    elif op == "duplicate" and isinstance(parent, dict):
        parent[f"{key}"] = copy.deepcopy(parent[key])
    return data


MUTATION = st.tuples(st.sampled_from(PATHS),
                     st.sampled_from(["delete", "retype", "rename", "duplicate"]), JUNK)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(MUTATION, min_size=1, max_size=3))
def test_mutated_mesh_never_raises(mutations: list) -> None:
    data = BASE
    for path, op, value in mutations:
        try:
            data = _mutate(data, path, op, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or changed this path
    raw = yaml.safe_dump(data, sort_keys=False).encode()
    result = compile_bytes(raw, ROOT_MESH)
    assert result.plan is not None or result.errors
    for d in result.diagnostics:
        assert d.code and d.message and d.line >= 0


FULL_MUTATION = st.tuples(st.sampled_from(FULL_PATHS),
                          st.sampled_from(["delete", "retype", "rename", "duplicate"]), JUNK)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FULL_MUTATION, min_size=1, max_size=3))
def test_mutated_full_mesh_never_raises(mutations: list) -> None:
    data = FULL_BASE
    for path, op, value in mutations:
        try:
            data = _mutate(data, path, op, value)
        except (KeyError, IndexError, TypeError):
            continue
    raw = yaml.safe_dump(data, sort_keys=False).encode()
    result = compile_bytes(raw, FULL)
    assert result.plan is not None or result.errors
    for d in result.diagnostics:
        assert d.code and d.message and d.line >= 0


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    result = compile_bytes(raw, "mesh.yaml")
    assert result.plan is None and result.errors
