"""CEL compiled to Python: policies are parsed once and evaluated over plain data.

celpy parses (so syntax errors, and their positions, are celpy's own); the tree
of an expression in the common subset is then translated into one Python
function over plain dicts, lists, strs, ints, floats, bools and None. The subset:
literals, identifiers, `a.b`, `a[i]`, `in`, comparisons, + - * / %, && || !, ?:,
list and map literals, size, has, contains/startsWith/endsWith/matches,
int/double/string, and the all/exists/exists_one/map/filter macros.

The fast path follows the CEL specification where celpy 0.5 does not: numbers
compare across int and double (`rounds <= 20.0`, `1 == 1.0`), values of different
types are unequal (`true == 1` is false, `m != null` is true), a negative list
index is an error, NaN is unequal to everything (only `!=` is true) and
`matches()` uses RE2 (google-re2): an invalid RE2 pattern (look-arounds,
backreferences) is an evaluation error, so a policy using it fails closed. `&&`,
`||`, `all` and `exists` absorb an error where the other side decides, as CEL does.
Any other type mismatch or unusual case makes it hand that one evaluation to
celpy's interpreter, whose result or CELEvalError is then the answer; an
expression outside the subset is always evaluated by celpy.

    env = Environment()
    program = env.program(env.compile("size(model.participants) >= 2"))
    program.evaluate({"model": {"participants": ["a", "b"]}})  # BoolType(True)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

import celpy
import re2
from celpy import celtypes
from lark import Token, Tree

from meshctl.compiler import cel_tables

CelError = celpy.CELEvalError
"""What evaluation raises: celpy's own error, with celpy's message."""

INT_MIN, INT_MAX = -(2**63), 2**63 - 1


class Unsupported(Exception):
    """The expression uses CEL outside the compiled subset (celpy evaluates it)."""


class Activation:
    """Variables for evaluation: plain data, converted to celpy's types only if needed.

    Variables that are already celpy values (celpy.json_to_cel) are accepted too:
    they are converted to plain data once, and kept for celpy.
    """

    def __init__(self, variables: Mapping[str, Any]) -> None:
        try:  # plain values are used as they are; celpy values are converted
            self.plain: dict[str, Any] | None = {
                k: _plain(v) if isinstance(v, _CEL_TYPES) else v for k, v in variables.items()}
        except _Doubt:  # uint, bytes, timestamps...: celpy evaluates everything
            self.plain = None
        if any(isinstance(v, _CEL_TYPES) for v in variables.values()):
            self.__dict__["cel"] = dict(variables)

    @cached_property
    def cel(self) -> dict[str, Any]:
        """The same variables as celpy values (for a fallback evaluation)."""
        return {name: celpy.json_to_cel(value) for name, value in self.plain.items()}


def _plain(value: Any) -> Any:
    """celpy values (or plain data) as plain data; raises _Doubt for what has no plain twin."""
    kind = type(value)
    if kind in (bool, int, float, str, type(None)):
        return value
    if isinstance(value, celtypes.BoolType):
        return bool(value)
    if isinstance(value, (celtypes.UintType, bytes)):
        raise _Doubt
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    raise _Doubt


_LAST: tuple[Any, Activation] | None = None


def _activation(variables: Activation | Mapping[str, Any]) -> Activation:
    """The Activation of `variables`; the last one is reused while the same object comes.

    Callers evaluate many programs over one variables dict, so it is converted
    once; a variables dict must not be changed between evaluations.
    """
    global _LAST  # a one-entry cache keyed by identity
    if isinstance(variables, Activation):
        return variables
    last = _LAST
    if last is not None and last[0] is variables:
        return last[1]
    act = Activation(variables)
    _LAST = (variables, act)
    return act


class Program:
    """One compiled expression; `evaluate` returns celpy values or raises CelError."""

    def __init__(self, ast: Tree, env: celpy.Environment) -> None:
        self.ast = ast
        self._env = env
        self._runner: Any = None
        try:
            self.source: str | None = _Translator().function(ast)
            self._fast: Callable[[dict], Any] | None = _build(self.source)
        except (Unsupported, SyntaxError, RecursionError):  # (Python's limits on nesting: celpy runs it)
            self.source, self._fast = None, None

    @property
    def function(self) -> Callable[[dict], Any] | None:
        """The compiled function of plain variables (Activation.plain), or None outside the subset.
        Its value is the answer when it is True or False; it raises on an error or a doubt, and any
        other value or exception is for `evaluate` to answer."""
        return self._fast

    @property
    def compiled(self) -> bool:
        """Whether the expression is in the compiled subset (else celpy runs it)."""
        return self._fast is not None

    def evaluate(self, activation: Activation | Mapping[str, Any]) -> Any:
        """The value as celpy gives it (BoolType(True), ...); raises CelError.

        A bool comes from the fast path; anything else (rare for a policy, and
        then an error to report) is celpy's own value, so that its type is too.
        """
        act = _activation(activation)
        value = self.evaluate_plain(act)
        if value is True:
            return _TRUE
        if value is False:
            return _FALSE
        return self._celpy(act)

    def evaluate_plain(self, activation: Activation | Mapping[str, Any]) -> Any:
        """The value as plain Python data where the fast path is certain, else `_FALLBACK`."""
        plain = activation.plain if isinstance(activation, Activation) else activation
        if self._fast is None or plain is None:
            return _FALLBACK
        try:
            return self._fast(plain)
        except _Error as err:  # certain: the specification says this is an error
            raise CelError(err.args[0]) from None
        except Exception:  # noqa: BLE001 - any doubt goes to celpy, which decides
            return _FALLBACK

    def truth(self, activation: Activation) -> bool | None:
        """True or False where the fast path is certain the value is that bool, else None
        (an error, another value or a doubt: `evaluate` gives the answer). The value `evaluate`
        gives then is BoolType of the same bool; this skips its wrapping and conversions."""
        fast, plain = self._fast, activation.plain
        if fast is None or plain is None:
            return None
        try:
            value = fast(plain)
        except Exception:  # noqa: BLE001 - an error or a doubt: evaluate() decides
            return None
        return value if value is True or value is False else None

    def _celpy(self, act: Activation) -> Any:
        if self._runner is None:
            self._runner = self._env.program(self.ast)
        value = self._runner.evaluate(act.cel)
        if isinstance(value, CelError):
            raise value
        return value


_TRUE, _FALSE = celpy.celtypes.BoolType(True), celpy.celtypes.BoolType(False)
_FALLBACK: Any = type("Fallback", (), {"__repr__": lambda self: "<celpy decides>"})()


class Environment:
    """A drop-in for celpy.Environment: `compile` parses, `program` compiles to Python."""

    def __init__(self) -> None:
        self._made: celpy.Environment | None = None

    @property
    def _env(self) -> celpy.Environment:
        """celpy's environment, made on the first use (a mesh without policies never makes it), with
        its parser from shipped tables instead of its grammar (meshctl.compiler.cel_tables)."""
        if self._made is None:
            cel_tables.install()
            self._made = celpy.Environment()
        return self._made

    def compile(self, text: str) -> Tree:
        """celpy's parse tree of `text`; raises celpy's CELParseError with its position."""
        return self._env.compile(text)

    def program(self, ast: Tree) -> Program:
        """The compiled program of a parse tree."""
        return Program(ast, self._env)


def _build(source: str) -> Callable[[dict], Any]:
    namespace = dict(_HELPERS)
    exec(compile(source, "<cel>", "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace["_cel"]


# ---------------------------------------------------------------------------
# Translation: parse tree -> Python source of `def _cel(_act): return ...`

_BINARY = {
    "relation_lt": "_lt", "relation_le": "_le", "relation_gt": "_gt", "relation_ge": "_ge",
    "relation_eq": "_eq", "relation_ne": "_ne", "relation_in": "_in",
    "addition_add": "_add", "addition_sub": "_sub",
    "multiplication_mul": "_mul", "multiplication_div": "_div", "multiplication_mod": "_mod",
}
_FUNCTIONS = {"size": "_size", "int": "_int", "double": "_double", "string": "_string"}
_METHODS = {"size": ("_size", 0), "contains": ("_contains", 1), "startsWith": ("_starts", 1),
            "endsWith": ("_ends", 1), "matches": ("_matches", 1)}
_MACROS = {"all", "exists", "exists_one", "map", "filter"}
_OVER_VALUES = {"all": "_all_of", "exists": "_any_of", "exists_one": "_one_of"}
"""The macros over the list of their body's values, for a body that cannot raise an error: every
element is evaluated either way, so only the first doubt (or exception) would differ, and any of
them hands the evaluation to celpy."""
_NAME = re.compile(r"v_[A-Za-z_][A-Za-z0-9_]*|_act\['[A-Za-z_][A-Za-z0-9_]*'\]")
"""Generated code that names a value (a macro variable, a variable of the activation)."""
_PLAIN_STRING = re.compile(r"""[rR]?("[^"\\\n]*"|'[^'\\\n]*')""")


