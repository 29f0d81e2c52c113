"""A run's on-disk layout and the manifest the launcher hands the coordinator.

    .meshctl/runs/<run-id>/
      run.json          this manifest (endpoints, public keys, local domains)
      plan.toml         the plan being executed
      keys/             ephemeral Curve keys of this run (secret files 0600, removed at the end)
      logs/             one log per process
      events.jsonl      every event, in order
      metrics.csv       one row per completed round
      domain_metrics.csv   one row per evaluating domain per round (docs/evaluation.md)
      checkpoints/<job>/round-NNNN.safetensors
      checkpoints/<job>/state/round-NNNN.safetensors   what the job carries across rounds (a resume restores it)
      checkpoints/<split job>/round-NNNN.safetensors   a split job's resume point after epoch NNNN (metadata only)
      models/<job>.safetensors
      run.lock          held (flock, shared) by every process of a live run; free once it is over
      detached          written by `meshctl up` when the user leaves the run going in the background
      coordinator.pid   the pid of the run's supervisor (the coordinator process `meshctl stop` signals)
      stop              written by `meshctl stop` before it signals: who asked (the run's stop reason)

`resolve_run` turns what a user types (a run id, a run directory, its events.jsonl, or
`latest`) into a run directory; `RunDir` reads one run: manifest, events, status, jobs
and domains. Every command that takes RUN goes through them.
"""

from __future__ import annotations

import difflib
import fcntl
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from meshctl.errors import UserError
from meshctl.runtime import events as ev

RUNS_DIR = Path(".meshctl") / "runs"
"""Where `meshctl up` keeps runs, relative to the mesh.yaml's directory."""
EVENTS_FILE = "events.jsonl"
"""A run's event log (and audit chain), inside its run directory."""
LOCK_FILE = "run.lock"
"""Every process of a live run holds a shared flock on it (forked children inherit it)."""
DETACHED_FILE = "detached"
"""Marker: the process that started the run left it going on purpose (its exit must not stop it)."""
PID_FILE = "coordinator.pid"
"""The pid of the run's supervisor (the coordinator process), written when it starts."""
STOP_FILE = "stop"
"""Written by `meshctl stop` just before it signals the supervisor: the run's stop reason."""


class RunManifest(BaseModel):
    """What the coordinator process needs to start a run; written by `meshctl up`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    run: str
    run_dir: str
    base_dir: str
    """Directory product sources are relative to."""
    router: str
    """Endpoint the coordinator's ROUTER binds (daemons connect here)."""
    events: str
    """Endpoint the coordinator's XPUB binds (dashboards and printers subscribe here)."""
    coordinator_key: str
    """Path of the coordinator's secret key file."""
    coordinator_public: str
    """The coordinator's Z85 public key (what daemons and observers trust)."""
    domain_keys: dict[str, str]
    """Z85 public key per domain that may join."""
    observer_keys: list[str] = Field(default_factory=list)
    """Z85 public keys that may subscribe to events."""
    local_domains: dict[str, str] = Field(default_factory=dict)
    """Domain -> secret key file, for domains the coordinator process forks."""
    threads: int = 1
    """torch threads per process that trains or evaluates."""
    wait_for_observer_s: float = 0.0
    """Wait this long for a first subscriber before publishing events."""
    join_timeout_s: float = 60.0
    """How long a job waits for a local domain (a child of the coordinator) to join."""
    remote_join_timeout_s: float | None = None
    """How long a job waits for a remote domain to join (`up --join-timeout`); None: for ever."""
    checkpoint: bool = True
    analysis: str = ""
    """Name of the analysis this run computes (`meshctl analyze`); empty for a training run."""
    audit_head: str = ""
    """Hash of the last entry of events.jsonl, recorded when the run ends (meshctl.runtime.audit)."""
    audit_entries: int = 0
    """Number of entries in events.jsonl when the run ended."""

    @property
    def path(self) -> Path:
        return Path(self.run_dir)

    def write(self) -> Path:
        p = self.path / "run.json"
        p.write_text(json.dumps(self.model_dump(), indent=2) + "\n")
        return p

    @classmethod
    def read(cls, run_dir: str | Path) -> RunManifest:
        return cls.model_validate_json((Path(run_dir) / "run.json").read_text())


