"""Contracts to and from the Open Data Contract Standard (ODCS) v3.

`export_contract` turns a meshctl contract into an ODCS v3.1.0 document (the
newest approved version; v3.2.0 is in progress upstream): one schema object
whose properties are the contract's columns, quality rules in the ODCS library
vocabulary (which meshctl's rules already use), the SLA as `slaProperties`, and
meshctl-only things (purposes, pii, masking, optional columns) as
`customProperties`. Each keeps its ODCS meaning: `required: true` is written for
a column that must not be null; a category's values are an invalidValues rule;
a `validRange` (not an ODCS argument) is a sql rule that counts the same rows.
`import_contract` goes the other way, lenient per field: what meshctl cannot
express (or run) is dropped with a line saying where and why, and the contract
imports. Export then import gives back the same contract. Pure: data in, data out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from meshctl.compiler.contracts import _quality as check_rule
from meshctl.compiler.diagnostics import Reporter, did_you_mean
from meshctl.compiler.spec import OPERATORS, Column, Contract, MeshSpec, QualityRule, Sla

API_VERSION = "v3.1.0"
"""ODCS version written: the newest approved one (library metrics are v3.1+; v3.2.0, with
`enum` values, is still in progress upstream)."""

LOGICAL = {"string": "string", "int": "integer", "float": "number", "bool": "boolean",
           "date": "date", "timestamp": "timestamp", "category": "string", "tensor": "array"}
"""meshctl column type -> ODCS logicalType (a category is a string with an `enum`; a tensor an
array of numbers, its shape a custom property)."""

PHYSICAL = {"string": "VARCHAR", "int": "BIGINT", "float": "DOUBLE", "bool": "BOOLEAN",
            "date": "DATE", "timestamp": "TIMESTAMP", "category": "VARCHAR", "tensor": "FLOAT[]"}
"""meshctl column type -> physicalType, as DuckDB (which reads products) names it."""

TYPES = {"string": "string", "integer": "int", "number": "float", "boolean": "bool",
         "date": "date", "timestamp": "timestamp"}
"""ODCS logicalType -> meshctl column type."""

DIMENSIONS = ("accuracy", "completeness", "conformity", "consistency", "coverage",
              "timeliness", "uniqueness")
"""ODCS quality dimensions; other dimensions travel as a custom property."""

METRICS = ("nullValues", "missingValues", "invalidValues", "duplicateValues", "rowCount")
ARGUMENTS = ("validValues", "validRange", "missingValues", "pattern")
SLA_EXPORT = {"freshness": "latency", "retention": "retention", "availability": "availability"}
SLA_IMPORT = {"latency": "freshness", "freshness": "freshness", "retention": "retention",
              "availability": "availability"}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-zA-Z%]+)$")
_DEFAULTS: dict[str, Any] = {"primaryKey": False, "primaryKeyPosition": -1, "unique": False,
                             "partitioned": False, "partitionKeyPosition": -1,
                             "criticalDataElement": False, "tags": [], "deprecated": False}
"""ODCS keys whose default value carries no information (not reported as dropped)."""


# -- export ----------------------------------------------------------------------------


def find_contract(spec: MeshSpec, ref: str) -> Contract:
    """The contract `name`, `name@major` or `name@x.y.z` names (the highest version);
    a LookupError with a did-you-mean when there is none."""
    name, _, version = ref.partition("@")
    found = sorted((c for c in spec.contracts if c.name == name and (
        not version or c.version == version or str(c.major) == version)),
        key=lambda c: tuple(int(x) for x in c.version.split(".")))
    if not found:
        names = sorted({c.name for c in spec.contracts})
        hint = did_you_mean(name, names) or f"contracts: {', '.join(names) or 'none'}"
        raise LookupError(f"unknown contract '{ref}' ({hint})")
    return found[-1]


CLASSIFICATIONS = ("public", "internal", "restricted")


def product_classification(spec: MeshSpec, contract: Contract) -> str | None:
    """The strictest classification of the products published under `contract`."""
    levels = [CLASSIFICATIONS.index(p.classification) for p in spec.products
              if p.contract and p.contract.partition("@")[0] == contract.name
              and p.contract.partition("@")[2].split(".")[0] == str(contract.major)]
    return CLASSIFICATIONS[max(levels)] if levels else None


def export_contract(contract: Contract, classification: str | None = None) -> dict[str, Any]:
    """The ODCS v3 document of `contract`.

    `classification` (the strictest classification of the products published
    under the contract) is written on every property; meshctl classifies
    products, not contract columns.
    """
    doc: dict[str, Any] = {"apiVersion": API_VERSION, "kind": "DataContract",
                           "id": _stable_id(contract.name), "name": contract.name,
                           "version": contract.version, "status": "active"}
    if contract.description:
        doc["description"] = {"purpose": contract.description}
    obj: dict[str, Any] = {"name": contract.object_name or contract.name, "logicalType": "object",
                           "properties": [_property(c, contract.quality, classification)
                                          for c in contract.columns]}
    table_rules = [_rule(r, None) for r in contract.quality if r.column is None]
    if table_rules:
        obj["quality"] = table_rules
    doc["schema"] = [obj]
    sla = _sla_properties(contract.sla)
    if sla:
        doc["slaProperties"] = sla
    if contract.purposes:
        doc["customProperties"] = [_custom("purposes", list(contract.purposes))]
    return doc


def dump(doc: dict[str, Any]) -> str:
    """YAML text of an ODCS document, keys in the order written."""
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100)


def _stable_id(name: str) -> str:
    """ODCS ids allow letters, digits, `-` and `_` only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _custom(name: str, value: Any) -> dict[str, Any]:
    return {"property": name, "value": value}


