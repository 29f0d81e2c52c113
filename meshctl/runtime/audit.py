"""The audit log: hash-chained events per run and mesh-wide, its verifier and compliance report.

A run's `events.jsonl` *is* its audit log. Every line is an event plus two fields:

    prev   the `hash` of the previous line; for line 1 the run's anchor
    hash   "sha256:" + sha256 of the line's canonical JSON without `hash` (so `prev` is covered)

Canonical JSON is `json.dumps(obj, sort_keys=True, separators=(",", ":"))` (ASCII escapes).
The anchor is "sha256:" + sha256(plan hash + run id), both taken from outside the log
(`plan.toml`, `run.json`). When the run ends, its head hash and entry count go into
`run.json` (so removing the last entries is detected), and its entries are appended to
the mesh-wide `.meshctl/audit.jsonl`, one line per entry:

    {"run": RUN, "n": N, "entry": <line N of the run's events.jsonl>, "prev": ..., "hash": ...}

chained the same way across runs from GENESIS = "sha256:" + sha256("meshctl audit log").
The compliance report built on this is meshctl.runtime.audit_report.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshctl.errors import UserError
from meshctl.runtime.run import EVENTS_FILE, RunManifest, show_path
from meshctl.runtime.run import resolve_run as run_resolver

MESH_LOG = "audit.jsonl"
HASH_PREFIX = "sha256:"


def sha256_text(text: str) -> str:
    """`sha256:<hex>` of a text's UTF-8 bytes."""
    return HASH_PREFIX + hashlib.sha256(text.encode()).hexdigest()


GENESIS = sha256_text("meshctl audit log")
"""`prev` of the first entry of a mesh-wide audit log."""


def canonical(obj: Mapping[str, Any]) -> str:
    """Canonical JSON: sorted keys, no spaces, ASCII escapes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def entry_hash(entry: Mapping[str, Any]) -> str:
    """The hash of an entry: sha256 of its canonical JSON without its `hash` field."""
    return sha256_text(canonical({k: v for k, v in entry.items() if k != "hash"}))


def run_anchor(plan_hash: str, run: str) -> str:
    """`prev` of a run's first entry: sha256 of the plan hash followed by the run id."""
    return sha256_text(plan_hash + run)


def seal(entry: Mapping[str, Any], prev: str) -> dict[str, Any]:
    """The entry with `prev` and its `hash` added (key order kept, chain fields last)."""
    sealed = {k: v for k, v in entry.items() if k not in ("prev", "hash")}
    sealed["prev"] = prev
    sealed["hash"] = entry_hash(sealed)
    return sealed


def _line(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


# -- writing: the coordinator's side ---------------------------------------------------


class Chain:
    """The head of a run's chain while its events.jsonl is written (see EventSink)."""

    def __init__(self, anchor: str, hashes: list[str] | None = None) -> None:
        self.anchor = anchor
        self.hashes = list(hashes or [])
        """Hash of every entry so far, in order."""

    @property
    def head(self) -> str:
        """Hash of the last entry, or the anchor before the first."""
        return self.hashes[-1] if self.hashes else self.anchor

    def seal(self, entry: Mapping[str, Any]) -> str:
        """The JSON line of `entry` chained after the head; the head moves to it."""
        sealed = seal(entry, self.head)
        self.hashes.append(sealed["hash"])
        return _line(sealed)

    @classmethod
    def open(cls, events: Path, anchor: str | None = None) -> Chain:
        """The chain of `events` (a run's events.jsonl), continuing after lines already there.

        Without `anchor`, it is computed from the run directory's run.json and plan.toml.
        """
        run_dir = events.parent
        if anchor is None:
            anchor = run_anchor(
                plan_hash_of(run_dir / "plan.toml")[0], RunManifest.read(run_dir).run
            )
        return cls(anchor, _stored_hashes(events))

    def resync(self, events: Path) -> None:
        """Take the head from the file again (after an entry's write was interrupted)."""
        self.hashes = _stored_hashes(events)

    def finish(self, run_dir: Path) -> None:
        """The run ended: record the head in run.json and append the run to the mesh-wide log."""
        record_head(run_dir, self.head, len(self.hashes))
        if run_dir.parent.name == "runs":
            lines = [
                json.loads(raw)
                for raw in (run_dir / EVENTS_FILE).read_bytes().splitlines()
                if raw.strip()
            ]
            append_to_mesh_log(run_dir.parent.parent / MESH_LOG, run_dir.name, lines)


def _stored_hashes(events: Path) -> list[str]:
    """The `hash` of every entry already in a file (none if there is no file)."""
    hashes: list[str] = []
    if events.is_file():
        for raw in events.read_bytes().splitlines():
            try:
                hashes.append(json.loads(raw)["hash"])
            except (ValueError, KeyError, TypeError):
                continue
    return hashes


def record_head(run_dir: Path, head: str, entries: int) -> None:
    """Write the chain's head and entry count into run.json (atomically)."""
    manifest = RunManifest.read(run_dir).model_copy(
        update={"audit_head": head, "audit_entries": entries}
    )
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(manifest.model_dump(), indent=2) + "\n")
    tmp.replace(run_dir / "run.json")


