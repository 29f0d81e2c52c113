"""A run's lineage as OpenLineage RunEvents (JSON lines), for Marquez, OpenMetadata or DataHub.

Per model job and per analysis the run attempted: one START event (when it started, or began
waiting for its domains) and one COMPLETE or FAIL event (when it ended), built from the run's
audit log and plan.toml. A job that fails before its first round (no quorum) gets its START
and FAIL too. Every FAIL carries the standard `errorMessage` run facet; a run stopped on purpose
(`stopped by ...`: Ctrl-C, `meshctl stop`) ends its jobs with ABORT instead.

- `run.runId`: a UUID derived from the meshctl run id and the job (uuid5), so exporting the
  same run twice gives the same ids; a `parent` facet names the meshctl run itself.
- `job`: namespace = the mesh's name, name = `model.<name>` or `analysis.<name>`.
- `inputs`: the products read, named as the OpenLineage naming spec names the data they read
  (`dataset_name`), so that lineage joins up with other tools reading the same data, with
  a `symlinks` facet naming the product (`meshctl://<domain>`, the product id), a `schema`
  facet (column names and types only, never a value), a custom `meshctl_pii` facet (each
  column's pii flag), plus `meshctl_contract`.
- `outputs`: the model file (or analysis result) as a `file` dataset.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from meshctl import __version__
from meshctl.errors import UserError
from meshctl.runtime import audit
from meshctl.runtime.audit_report import contract_version

MESHCTL_URL = "https://github.com/meshctl/meshctl"
PRODUCER = f"{MESHCTL_URL}/tree/v{__version__}"
"""`producer` of every event and facet: meshctl's URL at this version."""
SPEC = "https://openlineage.io/spec/2-0-2/OpenLineage.json"
RUN_EVENT_SCHEMA = f"{SPEC}#/$defs/RunEvent"
_FACETS = "https://openlineage.io/spec/facets"
SCHEMA_FACET = f"{_FACETS}/1-2-0/SchemaDatasetFacet.json#/$defs/SchemaDatasetFacet"
SYMLINKS_FACET = f"{_FACETS}/1-0-1/SymlinksDatasetFacet.json#/$defs/SymlinksDatasetFacet"
PARENT_FACET = f"{_FACETS}/1-2-0/ParentRunFacet.json#/$defs/ParentRunFacet"
JOB_TYPE_FACET = f"{_FACETS}/2-0-4/JobTypeJobFacet.json#/$defs/JobTypeJobFacet"
ERROR_FACET = f"{_FACETS}/1-0-1/ErrorMessageRunFacet.json#/$defs/ErrorMessageRunFacet"
CUSTOM_FACET = f"{MESHCTL_URL}/blob/main/docs/audit.md#lineage-facets"
RUN_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, MESHCTL_URL + "/openlineage")
REQUIRED = ("eventTime", "producer", "schemaURL", "run.runId", "job.namespace", "job.name")
"""Fields every RunEvent must carry (the spec's BaseEvent, Run and Job required fields)."""


def run_uuid(run: str, job: str = "") -> str:
    """The OpenLineage runId of a meshctl run (job "") or of one of its jobs; stable."""
    return str(uuid.uuid5(RUN_NAMESPACE, f"{run}/{job}"))


def _facet(schema_url: str, **fields: Any) -> dict[str, Any]:
    return {"_producer": PRODUCER, "_schemaURL": schema_url, **fields}


def _host(address: str) -> str:
    """HOST of a domain address tcp://HOST[:PORT]."""
    netloc = urlsplit(address).netloc
    return netloc.rsplit(":", 1)[0] if not netloc.endswith("]") else netloc


def _postgres_name(source: str, table: str) -> tuple[str, str]:
    """`postgres://{host}:{port}` and `{database}.{schema}.{table}`; never user or password."""
    parts = urlsplit(source)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    server = parts.netloc.rsplit("@", 1)[-1].split(",")[0]  # libpq allows host1:p1,host2:p2
    host, sep, port = server.rpartition(":") if not server.endswith("]") else (server, "", "")
    if not sep or not port.isdigit():
        host, port = server, ""
    user = unquote(parts.netloc.rsplit("@", 1)[0].split(":")[0]) if "@" in parts.netloc else ""
    host = unquote(host) or query.get("host", "")
    if not host or host.startswith("/"):  # no host, or a Unix socket directory: this host
        host = "localhost"
    port = port or query.get("port", "") or "5432"
    database = unquote(parts.path.lstrip("/")) or query.get("dbname", "") or user or "postgres"
    schema, _, name = table.rpartition(".")
    return f"postgres://{host}:{port}", f"{database}.{schema or 'public'}.{name}"


