"""The compliance report of a run: what ran, on which products and contracts, under which
policy decisions, with what privacy cost and contract checks, and whether its audit log verifies.

`build_report` gathers it from the run directory alone (plan.toml, run.json, events.jsonl)
as one JSON-ready dict; `render_markdown` shows the same facts; `write_report` writes both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from meshctl.errors import UserError
from meshctl.runtime.audit import (
    find_event,
    find_events,
    iso_time,
    read_manifest,
    read_plan,
    show_path,
    verify_run,
)

REPORT_FORMAT = 1
"""Version of the JSON report's layout."""


def build_report(run_dir: Path) -> dict[str, Any]:
    """The compliance report of a run as one JSON-ready dict (deterministic for a given run)."""
    from meshctl import __version__

    manifest, plan = read_manifest(run_dir), read_plan(run_dir)
    check = verify_run(run_dir)
    events = [e for e in check.objects if e]
    return {
        "report": "meshctl audit report",
        "format": REPORT_FORMAT,
        "run": _run_section(manifest.run, plan, events, __version__),
        "participants": _participants(plan, events),
        "jobs": [_job(job, events) for job in plan.jobs],
        "analyses": [_analysis(a, events) for a in plan.analyses],
        "split_models": [_split(s, events) for s in plan.split_models],
        "products": _products(plan, events),
        "policies": _policies(plan, events),
        "privacy": _privacy(plan, events),
        "contract_checks": _checks(events),
        "audit": {
            "verified": check.ok,
            "entries": check.entries,
            "head": check.head,
            "recorded_head": manifest.audit_head,
            "problems": check.problems,
            "notes": check.notes,
        },
    }


def _run_section(run: str, plan: Any, events: list[dict[str, Any]], version: str) -> dict[str, Any]:
    started, done = find_event(events, "run_started"), find_event(events, "run_completed")
    return {
        "id": run,
        "mesh": plan.plan.mesh,
        "plan_hash": plan.plan.hash,
        "plan_meshctl_version": plan.plan.meshctl_version,
        "meshctl_version": version,
        "protocol_version": plan.plan.protocol_version,
        "started": iso_time(started and started.get("ts")),
        "ended": iso_time(done and done.get("ts")),
        "seconds": done.get("seconds") if done else None,
        "outcome": "running or killed"
        if done is None
        else ("completed" if done.get("ok") else "failed"),
        "reason": (done or {}).get("reason", ""),
    }


