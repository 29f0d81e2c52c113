"""A bounded, seeded fuzzer over the bytes of every valid mesh: each mutated file compiles to
a plan or to diagnostics (which render, as text and as JSON), never to an exception, and fast.

tests/compiler/test_fuzz.py mutates the parsed data (delete, retype, rename a key) and dumps
it again, so its YAML is always well formed; this one mutates the text itself: byte flips,
lines deleted, duplicated or re-indented, scalars swapped for other types, deep nesting and
random unicode. Every case is reproducible from its number: `_mutant(case)`.
"""

from __future__ import annotations

import json
import random
import time
import traceback
from pathlib import Path

from meshctl.compiler.compile import compile_bytes
from meshctl.compiler.diagnostics import CODES, SHOWN, json_report

ROOT = Path(__file__).resolve().parents[2]
SEEDS = sorted([ROOT / "mesh.yaml", *(ROOT / "examples").glob("*/mesh.yaml"),
                *(ROOT / "tests" / "fixtures" / "specs" / "valid").glob("*.yaml")])
TEXTS = {p: p.read_bytes() for p in SEEDS}
CASES = 1000
"""Mutated meshes per run (about 8 s on a 2-core CI machine)."""
SLOW_S = 5.0
"""Most one compile may take."""

SCALARS = [b"true", b"null", b"~", b"0", b"-1", b"3.5", b"1e309", b".nan", b"''", b"[]", b"{}", b"[1, [2]]",
           b"{a: 1}", b"2024-13-45", b"!!int x", b"!!binary ???", b"*nope", b"&a x", b"'\\u0000'", b"\"\\x00\"",
           b"yes", b"9" * 400, b"size(model.participants) >", b"- x", b": :", b"'", b"\"", b"|", b">-", b"%"]
UNICODE = ["\u0000", "\u0007", "\ufeff", "\u202e", "\u200b", "\u00e9", "\U0001f600", "\ud800", "\x85", "\u2028",
           "\t", "\r", "ε", "\uffff", "\U0010ffff"]


def _flip(rng: random.Random, raw: bytearray) -> None:
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(raw))
        raw[i] ^= 1 << rng.randrange(8)


def _lines(rng: random.Random, raw: bytearray) -> None:
    lines = bytes(raw).split(b"\n")
    i = rng.randrange(len(lines))
    op = rng.choice(["delete", "duplicate", "indent", "dedent", "swap"])
    if op == "delete":
        del lines[i]
    elif op == "duplicate":
        lines.insert(i, lines[i])
    elif op == "indent":
        lines[i] = b" " * rng.randint(1, 7) + lines[i]
    elif op == "dedent":
        lines[i] = lines[i].lstrip(b" ") if rng.random() < 0.5 else lines[i][1:]
    else:
        j = rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    raw[:] = b"\n".join(lines)


def _retype(rng: random.Random, raw: bytearray) -> None:
    """Swap the value of a random `key: value` for a scalar (or collection) of another type."""
    lines = bytes(raw).split(b"\n")
    spots = [n for n, ln in enumerate(lines) if b": " in ln and not ln.lstrip().startswith(b"#")]
    if not spots:
        return
    n = rng.choice(spots)
    head = lines[n].split(b": ", 1)[0]
    lines[n] = head + b": " + rng.choice(SCALARS)
    raw[:] = b"\n".join(lines)


def _nest(rng: random.Random, raw: bytearray) -> None:
    """Nest a value deep: brackets, braces or block lists, up to far past the loader's limit."""
    depth = rng.choice([5, 50, 99, 100, 101, 500, 3000])
    shape = rng.choice(["[", "{a: ", "block"])
    if shape == "block":
        deep = b"\n" + b"".join(b" " * (k + 2) + b"-\n" for k in range(min(depth, 300))) + b" " * 2 + b"x"
    else:
        close = b"]" if shape == "[" else b"}"
        deep = shape.encode() * depth + b"1" + close * depth
    lines = bytes(raw).split(b"\n")
    spots = [n for n, ln in enumerate(lines) if b": " in ln] or [0]
    n = rng.choice(spots)
    lines[n] = lines[n].split(b": ", 1)[0] + b": " + deep
    raw[:] = b"\n".join(lines)


def _unicode(rng: random.Random, raw: bytearray) -> None:
    for _ in range(rng.randint(1, 5)):
        ch = rng.choice(UNICODE) if rng.random() < 0.7 else chr(rng.randrange(0x110000))
        at = rng.randrange(len(raw) + 1)
        raw[at:at] = ch.encode("utf-8", errors="surrogatepass")


MUTATIONS = [_flip, _lines, _lines, _retype, _retype, _nest, _unicode]


def _mutant(case: int) -> tuple[Path, bytes]:
    """Case `case`: a seed mesh and 1 to 3 mutations of its bytes, all from random.Random(case)."""
    rng = random.Random(case)
    seed = SEEDS[case % len(SEEDS)]
    raw = bytearray(TEXTS[seed])
    for _ in range(rng.randint(1, 3)):
        rng.choice(MUTATIONS)(rng, raw)
    return seed, bytes(raw)


def _check(case: int) -> str | None:
    """None when case `case` compiles to a plan or to well-formed diagnostics, quickly; else why not."""
    seed, raw = _mutant(case)
    start = time.process_time()  # the compiler's own CPU time: the suite shares its cores
    try:
        result = compile_bytes(raw, seed, hashed=False)
        result.render_diagnostics(limit=SHOWN)
        json.dumps(json_report(result.diagnostics))
    except Exception:  # noqa: BLE001 - the point is to catch every one
        return f"case {case} ({seed.name}): {traceback.format_exc(limit=-3)}"
    took = time.process_time() - start
    if result.plan is None and not result.errors:
        return f"case {case} ({seed.name}): no plan and no error"
    bad = [d for d in result.diagnostics if d.code not in CODES or not d.message or d.line < 0]
    if bad:
        return f"case {case} ({seed.name}): malformed diagnostics {bad[:2]}"
    if took > SLOW_S:
        return f"case {case} ({seed.name}): took {took:.1f}s"
    return None


def test_the_seeds_are_valid_meshes() -> None:
    assert len(SEEDS) >= 5
    for seed in SEEDS:
        result = compile_bytes(TEXTS[seed], seed)
        assert result.plan is not None, (seed, result.render_diagnostics())


def test_a_thousand_mutated_meshes_never_crash_the_compiler() -> None:
    start = time.perf_counter()
    failures = [f for f in map(_check, range(CASES)) if f]
    took = time.perf_counter() - start
    assert failures == [], f"{len(failures)} of {CASES} crashed:\n" + "\n".join(failures[:5])
    assert took < 60, f"{CASES} cases took {took:.0f}s"


def test_the_mutations_reach_every_kind_of_outcome() -> None:
    """The fuzzer is not vacuous: among the first cases are plans, syntax errors, schema errors,
    undecodable files and too-deep documents."""
    codes: set[str] = set()
    plans = 0
    for case in range(300):
        seed, raw = _mutant(case)
        result = compile_bytes(raw, seed, hashed=False)
        plans += result.plan is not None
        codes |= {d.code for d in result.diagnostics}
    assert plans > 0
    assert {"MESH101", "MESH104", "MESH107", "MESH202", "MESH204"} <= codes, sorted(codes)