def dataset_name(product: Any, address: str, base_dir: Path) -> tuple[str, str]:
    """(namespace, name) of the data a product reads, per the OpenLineage naming spec.

    Files: `file` and the absolute path (a remote domain's: `file://{host}` and the path as
    declared, relative to the mesh.yaml on that host). PostgreSQL: `postgres://{host}:{port}`
    and `{database}.{schema}.{table}`. DuckDB, which the spec does not list: as OpenLineage's
    own dbt integration names it, `duckdb://{path}` and `{database}.{schema}.{table}`. SQLite,
    listed by neither: the same way, `sqlite://{path}` and the table.
    """
    source, fmt = product.source, product.format
    if fmt == "postgresql":
        return _postgres_name(source, product.table)
    path = source.split(":", 1)[1] if fmt in ("sqlite", "duckdb") else source
    if address == "local":
        where, full = "", str((base_dir / path).resolve())
    else:
        where, full = _host(address), PurePosixPath(path).as_posix()
    if fmt == "duckdb":
        schema, _, table = product.table.rpartition(".")
        root = full if full.startswith("/") else "/" + full
        return f"duckdb://{where}{root}", f"{PurePosixPath(full).stem}.{schema or 'main'}.{table}"
    if fmt == "sqlite":
        root = full if full.startswith("/") else "/" + full
        return f"sqlite://{where}{root}", product.table
    return (f"file://{where}" if where else "file"), full


def _dataset(plan: Any, product_id: str, base_dir: Path) -> dict[str, Any]:
    p = plan.product(product_id)
    fields = [{"name": c.name, "type": c.type} for c in p.columns]
    pii = {c.name: c.pii for c in p.columns}
    address = next((d.address for d in plan.domains if d.name == p.domain), "local")
    namespace, name = dataset_name(p, address, base_dir)
    product = {"namespace": f"meshctl://{p.domain}", "name": p.id, "type": "DATA_PRODUCT"}
    return {
        "namespace": namespace,
        "name": name,
        "facets": {
            "symlinks": _facet(SYMLINKS_FACET, identifiers=[product]),
            "schema": _facet(SCHEMA_FACET, fields=fields),
            "meshctl_pii": _facet(CUSTOM_FACET, columns=pii),
            "meshctl_contract": _facet(
                CUSTOM_FACET,
                contract=p.contract,
                version=contract_version(plan, p.contract),
                classification=p.classification,
            ),
        },
    }


def _output(run_dir: Path, relative: str) -> list[dict[str, Any]]:
    if not relative:
        return []
    return [{"namespace": "file", "name": str((run_dir / relative).resolve())}]


def _event(
    kind: str,
    ts: float,
    run_id: str,
    job: str,
    mesh: str,
    parent: dict[str, Any],
    job_type: str,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    extra: dict[str, Any],
) -> dict[str, Any]:
    return {
        "eventType": kind,
        "eventTime": audit.iso_time(ts, "milliseconds") or "1970-01-01T00:00:00+00:00",
        "producer": PRODUCER,
        "schemaURL": RUN_EVENT_SCHEMA,
        "run": {
            "runId": run_id,
            "facets": {"parent": parent, "meshctl": _facet(CUSTOM_FACET, **extra)},
        },
        "job": {
            "namespace": mesh,
            "name": job,
            "facets": {
                "jobType": _facet(
                    JOB_TYPE_FACET, processingType="BATCH", integration="MESHCTL", jobType=job_type
                )
            },
        },
        "inputs": inputs,
        "outputs": outputs,
    }