class _Translator:
    """Python source for one expression; raises Unsupported outside the subset."""

    def __init__(self) -> None:
        self.scope: list[str] = []
        self.bools: set[str] = set()
        """Generated code whose value is True or False whenever it has one."""
        self.texts: set[str] = set()
        """Generated code that is a str literal."""
        self.text_lists: dict[str, str] = {}
        """Generated list literals of str literals only (one at least), as a tuple literal."""

    def _test(self, source: str) -> str:
        """`source` where Python tests it: _bool() makes sure it is a bool, unless it is one."""
        return source if source in self.bools else f"_bool({source})"

    def _bool(self, source: str) -> str:
        """`source`, noted as code whose value is a bool."""
        self.bools.add(source)
        return source

    def function(self, tree: Tree) -> str:
        """The whole module source: one function of the activation."""
        return f"def _cel(_act):\n    return {self.node(tree)}\n"

    def node(self, tree: Any) -> str:
        if not isinstance(tree, Tree):
            raise Unsupported(repr(tree))
        method = getattr(self, f"t_{tree.data}", None)
        if method is None:
            raise Unsupported(str(tree.data))
        return method(tree.children)

    def t_expr(self, kids: list) -> str:
        if len(kids) == 1:
            return self.node(kids[0])
        cond, then, other = (self.node(k) for k in kids)
        return f"({then} if {self._test(cond)} else {other})"

    def t_conditionalor(self, kids: list) -> str:
        if len(kids) == 1:
            return self.node(kids[0])
        left, right = self.node(kids[0]), self.node(kids[1])
        if _may_fail(left):  # an error on the left is absorbed if the right is true
            return self._bool(f"_or(lambda: {left}, lambda: {right})")
        return self._bool(f"(True if {self._test(left)} else {self._test(right)})")

    def t_conditionaland(self, kids: list) -> str:
        if len(kids) == 1:
            return self.node(kids[0])
        left, right = self.node(kids[0]), self.node(kids[1])
        if _may_fail(left):  # an error on the left is absorbed if the right is false
            return self._bool(f"_and(lambda: {left}, lambda: {right})")
        return self._bool(f"({self._test(right)} if {self._test(left)} else False)")

    def _binary(self, kids: list) -> str:
        if len(kids) == 1:
            return self.node(kids[0])
        op, right = kids
        helper = _BINARY.get(op.data) if isinstance(op, Tree) else None
        if helper is None or len(op.children) != 1:
            raise Unsupported(str(op))
        left, right = self.node(op.children[0]), self.node(right)
        if helper in ("_eq", "_ne") and (left in self.texts or right in self.texts):
            value, text = (right, left) if left in self.texts else (left, right)
            return self._bool(f"{helper}_str({value}, {text})")  # (the literal has no effect: any order)
        if helper == "_in" and right in self.text_lists:
            return self._bool(f"_in_strs({left}, {self.text_lists[right]})")
        source = f"{helper}({left}, {right})"
        return self._bool(source) if op.data.startswith("relation_") else source

    t_relation = t_addition = t_multiplication = _binary

    def t_unary(self, kids: list) -> str:
        if len(kids) == 1:
            return self.node(kids[0])
        op, operand = kids
        if op.data == "unary_not":
            return self._bool(f"(not {self._test(self.node(operand))})")
        if op.data == "unary_neg":
            return f"_neg({self.node(operand)})"
        raise Unsupported(str(op.data))

    def t_member(self, kids: list) -> str:
        return self.node(kids[0])

    def t_primary(self, kids: list) -> str:
        return self.node(kids[0])

    def t_paren_expr(self, kids: list) -> str:
        return self.node(kids[0])

    def t_member_dot(self, kids: list) -> str:
        target, name = self.node(kids[0]), repr(str(kids[1]))
        if _NAME.fullmatch(target):  # a name: read twice, no call (what _field does)
            return f"({target}[{name}] if type({target}) is dict else _doubt())"
        return f"_field({target}, {name})"

    def t_member_index(self, kids: list) -> str:
        target, index = kids
        key = self.node(index)
        if key.isdigit():  # a literal index that is not negative: never an error (_index's)
            return f"_at({self.node(target)}, {key})"
        return f"_index({self.node(target)}, {key})"

    def t_ident(self, kids: list) -> str:
        name = str(kids[0])
        if name in self.scope:
            return f"v_{name}"
        return f"_act[{name!r}]"

    def t_literal(self, kids: list) -> str:
        token: Token = kids[0]
        text = str(token)
        if token.type == "INT_LIT":
            value: Any = int(text, 16 if "x" in text.lower() else 10)
            if not INT_MIN <= value <= INT_MAX:
                raise Unsupported(text)
        elif token.type == "FLOAT_LIT":
            value = float(text)
        elif token.type == "STRING_LIT" and _PLAIN_STRING.fullmatch(text):
            source = repr(text[2:-1] if text[0] in "rR" else text[1:-1])
            self.texts.add(source)
            return source
        elif token.type == "BOOL_LIT":
            return self._bool(repr(text == "true"))
        elif token.type == "NULL_LIT":
            value = None
        else:
            raise Unsupported(token.type)
        return repr(value)

    def _args(self, kids: list, start: int) -> list[Tree]:
        rest = kids[start:]
        if not rest:
            return []
        if len(rest) != 1 or not isinstance(rest[0], Tree) or rest[0].data != "exprlist":
            raise Unsupported("arguments")
        return list(rest[0].children)

    def t_list_lit(self, kids: list) -> str:
        items = [self.node(i) for i in self._args(kids, 0)]
        source = "[" + "".join(f"{i}, " for i in items) + "]"
        if items and all(i in self.texts for i in items):
            self.text_lists[source] = "(" + "".join(f"{i}, " for i in items) + ")"
        return source

    def t_map_lit(self, kids: list) -> str:
        if not kids:
            return "{}"
        inits = kids[0].children
        pairs = ", ".join(f"({self.node(k)}, {self.node(v)})"
                          for k, v in zip(inits[::2], inits[1::2], strict=True))
        return f"_map([{pairs}])"

    def t_ident_arg(self, kids: list) -> str:
        name, args = str(kids[0]), self._args(kids, 1)
        if name == "has" and len(args) == 1:
            return self._has(args[0])
        if name in _FUNCTIONS and len(args) == 1:
            return f"{_FUNCTIONS[name]}({self.node(args[0])})"
        raise Unsupported(name)

    def _has(self, arg: Tree) -> str:
        node = _unwrap(arg)
        if node.data != "member_dot":
            raise Unsupported("has")
        target, name = node.children
        return self._bool(f"_has({self.node(target)}, {str(name)!r})")

    def t_member_dot_arg(self, kids: list) -> str:
        target, name, args = kids[0], str(kids[1]), self._args(kids, 2)
        if name in _MACROS and len(args) == 2:
            return self._macro(name, self.node(target), args)
        if name in _METHODS and _METHODS[name][1] == len(args):
            helper = _METHODS[name][0]
            source = f"{helper}({', '.join([self.node(target), *map(self.node, args)])})"
            return source if name == "size" else self._bool(source)
        raise Unsupported(name)

    def _macro(self, name: str, target: str, args: list[Tree]) -> str:
        var = self._macro_var(args[0])
        self.scope.append(var)
        try:
            body = self.node(args[1])
        finally:
            self.scope.pop()
        if not _may_fail(body):  # a comprehension: no call per element (any exception is a doubt)
            loop = f"for v_{var} in"
            if name == "filter":
                return f"[v_{var} {loop} _list({target}) if {self._test(body)}]"
            if name == "map":
                return f"[{body} {loop} _list({target})]"
            source = f"{_OVER_VALUES[name]}([{body} {loop} _items({target})])"
        else:
            helper = "_map_macro" if name == "map" else f"_{name}"
            source = f"{helper}({target}, lambda v_{var}: {body})"
        return source if name in ("map", "filter") else self._bool(source)

    def _macro_var(self, arg: Tree) -> str:
        node = _unwrap(arg)
        if node.data != "ident":
            raise Unsupported("macro variable")
        return str(node.children[0])


