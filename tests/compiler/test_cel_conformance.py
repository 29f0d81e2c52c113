"""CEL conformance corpus: expected answers written from the CEL specification
(github.com/google/cel-spec, langdef.md: equality and ordering across int and
double, heterogeneous equality is false, negative or out-of-range index is an
error, NaN is unequal to everything, `matches` is RE2, && and || absorb errors).

meshctl's compiled path must answer every case as the spec says. celpy 0.5 (the
reference interpreter) is run on the same corpus and its pass count recorded:
it departs from the spec on heterogeneous comparisons, `true == 1` and negative
indexes, so its count is pinned (a change means celpy moved: update CELPY_PASSES).
"""

from __future__ import annotations

from typing import Any

import celpy
import pytest

from meshctl.compiler import cel

ERROR = object()
"""The expected answer is an evaluation error."""

MODEL = {
    "training": {"rounds": 10, "learning_rate": 0.05},
    "participants": ["north", "south"],
    "weights": {"a": 1, "b": 2},
    "note": None,
    "name": "m007",
}

CORPUS: list[tuple[str, Any]] = [
    # numbers across int and double
    ("1 == 1.0", True),
    ("1.0 == 1", True),
    ("1 != 1.5", True),
    ("2 < 2.5", True),
    ("3 > 2.5", True),
    ("2 <= 2.0", True),
    ("2.0 >= 3", False),
    ("model.training.rounds <= 20.0", True),
    ("model.training.rounds > 9.5", True),
    ("model.training.learning_rate < 1", True),
    ("1 in [1.0, 2.0]", True),
    ("[1, 2] == [1.0, 2.0]", True),
    ("{'a': 1} == {'a': 1.0}", True),
    # values of different types are unequal, never equal
    ("true == 1", False),
    ("1 == true", False),
    ("false == 0", False),
    ("true != 1", True),
    ("'1' == 1", False),
    ("null == false", False),
    ("[1] == [true]", False),
    ("[1, 2] == [1]", False),
    ("{'a': 1} == {'b': 1}", False),
    ("true in [1, 2]", False),
    # null
    ("model.weights != null", True),
    ("model.weights == null", False),
    ("model.note == null", True),
    ("model.participants != null", True),
    ("null == null", True),
    # list index
    ("[1, 2, 3][0] == 1", True),
    ("[1, 2, 3][-1] == 3", ERROR),
    ("model.participants[-1] == 'south'", ERROR),
    ("[1, 2, 3][3] == 3", ERROR),
    ("[1, 2, 3][-1] == 3 || true", True),
    ("false && [1][-1] == 1", False),
    ("[1][-1] == 1 && false", False),
    # NaN
    ("double('NaN') == double('NaN')", False),
    ("double('NaN') != double('NaN')", True),
    ("double('NaN') < 1.0", False),
    ("double('NaN') > 1.0", False),
    ("double('NaN') <= 1.0", False),
    ("double('NaN') >= double('NaN')", False),
    ("double('NaN') == 1", False),
    ("double('NaN') < 1", False),
    # matches() is RE2
    ("'aa'.matches('^a{,2}$')", False),
    ("'a{,2}'.matches('^a{,2}$')", True),
    ("'aaa'.matches('^a{1,2}$')", False),
    ("'abc'.matches('b')", True),
    ("'abc'.matches('^b')", False),
    ("model.name.matches('^m[0-9]+$')", True),
    ("'ab'.matches('a(?=b)')", ERROR),
    ("'ab'.matches('a(?!c)')", ERROR),
    ("'aa'.matches('(a)\\\\1')", ERROR),
    ("'x'.matches('[')", ERROR),
    ("'ab'.matches('a(?=b)') || true", True),
    # macros absorb errors where another element decides
    ("[0, 1].exists(i, [1][-1] == 1 || i == 1)", True),
    ("[0, 1].all(i, i == 1)", False),
]


def _answer(value: Any) -> Any:
    if isinstance(value, Exception):
        return ERROR
    return bool(value) if isinstance(value, celpy.celtypes.BoolType) else value


def _meshctl(text: str) -> Any:
    env = cel.Environment()
    program = env.program(env.compile(text))
    # a string with a backslash is outside the subset: celpy (with RE2) answers it
    assert program.compiled or "\\" in text, f"{text} is outside the compiled subset"
    try:
        return _answer(program.evaluate({"model": MODEL}))
    except cel.CelError:
        return ERROR


def _celpy(text: str) -> Any:
    env = celpy.Environment()
    try:
        value = env.program(env.compile(text)).evaluate({"model": celpy.json_to_cel(MODEL)})
    except Exception as err:  # noqa: BLE001 - an escaping exception is an error answer
        value = err
    return _answer(value)


def _passes(answer: Any, expected: Any) -> bool:
    if expected is ERROR or answer is ERROR:
        return answer is expected
    return type(answer) is type(expected) and answer == expected


CELPY_PASSES = 33
"""celpy 0.5's count on this corpus (the compiled path's is len(CORPUS))."""


@pytest.mark.parametrize(("text", "expected"), CORPUS)
def test_compiled_path_follows_the_spec(text: str, expected: Any) -> None:
    assert _passes(_meshctl(text), expected), (text, _meshctl(text), expected)


def test_pass_counts_of_the_compiled_path_and_of_celpy() -> None:
    compiled = sum(_passes(_meshctl(t), e) for t, e in CORPUS)
    reference = sum(_passes(_celpy(t), e) for t, e in CORPUS)
    print(f"CEL conformance: compiled path {compiled}/{len(CORPUS)}, "
          f"celpy {reference}/{len(CORPUS)}")
    assert len(CORPUS) >= 40
    assert compiled == len(CORPUS)
    assert reference == CELPY_PASSES


def test_invalid_re2_pattern_makes_a_policy_fail_closed() -> None:
    from meshctl.runtime.governance import PolicyError, _evaluate

    with pytest.raises(PolicyError, match="invalid RE2 pattern"):
        _evaluate("model.name.matches('m(?=0)')", {"model": MODEL})
