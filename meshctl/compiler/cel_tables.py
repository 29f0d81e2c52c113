"""celpy's CEL parser, made from tables shipped beside this file instead of from its grammar.

celpy makes one Lark LALR parser per process from its grammar (`celpy/cel.lark`), which costs
0.13 to 0.22 CPU s: more than a small `meshctl validate` spends on everything else after its
imports. `cel_tables.json` holds what Lark's own analysis of that grammar gives (the rules,
terminals and parse table, as `Lark.memo_serialize` writes them), as JSON: read without running
anything (no pickle), and used only when its key matches the sha256 of the Lark version, celpy's
`celparser.py` (the options it gives Lark) and `cel.lark` installed now. Any other Lark or celpy,
a missing or a broken file: celpy makes its parser as it always does. Deleting the file is safe.

Regenerate after upgrading lark or celpy (tests/compiler/test_cel_tables.py says when):

    python -m meshctl.compiler.cel_tables
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import celpy
import lark
from celpy.celparser import CELParser
from lark import Lark, Token

TABLES = Path(__file__).with_name("cel_tables.json")
FORMAT = 1
"""Version of the file's layout; part of the key."""
_CELPY = Path(celpy.__file__).parent


def key() -> str:
    """What the tables must have been made from: this Lark, celpy's parser and grammar."""
    digest = hashlib.sha256(f"meshctl cel tables {FORMAT} lark {lark.__version__}\0".encode())
    for name in ("celparser.py", "cel.lark"):
        digest.update((_CELPY / name).read_bytes())
    return digest.hexdigest()


def load(path: Path | None = None) -> Lark | None:
    """celpy's parser (what `CELParser()` makes) from the tables at `path` (TABLES), or None when
    they are missing, broken or made for another Lark, celpy or grammar."""
    try:
        entry = json.loads((path or TABLES).read_bytes(), object_hook=_decode)
        if entry["key"] != key():
            return None
        data, memo = entry["data"], entry["memo"]
        for rule in memo.values():  # rule names are Tokens where Lark's grammar loader made them so
            if rule["__type__"] == "Rule" and rule["origin"]["name"] in entry["token_names"]:
                rule["origin"]["name"] = Token("RULE", rule["origin"]["name"])
        return Lark._load_from_dict(  # (Lark.load without its pickle)
            data, memo, lexer_callbacks={"IDENT": CELParser.ambiguous_literals},
            tree_class=lark.Tree, g_regex_flags=re.MULTILINE, propagate_positions=True, debug=True)
    except Exception:  # noqa: BLE001 - any doubt: celpy makes the parser from its grammar
        return None


def install() -> None:
    """Give celpy this parser (its CELParser.CEL_PARSER singleton) unless it has one already."""
    if CELParser.CEL_PARSER is None:
        CELParser.CEL_PARSER = load()


def made_by_celpy() -> Lark:
    """A parser made as celpy makes it, from its grammar (celpy's own singleton is left as it is)."""
    kept = CELParser.CEL_PARSER
    CELParser.CEL_PARSER = None
    try:
        CELParser()
        return CELParser.CEL_PARSER
    finally:
        CELParser.CEL_PARSER = kept


def tables() -> dict[str, Any]:
    """The file's content, from a parser celpy makes now."""
    from lark.grammar import Rule
    from lark.lexer import TerminalDef
    from lark.parsers.lalr_analysis import IntParseTable

    parser = made_by_celpy()
    lalr = parser.parser.parser
    kept = lalr._parse_table  # (celpy asks for debug: states are item sets; the table is the same)
    lalr._parse_table = IntParseTable.from_ParseTable(kept)
    try:
        data, memo = parser.memo_serialize([TerminalDef, Rule])
    finally:
        lalr._parse_table = kept
    for name in ("tree_class", "lexer_callbacks", "g_regex_flags", "postlex", "transformer",
                 "_plugins", "edit_terminals"):  # (given again when loading)
        data["options"].pop(name, None)
    data["parser"]["lexer_conf"]["g_regex_flags"] = int(data["parser"]["lexer_conf"]["g_regex_flags"])
    names = sorted({str(r.origin.name) for r in parser.rules if type(r.origin.name) is Token})
    return {"key": key(), "token_names": names, "data": _encode(data), "memo": _encode(memo)}


def write(path: Path | None = None) -> None:
    """Write the tables (to TABLES) for the Lark and celpy installed now."""
    (path or TABLES).write_text(json.dumps(tables(), separators=(",", ":")) + "\n", encoding="utf-8")


def _encode(value: Any) -> Any:
    """JSON for Lark's serialized data: a tuple as {"(": [...]}, a dict with int keys as {"#": [[k, v]]}."""
    if isinstance(value, tuple):
        return {"(": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if all(type(k) is str for k in value):
            return {k: _encode(v) for k, v in value.items()}
        if all(type(k) is int for k in value):
            return {"#": [[k, _encode(v)] for k, v in value.items()]}
        raise TypeError(f"keys of mixed types: {list(value)[:3]}")
    if value is None or type(value) in (str, int, bool):
        return value
    raise TypeError(f"not JSON: {type(value).__name__}")


def _decode(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        if "(" in obj:
            return tuple(obj["("])
        if "#" in obj:
            return {k: v for k, v in obj["#"]}
    return obj


if __name__ == "__main__":
    write()
    print(f"wrote {TABLES}")