def _property(column: Column, quality: list[QualityRule],
              classification: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": column.name, "logicalType": LOGICAL[column.type],
                           "physicalType": PHYSICAL[column.type]}
    own = [r for r in quality if r.column == column.name]
    if any(_not_null(r) for r in own):  # ODCS `required` means: never null
        out["required"] = True
    if column.range is not None and column.type in ("int", "float"):
        out["logicalTypeOptions"] = {"minimum": _scalar(column.range[0]),
                                     "maximum": _scalar(column.range[1])}
    if column.type == "tensor":  # every row: prod(shape) numbers
        size = math.prod(column.shape or [1])
        out["logicalTypeOptions"] = {"minItems": size, "maxItems": size}
        out["items"] = {"logicalType": "number", "physicalType": "FLOAT"}
    if classification:
        out["classification"] = classification
    if column.description:
        out["description"] = column.description
    rules = [_rule(r, column) for r in own]
    if column.values:  # v3.1.0 has no `enum`: the values are an invalidValues rule
        rules.insert(0, {"name": f"values({column.name})", "type": "library",
                         "metric": "invalidValues",
                         "arguments": {"validValues": list(column.values)}, "mustBe": 0,
                         "unit": "rows", "severity": "error"})
    if rules:
        out["quality"] = rules
    custom = [_custom(k, getattr(column, k)) for k in ("masking", "generalize")
              if getattr(column, k) is not None]
    if column.type == "tensor" and column.shape:
        custom.insert(0, _custom("shape", list(column.shape)))
    if column.values:
        custom.insert(0, _custom("values", list(column.values)))
    if not column.required:  # meshctl: the column may be absent (ODCS has no such notion)
        custom.insert(0, _custom("optional", True))
    if column.pii != "none":
        custom.insert(0, _custom("pii", column.pii))
    if custom:
        out["customProperties"] = custom
    return out


def _not_null(rule: QualityRule) -> bool:
    """A rule that says what ODCS `required: true` says: no null in the column."""
    return (rule.metric == "nullValues" and rule.mustBe == 0 and rule.severity == "error"
            and rule.operators() == ["mustBe"])


def _rule(rule: QualityRule, column: Column | None) -> dict[str, Any]:
    if rule.validRange is not None:
        return _range_rule(rule, column)
    out: dict[str, Any] = {}
    if rule.name:
        out["name"] = rule.name
    if rule.description:
        out["description"] = rule.description
    out["type"] = rule.type
    if rule.type == "library" and rule.metric:
        out["metric"] = rule.metric
        args = {a: _scalar(getattr(rule, a)) for a in ARGUMENTS if getattr(rule, a) is not None}
        if args:
            out["arguments"] = args
    if rule.type == "sql" and rule.query:
        out["query"] = rule.query
    if rule.type == "custom":
        out["engine"] = "meshctl"
        out["implementation"] = rule.description or "custom"
    if rule.type in ("library", "sql"):
        out["unit"] = rule.unit
    for op in rule.operators():
        out[op] = _scalar(getattr(rule, op))
    if rule.dimension in DIMENSIONS:
        out["dimension"] = rule.dimension
    elif rule.dimension:
        out["customProperties"] = [_custom("dimension", rule.dimension)]
    out["severity"] = rule.severity
    return out