def _may_fail(source: str) -> bool:
    """Whether generated code can raise a certain _Error (the helpers that raise it)."""
    return "_index(" in source or "_matches(" in source


_WRAPPERS = frozenset({"expr", "conditionalor", "conditionaland", "relation", "addition",
                       "multiplication", "unary", "member", "primary", "paren_expr"})


def _unwrap(tree: Tree) -> Tree:
    """The one node a chain of single-child precedence levels stands for."""
    node = tree
    while isinstance(node, Tree) and node.data in _WRAPPERS:
        if len(node.children) != 1:
            raise Unsupported("expected a name")
        node = node.children[0]
    if not isinstance(node, Tree):
        raise Unsupported("expected a name")
    return node


# ---------------------------------------------------------------------------
# Runtime helpers: strict where celpy is strict; anything doubtful raises.


class _Doubt(Exception):
    """The fast path cannot be sure: celpy evaluates."""


class _Error(Exception):
    """A certain evaluation error (the CEL specification's, where celpy differs)."""


_CEL_TYPES = (celtypes.BoolType, celtypes.IntType, celtypes.UintType, celtypes.DoubleType,
              celtypes.StringType, celtypes.ListType, celtypes.MapType, celtypes.BytesType)
_SCALARS = (bool, int, float, str, type(None))
_NUMBERS = (int, float)
_PLAIN_TYPES = (*_SCALARS, list, dict)
_SCALAR_SET, _PLAIN_SET = frozenset(_SCALARS), frozenset(_PLAIN_TYPES)