def _participants(plan: Any, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for d in plan.domains:
        joined = find_event(events, "domain_joined", domain=d.name)
        problems = [
            f"{e['type'].removeprefix('domain_')}: {e.get('reason', '')}"
            for e in events
            if e.get("type") in ("domain_refused", "domain_lost") and e.get("domain") == d.name
        ]
        out.append(
            {
                "domain": d.name,
                "owner": d.owner,
                "jurisdiction": d.jurisdiction,
                "joined": iso_time(joined and joined.get("ts")),
                "rows": (joined or {}).get("rows", {}),
                "problems": problems,
            }
        )
    return out


def _job(job: Any, events: list[dict[str, Any]]) -> dict[str, Any]:
    started = find_event(events, "job_started", job=job.name)
    done = find_event(events, "job_completed", job=job.name)
    failed = find_event(events, "job_failed", job=job.name)
    rounds = [
        {
            "round": e.get("round"),
            "participants": len(e.get("participants", [])),
            "train_loss": e.get("train_loss"),
            "metrics": e.get("metrics", {}),
            "seconds": e.get("seconds"),
        }
        for e in find_events(events, "round_completed", job=job.name)
    ]
    status = (
        "completed"
        if done
        else "failed"
        if failed
        else "not started"
        if started is None
        else "stopped"
    )
    dp = job.privacy.dp
    return {
        "name": job.name,
        "kind": "model",
        "purpose": job.purpose,
        "participants": (started or {}).get("participants", []),
        "planned_participants": job.participants,
        "products": [r.product for r in job.reads],
        "grants": job.grants,
        "rounds_planned": job.training.rounds,
        "rounds_completed": len(rounds),
        "aggregation": job.aggregation.strategy,
        "privacy": {
            "secure_aggregation": job.privacy.secure_aggregation,
            "dp_epsilon": dp.epsilon if dp else None,
            "dp_delta": dp.delta if dp else None,
        },
        "status": status,
        "reason": (failed or {}).get("reason", ""),
        "started": iso_time(started and started.get("ts")),
        "seconds": (done or {}).get("seconds"),
        "metrics": (done or {}).get("metrics") or (rounds[-1]["metrics"] if rounds else {}),
        "model": (done or {}).get("model_path", ""),
        "rounds": rounds,
    }


def _analysis(analysis: Any, events: list[dict[str, Any]]) -> dict[str, Any]:
    started = find_event(events, "analysis_started", analysis=analysis.name)
    done = find_event(events, "analysis_completed", analysis=analysis.name)
    return {
        "name": analysis.name,
        "kind": "analysis",
        "purpose": analysis.purpose,
        "participants": (started or {}).get("participants", []),
        "products": [r.product for r in analysis.reads],
        "metrics": [m.label for m in analysis.metrics],
        "min_group_size": analysis.min_group_size,
        "dp_epsilon": analysis.dp.epsilon if analysis.dp else None,
        "status": "completed" if done else "not started" if started is None else "stopped",
        "groups": (done or {}).get("groups"),
        "suppressed": (done or {}).get("suppressed"),
        "seconds": (done or {}).get("seconds"),
        "result": (done or {}).get("result_path", ""),
    }


def _split(split: Any, events: list[dict[str, Any]]) -> dict[str, Any]:
    """A split model: which product and contract version fed each part, the intersection, the outcome."""
    started = find_event(events, "job_started", job=split.name)
    done = find_event(events, "job_completed", job=split.name)
    failed = find_event(events, "job_failed", job=split.name)
    shared = find_event(events, "intersection_computed", job=split.name) or {}
    return {
        "name": split.name,
        "kind": "split_model",
        "purpose": split.purpose,
        "parts": [{"domain": p.domain, "product": p.product, "contract": p.contract, "features": p.features}
                  for p in split.parts],
        "label": {"domain": split.label_domain, "product": split.label_product, "column": split.label_column},
        "top_at": split.top_at or "label_owner",
        "intersection": shared.get("size"),
        "epochs_planned": split.epochs,
        "epochs_completed": len({e.get("round") for e in find_events(events, "round_completed", job=split.name)}),
        "status": "completed" if done else "failed" if failed else "not started" if started is None else "stopped",
        "reason": (failed or {}).get("reason", ""),
        "metrics": (done or {}).get("metrics", {}),
        "model": (done or {}).get("model_path", ""),
    }


def _epochs(split: dict[str, Any]) -> str:
    """A split model's cell of the rounds column: `30 epochs` when all ran, else `12/30 epochs`."""
    done, planned = split.get("epochs_completed", 0), split.get("epochs_planned", 0)
    return f"{done} epochs" if done == planned else f"{done}/{planned} epochs"


def contract_version(plan: Any, contract_id: str) -> str:
    """The version of a contract id (`name@version`), from the plan's contracts or the id itself."""
    found = next((c for c in plan.contracts if c.id == contract_id), None)
    return found.version if found else contract_id.partition("@")[2]


def _products(plan: Any, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    readers: dict[str, list[str]] = {}
    for unit, kind in [(j, "model") for j in plan.jobs] + [(a, "analysis") for a in plan.analyses]:
        for r in unit.reads:
            readers.setdefault(r.product, []).append(f"{kind}.{unit.name}")
    for split in plan.split_models:
        for part in split.parts:
            readers.setdefault(part.product, []).append(f"split_model.{split.name}")
    rows = {
        p: n for e in find_events(events, "domain_joined") for p, n in e.get("rows", {}).items()
    }
    out = []
    for p in plan.products:
        listed = find_event(events, "product_listed", product=p.id) or {}
        contract = listed.get("contract") or p.contract
        out.append(
            {
                "id": p.id,
                "domain": p.domain,
                "owner": p.owner,
                "classification": p.classification,
                "access": p.access,
                "contract": contract,
                "contract_version": contract_version(plan, contract),
                "read_by": readers.get(p.id, []),
                "rows": rows.get(p.id),
            }
        )
    return out


def _exclusion(e: dict[str, Any]) -> dict[str, Any]:
    """An `update_excluded` or `domain_suspended` event as a run-time decision's fields (else the event)."""
    if e.get("type") == "update_excluded":
        return {**e, "scope": "round", "subject": f"update.{e.get('job')}.{e.get('round')}.{e.get('domain')}",
                "effect": "exclude", "domain": ""}
    if e.get("type") == "domain_suspended":
        return {**e, "scope": "round", "subject": f"domain.{e.get('domain')}", "effect": "suspend", "domain": "",
                "reason": f"{e.get('exclusions')} update(s) excluded in job {e.get('job')}: no further part in it"}
    return e


def _policies(plan: Any, events: list[dict[str, Any]]) -> dict[str, Any]:
    compile_time = [
        {
            "policy": d.policy,
            "scope": d.scope,
            "subject": d.subject,
            "effect": d.effect,
            "reason": d.reason,
            "at": d.at,
        }
        for d in plan.decisions
    ]
    run_time = [
        {
            "policy": e.get("policy"),
            "scope": e.get("scope"),
            "subject": e.get("subject"),
            "effect": e.get("effect"),
            "reason": e.get("reason"),
            "at": e.get("at", ""),
            "domain": e.get("domain", ""),
            "time": iso_time(e.get("ts")),
        }
        for e in map(_exclusion, events)  # (each exclusion and suspension is a run-time decision too)
        if e.get("type") == "policy_decided" and e.get("stage", "compile") != "compile"
        or e.get("type") in ("update_excluded", "domain_suspended")
    ]
    counts = {
        k: sum(1 for d in compile_time + run_time if d["effect"] == k)
        for k in ("allow", "warn", "deny", "exclude", "suspend")
    }
    return {"compile": compile_time, "runtime": run_time, "counts": counts}


def _privacy(plan: Any, events: list[dict[str, Any]]) -> dict[str, Any]:
    spent = [
        {
            "product": e.get("product"),
            "subject": e.get("subject"),
            "epsilon": e.get("epsilon"),
            "total": e.get("total"),
            "cap": e.get("cap"),
        }
        for e in find_events(events, "budget_spent")
    ]
    by_product: dict[str, float] = {}
    for s in spent:
        by_product[s["product"]] = by_product.get(s["product"], 0.0) + float(s["epsilon"] or 0)
    return {"spent": spent, "epsilon_by_product": by_product}


def _checks(events: list[dict[str, Any]]) -> dict[str, Any]:
    checks = [
        {
            k: e.get(k)
            for k in (
                "product",
                "domain",
                "contract",
                "rule",
                "observed",
                "operator",
                "threshold",
                "passed",
                "severity",
            )
        }
        for e in find_events(events, "contract_checked")
    ]
    failed = [c for c in checks if not c["passed"]]
    return {
        "passed": len(checks) - len(failed),
        "failed": len(failed),
        "failed_errors": sum(1 for c in failed if c["severity"] == "error"),
        "checks": checks,
    }


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items()) or "—"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "—"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    if not rows:
        return ["(none)", ""]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown, the same facts as its JSON."""
    run, audit = report["run"], report["audit"]
    verdict = (
        f"verified: {audit['entries']} entries, head `{audit['head']}`"
        if audit["verified"]
        else f"**NOT verified**: {len(audit['problems'])} problems"
    )
    out = [
        f"# Audit report: run {run['id']}",
        "",
        f"- mesh: **{run['mesh']}**, plan `{run['plan_hash']}`",
        (
            f"- meshctl {run['meshctl_version']} (plan compiled by {run['plan_meshctl_version']}, "
            f"protocol {run['protocol_version']})"
        ),
        (
            f"- {run['started'] or '?'} to {run['ended'] or '?'} ({_cell(run['seconds'])} s): "
            f"**{run['outcome']}**{': ' + run['reason'] if run['reason'] else ''}"
        ),
        f"- audit chain {verdict}",
        "",
        "## What ran",
        "",
    ]
    out += _table(
        [
            "job",
            "kind",
            "purpose",
            "status",
            "rounds",
            "participants",
            "products",
            "metrics",
            "model",
        ],
        [
            [
                j["name"],
                j["kind"],
                j["purpose"],
                j["status"],
                f"{j['rounds_completed']}/{j['rounds_planned']}",
                j["participants"],
                j["products"],
                j["metrics"],
                j["model"],
            ]
            for j in report["jobs"]
        ]
        + [
            [
                a["name"],
                a["kind"],
                a["purpose"],
                a["status"],
                "—",
                a["participants"],
                a["products"],
                a["metrics"],
                a["result"],
            ]
            for a in report["analyses"]
        ]
        + [
            [
                s["name"],
                "split model",
                s["purpose"],
                s["status"] + (f": {s['reason']}" if s["reason"] else ""),
                _epochs(s),
                [p["domain"] for p in s["parts"]],
                [p["product"] for p in s["parts"]],
                s["metrics"],
                s["model"],
            ]
            for s in report.get("split_models", [])
        ],
    )
    for s in report.get("split_models", []):
        label = s["label"]
        out += [
            f"### Split model {s['name']}",
            "",
            f"- intersection: {_cell(s['intersection'])} shared ids",
            f"- label: {label['column']} from {label['product']} ({label['domain']})",
            "",
        ]
        out += _table(
            ["domain", "product", "contract", "features"],
            [[p["domain"], p["product"], p["contract"], p["features"]] for p in s["parts"]],
        )
    for j in report["jobs"]:
        out += [f"### Rounds of {j['name']}", ""]
        out += _table(
            ["round", "participants", "train loss", "metrics", "seconds"],
            [
                [r["round"], r["participants"], r["train_loss"], r["metrics"], r["seconds"]]
                for r in j["rounds"]
            ],
        )
    out += ["## Participants", ""]
    out += _table(
        ["domain", "owner", "jurisdiction", "joined", "rows", "problems"],
        [
            [p["domain"], p["owner"], p["jurisdiction"], p["joined"], p["rows"], p["problems"]]
            for p in report["participants"]
        ],
    )
    out += ["## Products and contracts", ""]
    out += _table(
        ["product", "domain", "classification", "access", "contract", "version", "read by", "rows"],
        [
            [
                p["id"],
                p["domain"],
                p["classification"],
                p["access"],
                p["contract"],
                p["contract_version"],
                p["read_by"],
                p["rows"],
            ]
            for p in report["products"]
        ],
    )
    pol = report["policies"]
    out += ["## Policy decisions", "", "Compile time (from the plan):", ""]
    out += _table(
        ["policy", "scope", "subject", "effect", "reason", "at"],
        [
            [d["policy"], d["scope"], d["subject"], d["effect"], d["reason"], d["at"]]
            for d in pol["compile"]
        ],
    )
    out += ["Run time:", ""]
    out += _table(
        ["time", "policy", "domain", "subject", "effect", "reason", "at"],
        [
            [d["time"], d["policy"], d["domain"], d["subject"], d["effect"], d["reason"], d["at"]]
            for d in pol["runtime"]
        ],
    )
    out += ["## Privacy budget", ""]
    out += _table(
        ["product", "spent by", "ε", "total", "cap"],
        [
            [s["product"], s["subject"], s["epsilon"], s["total"], s["cap"]]
            for s in report["privacy"]["spent"]
        ],
    )
    checks = report["contract_checks"]
    out += [
        "## Contract checks",
        "",
        (
            f"{checks['passed']} passed, {checks['failed']} failed "
            f"({checks['failed_errors']} of severity error)."
        ),
        "",
    ]
    out += _table(
        ["product", "contract", "rule", "observed", "operator", "threshold", "result", "severity"],
        [
            [
                c["product"],
                c["contract"],
                c["rule"],
                c["observed"],
                c["operator"],
                c["threshold"],
                "pass" if c["passed"] else "FAIL",
                c["severity"],
            ]
            for c in checks["checks"]
        ],
    )
    out += [
        "## Audit chain",
        "",
        f"- entries: {audit['entries']}",
        f"- head: `{audit['head']}`",
        f"- head recorded in run.json: `{audit['recorded_head'] or 'none'}`",
    ]
    out += [f"- problem: {p}" for p in audit["problems"]] + [f"- note: {n}" for n in audit["notes"]]
    return "\n".join(out) + "\n"


def write_report(run_dir: Path, out_dir: Path | None = None) -> tuple[Path, Path, dict[str, Any]]:
    """Write `audit-<run>.md` and `audit-<run>.json` into OUT_DIR (default: the run directory)."""
    report = build_report(run_dir)
    out = out_dir or run_dir
    if out.exists() and not out.is_dir():
        raise UserError("not a directory", where=show_path(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
        md, js = out / f"audit-{report['run']['id']}.md", out / f"audit-{report['run']['id']}.json"
        md.write_text(render_markdown(report), encoding="utf-8")
        js.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as err:
        raise UserError(
            f"cannot write the report: {err.strerror or err}", where=show_path(out)
        ) from None
    return md, js, report
