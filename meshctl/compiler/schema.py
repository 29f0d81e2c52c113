"""The JSON Schema of mesh.yaml (`meshctl schema`), for editors.

pydantic writes the shape (keys, types, choices, bounds) from `MeshSpec`; this module adds
what the shape alone misses, so that the schema accepts every mesh that compiles and
rejects, where JSON Schema can say it, what the schema stage (MESH2xx) rejects:

- the forms pydantic converts before validating (category values written as numbers or
  bools, analysis metrics written as `mean(age)`);
- the rules the compiler checks after pydantic, each taken from the constant the compiler
  itself uses (column ranges, masking, generalize, quality rules, sources and tables,
  SLA durations, addresses and Curve keys).

What JSON Schema cannot say (one value compared with another, such as a range's low
above its high) stays with `meshctl validate`. Pure: no files, no sockets.
"""

from __future__ import annotations

import re
from typing import Any

from meshctl.compiler.compile import OWNER
from meshctl.compiler.contracts import _GENERALIZE, COLUMN_METRICS, NUMBERS, PLACEHOLDERS
from meshctl.compiler.identity import Z85_ALPHABET
from meshctl.compiler.sources import FILE_FORMATS, UNITS, URI_FORMATS
from meshctl.compiler.spec import OPERATORS, MeshSpec

DRAFT = "https://json-schema.org/draft/2020-12/schema"
"""The JSON Schema dialect `meshctl schema` declares."""
SCHEMA_ID = "urn:meshctl:mesh:v1"
"""`$id` of the schema of apiVersion meshctl/v1: an identifier, not a download address."""

_HOST = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+)"
_PORT = (r"(0[0-9]{0,4}|[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}"
         r"|655[0-2][0-9]|6553[0-5])")
"""A port, 0 to 65535 (leading zeros allowed, as int() allows them)."""
_Z85 = "^[" + re.sub(r"([\-\[\]\\^])", r"\\\1", Z85_ALPHABET) + "]{40}$"
_NUMBER = r"[0-9]+(\.[0-9]+)?"
_IDENT = r"[A-Za-z_]\w*"


def _absent(key: str) -> dict[str, Any]:
    """`key` is missing or null (what pydantic reads as None)."""
    return {"properties": {key: {"type": "null"}}}


def _present(key: str, value: dict[str, Any] | None = None) -> dict[str, Any]:
    """`key` is there and not null (and matches `value`)."""
    return {"required": [key], "properties": {key: value or {"not": {"type": "null"}}}}


