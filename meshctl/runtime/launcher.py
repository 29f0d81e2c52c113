"""`meshctl up`: prepare a run, spawn the coordinator (which forks the local daemons),
follow its events, and stop every process it started — also on Ctrl-C.

This module does not import torch: the coordinator process does, once, and its
forked daemons share those pages.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq

from meshctl.compiler.plan import Plan
from meshctl.errors import UserError
from meshctl.runtime import events as ev
from meshctl.runtime.keys import (
    KeyPair,
    check_public_key,
    curve_client,
    declared_coordinator_keys,
    fast_reconnect,
)
from meshctl.runtime.run import (
    DETACHED_FILE,
    EVENTS_FILE,
    RunManifest,
    claim_run,
    hold_run,
    last_line,
    new_run_id,
    remove_dead_secrets,
    run_ended,
    run_live,
)


@dataclass(frozen=True)
class RunResult:
    ok: bool
    run_dir: Path
    reason: str = ""
    events: tuple[ev.Event, ...] = ()
    detached: bool = False
    """The dashboard left the run going in the background (re-attach with `meshctl dash`)."""
    signal: int = 0
    """The signal (SIGINT, SIGTERM, SIGHUP, SIGQUIT) that made `up` stop the run, else 0."""


def state_dir(mesh_file: Path) -> Path:
    """`.meshctl/` beside mesh.yaml."""
    return mesh_file.resolve().parent / ".meshctl"


def prepare_run(mesh_file: Path, plan: Plan, *, address: str | None = None, threads: int = 1,
                wait_for_observer_s: float = 10.0, analysis: str = "",
                coordinator_key: Path | None = None,
                join_timeout: float | None = None) -> tuple[RunManifest, KeyPair]:
    """Make the run directory, its ephemeral keys and manifest; return it and the observer's keys.

    A job waits `join_timeout` seconds for remote domains to join (None: for ever); local
    ones, the coordinator's own children, keep the manifest's `join_timeout_s`.

    A mesh that declares `mesh.coordinator.public_key` runs with that key pair (its secret:
    `coordinator_key`, else `.meshctl/keys/coordinator.key_secret`); else the coordinator's
    key is ephemeral too.
    """
    declared = _coordinator_identity(mesh_file, plan, coordinator_key)  # before anything starts
    router, events = _endpoints(address or plan.coordinator.address)  # a busy port leaves no run directory
    run = new_run_id()
    run_dir = state_dir(mesh_file) / "runs" / run
    remove_dead_secrets(run_dir.parent)
    (run_dir / "logs").mkdir(parents=True)
    _HELD[str(run_dir)] = hold_run(run_dir)  # before the keys: no cleanup may take them from a starting run
    keys_dir = run_dir / "keys"
    plan.write(run_dir / "plan.toml")
    if declared is None:
        coordinator = KeyPair.generate()
        coordinator_file = coordinator.save(keys_dir, "coordinator")
    else:
        coordinator_file, coordinator = declared
    domain_keys: dict[str, str] = {}
    local: dict[str, str] = {}
    for d in plan.domains:
        if d.address == "local":
            pair = KeyPair.generate()
            local[d.name] = str(pair.save(keys_dir, d.name))
            domain_keys[d.name] = pair.public.decode()
        else:
            if not d.public_key:
                raise UserError(f"domain {d.name} runs at {d.address} but mesh.yaml gives no public_key for it",
                                hint="run `meshctl keys generate` on that host and add its public key")
            domain_keys[d.name] = check_public_key(d.public_key, where=f"domain {d.name}").decode()
    observer = KeyPair.generate()
    observer.save(keys_dir, "observer")  # lets `meshctl dash RUN` attach while the run lives
    manifest = RunManifest(
        run=run, run_dir=str(run_dir), base_dir=str(mesh_file.resolve().parent), router=router, events=events,
        coordinator_key=str(coordinator_file), coordinator_public=coordinator.public.decode(),
        domain_keys=domain_keys, observer_keys=[observer.public.decode()], local_domains=local,
        threads=threads, wait_for_observer_s=wait_for_observer_s, analysis=analysis,
        remote_join_timeout_s=join_timeout)
    manifest.write()
    return manifest, observer


def _coordinator_identity(mesh_file: Path, plan: Plan, explicit: Path | None) -> tuple[Path, KeyPair] | None:
    """The declared coordinator key pair (secret file, pair), or None for an ephemeral one."""
    declared = plan.coordinator.public_key
    if not declared:
        if explicit is not None:
            raise UserError("--coordinator-key given, but mesh.yaml declares no mesh.coordinator.public_key",
                            where=str(explicit), hint="declare its public key in mesh.yaml (`meshctl keys show "
                            "coordinator` prints the line), or leave --coordinator-key out for an ephemeral key")
        return None
    return declared_coordinator_keys(declared, mesh_file, explicit)


_HELD: dict[str, int] = {}
"""Run directory -> fd of this process's shared lock on it (released by LocalRun.finish)."""


