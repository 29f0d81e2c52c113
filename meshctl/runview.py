"""What `meshctl runs` and `meshctl status` print: a run's data (meshctl.runtime.run.RunDir) as
text tables or JSON. Presentation only; nothing here changes a run."""

from __future__ import annotations

import json
import time
from pathlib import Path

from meshctl.runtime.run import (
    RUNNING,
    DomainState,
    JobProgress,
    RunDir,
    list_runs,
    runs_dir,
    show_path,
)
from meshctl.tables import format_table

__all__ = ["render_runs", "render_status", "render_stopped"]


def when(ts: float | None) -> str:
    """A unix time as `YYYY-MM-DD HH:MM:SS` UTC (run ids are UTC too), or `-`."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "-"


def span(seconds: float | None) -> str:
    """`42s`, `3m07s`, `2h05m`, or `-`."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _rounds(jobs: list[JobProgress]) -> str:
    """`done/total` rounds of the run's jobs; `epochs` after it when every job is a split job."""
    done = sum(j.done for j in jobs)
    total = [j.rounds for j in jobs]
    epochs = " epochs" if jobs and all(j.unit == "epoch" for j in jobs) else ""
    return f"{done}/{sum(t for t in total if t) if all(total) else '?'}{epochs}" if jobs else "-"


def _metric(jobs: list[JobProgress]) -> str:
    """The first metric other than a loss of the last job that has metrics (`accuracy 0.9561`)."""
    for job in reversed(jobs):
        if job.metrics:
            name = next((k for k in job.metrics if "loss" not in k), next(iter(job.metrics)))
            return f"{name} {job.metrics[name]:.4f}"
    return "-"


def _domain_row(d: DomainState, live: bool, now: float) -> tuple[object, ...]:
    """A domain's row in `meshctl status`; once the run has ended, `connected` reads `joined`."""
    if not live:
        return d.name, "joined" if d.state == "connected" else d.state, "-", "-", d.pid or "-", d.reason
    seen = f"{span(now - d.last_seen)} ago" if d.last_seen else "-"
    return d.name, d.state, d.activity or "-", seen, d.pid or "-", d.reason


def render_runs(root: str | Path, fmt: str = "text") -> str:
    """`meshctl runs`: the mesh's runs, newest first, as a table or a JSON list."""
    runs = [RunDir(p) for p in list_runs(root)]
    if fmt == "json":
        return json.dumps([r.summary() for r in runs], indent=2)
    if not runs:
        return f"no runs yet under {show_path(runs_dir(root))}/ (start one with `meshctl up`)"
    rows = []
    for r in runs:
        state, reason = r.status
        jobs = r.jobs()
        rows.append((r.id, state, when(r.started), span(r.duration),
                     ", ".join(j.name for j in jobs) or "-", _rounds(jobs), _metric(jobs), reason))
    return format_table(("run", "status", "started (UTC)", "duration", "jobs", "rounds", "metric", "reason"),
                        rows)


def render_status(run_dir: Path, fmt: str = "text") -> str:
    """`meshctl status RUN`: a live run's domains (connected, missing, lost, refused) and job
    progress; a finished run's outcome."""
    r = RunDir(run_dir)
    state, reason = r.status
    domains, jobs = r.domains(), r.jobs()
    if fmt == "json":
        return json.dumps({**r.summary(), "domains": [d.__dict__ for d in domains]}, indent=2)
    now = time.time()
    head = f"run {r.id}: {state}" + (f": {reason}" if reason else "")
    head += f"  (started {when(r.started)} UTC, {span(r.duration)})" if r.started else ""
    lines = [head, ""]
    if domains:
        connected = [d.name for d in domains if d.state == "connected"]
        missing = [d.name for d in domains if d.state == "missing"]
        lost = [d.name for d in domains if d.state in ("lost", "refused")]
        joined = "connected" if state == RUNNING else "joined"
        lines.append(f"domains: {len(connected)} {joined}, {len(missing)} missing, {len(lost)} lost or refused")
        rows = [_domain_row(d, state == RUNNING, now) for d in domains]
        lines += [format_table(("domain", "state", "activity", "last seen", "pid", "reason"), rows), ""]
    if jobs:
        rows = [(j.name, j.state, f"{j.done}/{j.rounds or '?'}" + (" epochs" if j.unit == "epoch" else ""),
                 "  ".join(f"{k} {v:.4f}" for k, v in j.metrics.items()) or "-", j.detail) for j in jobs]
        lines.append(format_table(("job", "state", "rounds", "metrics", "detail"), rows))
        from meshctl.runtime.launcher import evaluation_lines

        extra = [line for j in jobs for line in evaluation_lines(r.events, j.name, r.path)]
        lines += ["", *extra] if extra else []
    return "\n".join(lines).rstrip()


def render_stopped(run: RunDir) -> str:
    """`meshctl stop`'s last line: how the run ended."""
    done = run.completion
    if done is None:
        return f"run {run.id} ended without run_completed ({run.status[0]})"
    if done.ok:
        return f"run {run.id} completed before the stop"
    return f"run {run.id} stopped: {done.reason}"