def new_run_id() -> str:
    """Sortable and unique: UTC time plus four random hex digits."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def last_line(path: Path) -> str:
    """The last non-empty line of a log file (for one-line failure reports)."""
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip() if lines else "no output"


def hold_run(run_dir: str | Path) -> int:
    """Take a shared lock on the run's lock file; the returned fd holds it until closed (or exit)."""
    fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def claim_run(run_dir: str | Path) -> int | None:
    """Hold the run's lock (shared) if no process holds it; None while the run is live."""
    fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def run_live(run_dir: str | Path) -> bool:
    """True while some process (coordinator, daemon, `meshctl up`) holds the run's lock."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def remove_dead_secrets(runs_dir: Path) -> list[Path]:
    """Delete the secret key files of runs no process holds any more (killed runs); the deleted files."""
    removed: list[Path] = []
    for run_dir in sorted(runs_dir.glob("*")) if runs_dir.is_dir() else []:
        secrets_left = list((run_dir / "keys").glob("*.key_secret"))
        if secrets_left and not run_live(run_dir):
            for f in secrets_left:
                f.unlink(missing_ok=True)
                removed.append(f)
    return removed


def run_ended(run_dir: Path) -> bool:
    """True when the run's last event is run_completed."""
    try:
        with (run_dir / EVENTS_FILE).open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            return b'"type":"run_completed"' in f.read().splitlines()[-1]
    except (OSError, IndexError):
        return False


def stop_reason(run_dir: str | Path) -> str:
    """What `meshctl stop` wrote into the run's stop file (the run's stop reason), or ''."""
    try:
        return (Path(run_dir) / STOP_FILE).read_text(encoding="utf-8").strip().splitlines()[0][:200]
    except (OSError, ValueError, IndexError):
        return ""


# -- finding runs ----------------------------------------------------------------------

LATEST = "latest"
"""The run id that means the newest run of the mesh."""


def runs_dir(root: str | Path | None = None) -> Path:
    """The runs directory of a mesh: ROOT is its mesh.yaml, the directory holding it, or its `.meshctl/`
    (the working directory when None)."""
    base = Path.cwd() if root is None else Path(root)
    if base.name == ".meshctl":
        return base / "runs"
    if base.suffix in (".yaml", ".yml") or base.is_file():
        base = base.parent
    return base / RUNS_DIR


