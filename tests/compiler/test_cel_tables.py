"""celpy's CEL parser made from meshctl/compiler/cel_tables.json (not from its grammar, 0.15 s a
process) parses as the one celpy makes: the same trees, positions and errors; and the compiled
subset's newer forms (comprehension macros, literal indexes, names read in place, tests of code
that is a bool) answer fast and as celpy does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import celpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cel import CORPUS, ENV, EXPRESSIONS, FAST, MODEL, _celpy, _check_fast_value, _fast, _same

from meshctl.compiler import cel, cel_tables

BAD = ["size(", "a ++ b", "1 +", "'abc", "model.x y", "a[", "{1:}", "a ? b", "@", "a.b(", "1 2", "",
       " ", "a &&", "x in [1,2", '"', "a.#", "a\n+\n*b", "true false", "f(,)", "a..b", "1.2.3", "[1,2",
       "{'a': 1", "!", "a = b", "a == = b", "model.reads.all(p,", "1u +", "b'\\x'"]
GOOD = ["true && false || 1.5e3 > 2u", "b'x' == r'y' ? {'a': 1} : [1,2][0]", "-1 - -2 % 3 / 4",
        "a.b.c(d, e)[f]", "'''x'''", "Foo{a: 1}", ".a.b", "0x1F + 1u", "a\n&&\nb // c", "[]", "{}"]

LOADED, CELPYS = cel_tables.load(), cel_tables.made_by_celpy()


def _parsed(parser: Any, text: str) -> tuple:
    """Everything of a parse a caller sees: the tree (with its tokens' types), its positions, or
    the error with its position, first line and the tokens it expected."""
    try:
        tree = parser.parse(text)
    except Exception as err:  # noqa: BLE001
        return ("error", type(err).__name__, str(err).splitlines()[0], getattr(err, "line", None),
                getattr(err, "column", None), sorted(getattr(err, "expected", None) or []),
                sorted(getattr(err, "allowed", None) or []), repr(getattr(err, "token", None)))
    return ("tree", repr(tree), [None if t.meta.empty else (t.meta.line, t.meta.column, t.meta.end_line,
                                                          t.meta.end_column, t.meta.start_pos)
                                 for t in tree.iter_subtrees()])


def test_the_shipped_tables_are_this_lark_and_celpy() -> None:
    assert LOADED is not None, "regenerate: python -m meshctl.compiler.cel_tables"
    assert LOADED.source_path == "<deserialized>" and CELPYS is not LOADED


@pytest.mark.parametrize("text", CORPUS + BAD + GOOD)
def test_the_tables_parse_as_celpys_grammar(text: str) -> None:
    assert _parsed(LOADED, text) == _parsed(CELPYS, text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(EXPRESSIONS, st.text(alphabet="ab.()[]{}'\",:?!&|=<>+-*/%0123456789 \n", max_size=12)))
def test_random_texts_parse_as_with_celpys_grammar(text: str) -> None:
    assert _parsed(LOADED, text) == _parsed(CELPYS, text)


def test_other_or_broken_tables_are_not_used(tmp_path: Path) -> None:
    good = json.loads(cel_tables.TABLES.read_text())
    cases = {"missing.json": None, "broken.json": cel_tables.TABLES.read_text()[:5000],
             "other.json": json.dumps({**good, "key": "0" * 64}), "empty.json": "{}"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        assert cel_tables.load(tmp_path / name) is None, name
    (tmp_path / "same.json").write_text(json.dumps(good))
    assert cel_tables.load(tmp_path / "same.json") is not None


def test_a_compile_does_not_make_celpys_parser_from_its_grammar() -> None:
    code = ("from meshctl.compiler import policy; from celpy.celparser import CELParser; "
            "print(CELParser.CEL_PARSER); policy._ENV.compile('true'); print(CELParser.CEL_PARSER.source_path)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "<deserialized>"]  # none before the first expression


# -- the compiled subset's forms, against celpy ---------------------------------------------

CASES = {  # text: a form of the generated code the fast path answers it with
    "model.reads.all(p, model.purpose in p.purposes && p.classification != 'x')": "_all_of([",
    "model.reads.exists(p, p.jurisdiction in ['eu', 'us', 1])": "_any_of([",
    "model.reads.exists_one(p, p.jurisdiction == 'ch')": "_one_of([",
    "model.reads.map(p, p.domain) == ['north', 'south', 'east']": "for v_p in _list(",
    "model.reads.filter(p, p.jurisdiction == 'eu').size() == 2": "if _eq_str(",
    "model.reads.exists(p, p.jurisdiction in ['us', 'ch'])": "_in_strs(",
    "model.reads.all(p, 'x' != p.domain && model.name != 'a' && !(model.purpose in ['a']))": "_ne_str(",
    "model.target in ['y', 'diagnosis'] || model.name == 'x'": "_in_strs(",
    "model.reads.map(p, p.domain).exists_one(d, d == model.reads[0].domain)": "_at(",
    "model.reads[2].jurisdiction == 'ch' && model.reads[0x1].domain == 'south'": "_at(",
    "model.participants.all(p, model.participants.exists(p, p == p))": "_any_of([",
    "model.reads.all(p, p.purposes.exists(q, q == model.purpose))": "_all_of([",
    "model.training.rounds > 5 ? model.name.startsWith('m') : false": "(_starts(",
    "!(model.parameters < 100) && has(model.privacy.dp)": "(not _lt(",
    "model.features.all(f, f.startsWith('x') || f == 'radius_mean')": "(True if _starts(",
    "'audit' in model.reads[0].purposes": "_in(",
    "1 in model.participants || 'north' in model.participants": "_in(1,",
    "model.weights.all(k, model.weights[k] > 0)": "_all(",
}
DOUBTS = {  # the same forms where the fast path is unsure or sure of an error: celpy's answer
    "model.reads.all(p, p.nope)": "_all_of([", "model.reads.exists(p, p.domain)": "_any_of([",
    "model.reads.exists_one(p, 1)": "_one_of([", "model.reads[5].domain == 'x'": "_at(",
    "model.name.all(c, true)": "_all_of([", "model.reads.map(p, p.nope).size() > 0": "for v_p in _list(",
    "model.weights.filter(k, k == 'a').size() == 1": "_list(", "model.name.x": "_field(",
    "model.reads[0].domain.x == 1": "_field(", "model.reads.all(p, p.x.y)": "_field(",
    "model.reads.all(p, p[-1] == 1)": "_all(", "model.note.a": "_field(",
}


@pytest.mark.parametrize("text", list(CASES) + list(DOUBTS))
def test_the_fast_forms_answer_as_celpy(text: str) -> None:
    program = FAST.program(FAST.compile(text))
    assert program.source is not None and (CASES | DOUBTS)[text] in program.source, program.source
    variables = {"model": MODEL}
    expected = _celpy(ENV.program(ENV.compile(text)), variables)
    got = _fast(program, variables)
    assert _same(expected, got), (expected, got)
    _check_fast_value(program, variables, expected)
    if text in CASES:  # answered by the compiled code alone, a bool
        assert program.evaluate_plain(cel.Activation(variables)) in (True, False)
        assert program.truth(cel.Activation(variables)) is bool(got)
    else:
        assert program.truth(cel.Activation(variables)) is None


@settings(max_examples=200, deadline=None)
@given(EXPRESSIONS.map(lambda t: f"v.all(x, {t.replace('w', 'x')})"), st.lists(st.integers(0, 2), max_size=3))
def test_truth_is_the_value_or_none(text: str, v: list) -> None:
    try:
        program = FAST.program(FAST.compile(text))
    except Exception:  # noqa: BLE001 - not CEL
        return
    variables = {"v": v, "w": None}
    value = _fast(program, variables)
    truth = program.truth(cel.Activation(variables))
    assert truth is None or (isinstance(value, celpy.celtypes.BoolType) and truth is bool(value))


def test_an_expression_nested_past_pythons_limits_runs_on_celpy() -> None:
    text = "model" + ".training" * 200 + " == 1"  # (Python: too many nested parentheses)
    program = FAST.program(FAST.compile(text))
    assert not program.compiled
    expected = _celpy(ENV.program(ENV.compile(text)), {"model": MODEL})
    assert _same(expected, _fast(program, {"model": MODEL}))