def release_run(run_dir: str | Path) -> None:
    """Let go of this process's lock on a run (the run's own processes keep theirs)."""
    fd = _HELD.pop(str(run_dir), None)
    if fd is not None:
        os.close(fd)


def _endpoints(address: str) -> tuple[str, str]:
    """(router, events) endpoints: the events socket takes the next port; port 0 picks free ones."""
    parts = urlsplit(address)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise UserError(f"coordinator address {address!r} is not tcp://HOST:PORT")
    host = parts.hostname
    if parts.port == 0:
        router, events = _free_ports(host, 2)
        return f"tcp://{host}:{router}", f"tcp://{host}:{events}"
    for port in (parts.port, parts.port + 1):
        if not _port_free(host, port):
            raise UserError(f"port {port} on {host} is in use (another `meshctl up`?)",
                            where=address, hint="stop it, or pass --address tcp://127.0.0.1:0 for free ports")
    return f"tcp://{host}:{parts.port}", f"tcp://{host}:{parts.port + 1}"


def _free_ports(host: str, n: int) -> list[int]:
    """`n` distinct free ports: each socket stays bound until all are picked, so no port is picked twice."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class WarmCoordinator:
    """A coordinator process started before the run exists, importing torch while `up` compiles.

    `meshctl up` spends about as long compiling and preparing the run as a fresh process
    spends importing torch and the data path; started first, the coordinator does both at
    once and then waits, on its stdin, for the run directory (`LocalRun.start` hands it
    over). Whatever happens to `up` before that, the process sees end-of-file and exits.
    Its output until the hand-over goes to a private temporary file that `start` copies
    into the run's log.
    """

    def __init__(self) -> None:
        import tempfile

        self.early = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as this object
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-m", "meshctl", "coordinator", "--warm"],
            stdin=subprocess.PIPE, stdout=self.early, stderr=subprocess.STDOUT,
            start_new_session=True)  # Ctrl-C reaches `up` only; `up` stops the rest in order

    def take(self, run_dir: str, log: Path) -> subprocess.Popen[bytes] | None:
        """Hand `run_dir` over; the process, or None when it is no longer waiting for one."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        self._copy_early(log)
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.write(run_dir.encode() + b"\n")
                proc.stdin.close()
                return proc
            except OSError:  # it died just now
                pass
        proc.wait()
        self._copy_early(log)
        return None

    def _copy_early(self, log: Path) -> None:
        self.early.seek(0)
        early = self.early.read()
        self.early.seek(0)
        self.early.truncate()
        if early:
            with log.open("ab") as out:
                out.write(early)

    def discard(self) -> None:
        """End the process if no run was handed to it (it is importing, or waiting on stdin)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
        self.early.close()


class LocalRun:
    """A started run: the coordinator process and a Curve SUB socket on its events."""

    def __init__(self, manifest: RunManifest, observer: KeyPair):
        self.m = manifest
        self.observer = observer
        self.proc: subprocess.Popen[bytes] | None = None
        self.events: list[ev.Event] = []
        self.result: ev.RunCompleted | None = None

    @property
    def log(self) -> Path:
        return self.m.path / "logs" / "coordinator.log"

    def start(self, warm: WarmCoordinator | None = None, *, resume: bool = False) -> None:
        """Start the coordinator: hand the run to `warm` when it is still waiting, else spawn one
        (with `resume`, one that takes the run up from its newest checkpoints)."""
        if warm is not None:
            self.proc = warm.take(self.m.run_dir, self.log)
            if self.proc is not None:
                return
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "meshctl", "coordinator", "--run-dir", self.m.run_dir,
                 *(["--resume"] if resume else [])],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)  # Ctrl-C reaches `up` only; `up` stops the rest in order

    def follow(self, poll_ms: int = 200) -> Iterator[ev.Event]:
        """Events as they happen, until RunCompleted or the coordinator dies."""
        ctx = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        curve_client(sub, self.observer, self.m.coordinator_public.encode())
        fast_reconnect(sub)
        sub.subscribe(b"")
        sub.connect(self.m.events)
        try:
            while True:
                if sub.poll(poll_ms, zmq.POLLIN):
                    try:
                        event = ev.parse_event(sub.recv())
                    except ValueError:
                        continue
                    self.events.append(event)
                    yield event
                    if isinstance(event, ev.RunCompleted):
                        self.result = event
                        return
                elif self.proc is not None and self.proc.poll() is not None:
                    return
        finally:
            sub.close()

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            return self.proc.wait()

    def stop(self, grace_s: float = 10.0, signum: int = 0) -> None:
        """SIGTERM the coordinator (it shuts its daemons down), SIGKILL the group after `grace_s`; `signum`: the
        signal the user sent `up` (Ctrl-C's SIGINT), which the run's reason names (`stopped by SIGINT`)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if signum:  # (the coordinator's reason is the stop file's, as for `meshctl stop`)
            from meshctl.runtime.run import STOP_FILE

            try:
                (self.m.path / STOP_FILE).write_text(f"stopped by {signal.Signals(signum).name}\n", encoding="utf-8")
            except OSError:  # (the coordinator then names the SIGTERM it got)
                pass
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def detach(self) -> None:
        """Leave the run going: from now on the exit of this process does not stop it."""
        (self.m.path / DETACHED_FILE).touch()
        release_run(self.m.path)

    def finish(self) -> RunResult:
        """Wait for the coordinator (and any process of the run it left), remove secret keys,
        and say how the run ended."""
        code = self.wait()
        release_run(self.m.path)
        deadline = time.monotonic() + 20.0  # a killed supervisor's coordinator ends the run itself
        while run_live(self.m.path) and not run_ended(self.m.path) and time.monotonic() < deadline:
            time.sleep(0.1)
        for f in (self.m.path / "keys").glob("*.key_secret"):
            f.unlink()
        self._update_catalog()
        if self.result is None:  # not followed here (the dashboard was): the audit log says
            done = [e for e in _read_log(self.m.path / EVENTS_FILE) if isinstance(e, ev.RunCompleted)]
            self.result = done[-1] if done else None
        if self.result is None:
            last = last_line(self.log)
            return RunResult(False, self.m.path, f"coordinator exited with code {code}: {last} (log: {self.log})",
                             tuple(self.events))
        return RunResult(self.result.ok, self.m.path, self.result.reason, tuple(self.events))


    def _update_catalog(self) -> None:
        """Ingest the run's events into `.meshctl/catalog.db`; a problem there is a warning, never a failure."""
        if not (self.m.path / EVENTS_FILE).is_file():
            return
        try:
            from meshctl.runtime.catalog import CATALOG_FILE, ingest_run

            ingest_run(self.m.path.parent.parent / CATALOG_FILE, self.m.path)
        except Exception as err:  # noqa: BLE001 - the run is over and recorded; the catalog is a view of it
            text = str(err).strip().splitlines()
            print(f"warning: catalog not updated: {text[0] if text else type(err).__name__}", file=sys.stderr)


def _read_log(path: Path) -> list[ev.Event]:
    try:
        return ev.read_events(str(path))
    except (OSError, ValueError):
        return []


def start_run(mesh_file: Path, plan: Plan, *, address: str | None = None, threads: int = 1,
              analysis: str = "", warm: WarmCoordinator | None = None,
              coordinator_key: Path | None = None, join_timeout: float | None = None) -> LocalRun:
    """Prepare a run and start its coordinator (`warm`'s, when given); `analysis` names an
    analysis to run instead of training; `coordinator_key` is the secret of a declared coordinator key;
    `join_timeout` bounds the wait for remote domains (None: for ever)."""
    manifest, observer = prepare_run(mesh_file, plan, address=address, threads=threads, analysis=analysis,
                                     coordinator_key=coordinator_key, join_timeout=join_timeout)
    run = LocalRun(manifest, observer)
    run.start(warm)
    return run


def resume_run(spec: str, mesh_file: Path, coordinator_key: Path | None = None) -> LocalRun:
    """`meshctl resume RUN`: take a killed run up from its newest checkpoints with fresh keys.

    RUN is a run id, a run directory or `latest`. Refused for a run that ended, one that is
    still live (a process holds its lock), one that never started, and analysis runs.
    """
    from meshctl.runtime.audit import show_path
    from meshctl.runtime.run import STOP_FILE, resolve_run

    remove_dead_secrets(state_dir(mesh_file) / "runs")
    run_dir = resolve_run(spec, mesh_file.resolve().parent)  # an id, a directory or `latest`
    m = RunManifest.read(run_dir)
    where = show_path(run_dir)
    if run_live(run_dir):
        raise UserError(f"run {m.run} is still running", where=where,
                        hint=f"watch it with `meshctl dash {m.run}`, or stop it first")
    if run_ended(run_dir):
        raise UserError(f"run {m.run} has ended: nothing to resume", where=where,
                        hint="start a new run with `meshctl up`")
    if not (run_dir / EVENTS_FILE).is_file() or not (run_dir / EVENTS_FILE).stat().st_size:
        raise UserError(f"run {m.run} never started: nothing to resume", where=where,
                        hint="start a new run with `meshctl up`")
    if m.analysis:
        raise UserError(f"run {m.run} is an analysis: it cannot be resumed (its ε would be charged twice)",
                        where=where, hint=f"run `meshctl analyze {m.analysis}` again")
    fd = claim_run(run_dir)
    if fd is None:  # it came alive just now (another `meshctl resume`)
        raise UserError(f"run {m.run} is still running", where=where,
                        hint=f"watch it with `meshctl dash {m.run}`, or stop it first")
    _HELD[str(run_dir)] = fd
    try:
        declared = _resumed_coordinator(m, coordinator_key)
    except UserError:
        release_run(run_dir)
        raise
    manifest, observer = _fresh_keys(m, declared)
    (run_dir / DETACHED_FILE).unlink(missing_ok=True)
    (run_dir / STOP_FILE).unlink(missing_ok=True)  # an earlier `meshctl stop` is not this run's reason
    run = LocalRun(manifest, observer)
    run.start(resume=True)
    return run


def _resumed_coordinator(m: RunManifest, explicit: Path | None) -> tuple[Path, KeyPair] | None:
    """The declared coordinator key pair a resumed run must keep (remote daemons trust only it), or None
    when the run's plan declares none. Its secret: `explicit`, else the file the run started with."""
    declared = Plan.read(m.path / "plan.toml").coordinator.public_key
    if not declared:
        if explicit is not None:
            raise UserError("--coordinator-key given, but this run's plan declares no coordinator key",
                            where=str(explicit), hint="leave --coordinator-key out: the run gets fresh keys")
        return None
    return declared_coordinator_keys(declared, Path(m.base_dir) / "mesh.yaml",
                                     explicit or Path(m.coordinator_key))


def _fresh_keys(m: RunManifest, declared: tuple[Path, KeyPair] | None = None) -> tuple[RunManifest, KeyPair]:
    """New ephemeral keys for the coordinator, the local domains and the observer (the old secrets are
    gone with the processes that used them); remote domains keep the public keys mesh.yaml gives, and a
    `declared` coordinator key pair (mesh.coordinator.public_key) is kept."""
    keys_dir = m.path / "keys"
    for f in keys_dir.glob("*.key_secret"):
        f.unlink()
    for port in {urlsplit(e).port for e in (m.router, m.events)}:
        host = urlsplit(m.router).hostname or "127.0.0.1"
        if port and not _port_free(host, port):
            raise UserError(f"port {port} on {host} is in use (another `meshctl up`?)", where=m.router,
                            hint="stop whatever holds it, then resume again")
    if declared is None:
        coordinator = KeyPair.generate()
        coordinator_file = coordinator.save(keys_dir, "coordinator")
    else:
        coordinator_file, coordinator = declared
    local = {d: str(KeyPair.generate().save(keys_dir, d)) for d in m.local_domains}
    domain_keys = {**m.domain_keys, **{d: KeyPair.load(f).public.decode() for d, f in local.items()}}
    observer = KeyPair.generate()
    observer.save(keys_dir, "observer")
    manifest = m.model_copy(update={
        "coordinator_key": str(coordinator_file),
        "coordinator_public": coordinator.public.decode(), "domain_keys": domain_keys,
        "local_domains": local, "observer_keys": [observer.public.decode()]})
    manifest.write()
    return manifest, observer


# -- the headless printer ------------------------------------------------------------

def human_bytes(n: float) -> str:
    """Binary units, as the dashboard shows them: `512 B`, `2.5 KiB`, `3.1 MiB`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


WIDTH = 120
"""Columns a headless line fits: a round line longer than that goes on under a 4-space indent."""


def fit(parts: list[str], width: int = WIDTH) -> str:
    """`parts` joined by two spaces, on as many lines of at most `width` columns as they need."""
    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + 2 + len(part) > width:
            lines.append("    " + part)
        else:
            lines[-1] += "  " + part
    return "\n".join(lines)


def domain_lines(event: ev.JobCompleted) -> list[str]:
    """The headless summary's per-domain lines under a job's pooled metrics: each domain's metrics
    of the last round, with the holdout examples behind them."""
    width = max((len(d) for d in event.domain_metrics), default=0)
    return [f"  {domain:<{width}}  {event.domain_examples.get(domain, 0):>6} examples  "
            + "  ".join(f"{k} {v:.4f}" for k, v in values.items())
            for domain, values in event.domain_metrics.items()]


def epoch_jobs(run_dir: str | Path) -> frozenset[str]:
    """The run's split jobs (its plan's `split_models`), whose rounds are epochs: the headless lines and
    the summary say `epoch` for them (the event stays `round_completed`); empty without a readable plan."""
    try:
        return frozenset(s.name for s in Plan.read(Path(run_dir) / "plan.toml").split_models)
    except (OSError, ValueError):
        return frozenset()


def short(value: float) -> str:
    """A metric of an epoch line in at most 5 significant digits (4 decimals below 10): a regression's
    losses in the thousands keep one epoch on one line of 120 columns."""
    size = abs(value)
    return f"{value:.{4 if size < 10 else 3 if size < 100 else 2 if size < 1000 else 1 if size < 10000 else 0}f}"


def epoch_line(event: ev.RoundCompleted) -> str:
    """A split job's headless line of one epoch: no participants (every part, always), short numbers,
    and the bytes the coordinator received and sent in one figure."""
    return fit([f"{event.job}  epoch {event.round:>3}/{event.rounds}", f"train_loss {short(event.train_loss)}",
                *(f"{k} {short(v)}" for k, v in event.metrics.items()),
                f"in+out {human_bytes(event.bytes_in + event.bytes_out)}", f"{event.seconds:.3f}s"])


def headless_lines(events: Iterable[ev.Event], epochs: frozenset[str] = frozenset()) -> Iterator[str]:
    """The headless lines of `events`: `render_event`'s, with a product's passed quality checks in one
    line (`PRODUCT: N quality checks passed`); a failed check keeps its own line. The rounds of the
    `epochs` jobs (split jobs: `epoch_jobs`) are called epochs."""
    passed: dict[str, int] = {}

    def counted() -> Iterator[str]:
        yield from (f"{p}: {n} quality check{'s' * (n != 1)} passed" for p, n in passed.items())
        passed.clear()

    for event in events:
        if isinstance(event, ev.ContractChecked) and event.passed:
            passed[event.product] = passed.get(event.product, 0) + 1
            continue
        if not isinstance(event, ev.ContractChecked):  # the checks' run is over: their counts
            yield from counted()
        split = isinstance(event, ev.RoundCompleted) and event.job in epochs
        line = epoch_line(event) if split else render_event(event)
        if line and epochs:
            line = ev.in_epochs(event, line, epochs)
        if line:
            yield line
    yield from counted()


def render_event(event: ev.Event) -> str | None:
    """The headless line for an event, or None for events it does not print."""
    if isinstance(event, ev.RoundCompleted):
        eps = [] if event.epsilon is None else [f"ε {event.epsilon:.3f}"]
        return fit([f"{event.job}  round {event.round:>3}/{event.rounds}", f"participants {len(event.participants)}",
                    *eps, f"train_loss {event.train_loss:.4f}", *(f"{k} {v:.4f}" for k, v in event.metrics.items()),
                    f"in {human_bytes(event.bytes_in)} (updates {human_bytes(event.update_bytes)})",
                    f"out {human_bytes(event.bytes_out)}", f"{event.seconds:.3f}s"])
    if isinstance(event, (ev.UpdateReceived, ev.RoundStarted, ev.CheckpointWritten, ev.RunCompleted)):
        return None
    if isinstance(event, ev.BudgetSpent) and event.subject.startswith("model."):
        return None  # DP training charges every round; the round line carries ε
    if isinstance(event, ev.PolicyDecided) and event.effect == "allow":
        return None
    if isinstance(event, ev.ContractChecked) and event.passed:
        return None  # counted by headless_lines: one line per product
    return event.message()


def evaluation_lines(events: list[ev.Event], job: str, run_dir: Path) -> list[str]:
    """The summary lines of a job's evaluation product (its last score) and cross-site matrix, if any."""
    lines = []
    held = [e for e in events if isinstance(e, ev.HeldOutEvaluated) and e.job == job]
    if held:
        e = held[-1]
        ms = "  ".join(f"{k} {v:.4f}" for k, v in e.metrics.items())
        lines.append(f"job {job}: evaluation product {e.product} (round {e.round}, {e.examples} examples)  {ms}"
                     if not e.reason else f"job {job}: evaluation product {e.product} not scored: {e.reason}")
    for e in events:
        if isinstance(e, ev.CrossSiteEvaluated) and e.job == job:
            lines.append(f"job {job}: cross-site evaluation, models down, sites across ({run_dir / e.path}):")
            lines += e.table()
    return lines


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
"""What stops a run that `up` attends: Ctrl-C, kill, systemctl/docker stop, timeout, a hang-up, Ctrl-\\."""