def _range_rule(rule: QualityRule, column: Column | None) -> dict[str, Any]:
    """An invalidValues rule with `validRange` (not an ODCS argument) as an ODCS sql rule that
    counts the same values (in DuckDB's SQL, the dialect meshctl runs); the meshctl rule
    travels in a custom property `meshctl`, so that import gives it back."""
    assert rule.validRange is not None
    low, high = (_scalar(v) for v in rule.validRange)
    bad = [(f"TRY_CAST({{property}} AS DOUBLE) IS NULL OR TRY_CAST({{property}} AS DOUBLE) "
            f"NOT BETWEEN {low} AND {high}")]
    if rule.validValues is not None:
        listed = ", ".join("'" + str(v).replace("'", "''") + "'" for v in rule.validValues)
        bad.append(f"CAST({{property}} AS VARCHAR) NOT IN ({listed})")
    if rule.pattern is not None:
        bad.append(f"NOT regexp_full_match(CAST({{property}} AS VARCHAR), "
                   f"'{rule.pattern.replace(chr(39), chr(39) * 2)}')")
    where = "{property} IS NOT NULL AND (" + " OR ".join(f"({b})" for b in bad) + ")"
    count = f"SUM(CASE WHEN {where} THEN 1 ELSE 0 END)"
    query = (f"SELECT {count} FROM {{object}}" if rule.unit == "rows"
             else f"SELECT COALESCE(100.0 * {count} / NULLIF(COUNT(*), 0), 0) FROM {{object}}")
    meshctl = {k: _scalar(v) for k, v in rule.model_dump(exclude_defaults=True).items()
               if k not in ("name", "description", "column", "severity", "dimension")}
    out = _rule(rule.model_copy(update={"type": "sql", "query": query, "metric": None,
                                        "validRange": None, "validValues": None,
                                        "pattern": None}), column)
    out.setdefault("customProperties", []).append(_custom("meshctl", meshctl))
    return out


def _sla_properties(sla: Sla | None) -> list[dict[str, Any]]:
    out = []
    for key, prop in SLA_EXPORT.items():
        text = getattr(sla, key) if sla else None
        if text is None:
            continue
        m = _DURATION.match(text.strip())
        if m:
            number = float(m.group(1))
            out.append({"property": prop, "value": int(number) if number.is_integer()
                        else number, "unit": m.group(2)})
        else:
            out.append({"property": prop, "value": text})
    return out


# -- import ----------------------------------------------------------------------------


class OdcsError(ValueError):
    """The document is not an ODCS v3 data contract meshctl can import."""


@dataclass
class Imported:
    """A contract in mesh.yaml form, and what of the ODCS document was dropped."""

    contract: dict[str, Any]
    dropped: list[str] = field(default_factory=list)
    """One line per ODCS field meshctl cannot express."""


def import_contract(doc: Any, name: str | None = None,
                    classification: str | None = None) -> Imported:
    """The meshctl contract (as mesh.yaml data) of an ODCS v3 document.

    `name` overrides the document's `name`/`id`; `classification` is what the
    mesh's products under this contract are classified as, so a property
    classification that agrees with it is not reported as dropped.
    """
    if not isinstance(doc, dict) or doc.get("kind") != "DataContract":
        raise OdcsError("not an ODCS data contract (kind: DataContract is missing)")
    api = str(doc.get("apiVersion", ""))
    if not api.startswith("v3."):
        raise OdcsError(f"apiVersion {api or 'is missing'}: only ODCS v3 is supported")
    imp = _Importer(classification)
    out = imp.header(doc, name)
    objects = doc.get("schema") or []
    if not isinstance(objects, list):
        raise OdcsError("`schema` must be a list of objects")
    for i, obj in enumerate(objects[1:], 1):
        imp.drop(f"schema[{i}]", f"object '{_name(obj)}' (a meshctl contract describes one "
                 "table; only the first object is imported)")
    columns, quality = imp.schema_object(objects[0]) if objects else ([], [])
    if columns:
        out["columns"] = columns
    if quality:
        out["quality"] = quality
    sla = imp.sla(doc.get("slaProperties") or [])
    if sla:
        out["sla"] = sla
    first = objects[0] if objects and isinstance(objects[0], dict) else {}
    if first.get("name") and str(first["name"]) != out["name"]:
        out["object_name"] = str(first["name"])
    Contract.model_validate(out)  # a ValueError (pydantic) if the result is not a contract
    return Imported(out, imp.dropped)