def append_to_mesh_log(log: Path, run: str, entries: list[dict[str, Any]]) -> int:
    """Append the run's entries the mesh log does not hold yet, chained; return how many.

    The file is locked while its head is read and the entries appended, so runs that end
    at the same time interleave whole runs, never lines.
    """
    marker = f'{{"run":{json.dumps(run)},'
    with log.open("a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        head, have, last = GENESIS, set(), ""
        for line in f:
            if line.strip():
                last = line
            if line.startswith(marker):
                have.add(json.loads(line).get("n"))
        if last:
            head = json.loads(last).get("hash", head)
        added = 0
        for n, entry in enumerate(entries, 1):
            if n in have:
                continue
            sealed = seal({"run": run, "n": n, "entry": entry}, head)
            f.write(_line(sealed) + "\n")
            head, added = sealed["hash"], added + 1
        f.flush()
        os.fsync(f.fileno())
    return added


# -- finding runs ----------------------------------------------------------------------


def resolve_run(spec: str | Path, root: str | Path | None = None) -> Path:
    """The directory of RUN (an id, a run directory, its events.jsonl, or `latest`): see
    meshctl.runtime.run.resolve_run, the one resolver every command uses.

    Raises:
        UserError: nothing matches, or the directory is not a run directory.
    """
    return run_resolver(spec, root)


def read_manifest(run_dir: Path) -> RunManifest:
    """run.json of a run directory; a UserError if it cannot be read."""
    path = run_dir / "run.json"
    try:
        return RunManifest.read(run_dir)
    except OSError as err:
        raise UserError(
            f"cannot read run.json: {err.strerror or err}", where=show_path(path)
        ) from None
    except ValueError as err:  # pydantic and UTF-8 errors
        raise UserError(
            f"not a run manifest: {str(err).splitlines()[0]}", where=show_path(path)
        ) from None


def plan_hash_of(path: Path) -> tuple[str, str]:
    """(hash recorded in a plan.toml's [plan] table, hash recomputed from its bytes; the trailing
    `[positions]` table is not hashed)."""
    from meshctl.compiler.plan import hashed_text

    text = hashed_text(path.read_text(encoding="utf-8"))
    section = re.search(r"^\[plan\]\n(?:(?!\[).*\n)*", text, re.MULTILINE)
    found = section and re.search(r'^hash = "(sha256:[0-9a-f]+)"$', section.group(0), re.MULTILINE)
    if not section or not found:
        raise ValueError("no [plan] hash")
    start = section.start() + found.start()
    unhashed = text[:start] + 'hash = ""' + text[section.start() + found.end() :]
    return found.group(1), sha256_text(unhashed)


# -- verifying -------------------------------------------------------------------------


@dataclass
class Verification:
    """What a verification found: problems make it fail, notes do not."""

    entries: int = 0
    head: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    """Stored hash of each entry, in order (for cross-checks)."""
    lines: list[int] = field(default_factory=list)
    """Line number of each entry."""
    objects: list[Any] = field(default_factory=list)
    runs: int = 0
    """Runs covered (mesh-wide verification only)."""
    """Each entry as parsed (None where it did not parse)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """`N entries verified, head H`, or how many problems were found."""
        if self.ok:
            across = f" across {self.runs} run{'s' if self.runs != 1 else ''}" if self.runs else ""
            return f"{self.entries} entries verified{across}, head {self.head}"
        n = len(self.problems)
        return (
            f"audit log NOT verified: {n} problem{'s' if n != 1 else ''} in {self.entries} entries"
        )


def check_chain(path: Path, anchor: str | None) -> Verification:
    """Recompute the chain of a JSON-lines file; one problem per broken entry, with FILE:LINE.

    `anchor` is the expected `prev` of the first entry (None: not checked).
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read: {err.strerror or err}", where=show_path(path)) from None
    v = Verification(head=anchor or "")
    prev: str | None = anchor
    shown = show_path(path)
    for lineno, data in enumerate(raw.split(b"\n"), 1):
        if not data.strip():
            continue
        v.entries += 1
        n = v.entries
        obj = _parse_entry(data)
        v.lines.append(lineno)
        v.objects.append(obj if isinstance(obj, dict) else None)
        if isinstance(obj, str):
            v.problems.append(f"{shown}:{lineno}: entry {n}: {obj}")
            v.hashes.append("")
            prev = None
            continue
        if entry_hash(obj) != obj["hash"]:
            v.problems.append(f"{shown}:{lineno}: entry {n}: hash mismatch (changed?)")
        if prev is not None and obj["prev"] != prev:
            what = (
                f"entry {n - 1} (removed or reordered?)"
                if n > 1
                else "the chain's anchor (first entry removed?)"
            )
            v.problems.append(f"{shown}:{lineno}: entry {n}: prev does not match {what}")
        prev = v.head = obj["hash"]
        v.hashes.append(obj["hash"])
    if v.entries == 0:
        v.problems.append(f"{shown}: no entries (emptied?)")
    return v


def _parse_entry(data: bytes) -> dict[str, Any] | str:
    """The entry of one line, or why it is not one."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8 (changed?)"
    except ValueError:
        return "not valid JSON (changed or cut?)"
    if (
        not isinstance(obj, dict)
        or not isinstance(obj.get("hash"), str)
        or not isinstance(obj.get("prev"), str)
    ):
        return "no prev/hash fields (not an audit entry)"
    return obj


def verify_run(run_dir: Path) -> Verification:
    """Verify a run's events.jsonl against its anchor (plan.toml, run.json) and recorded head."""
    manifest = read_manifest(run_dir)
    plan_file, events = run_dir / "plan.toml", run_dir / EVENTS_FILE
    problems: list[str] = []
    try:
        recorded, actual = plan_hash_of(plan_file)
    except (OSError, ValueError) as err:
        recorded = None
        problems.append(
            f"{show_path(plan_file)}: not a readable plan ({err}); the chain's anchor is unknown"
        )
    else:
        if recorded != actual:
            problems.append(
                f"{show_path(plan_file)}: content does not match its hash (changed after the run?)"
            )
    if not events.exists() and not manifest.audit_head and not problems:  # a failed start
        v = Verification(head=run_anchor(recorded or "", manifest.run))
        v.notes.append(f"{show_path(run_dir)}: run {manifest.run} never started (no events)")
        return v
    v = check_chain(events, None if recorded is None else run_anchor(recorded, manifest.run))
    v.problems[:0] = problems
    v.problems.extend(check_rounds(v, events))
    v.problems.extend(check_metrics(run_dir / "metrics.csv"))
    if not manifest.audit_head:
        v.notes.append(
            f"{show_path(run_dir / 'run.json')}: no head recorded (the run has not ended, or its "
            "coordinator was killed): removal of the last entries cannot be detected"
        )
    elif v.head != manifest.audit_head:
        v.problems.append(
            f"{show_path(events)}: ends at entry {v.entries} with head {v.head[:19]}, but run.json "
            f"records {manifest.audit_entries} entries ending at {manifest.audit_head[:19]} "
            "(last entries removed or added?)"
        )
    return v


def check_rounds(v: Verification, events: Path) -> list[str]:
    """Rounds completed again or out of order, unless a run_resumed before them says the job went
    back to an earlier checkpoint (a run restarted from round 1 repeats its rounds)."""
    problems: list[str] = []
    done: dict[str, int] = {}
    for obj, lineno in zip(v.objects, v.lines, strict=True):
        kind = obj.get("type") if obj else None
        if kind == "run_resumed" and isinstance(obj.get("rounds"), dict):
            for job, rnd in obj["rounds"].items():
                done[job] = min(done.get(job, 0), int(rnd)) if job in done else int(rnd)
        elif kind == "round_completed":
            job, rnd = str(obj.get("job")), int(obj.get("round") or 0)
            if rnd <= done.get(job, 0):
                problems.append(f"{show_path(events)}:{lineno}: job {job} round {rnd} completed again after "
                                f"round {done[job]} (duplicated or restarted round, no run_resumed explains it)")
            done[job] = max(done.get(job, 0), rnd)
    return problems


def check_metrics(path: Path) -> list[str]:
    """metrics.csv rows that repeat a (job, round): a round recorded twice."""
    import csv

    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except OSError:
        return []
    seen: dict[tuple[str, str], int] = {}
    problems: list[str] = []
    for lineno, row in enumerate(rows[1:], 2):
        if len(row) < 2:
            continue
        key = (row[0], row[1])
        if key in seen:
            problems.append(f"{show_path(path)}:{lineno}: job {row[0]} round {row[1]} recorded again "
                            f"(first at line {seen[key]}; duplicated or restarted round)")
        seen.setdefault(key, lineno)
    return problems


def verify_mesh(state: Path) -> Verification:
    """Verify the mesh-wide `state/audit.jsonl`, every run in `state/runs/`, and that they agree."""
    log, runs_dir = state / MESH_LOG, state / "runs"
    if not log.exists() and not runs_dir.is_dir():
        raise UserError(
            "no audit log: no run has ended here yet",
            where=show_path(log),
            hint="run `meshctl up`, or pass --mesh PATH/mesh.yaml",
        )
    mesh = check_chain(log, GENESIS) if log.exists() else Verification(head=GENESIS)
    by_run = _entries_by_run(mesh, log)
    runs = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    mesh.runs = len(set(by_run) | {r.name for r in runs})
    for run_dir in runs:
        _cross_check(mesh, run_dir, by_run.pop(run_dir.name, None), log)
    for run, recorded in sorted(by_run.items()):
        mesh.notes.append(
            f"run {run}: directory removed; its {len(recorded)} entries are checked "
            "in the mesh log only"
        )
    if not log.exists():
        mesh.notes.append(f"{show_path(log)}: no mesh log yet")
    return mesh


def _entries_by_run(mesh: Verification, log: Path) -> dict[str, dict[int, tuple[str, int]]]:
    """run -> n -> (the run entry's hash, mesh log line); checks each copied entry's own hash."""
    by_run: dict[str, dict[int, tuple[str, int]]] = {}
    for obj, lineno in zip(mesh.objects, mesh.lines, strict=True):
        entry = obj.get("entry") if obj else None
        if not isinstance(entry, dict) or not isinstance(entry.get("hash"), str):
            if obj:
                mesh.problems.append(f"{show_path(log)}:{lineno}: no run entry in this line")
            continue
        if entry_hash(entry) != entry["hash"]:
            mesh.problems.append(
                f"{show_path(log)}:{lineno}: run {obj.get('run')} entry {obj.get('n')}: "
                "hash mismatch (changed?)"
            )
        by_run.setdefault(str(obj.get("run")), {})[int(obj.get("n") or 0)] = (entry["hash"], lineno)
    return by_run


def _cross_check(
    mesh: Verification, run_dir: Path, recorded: dict[int, tuple[str, int]] | None, log: Path
) -> None:
    """Verify one run and compare it with the mesh log's copy of it."""
    try:
        run = verify_run(run_dir)
    except UserError as err:
        mesh.problems.append(f"{err.where}: {err.message}" if err.where else err.message)
        return
    mesh.problems.extend(run.problems)
    mesh.notes.extend(run.notes)
    if recorded is None:
        mesh.entries += run.entries  # checked in its own file only
        if read_manifest(run_dir).audit_head:
            mesh.problems.append(
                f"{show_path(log)}: run {run_dir.name} ended but is missing from the mesh log "
                "(mesh log cut or edited?)"
            )
        else:
            mesh.notes.append(f"run {run_dir.name}: not in the mesh log (not ended)")
        return
    for n, stored in enumerate(run.hashes, 1):
        copy = recorded.pop(n, None)
        if copy is None:
            mesh.problems.append(
                f"{show_path(log)}: run {run_dir.name} entry {n} is missing from the mesh log"
            )
            return
        if copy[0] != stored:
            mesh.problems.append(
                f"{show_path(log)}:{copy[1]}: run {run_dir.name} entry {n} differs from "
                f"{show_path(run_dir / EVENTS_FILE)}:{run.lines[n - 1]}"
            )
            return
    for n, (_, lineno) in sorted(recorded.items())[:1]:
        mesh.problems.append(
            f"{show_path(log)}:{lineno}: run {run_dir.name} entry {n} is not in "
            f"{show_path(run_dir / EVENTS_FILE)} (removed there?)"
        )


def verify(run: str | None, mesh_file: Path) -> Verification:
    """`meshctl audit verify [RUN]`: one run, or (RUN None) the whole history of the mesh."""
    state = mesh_file.resolve().parent / ".meshctl"
    if run is None:
        return verify_mesh(state)
    return verify_run(resolve_run(run, mesh_file.resolve().parent))


# -- reading a run -------------------------------------------------------------------


def read_plan(run_dir: Path):
    """The plan.toml of a run directory; a UserError if it cannot be read."""
    from meshctl.compiler.plan import Plan

    path = run_dir / "plan.toml"
    try:
        return Plan.read(path)
    except OSError as err:
        raise UserError(
            f"cannot read plan.toml: {err.strerror or err}", where=show_path(path)
        ) from None
    except ValueError as err:  # TOML, UTF-8 and pydantic errors
        raise UserError(
            f"not a meshctl plan: {str(err).splitlines()[0]}", where=show_path(path)
        ) from None


def iso_time(ts: float | None, timespec: str = "seconds") -> str:
    """ISO 8601 UTC time of a Unix timestamp; "" for none."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec=timespec) if ts else ""


def find_event(events: list[dict[str, Any]], kind: str, **match: Any) -> dict[str, Any] | None:
    """The first event of type KIND whose fields equal MATCH, or None."""
    return next(
        (
            e
            for e in events
            if e.get("type") == kind and all(e.get(k) == v for k, v in match.items())
        ),
        None,
    )


def find_events(events: list[dict[str, Any]], kind: str, **match: Any) -> list[dict[str, Any]]:
    """Every event of type KIND whose fields equal MATCH."""
    return [
        e for e in events if e.get("type") == kind and all(e.get(k) == v for k, v in match.items())
    ]