class Interrupted(KeyboardInterrupt):
    """One of STOP_SIGNALS reached the process that attends a run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn the first of STOP_SIGNALS into `Interrupted`, then ignore them while the run is stopped in
    order (until the caller restores them); a signal ignored when we started (nohup, `cmd &`) stays so."""
    fired: list[int] = []

    def interrupt(signum: int, _frame: Any) -> None:
        fired.append(signum)
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN}
    for sig in previous:
        signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items() if not fired else ():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def interrupted(run: LocalRun, signum: int, echo) -> RunResult:
    """Stop the run in order after `signum` reached `up`; the result carries the signal."""
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    echo(f"stopping the run ({name})...")
    run.stop(signum=signum)
    result = run.finish()
    return RunResult(False, result.run_dir, f"interrupted by {signal.Signals(signum).name}", result.events,
                     signal=signum)


def run_headless(run: LocalRun, echo) -> RunResult:
    """Print one line per round (and notable events) until the run ends."""
    started = time.time()
    try:
        with stop_on_signals():
            for line in headless_lines(run.follow(), epoch_jobs(run.m.path)):
                echo(line)
    except KeyboardInterrupt as err:
        return interrupted(run, getattr(err, "signum", signal.SIGINT), echo)
    result = run.finish()
    for line in summary_lines(result):
        echo(line)
    echo(f"run {'completed' if result.ok else 'failed'} in {time.time() - started:.2f}s: {result.run_dir}")
    return result