_WHOLE = re.compile(r"(^|\.)(schema|properties|quality|slaProperties)\[\d+\]$")
"""Where a whole schema object, column, quality rule or SLA property was dropped."""


def summarize(dropped: list[str], limit: int = 10) -> list[str]:
    """The warning lines of an import: one per dropped column, rule, SLA property or schema
    object (each loses a check or a column), then one line naming the other fields by their
    key with a count, e.g. `14 fields meshctl does not use: servers, primaryKey (5), ...`."""
    lines = [d for d in dropped if _WHOLE.search(d.split(": ", 1)[0])]
    keys: dict[str, int] = {}
    for d in dropped:
        where = d.split(": ", 1)[0]
        if not _WHOLE.search(where):
            key = re.sub(r"\[\d+\]", "", where).rsplit(".", 1)[-1]
            keys[key] = keys.get(key, 0) + 1
    if keys:
        names = [k if n == 1 else f"{k} ({n})" for k, n in keys.items()]
        more = f", and {len(names) - limit} more" if len(names) > limit else ""
        n = sum(keys.values())
        lines.append(f"{n} field{'s' if n != 1 else ''} meshctl does not use: "
                     f"{', '.join(names[:limit])}{more}")
    return lines


def _name(obj: Any) -> str:
    return str(obj.get("name", "?")) if isinstance(obj, dict) else "?"


