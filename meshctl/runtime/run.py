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
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

RUNS_DIR = Path(".meshctl") / "runs"
"""Where `meshctl up` keeps runs, relative to the mesh.yaml's directory."""
EVENTS_FILE = "events.jsonl"
"""A run's event log (and audit chain), inside its run directory."""


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