def show_path(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when below it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if not rel.startswith("..") else str(path)


def _age_key(run_dir: Path) -> tuple[str, float, str]:
    """Newest last: the id's UTC time, then when its plan was written (two runs in one second)."""
    try:
        written = (run_dir / "plan.toml").stat().st_mtime
    except OSError:
        written = 0.0
    return run_dir.name[:15], written, run_dir.name


def list_runs(root: str | Path | None = None) -> list[Path]:
    """Every run directory (one with a run.json) of the mesh at ROOT, newest first."""
    runs = runs_dir(root)
    if not runs.is_dir():
        return []
    found = [p for p in runs.iterdir() if p.is_dir() and (p / "run.json").is_file()]
    return sorted(found, key=_age_key, reverse=True)


def resolve_run(spec: str | Path, root: str | Path | None = None) -> Path:
    """The directory of RUN: `latest` (the newest run), a run directory, its events.jsonl, or a run id
    under ROOT's `.meshctl/runs/` (ROOT: a mesh.yaml, its directory or its `.meshctl/`; default: here).

    Raises:
        UserError: no runs yet (for `latest`), nothing matches (with the nearest run ids), or the
            directory is not a run directory.
    """
    text = str(spec)
    runs = runs_dir(root)
    if text == LATEST:
        found = list_runs(root)
        if not found:
            raise UserError("no runs yet", where=show_path(runs), hint="start one with `meshctl up`")
        return found[0]
    path = Path(text).expanduser()
    if path.is_file() and path.name == EVENTS_FILE:
        path = path.parent
    if not path.is_dir() and text and "/" not in text and text not in (".", ".."):
        path = runs / text
    if path.is_dir():
        if not (path / "run.json").is_file():
            raise UserError("not a run directory (no run.json)", where=text,
                            hint=f"runs live under {RUNS_DIR}/ beside mesh.yaml")
        return path
    ids = [p.name for p in list_runs(root)]
    near = [i for i in ids if text and (i.startswith(text) or i.endswith(text))]
    near = near or difflib.get_close_matches(text, ids, n=1, cutoff=0.6)
    hint = (f"did you mean {' or '.join(near[:3])}?" if near else
            f"`meshctl runs` lists {'the run' if len(ids) == 1 else f'the {len(ids)} runs'} under {show_path(runs)}/, or give `latest`" if ids else
            f"no runs yet under {show_path(runs)}/; pass a run directory, or start one with `meshctl up`")
    raise UserError(f"no such run: {text}", hint=hint)


# -- reading one run -------------------------------------------------------------------

RUNNING, COMPLETED, FAILED, STOPPED, KILLED, NEVER_STARTED = (
    "running", "completed", "failed", "stopped", "killed", "never started")
"""A run's states: live; ended ok; ended not ok; ended not ok because a signal or `meshctl stop`
asked it to (its reason says `stopped by ...`); its processes gone without run_completed; no events."""


def read_run_events(path: Path) -> list[ev.Event]:
    """The events of an events.jsonl, skipping lines that do not parse (a live run's torn last line)."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    found: list[ev.Event] = []
    for raw in data.splitlines():
        if raw.strip():
            try:
                found.append(ev.parse_event(raw))
            except ValueError:  # JSON, UTF-8 and pydantic errors
                continue
    return found


@dataclass
class JobProgress:
    """One job (or analysis) of a run, as its events tell it."""

    name: str
    rounds: int | None = None
    """Rounds in all (None until known)."""
    done: int = 0
    """The last completed round."""
    state: str = "pending"
    """pending | waiting | training | completed | failed"""
    metrics: dict[str, float] = field(default_factory=dict)
    """The last round's evaluation."""
    detail: str = ""
    """Why it failed, or what it waits for."""
    unit: str = "round"
    """`epoch` for a split job, whose rounds are epochs (its events stay `round_completed`)."""


REFUSING = ("data", "resume")
"""Runtime `deny` decisions by which a domain refuses a job itself (its data; a split job's state to resume)."""


@dataclass
class DomainState:
    """One domain of a run: connected, missing (never joined), lost or refused."""

    name: str
    state: str = "missing"
    reason: str = ""
    pid: int = 0
    last_seen: float = 0.0
    activity: str = ""
    """idle | training | evaluating | analyzing (the last heartbeat)."""


class RunDir:
    """One run directory, read on demand (a new RunDir reads a live run afresh)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def id(self) -> str:
        return self.path.name

    @cached_property
    def manifest(self) -> RunManifest:
        """run.json; a one-line UserError if it cannot be read."""
        where = show_path(self.path / "run.json")
        try:
            return RunManifest.read(self.path)
        except OSError as err:
            raise UserError(f"cannot read run.json: {err.strerror or err}", where=where) from None
        except ValueError as err:  # pydantic and UTF-8 errors
            raise UserError(f"not a run manifest: {str(err).splitlines()[0]}", where=where) from None

    @cached_property
    def events(self) -> list[ev.Event]:
        return read_run_events(self.path / EVENTS_FILE)

    @cached_property
    def live(self) -> bool:
        return run_live(self.path)

    @cached_property
    def completion(self) -> ev.RunCompleted | None:
        """The run's last run_completed, or None."""
        return next((e for e in reversed(self.events) if isinstance(e, ev.RunCompleted)), None)

    @cached_property
    def status(self) -> tuple[str, str]:
        """(state, reason): running, completed, failed or stopped (why), killed, or never started."""
        done = self.completion
        if done is not None:
            if done.ok:
                return COMPLETED, ""
            return (STOPPED if done.reason.startswith("stopped by") else FAILED), done.reason
        if self.live:
            return RUNNING, ""
        if not self.events:
            return NEVER_STARTED, ""
        return KILLED, "its processes ended without run_completed (`meshctl resume` goes on with it)"

    @property
    def started(self) -> float | None:
        """When its first event happened (unix time), None if it never started."""
        return next((e.ts for e in self.events if e.ts), None)

    @property
    def duration(self) -> float | None:
        """Seconds from the first event to run_completed (or to now while it runs, to its last event if killed)."""
        start = self.started
        if start is None:
            return None
        end = self.completion.ts if self.completion is not None else (
            time.time() if self.status[0] == RUNNING else max(e.ts for e in self.events))
        if self.completion is not None and end <= start:  # failed at its start: only run_completed was logged,
            return max(0.0, self.completion.seconds)    # the seconds it says it took
        return max(0.0, end - start)

    @cached_property
    def plan(self) -> Any:
        """plan.toml, or None when it cannot be read (listings go on without it)."""
        from meshctl.compiler.plan import Plan

        try:
            return Plan.read(self.path / "plan.toml")
        except (OSError, ValueError):
            return None

    def jobs(self) -> list[JobProgress]:
        """Every job of the run (or its analysis), in plan order, with its progress."""
        jobs: dict[str, JobProgress] = {}
        analysis = self._analysis_name()
        if analysis:
            jobs[analysis] = JobProgress(analysis, rounds=1)
        elif self.plan is not None:
            for job in self.plan.jobs:
                jobs[job.name] = JobProgress(job.name, rounds=job.training.rounds)
            for split in self.plan.split_models:
                jobs[split.name] = JobProgress(split.name, rounds=split.epochs, unit="epoch")
        for e in self.events:
            if isinstance(e, ev.RunStarted):
                for name in e.jobs:
                    jobs.setdefault(name, JobProgress(name))
            name = getattr(e, "job", None) or getattr(e, "analysis", None)
            if not isinstance(name, str) or not name:
                continue
            job = jobs.setdefault(name, JobProgress(name))
            if isinstance(e, ev.JobStarted):
                job.rounds, job.state, job.detail = e.rounds, "training", ""
            elif isinstance(e, ev.JobWaiting):
                job.state, job.detail = "waiting", f"quorum: {len(e.have)}/{e.need} domains"
            elif isinstance(e, ev.DomainsAwaited):
                job.state, job.detail = "waiting", f"waits for {', '.join(e.domains)} ({e.waited_s:.0f}s)"
            elif isinstance(e, ev.RoundRetried):
                job.detail = f"round {e.round} re-run (attempt {e.attempt}): {', '.join(e.domains)} back"
            elif isinstance(e, (ev.RoundStarted, ev.AnalysisStarted)):
                job.state, job.detail = ("analyzing" if isinstance(e, ev.AnalysisStarted) else "training"), ""
            elif isinstance(e, ev.IntersectionComputed):  # only a split job intersects
                job.unit = "epoch"
            elif isinstance(e, ev.RoundCompleted):
                job.done, job.rounds, job.metrics = e.round, e.rounds, dict(e.metrics)
            elif isinstance(e, ev.JobCompleted):
                job.state, job.done = "completed", e.rounds
                job.metrics = dict(e.metrics) or job.metrics
            elif isinstance(e, ev.AnalysisCompleted):
                job.state, job.done = "completed", 1
            elif isinstance(e, ev.JobFailed):
                job.state, job.detail = "failed", e.reason
        if self.status[0] != RUNNING:  # nothing goes on any more
            for job in jobs.values():
                if job.state in ("training", "waiting", "analyzing"):
                    job.state, job.detail = "stopped", job.detail
        return list(jobs.values())

    def domains(self) -> list[DomainState]:
        """Every domain of the run with what its events last said about it."""
        names = [d.name for d in self.plan.domains] if self.plan is not None else []
        states = {n: DomainState(n) for n in names}
        for e in self.events:
            if isinstance(e, ev.RunStarted):
                for n in e.domains:
                    states.setdefault(n, DomainState(n))
            if isinstance(e, ev.DomainsAwaited):  # still missing: what brings each one
                for n in e.domains:
                    d = states.setdefault(n, DomainState(n))
                    if d.state == "missing":
                        d.reason = f"awaited for {e.waited_s:.0f}s" + (
                            f": {e.commands[n]}" if n in e.commands else "")
            if isinstance(e, ev.PolicyDecided) and e.domain and e.effect == "deny" and e.policy in REFUSING:
                d = states.setdefault(e.domain, DomainState(e.domain))  # it refused its own data (the dashboard's too)
                d.state, d.reason = "refused", f"{e.policy}: {e.reason}"
                continue
            name = getattr(e, "domain", None) if not isinstance(e, ev.PolicyDecided) else None
            if not isinstance(name, str) or not name or isinstance(e, (ev.ProductListed, ev.ContractChecked)):
                continue
            d = states.setdefault(name, DomainState(name))
            if isinstance(e, ev.DomainJoined):
                d.state, d.reason, d.pid, d.last_seen = "connected", "", e.pid, e.ts
            elif isinstance(e, ev.DomainLost) and e.cause == "data refused":  # its daemon could not start on its data
                d.state, d.reason = "refused", f"data: {e.reason}"
            elif isinstance(e, ev.DomainLost):
                d.state, d.reason = "lost", e.reason if e.cause in e.reason else f"{e.cause}: {e.reason}"
            elif isinstance(e, ev.DomainRejoined):
                d.state, d.reason, d.pid, d.last_seen = "connected", "", e.pid or d.pid, e.ts
            elif isinstance(e, ev.DomainRefused):
                d.state, d.reason = "refused", e.reason
            elif isinstance(e, ev.DomainHeartbeat):
                d.last_seen, d.activity = e.ts, e.state
            elif isinstance(e, ev.UpdateReceived):
                d.last_seen = e.ts
        return list(states.values())

    def _analysis_name(self) -> str:
        try:
            return self.manifest.analysis
        except UserError:
            return ""

    def summary(self) -> dict[str, Any]:
        """What `meshctl runs --format json` prints for this run."""
        state, reason = self.status
        jobs = self.jobs()
        return {
            "run": self.id, "path": str(self.path), "status": state, "reason": reason,
            "started": self.started, "seconds": self.duration,
            "analysis": self._analysis_name(),
            "jobs": [{"name": j.name, "state": j.state, "rounds_done": j.done, "rounds": j.rounds,
                      "metrics": j.metrics, "detail": j.detail} for j in jobs],
        }

    def supervisor_pid(self) -> int | None:
        """The pid in coordinator.pid when that process still runs meshctl's coordinator, else None."""
        try:
            pid = int((self.path / PID_FILE).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return None
        except OSError:  # no /proc here: trust the file while the process exists
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            return pid
        return pid if b"meshctl" in cmdline and b"coordinator" in cmdline else None
