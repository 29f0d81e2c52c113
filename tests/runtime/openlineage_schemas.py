"""RunEvents checked against the official OpenLineage JSON Schemas (tests/fixtures/openlineage).

The schemas are the upstream files, unmodified; `$ref`s and facet `_schemaURL`s resolve by the
files' `$id`s, offline. A facet whose `_schemaURL` names one of these schemas is validated
against it; a facet under a standard name must name one (so none goes unchecked).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

HERE = Path(__file__).resolve().parents[1] / "fixtures" / "openlineage"
SPEC_ID = "https://openlineage.io/spec/2-0-2/OpenLineage.json"
STANDARD = {"errorMessage", "parent", "jobType", "schema", "symlinks"}
"""Facet names the spec defines that the export uses."""


def _registry() -> Registry:
    resources = []
    for path in sorted(HERE.rglob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        resources.append((doc["$id"], Resource.from_contents(doc)))
    return Registry().with_resources(resources)


REGISTRY = _registry()
KNOWN = {uri for uri in REGISTRY}


def _validator(ref: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": ref}, registry=REGISTRY,
                                format_checker=Draft202012Validator.FORMAT_CHECKER)


def _facets(event: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(where, name, facet) of every facet of the event."""
    out = [(f"run.facets.{k}", k, v) for k, v in event["run"].get("facets", {}).items()]
    out += [(f"job.facets.{k}", k, v) for k, v in event["job"].get("facets", {}).items()]
    for side in ("inputs", "outputs"):
        for i, ds in enumerate(event.get(side, [])):
            out += [(f"{side}[{i}].facets.{k}", k, v) for k, v in ds.get("facets", {}).items()]
    return out


def problems(event: dict[str, Any]) -> list[str]:
    """Why `event` is not a valid RunEvent with valid facets; [] when it is."""
    out = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
           for e in _validator(f"{SPEC_ID}#/$defs/RunEvent").iter_errors(event)]
    for where, name, facet in _facets(event):
        url = facet.get("_schemaURL", "")
        doc = url.split("#", 1)[0]
        if doc not in KNOWN:
            if name in STANDARD:
                out.append(f"{where}: standard facet with a schema not checked here: {url}")
            continue
        out += [f"{where}: {e.message}" for e in _validator(url).iter_errors(facet)]
    return out