def export_events(run_dir: Path) -> list[dict[str, Any]]:
    """The run's RunEvents: START, then COMPLETE or FAIL, per job and analysis, in time order."""
    manifest, plan = audit.read_manifest(run_dir), audit.read_plan(run_dir)
    events = [e for e in audit.check_chain(run_dir / audit.EVENTS_FILE, None).objects if e]
    mesh, run = plan.plan.mesh, manifest.run
    done = audit.find_event(events, "run_completed") or {}
    parent = _facet(
        PARENT_FACET, run={"runId": run_uuid(run)}, job={"namespace": mesh, "name": f"run.{mesh}"}
    )
    units = [
        ("model", j.name, "FEDERATED_TRAINING", j.reads, ("job_started", "job_completed", "job"))
        for j in plan.jobs
    ]
    units += [
        (
            "analysis",
            a.name,
            "FEDERATED_ANALYSIS",
            a.reads,
            ("analysis_started", "analysis_completed", "analysis"),
        )
        for a in plan.analyses
    ]
    units += [  # split learning: each part's product (and its contract version) is an input
        ("model", s.name, "SPLIT_TRAINING", s.parts, ("job_started", "job_completed", "job"))
        for s in plan.split_models
    ]
    base_dir = Path(manifest.base_dir)
    begun = audit.find_event(events, "run_started") or {}
    out: list[dict[str, Any]] = []
    for kind, name, job_type, reads, (start_type, end_type, key) in units:
        started = audit.find_event(events, start_type, **{key: name})
        finished = audit.find_event(events, end_type, **{key: name})
        failed = audit.find_event(events, "job_failed", job=name) if kind == "model" else None
        if started is None:  # failed before its first round: from when it waited, or failed
            waiting = audit.find_event(events, "job_waiting", job=name) if kind == "model" else None
            if kind == "analysis" and f"analysis:{name}" in begun.get("jobs", []) and done:
                waiting = {"ts": begun.get("ts", 0.0)}  # an analysis run: the analysis is its work
            started = waiting or failed
            if started is None or finished is not None:
                continue  # never attempted (an earlier job failed, or not this run's work)
        extra = {
            "meshctl_run": run,
            "plan_hash": plan.plan.hash,
            "participants": started.get("participants", started.get("have", [])),
        }
        shared = audit.find_event(events, "intersection_computed", job=name) if job_type == "SPLIT_TRAINING" else None
        if shared is not None:  # split learning: how many ids all parts share (the rows it trained on)
            extra["intersection"] = shared.get("size")
        args = (
            run_uuid(run, f"{kind}.{name}"),
            f"{kind}.{name}",
            mesh,
            parent,
            job_type,
            [_dataset(plan, r.product, base_dir) for r in reads],
        )
        out.append(_event("START", started.get("ts", 0.0), *args, [], extra))
        if finished:
            path = finished.get("model_path") or finished.get("result_path", "")
            extra = {
                **extra,
                "metrics": finished.get("metrics", {}),
                "rounds": finished.get("rounds"),
            }
            out.append(
                _event("COMPLETE", finished.get("ts", 0.0), *args, _output(run_dir, path), extra)
            )
        elif failed or done:  # else the run is still going: START only, its end comes later
            reason = (failed or {}).get("reason") or done.get("reason") or "did not complete"
            ts = (failed or done).get("ts", started.get("ts", 0.0))
            stopped = not failed and reason.startswith("stopped by")  # asked to stop: not a failure
            event = _event("ABORT" if stopped else "FAIL", ts, *args, [], {**extra, "reason": reason})
            event["run"]["facets"]["errorMessage"] = _facet(
                ERROR_FACET, message=reason, programmingLanguage="python"
            )
            out.append(event)
    return sorted(out, key=lambda e: e["eventTime"])


def missing_fields(event: dict[str, Any]) -> list[str]:
    """Required RunEvent fields that `event` lacks (dotted paths); [] when it has them all."""
    missing = []
    for path in REQUIRED:
        node: Any = event
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node in (None, ""):
            missing.append(path)
    return missing


def write_events(run_dir: Path, out: Path | None) -> tuple[list[dict[str, Any]], Path | None]:
    """Export the run's RunEvents as JSON lines into OUT (None: return them for stdout)."""
    events = export_events(run_dir)
    if out is not None:
        text = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events)
        try:
            out.write_text(text, encoding="utf-8")
        except OSError as err:
            raise UserError(f"cannot write: {err.strerror or err}", where=str(out)) from None
    return events, out
