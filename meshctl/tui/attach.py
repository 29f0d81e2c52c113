"""`meshctl dash RUN`: attach the dashboard to a run that is going on now.

By run id or run directory, the run's `run.json` gives the events endpoint and
the coordinator's public key, and `keys/observer.key_secret` (written by `up`,
mode 0600, one of the run's allowed observer keys) the client key. The
dashboard first reads what `events.jsonl` already holds, then follows the live
stream, dropping events it has already seen (by `seq`), and fills a gap in the
sequence from the file; so attaching late shows the whole run. A run that has
already ended is simply replayed from its file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from meshctl.errors import UserError
from meshctl.runtime.events import Event, parse_event
from meshctl.runtime.keys import KeyPair, check_public_key
from meshctl.runtime.run import RunManifest
from meshctl.runtime.run import resolve_run as run_resolver
from meshctl.tui.bridge import EventBridge
from meshctl.tui.replay import EVENTS_FILE

__all__ = ["OBSERVER_KEY", "AttachTarget", "LiveAttach", "resolve_run", "run_finished"]

OBSERVER_KEY = Path("keys") / "observer.key_secret"
"""Where `up` keeps the key a dashboard of this run may subscribe with."""


@dataclass(frozen=True)
class AttachTarget:
    """Where and how to subscribe."""

    endpoint: str
    server_key: bytes
    keys: KeyPair
    run_dir: Path | None = None
    """The run directory, when attaching by run (None by bare address)."""


def resolve_run(run: str, *, root: Path | None = None) -> Path:
    """The directory of RUN: `latest`, a run directory, or a run id under `root/.meshctl/runs/`
    (meshctl.runtime.run.resolve_run; an unknown run also hints at attaching by address)."""
    try:
        return run_resolver(run, root)
    except UserError as err:
        if not err.message.startswith("no such run"):
            raise
        raise UserError(err.message, hint=f"{err.hint}; or --address tcp://HOST:PORT --server-key KEY "
                        "--key FILE") from None


def run_finished(run_dir: Path) -> bool:
    """Whether the run's `events.jsonl` already holds its `run_completed`."""
    try:
        text = (run_dir / EVENTS_FILE).read_text(encoding="utf-8")
    except OSError:
        return False
    return '"type":"run_completed"' in text


def target_for_run(run_dir: Path) -> AttachTarget:
    """Endpoint and keys to follow the live run in `run_dir`."""
    try:
        manifest = RunManifest.read(run_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read run.json: {str(err).splitlines()[0]}", where=str(run_dir)) \
            from None
    key_file = run_dir / OBSERVER_KEY
    if not key_file.is_file():
        raise UserError("this run has no dashboard key (keys/observer.key_secret)",
                        where=str(run_dir), hint="it was started by an older meshctl, or from "
                        "another host: use --address, --server-key and --key")
    return AttachTarget(manifest.events, manifest.coordinator_public.encode(),
                        KeyPair.load(key_file), run_dir)


def target_for_address(address: str, server_key: str | None, key_file: Path | None) -> AttachTarget:
    """Endpoint and keys given on the command line."""
    if not address.startswith("tcp://"):
        raise UserError(f"not a tcp:// address: {address}", where="--address")
    if not server_key:
        raise UserError("--address needs --server-key (the coordinator's public key, run.json "
                        "coordinator_public)", where="--server-key")
    if key_file is None:
        raise UserError("--address needs --key: a secret key file the run allows as an observer",
                        where="--key", hint="the run's keys/observer.key_secret")
    return AttachTarget(address, check_public_key(server_key, where="--server-key"),
                        KeyPair.load(key_file))


class LiveAttach(EventBridge):
    """An `EventBridge` that starts from the run's `events.jsonl` and never repeats an event.

    Args:
        target: Where to subscribe and with which keys.
        poll_ms: How long each poll waits.
    """

    def __init__(self, target: AttachTarget, *, poll_ms: int = 100) -> None:
        super().__init__(target.endpoint, curve_serverkey=target.server_key,
                         curve_publickey=target.keys.public, curve_secretkey=target.keys.secret,
                         poll_ms=poll_ms)
        self.file = target.run_dir / EVENTS_FILE if target.run_dir is not None else None
        self.last_seq = 0
        """The newest event delivered."""
        self._offset = 0
        self._last_backfill = 0.0

    def deliver(self, raw: bytes | str) -> Event | None:
        """Deliver a live event unless already seen; read a gap before it from the file."""
        try:
            event = parse_event(raw)
        except Exception:  # noqa: BLE001 - the base class counts and reports it
            return super().deliver(raw)
        if event.seq and event.seq <= self.last_seq:
            return None
        if event.seq > self.last_seq + 1:
            self.backfill()
            if event.seq <= self.last_seq:
                return None
        self.last_seq = max(self.last_seq, event.seq)
        self.received += 1
        self._post_event(event)
        return event

    def backfill(self) -> int:
        """Deliver the file's events newer than `last_seq`; return how many."""
        if self.file is None:
            return 0
        try:
            with open(self.file, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return 0
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        fed = 0
        for line in complete.decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                event = parse_event(line)
            except ValueError:
                continue
            if event.seq > self.last_seq:
                self.last_seq = event.seq
                self.received += 1
                fed += 1
                self._post_event(event)
        return fed

    def _on_monitor(self, info: dict[str, object]) -> None:
        was = self.connected.is_set()
        super()._on_monitor(info)
        if self.connected.is_set() and not was:
            self.backfill()

    def _idle(self) -> None:
        now = time.monotonic()
        if now - self._last_backfill >= 1.0:  # an event lost before the subscription took
            self._last_backfill = now
            self.backfill()

    def _run(self) -> None:
        self.backfill()  # what already happened shows even before the handshake
        super()._run()