def _rule(when: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    return {"if": when, "then": then}


def _type_is(*types: str) -> dict[str, Any]:
    """A column's `type` is one of `types`."""
    return {"required": ["type"], "properties": {"type": {"enum": list(types)}}}


_LIBRARY = {"properties": {"type": {"const": "library"}}}
"""A quality rule of type library (an absent type means library)."""


def _metric_is(*metrics: str) -> dict[str, Any]:
    """A library quality rule whose metric is one of `metrics`."""
    return {"allOf": [_LIBRARY, _present("metric", {"enum": list(metrics)})]}


def _any_case(suffix: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in suffix)


def _source_rules() -> list[dict[str, Any]]:
    """A supported source (MESH501); a table exactly for database URIs (MESH212)."""
    uri = "^(" + "|".join(re.escape(p) for p in URI_FORMATS) + ")"
    suffixes = "|".join(_any_case(s) for s in FILE_FORMATS)
    file = rf"^(?!.*://).*({suffixes})$"
    return [
        {"properties": {"source": {"anyOf": [{"pattern": uri}, {"pattern": file}]}}},
        _rule(_present("source", {"pattern": uri}),
              _present("table", {"type": "string", "minLength": 1})),
        _rule(_present("source", {"not": {"pattern": uri}}), _absent("table")),
    ]


def _column_rules() -> list[dict[str, Any]]:
    """Values only and always on categories (MESH204), ranges only on numbers (MESH209),
    masking only on indirect identifiers (MESH210), generalize with its masking and in the
    form its type takes (MESH211), a shape only and always on tensors (MESH520)."""
    rules = [
        _rule(_type_is("category"),
              {"required": ["values"], "properties": {"values": {"minItems": 1}}}),
        _rule({"not": _type_is("category")}, {"properties": {"values": {"maxItems": 0}}}),
        _rule(_present("range"), _type_is(*NUMBERS)),
        _rule(_present("masking"),
              {"required": ["pii"], "properties": {"pii": {"const": "indirect"}}}),
        _rule(_present("masking", {"const": "generalize"}), _present("generalize")),
        _rule(_present("generalize"), _present("masking", {"const": "generalize"})),
        _rule(_type_is("tensor"), _present("shape", {"type": "array", "minItems": 1, "maxItems": 3,
                                                     "items": {"type": "integer", "minimum": 1}})),
        _rule({"not": _type_is("tensor")}, {"not": _present("shape")}),
    ]
    kinds = ("string", "int", "float", "bool", "date", "timestamp", "category", "tensor")
    for kind in kinds:
        form = _GENERALIZE.get(kind)
        then = (_present("generalize", {"pattern": f"^({form})$"}) if form
                else {"not": _present("generalize")})
        rules.append(_rule({"allOf": [_type_is(kind), _present("generalize")]}, then))
    return rules


def _quality_rules() -> list[dict[str, Any]]:
    """A library rule's metric (MESH213), exactly one operator (MESH214), options that fit
    the metric (MESH215), a sql rule's query and placeholders (MESH213, MESH216)."""
    sql = {"required": ["type"], "properties": {"type": {"const": "sql"}}}
    unknown = r"\{(?!(" + "|".join(PLACEHOLDERS) + r")\})\w*\}"
    rules = [
        _rule(_LIBRARY, _present("metric")),
        _rule(sql, _present("query", {"type": "string", "minLength": 1,
                                      "not": {"pattern": unknown}})),
        _rule({"allOf": [sql, _present("query", {"type": "string", "pattern": r"\{property\}"})]},
              _present("column")),
        _rule({"anyOf": [_LIBRARY, sql]}, {"oneOf": [_present(op) for op in OPERATORS]}),
        _rule(_metric_is(*COLUMN_METRICS), _present("column")),
        _rule(_metric_is("rowCount"), _absent("column")),
    ]
    for option, metric in (("validValues", "invalidValues"), ("validRange", "invalidValues"),
                           ("pattern", "invalidValues"), ("missingValues", "missingValues")):
        others = [m for m in ("nullValues", "missingValues", "invalidValues", "duplicateValues",
                              "rowCount") if m != metric]
        rules.append(_rule({"allOf": [_metric_is(*others), _present(option)]}, False))
    return rules


def _domain_rules() -> list[dict[str, Any]]:
    """`local` or tcp://HOST[:PORT] (MESH217); a remote domain declares a Curve public key
    (MESH218, MESH219), a local one none (MESH220)."""
    local = {"properties": {"address": {"const": "local"}}}  # absent address means local
    return [
        {"properties": {"address": {"anyOf": [{"const": "local"},
                                              {"pattern": f"^tcp://{_HOST}(:{_PORT})?$"}]}}},
        _rule(local, {"properties": {"public_key": {"const": ""}}}),
        _rule({"not": local}, _present("public_key", {"type": "string", "pattern": _Z85})),
    ]


def _metric_string() -> dict[str, Any]:
    """An analysis metric written as a call: `count`, `mean(age)`, `quantile(age, 0.5)`."""
    forms = [
        rf"count(\s*\(\s*{_IDENT}\s*\))?",
        rf"(sum|mean|variance)\s*\(\s*{_IDENT}\s*\)",
        rf"histogram\s*\(\s*{_IDENT}\s*(,\s*[^)]*)?\)",
        rf"quantile\s*\(\s*{_IDENT}\s*,\s*[^)]*\)",
    ]
    return {"type": "string", "pattern": r"^\s*(" + "|".join(forms) + r")\s*$",
            "description": "An aggregate written as a call: count, mean(age), "
                           "histogram(age, bins: 10), quantile(age, 0.5)."}


def _add(defs: dict[str, Any], name: str, rules: list[dict[str, Any]]) -> None:
    defs[name].setdefault("allOf", []).extend(rules)


def mesh_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a mesh.yaml of apiVersion meshctl/v1."""
    body = MeshSpec.model_json_schema(by_alias=True)
    defs = body["$defs"]
    values = defs["Column"]["properties"]["values"]
    values["items"] = {"type": ["string", "number", "boolean"]}
    _add(defs, "Column", _column_rules())
    _add(defs, "QualityRule", _quality_rules())
    _add(defs, "Product", _source_rules())
    _add(defs, "Domain", _domain_rules())
    duration = f"^\\s*{_NUMBER}\\s*[{''.join(UNITS)}]\\s*$"
    sla = defs["Sla"]["properties"]
    for key in ("freshness", "retention"):
        sla[key]["anyOf"][0]["pattern"] = duration
    percent = r"^\s*0*(100(\.0+)?|[0-9]{1,2}(\.[0-9]+)?)\s*%\s*$"  # at most 100%
    sla["availability"]["anyOf"][0]["pattern"] = percent
    owner = defs["MeshHeader"]["properties"]["owner"]["anyOf"][0]
    owner["pattern"] = "^(" + OWNER.pattern + ")$"
    coordinator = defs["Coordinator"]["properties"]
    coordinator["address"]["pattern"] = f"^tcp://{_HOST}:{_PORT}$"
    coordinator["public_key"]["anyOf"] = [{"const": ""}, {"pattern": _Z85}]
    defs["Architecture"]["properties"]["hidden"]["items"]["exclusiveMinimum"] = 0
    metric = defs["AnalysisMetric"]
    _add(defs, "AnalysisMetric", [
        _rule(_present("fn", {"not": {"const": "count"}}), _present("column")),
        _rule(_present("fn", {"const": "quantile"}),
              {"required": ["q"], "properties": {"q": {"minItems": 1}}}),
    ])
    metric["properties"]["q"]["items"].update(exclusiveMinimum=0, exclusiveMaximum=1)
    defs["Analysis"]["properties"]["metrics"]["items"] = {
        "anyOf": [_metric_string(), {"$ref": "#/$defs/AnalysisMetric"}]}
    defs["Grant"]["oneOf"] = [_present("model", {"type": "string"}),
                              _present("analysis", {"type": "string"})]
    return {"$schema": DRAFT, "$id": SCHEMA_ID, **body}