def _bool(value: Any) -> bool:
    if value is True or value is False:
        return value
    raise _Doubt


def _same(a: Any, b: Any) -> type:
    kind = type(a)
    if kind is not type(b):
        raise _Doubt
    return kind


def _or(left: Callable[[], Any], right: Callable[[], Any]) -> bool:
    """CEL `||`: true if either side is true, even where the other is an error."""
    try:
        first: Any = _bool(left())
    except _Error as err:
        first = err
    if first is True or _bool(right()):
        return True
    if isinstance(first, _Error):
        raise first
    return False


def _and(left: Callable[[], Any], right: Callable[[], Any]) -> bool:
    """CEL `&&`: false if either side is false, even where the other is an error."""
    try:
        first: Any = _bool(left())
    except _Error as err:
        first = err
    if first is False or not _bool(right()):
        return False
    if isinstance(first, _Error):
        raise first
    return True


def _eq(a: Any, b: Any) -> bool:
    """CEL equality: numbers across int and double; other different types are unequal."""
    kind, other = type(a), type(b)
    if kind is other and kind in _SCALAR_SET:  # (the common case first: two strs)
        return a == b
    if kind in _NUMBERS and other in _NUMBERS:
        return a == b  # exact across int and double; NaN is unequal to everything
    if kind is not other:
        if kind in _PLAIN_TYPES and other in _PLAIN_TYPES:
            return False  # true == 1, {...} == null: different types, not equal
        raise _Doubt
    if kind in _SCALARS:
        return a == b
    if kind is list:
        if len(a) != len(b):
            return False
        results = [_eq(x, y) for x, y in zip(a, b, strict=True)]  # every pair is checked
        return all(results)
    if kind is dict:
        if a.keys() != b.keys():
            return False
        results = [_eq(a[k], b[k]) for k in a]
        return all(results)
    raise _Doubt