class _Importer:
    """Builds mesh.yaml data and records what is dropped."""

    def __init__(self, classification: str | None) -> None:
        self.classification = classification
        self.dropped: list[str] = []

    def drop(self, where: str, what: Any) -> None:
        text = what if isinstance(what, str) else _short(what)
        self.dropped.append(f"{where}: {text}")

    def rest(self, where: str, data: dict[str, Any], used: set[str]) -> None:
        """Report every key of `data` not in `used` whose value carries information."""
        for key, value in data.items():
            if key in used or value is None or _DEFAULTS.get(key, object()) == value:
                continue
            if value in ("", [], {}):
                continue
            self.drop(f"{where}.{key}" if where else key, value)

    def header(self, doc: dict[str, Any], name: str | None) -> dict[str, Any]:
        contract_name = name or doc.get("name") or doc.get("id")
        if not contract_name:
            raise OdcsError("the contract has neither `name` nor `id`; pass --name")
        version = str(doc.get("version", ""))
        if not re.fullmatch(r"\d+\.\d+\.\d+", version):
            raise OdcsError(f"version '{version}' is not semantic (x.y.z)")
        out: dict[str, Any] = {"name": str(contract_name), "version": version}
        desc = doc.get("description")
        if isinstance(desc, dict):
            if desc.get("purpose"):
                out["description"] = str(desc["purpose"])
            self.rest("description", desc, {"purpose"})
        elif isinstance(desc, str) and desc:
            out["description"] = desc
        purposes, custom = [], doc.get("customProperties") or []
        for i, prop in enumerate(custom):
            if isinstance(prop, dict) and prop.get("property") == "purposes":
                purposes = [str(p) for p in prop.get("value") or []]
            else:
                self.drop(f"customProperties[{i}]", prop)
        if purposes:
            out["purposes"] = purposes
        used = {"apiVersion", "kind", "name", "version", "description", "customProperties",
                "schema", "slaProperties"}
        if doc.get("id") in (contract_name, _stable_id(str(contract_name))):
            used.add("id")
        if doc.get("status") == "active":
            used.add("status")
        self.rest("", doc, used)
        return out

    def schema_object(self, obj: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        if not isinstance(obj, dict):
            raise OdcsError("schema[0] must be a mapping")
        used = {"name", "properties", "quality", "logicalType"}
        if obj.get("physicalType") == "table":
            used.add("physicalType")
        self.rest("schema[0]", obj, used)
        columns, quality = [], []
        for j, prop in enumerate(obj.get("properties") or []):
            where = f"schema[0].properties[{j}]"
            column = self.column(prop, where)
            if column is None:
                continue
            columns.append(column)
            own = []
            for k, rule in enumerate(prop.get("quality") or []):
                if _is_values_rule(rule, column):
                    continue  # the category's own values, as export writes them
                got = self.rule(rule, f"{where}.quality[{k}]", column["name"])
                if got is not None:
                    own.append(got)
            if prop.get("required") is True and not any(
                    _not_null(QualityRule.model_validate(r)) for r in own):
                own.insert(0, {"column": column["name"], "metric": "nullValues", "mustBe": 0})
            quality += own
        for k, rule in enumerate(obj.get("quality") or []):
            got = self.rule(rule, f"schema[0].quality[{k}]", None)
            if got is not None:
                quality.append(got)
        return columns, quality

    def column(self, prop: Any, where: str) -> dict[str, Any] | None:
        if not isinstance(prop, dict) or not prop.get("name"):
            self.drop(where, "a property without a name")
            return None
        logical = prop.get("logicalType")
        enum = prop.get("enum")
        kind = TYPES.get(logical) if logical else _from_physical(prop.get("physicalType"))
        if logical == "array":
            return self.tensor(prop, where)
        if kind is None:
            self.drop(where, f"property '{prop['name']}' of logicalType {logical} (meshctl "
                      "columns are scalars)")
            return None
        out: dict[str, Any] = {"name": str(prop["name"]), "type": kind}
        physical = prop.get("physicalType")
        if physical is not None and str(physical).upper() != PHYSICAL[kind]:
            self.drop(f"{where}.physicalType", f"{physical} (meshctl keeps the type {kind})")
        if enum:
            if kind != "string":
                self.drop(f"{where}.logicalType", f"{logical} (a category's values are "
                          "strings in meshctl)")
            out["type"] = "category"
            out["values"] = [str(_scalar(e.get("value") if isinstance(e, dict) else e))
                             for e in enum]
            for n, e in enumerate(enum):
                if isinstance(e, dict):
                    self.rest(f"{where}.enum[{n}]", e, {"value"})
        self.options(prop, out, where)
        self.custom_column(prop, out, where)
        if prop.get("required") not in (None, True, False):
            self.drop(f"{where}.required", prop["required"])
        if prop.get("description"):
            out["description"] = str(prop["description"])
        if prop.get("classification") not in (None, self.classification):
            self.drop(f"{where}.classification", f"'{prop['classification']}' (meshctl "
                      "classifies products, not contract columns: set it on the products)")
        self.rest(where, prop, {"name", "logicalType", "physicalType", "enum", "required",
                                "description", "classification", "quality",
                                "logicalTypeOptions", "customProperties"})
        return _column_order(out)

    def tensor(self, prop: dict[str, Any], where: str) -> dict[str, Any] | None:
        """An array of numbers as a tensor column: its shape from the custom property `shape`, else
        [n] where minItems = maxItems = n."""
        items = prop.get("items") if isinstance(prop.get("items"), dict) else {}
        opts = prop.get("logicalTypeOptions") if isinstance(prop.get("logicalTypeOptions"), dict) else {}
        custom = [cp for cp in prop.get("customProperties") or [] if isinstance(cp, dict)]
        shape = next((cp.get("value") for cp in custom if cp.get("property") == "shape"), None)
        if shape is None and _number(opts.get("minItems")) and opts.get("minItems") == opts.get("maxItems"):
            shape = [opts["minItems"]]
        if items.get("logicalType") not in ("number", "integer") or not isinstance(shape, list) \
                or not all(isinstance(n, int) and n > 0 for n in shape):
            self.drop(where, f"property '{prop['name']}' of logicalType array (meshctl takes arrays of numbers "
                      "of one fixed size, as tensor columns)")
            return None
        out: dict[str, Any] = {"name": str(prop["name"]), "type": "tensor", "shape": list(shape)}
        if prop.get("description"):
            out["description"] = str(prop["description"])
        prop = {**prop, "customProperties": [cp for cp in custom if cp.get("property") != "shape"]}
        self.custom_column(prop, out, where)
        self.rest(where, prop, {"name", "logicalType", "physicalType", "items", "logicalTypeOptions", "required",
                                "description", "classification", "quality", "customProperties"})
        return _column_order(out)

    def options(self, prop: dict[str, Any], out: dict[str, Any], where: str) -> None:
        opts = prop.get("logicalTypeOptions") or {}
        if not isinstance(opts, dict):
            return
        low, high = opts.get("minimum"), opts.get("maximum")
        used = set()
        if out["type"] in ("int", "float") and _number(low) and _number(high):
            out["range"] = [low, high]
            used = {"minimum", "maximum"}
        self.rest(f"{where}.logicalTypeOptions", opts, used)

    def custom_column(self, prop: dict[str, Any], out: dict[str, Any], where: str) -> None:
        for i, cp in enumerate(prop.get("customProperties") or []):
            key = cp.get("property") if isinstance(cp, dict) else None
            if key == "pii":
                out[key] = self.pii(cp.get("value"), f"{where}.customProperties[{i}]")
            elif key == "optional" and cp.get("value") is True:
                out["required"] = False
            elif key == "values" and isinstance(cp.get("value"), list) and out["type"] == "string":
                out["type"] = "category"
                out["values"] = [str(_scalar(v)) for v in cp["value"]]
            elif key in ("masking", "generalize"):
                out[key] = cp.get("value")
            else:
                self.drop(f"{where}.customProperties[{i}]", cp)

    def pii(self, value: Any, where: str) -> str:
        """meshctl's pii of a custom property `pii`: true (as datacontract-cli writes it) is
        `direct`, the strictest (never selected); an unknown value is `direct` too."""
        text = str(value).strip().lower()
        if text in ("none", "direct", "indirect"):
            return text
        if text in ("false", "no", "0"):
            return "none"
        if text not in ("true", "yes", "1"):
            self.drop(where, f"pii '{value}' read as direct (meshctl knows none, indirect, direct)")
        return "direct"

    def rule(self, rule: Any, where: str, column: str | None) -> dict[str, Any] | None:
        if not isinstance(rule, dict):
            self.drop(where, rule)
            return None
        mine = [cp.get("value") for cp in rule.get("customProperties") or []
                if isinstance(cp, dict) and cp.get("property") == "meshctl"]
        if rule.get("type") == "sql" and mine and isinstance(mine[0], dict):
            # a rule meshctl exported as sql (validRange): take back meshctl's own rule
            rule = {k: v for k, v in rule.items() if k not in ("query", "unit", "type", *OPERATORS)}
            rule = {**rule, "type": "library", **mine[0]}
            rule["customProperties"] = [cp for cp in rule.get("customProperties") or []
                                        if not (isinstance(cp, dict)
                                                and cp.get("property") == "meshctl")]
            args = {k: rule.pop(k) for k in ARGUMENTS if k in rule}
            rule["arguments"] = args
        kind = rule.get("type", "library")
        metric = rule.get("metric") or (rule.get("rule") if rule.get("rule") in METRICS
                                        else None)
        if kind == "library" and metric not in METRICS:
            self.drop(where, f"library rule '{rule.get('rule') or metric}' (not an ODCS "
                      "metric meshctl runs: nullValues, missingValues, invalidValues, "
                      "duplicateValues, rowCount)")
            return None
        out: dict[str, Any] = {}
        for key in ("name", "description"):
            if rule.get(key):
                out[key] = str(rule[key])
        if kind != "library":
            out["type"] = kind
        if column is not None:
            out["column"] = column
        used = {"name", "description", "type", "metric", "rule", "unit", "severity",
                "dimension", "arguments", "customProperties", *OPERATORS}
        if kind == "library":
            out["metric"] = metric
            self.arguments(rule.get("arguments") or {}, out, where)
        elif kind == "sql":
            out["query"] = _placeholders(rule.get("query"))
            used.add("query")
        elif kind == "custom" and rule.get("engine") == "meshctl":
            used |= {"engine", "implementation"}
        unit = rule.get("unit")
        if kind in ("library", "sql") and unit == "percent":
            out["unit"] = unit
        elif unit not in (None, "rows"):
            self.drop(f"{where}.unit", f"'{unit}' (meshctl counts rows or percent)")
        for op in OPERATORS:
            if op in rule and _operand(rule[op]):
                out[op] = rule[op]
            elif op in rule:
                self.drop(f"{where}.{op}", f"{_short(rule[op])} (meshctl compares numbers)")
        self.qualifiers(rule, out, where)
        self.rest(where, rule, used)
        problem = _rule_problem(out)
        if problem:
            self.drop(where, f"{_rule_label(rule)} ({problem}: meshctl cannot run it)")
            return None
        return out

    def arguments(self, args: dict[str, Any], out: dict[str, Any], where: str) -> None:
        if not isinstance(args, dict):
            self.drop(f"{where}.arguments", args)
            return
        for key in ARGUMENTS:
            if key in args:
                out[key] = args[key]
        if isinstance(out.get("validValues"), list):  # null is never invalid: invalidValues
            out["validValues"] = [v for v in out["validValues"] if v is not None]  # counts non-nulls
        self.rest(f"{where}.arguments", args, set(ARGUMENTS))

    def qualifiers(self, rule: dict[str, Any], out: dict[str, Any], where: str) -> None:
        severity = rule.get("severity")
        if severity in ("info", "warning"):
            out["severity"] = severity
        elif severity not in (None, "error"):
            self.drop(f"{where}.severity", f"'{severity}' (meshctl knows info, warning, error)")
        if rule.get("dimension"):
            out["dimension"] = str(rule["dimension"])
        for i, cp in enumerate(rule.get("customProperties") or []):
            if isinstance(cp, dict) and cp.get("property") == "dimension":
                out["dimension"] = str(cp.get("value"))
            else:
                self.drop(f"{where}.customProperties[{i}]", cp)

    def sla(self, props: list[Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        if not isinstance(props, list):
            self.drop("slaProperties", props)
            return out
        for i, prop in enumerate(props):
            key = SLA_IMPORT.get(prop.get("property")) if isinstance(prop, dict) else None
            if key is None or key in out:
                self.drop(f"slaProperties[{i}]", prop)
                continue
            text = _sla_text(key, prop.get("value"), prop.get("unit"))
            if text is None:
                self.drop(f"slaProperties[{i}]", f"{_short(prop)} (not a "
                          f"{'percentage' if key == 'availability' else 'duration'} meshctl reads)")
                continue
            out[key] = text
            self.rest(f"slaProperties[{i}]", prop, {"property", "value", "unit"})
        return out


def _column_order(col: dict[str, Any]) -> dict[str, Any]:
    """Keys in the order mesh.yaml writes them."""
    order = ("name", "type", "values", "shape", "range", "required", "pii", "masking", "generalize",
             "description")
    return {k: col[k] for k in order if k in col}


def _from_physical(physical: Any) -> str | None:
    """A meshctl type guessed from a physicalType when logicalType is absent."""
    text = str(physical or "").lower()
    for marker, kind in (("char", "string"), ("text", "string"), ("string", "string"),
                         ("bool", "bool"), ("timestamp", "timestamp"), ("date", "date"),
                         ("int", "int"), ("double", "float"), ("float", "float"),
                         ("decimal", "float"), ("numeric", "float"), ("real", "float")):
        if marker in text:
            return kind
    return None


def _operand(value: Any) -> bool:
    """A number, or a [low, high] pair of numbers."""
    if isinstance(value, list):
        return len(value) == 2 and all(_number(v) for v in value)
    return _number(value)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scalar(value: Any) -> Any:
    """Whole numbers (also inside lists) print without `.0`."""
    if isinstance(value, list):
        return [_scalar(v) for v in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _short(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000,
                          allow_unicode=True).strip()
    text = text.removesuffix("...").strip()
    return text if len(text) <= 80 else text[:77] + "..."


_UNITS = {"s": "s", "sec": "s", "secs": "s", "second": "s", "seconds": "s", "m": "m", "min": "m",
          "mins": "m", "minute": "m", "minutes": "m", "h": "h", "hr": "h", "hrs": "h",
          "hour": "h", "hours": "h", "d": "d", "day": "d", "days": "d", "w": "w", "wk": "w",
          "week": "w", "weeks": "w", "y": "y", "yr": "y", "yrs": "y", "year": "y", "years": "y"}
"""ODCS unit spellings ("**d**, day, days for days; **y**, yr, years for years") -> meshctl's."""

_SECONDS = {"y": 365 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_ISO = re.compile(r"^P(?:(\d+)Y)?(?:(\d+)W)?(?:(\d+)D)?"
                  r"(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?$")
"""An ISO-8601 duration without months (a month has no fixed length), e.g. P1Y, P30D, PT1H."""


def _sla_text(key: str, value: Any, unit: Any) -> str | None:
    """The mesh.yaml text of an ODCS SLA value and unit, or None when meshctl cannot read it:
    `7, day` -> 7d, `P1Y` -> 1y, `500, ms` -> 0.5s, `95%, %` -> 95%."""
    if value is None or isinstance(value, bool):
        return None
    text = str(_scalar(value)).strip()
    unit = str(unit or "").strip().lower()
    if key == "availability":
        if unit not in ("", "%", "percent"):
            return None
        text = text.removesuffix("%").strip()
        ok = re.fullmatch(r"\d+(\.\d+)?", text) and float(text) <= 100
        return f"{text}%" if ok else None
    m = _DURATION.match(text)
    number, spelled = (m.group(1), m.group(2).lower()) if m else (text, unit)
    if re.fullmatch(r"\d+(\.\d+)?", number) and spelled in _UNITS:
        return f"{_scalar(float(number))}{_UNITS[spelled]}"  # the unit as written: 7d stays 7d
    seconds = _seconds(text, unit)
    if seconds is None:
        return None
    for name, size in _SECONDS.items():
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{name}"
    return f"{_scalar(round(seconds, 6))}s"


def _seconds(text: str, unit: str) -> float | None:
    iso = _ISO.match(text.upper()) if text.upper().startswith("P") else None
    if iso and any(iso.groups()):
        parts = [float(g) if g else 0.0 for g in iso.groups()]
        return sum(n * size for n, size in zip(parts, (_SECONDS["y"], _SECONDS["w"], _SECONDS["d"],
                                                      3600, 60, 1), strict=True))
    m = _DURATION.match(text)
    number, unit = (float(m.group(1)), m.group(2).lower()) if m else (None, unit)
    if number is None:
        if not re.fullmatch(r"\d+(\.\d+)?", text):
            return None
        number = float(text)
    if unit in ("ms", "millisecond", "milliseconds"):
        return number / 1000
    return number * _SECONDS[_UNITS[unit]] if unit in _UNITS else None


_PEER_PLACEHOLDERS = {"model": "object", "table": "object", "field": "property",
                      "column": "property"}
"""Placeholders datacontract-cli replaces as ODCS's {object} and {property}."""


def _placeholders(query: Any) -> Any:
    """`{model}`/`{table}` as `{object}`, `{field}`/`{column}` as `{property}`, as the peer reads them."""
    if not isinstance(query, str):
        return query
    return re.sub(r"(\$?)\{(model|table|field|column)\}",
                  lambda m: m.group(1) + "{" + _PEER_PLACEHOLDERS[m.group(2)] + "}", query)


def _rule_problem(rule: dict[str, Any]) -> str | None:
    """Why meshctl cannot check `rule` (mesh.yaml data), in the compiler's words; None if it can."""
    try:
        parsed = QualityRule.model_validate(rule)
    except ValidationError as err:
        e = err.errors()[0]
        return f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}".lower()
    columns = [Column.model_construct(name=rule["column"])] if rule.get("column") else []
    holder = Contract.model_construct(name="odcs", version="1.0.0", columns=columns,
                                      quality=[parsed])
    report = Reporter("odcs", lambda path, key: (0, 0))
    check_rule(holder, 0, report)
    errors = [d.message for d in report.diagnostics if d.severity == "error"]
    return errors[0] if errors else None


def _rule_label(rule: dict[str, Any]) -> str:
    kind = rule.get("type", "library")
    what = rule.get("metric") or rule.get("rule") or ""
    return f"{kind} rule" + (f" '{what}'" if what else "") + (
        f" {rule['name']!r}" if rule.get("name") else "")


def _is_values_rule(rule: Any, column: dict[str, Any]) -> bool:
    """The invalidValues rule export writes for a category's values."""
    return (isinstance(rule, dict) and column.get("type") == "category"
            and rule.get("name") == f"values({column['name']})"
            and rule.get("metric") == "invalidValues" and rule.get("mustBe") == 0
            and (rule.get("arguments") or {}).get("validValues") == column.get("values"))