def summary_lines(result: RunResult) -> list[str]:
    """What a run's end prints, headless or after the dashboard: each job's final metrics and model
    path, its evaluations, per-domain metrics and personal models (from the run's audit log when
    `result` carries no events: the dashboard followed them)."""
    events = result.events or tuple(_read_log(result.run_dir / EVENTS_FILE))
    lines: list[str] = []
    resumed: dict[str, int] = {}
    epochs = epoch_jobs(result.run_dir)
    for e in events:
        if isinstance(e, ev.RunResumed):  # its seconds count from the resume: say so
            resumed.update(e.rounds)
        if isinstance(e, ev.JobCompleted):
            unit = "epochs" if e.job in epochs else "rounds"
            after = f" (resumed after {unit[:-1]} {resumed[e.job]})" if e.job in resumed else ""
            lines += fit([f"job {e.job}: {e.rounds} {unit}{after} in {e.seconds:.2f}s",  # a long path: on a line
                          *(f"{k} {v:.4f}" for k, v in e.metrics.items()),     # of its own, in 120
                          f"model {result.run_dir / e.model_path}"]).splitlines()
            lines += evaluation_lines(list(events), e.job, result.run_dir)
            lines += domain_lines(e)
        elif isinstance(e, ev.Personalized):
            for domain, sides in e.domains.items():
                line = "  ".join(f"{k} {v:.4f}" + (f" -> {sides['after'][k]:.4f}" if "after" in sides else "")
                                 for k, v in sides["before"].items())
                lines.append(f"job {e.job}: {domain} personal model ({e.examples.get(domain, 0)} holdout rows)  "
                             f"{line}")
    return lines