def _ne(a: Any, b: Any) -> bool:
    return not _eq(a, b)


def _eq_str(value: Any, text: str) -> bool:
    """_eq(value, text) for a str literal `text`."""
    kind = type(value)
    if kind is str:
        return value == text
    if kind in _PLAIN_SET:
        return False
    raise _Doubt


def _ne_str(value: Any, text: str) -> bool:
    """_ne(value, text) for a str literal `text`."""
    return not _eq_str(value, text)


def _in_strs(item: Any, texts: tuple[str, ...]) -> bool:
    """_in(item, [texts...]) for a list literal of str literals (one at least)."""
    kind = type(item)
    if kind is str:
        return item in texts
    if kind in _PLAIN_SET:
        return False
    raise _Doubt


def _ordered(a: Any, b: Any) -> None:
    """Ordering is defined within a type, and across int and double (NaN: false)."""
    kind, other = type(a), type(b)
    if kind in _NUMBERS and other in _NUMBERS:
        return
    if kind is not other or kind not in (str, bool):
        raise _Doubt


def _lt(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return a < b


def _le(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return a <= b


def _gt(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return a > b


def _ge(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return a >= b


def _in(item: Any, container: Any) -> bool:
    kind = type(container)
    if kind is list:
        if type(item) is str and _PLAIN_SET.issuperset(map(type, container)):
            return item in container  # (a str is equal to an equal str only, as _eq says)
        results = [_eq(item, x) for x in container]  # a mismatch anywhere is celpy's call
        return any(results)
    if kind is dict and type(item) is str and all(type(k) is str for k in container):
        return item in container
    raise _Doubt


def _int_result(value: int) -> int:
    if not INT_MIN <= value <= INT_MAX:
        raise _Doubt
    return value


def _add(a: Any, b: Any) -> Any:
    kind = _same(a, b)
    if kind is int:
        return _int_result(a + b)
    if kind in (float, str, list):
        return a + b
    raise _Doubt


def _sub(a: Any, b: Any) -> Any:
    kind = _same(a, b)
    if kind is int:
        return _int_result(a - b)
    if kind is float:
        return a - b
    raise _Doubt


def _mul(a: Any, b: Any) -> Any:
    kind = _same(a, b)
    if kind is int:
        return _int_result(a * b)
    if kind is float:
        return a * b
    raise _Doubt


def _div(a: Any, b: Any) -> Any:
    kind = _same(a, b)
    if kind is int and b != 0:
        quotient = abs(a) // abs(b)
        return _int_result(quotient if (a < 0) == (b < 0) else -quotient)
    if kind is float and b != 0.0:
        return a / b
    raise _Doubt


def _mod(a: Any, b: Any) -> Any:
    if _same(a, b) is int and b != 0:
        remainder = abs(a) % abs(b)
        return remainder if a >= 0 else -remainder
    raise _Doubt


def _neg(a: Any) -> Any:
    kind = type(a)
    if kind is int:
        return _int_result(-a)
    if kind is float:
        return -a
    raise _Doubt


def _field(target: Any, name: str) -> Any:
    if type(target) is dict:
        return target[name]
    raise _Doubt


def _index(target: Any, key: Any) -> Any:
    kind = type(target)
    if kind is list and type(key) is int:
        if key < 0:
            raise _Error(f"index out of range: {key}")
        return target[key]
    if kind is dict and type(key) is str:
        return target[key]
    raise _Doubt


def _at(target: Any, key: int) -> Any:
    """`_index` with a literal index that is not negative."""
    if type(target) is list:
        return target[key]
    raise _Doubt


def _doubt() -> Any:
    raise _Doubt


def _has(target: Any, name: str) -> bool:
    if type(target) is dict:
        return name in target
    raise _Doubt


def _map(pairs: list[tuple[Any, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if type(key) is not str or key in out:
            raise _Doubt
        out[key] = value
    return out


def _size(value: Any) -> int:
    if type(value) in (str, list, dict):
        return len(value)
    raise _Doubt


def _strings(*values: Any) -> None:
    if any(type(v) is not str for v in values):
        raise _Doubt


def _contains(text: Any, part: Any) -> bool:
    if type(text) is str and type(part) is str:
        return part in text
    raise _Doubt


def _starts(text: Any, part: Any) -> bool:
    if type(text) is str and type(part) is str:
        return text.startswith(part)
    raise _Doubt


def _ends(text: Any, part: Any) -> bool:
    if type(text) is str and type(part) is str:
        return text.endswith(part)
    raise _Doubt


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # an invalid pattern is our error, not a line on stderr
_PATTERNS: dict[str, Any] = {}


def _matches(text: Any, pattern: Any) -> bool:
    """RE2 semantics, as cel-go, cel-cpp and celpy: an invalid RE2 pattern is an error."""
    _strings(text, pattern)
    compiled = _PATTERNS.get(pattern)
    if compiled is None:
        try:
            compiled = re2.compile(pattern, _RE2_OPTIONS)
        except re2.error as err:
            compiled = _Error(f"invalid RE2 pattern {pattern!r}: {_re2_reason(err)}")
        compiled = _PATTERNS.setdefault(pattern, compiled)
    if isinstance(compiled, _Error):
        raise compiled
    return compiled.search(text) is not None


def _re2_reason(err: Exception) -> str:
    reason = err.args[0] if err.args else type(err).__name__
    return reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)


def _int(value: Any) -> int:
    kind = type(value)
    if kind is int:
        return value
    if kind is float and math.isfinite(value) and abs(value) < 2.0**63:
        return _int_result(int(value))
    if kind is str and re.fullmatch(r"-?[0-9]+", value):
        return _int_result(int(value))
    raise _Doubt


_DOUBLE_TEXT = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|NaN|-?Infinity")


def _double(value: Any) -> float:
    kind = type(value)
    if kind is float:
        return value
    if kind is int:
        return float(value)
    if kind is str and _DOUBLE_TEXT.fullmatch(value):
        return float(value)  # double('NaN'), double('1.5e3')
    raise _Doubt


def _string(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return value
    if kind is int:
        return str(value)
    raise _Doubt


def _items(target: Any) -> list:
    kind = type(target)
    if kind is list:
        return target
    if kind is dict:
        return list(target)
    raise _Doubt


def _verdicts(target: Any, predicate: Callable[[Any], Any]) -> list[Any]:
    """Each element's bool, or its certain _Error (doubts raise: celpy decides)."""
    out: list[Any] = []
    for x in _items(target):  # no short cut: doubts anywhere count
        try:
            out.append(_bool(predicate(x)))
        except _Error as err:
            out.append(err)
    return out


def _all(target: Any, predicate: Callable[[Any], Any]) -> bool:
    results = _verdicts(target, predicate)
    if False in results:
        return False
    for result in results:
        if isinstance(result, _Error):
            raise result
    return True


def _exists(target: Any, predicate: Callable[[Any], Any]) -> bool:
    results = _verdicts(target, predicate)
    if True in results:
        return True
    for result in results:
        if isinstance(result, _Error):
            raise result
    return False


def _exists_one(target: Any, predicate: Callable[[Any], Any]) -> bool:
    return [_bool(predicate(x)) for x in _items(target)].count(True) == 1


def _all_of(values: list) -> bool:
    """`all` over its body's values (each must be a bool)."""
    if not _BOOL.issuperset(map(type, values)):
        raise _Doubt
    return False not in values


def _any_of(values: list) -> bool:
    """`exists` over its body's values (each must be a bool)."""
    if not _BOOL.issuperset(map(type, values)):
        raise _Doubt
    return True in values


def _one_of(values: list) -> bool:
    """`exists_one` over its body's values (each must be a bool)."""
    if not _BOOL.issuperset(map(type, values)):
        raise _Doubt
    return values.count(True) == 1


_BOOL = frozenset({bool})


def _list(target: Any) -> list:
    if type(target) is not list:
        raise _Doubt
    return target


def _map_macro(target: Any, function: Callable[[Any], Any]) -> list:
    if type(target) is not list:
        raise _Doubt
    return [function(x) for x in target]


def _filter(target: Any, predicate: Callable[[Any], Any]) -> list:
    if type(target) is not list:
        raise _Doubt
    return [x for x in target if _bool(predicate(x))]


_HELPERS: dict[str, Any] = {
    name: value for name, value in globals().items()
    if name.startswith("_") and callable(value) and not isinstance(value, type)
}
