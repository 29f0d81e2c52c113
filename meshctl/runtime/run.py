"""A run's on-disk layout and the manifest the launcher hands the coordinator.

    .meshctl/runs/<run-id>/
      run.json          this manifest (endpoints, public keys, local domains)
      plan.toml         the plan being executed
      keys/             ephemeral Curve keys of this run (secret files 0600, removed at the end)
      logs/             one log per process
      events.jsonl      every event, in order
      metrics.csv       one row per completed round
      checkpoints/<job>/round-NNNN.safetensors
      models/<job>.safetensors
      run.lock          held (flock, shared) by every process of a live run; free once it is over
      detached          written by `meshctl up` when the user leaves the run going in the background
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

RUNS_DIR = Path(".meshctl") / "runs"
"""Where `meshctl up` keeps runs, relative to the mesh.yaml's directory."""
EVENTS_FILE = "events.jsonl"
"""A run's event log (and audit chain), inside its run directory."""
LOCK_FILE = "run.lock"
"""Every process of a live run holds a shared flock on it (forked children inherit it)."""
DETACHED_FILE = "detached"
"""Marker: the process that started the run left it going on purpose (its exit must not stop it)."""


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
