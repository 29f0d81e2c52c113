"""`meshctl serve`: one domain as a long-lived service that dials out and serves run after run.

The service compiles the mesh from its own checkout (the compiler is pure) and serves a run
only when the coordinator's plan hash (RunInfo) equals its own compile. Each connection is a
new DEALER socket (a new identity) that says Knock, and Hello once the run is known:

    connect -> Knock -> RunInfo(run, plan hash) -> same plan? -> Daemon(run).load() -> Hello -> serve
       ^          \\-- another plan: "plan out of date", stay connected, Knock again on reload
       '-- lost (connection closed, or ZMTP heartbeats unanswered): backoff, new socket
       '-- Shutdown: "waiting for the next run", new socket

The same run id after a reconnection rejoins that run with the same Daemon (its secure
aggregation key, its ledger reservations); a new run id gets a new Daemon (new keys, new
bookings). The mesh is reloaded when the file changes or on SIGHUP, between runs. SIGTERM
and SIGINT stop the service (exit 0). Every state change is one line on stderr (`say`).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from meshctl.compiler.plan import Plan
from meshctl.errors import MeshctlError, UserError
from meshctl.runtime import wire
from meshctl.runtime.daemon import (
    POLL_MS,
    CoordinatorLost,
    Daemon,
    DaemonConfig,
    _receive,
    _short,
    dial,
    heartbeat_interval,
    outbound,
    say,
)
from meshctl.runtime.keys import KeyPair, check_public_key, fingerprint, keys_dir
from meshctl.runtime.liveness import env_seconds

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
"""Reconnection delays double from BACKOFF_BASE_S up to this cap (MESHCTL_RECONNECT_MAX_S overrides)."""
NEXT_RUN_PAUSE_S = 1.0
"""After a run's Shutdown, the coordinator closes its socket: dial again only after this pause."""
KNOCK_EVERY_S = 10.0
"""While the coordinator runs another plan, ask again this often (and at once after a reload)."""
RELOAD_CHECK_S = 1.0
"""How often the mesh file's size and mtime are looked at while waiting."""

_TCP = re.compile(r"tcp://(?P<host>\[[0-9a-fA-F:.]+\]|[^:/\s]+):(?P<port>\d{1,5})")
_ANY_HOST = {"0.0.0.0", "*", "[::]", "::"}


@dataclass
class ServiceConfig:
    domain: str
    mesh: Path
    """This host's checkout of the reviewed mesh.yaml."""
    coordinator: str | None = None
    """tcp://HOST:PORT to dial; None: the mesh's `mesh.coordinator.address`."""
    key_file: Path | None = None
    """This domain's Curve secret; None: `.meshctl/keys/DOMAIN.key_secret` beside the mesh."""
    data_root: Path | None = None
    """Directory the domain's product sources (and its `.meshctl/` ledger) are relative to; None: the mesh's."""
    threads: int = 1

    @property
    def key_path(self) -> Path:
        return self.key_file or keys_dir(self.mesh) / f"{self.domain}.key_secret"

    @property
    def base_dir(self) -> Path:
        return (self.data_root or self.mesh.resolve().parent).resolve()


@dataclass(frozen=True)
class MeshView:
    """The mesh as this domain compiled it: its plan, where to dial and whom to trust."""

    plan: Plan
    digest: str
    """sha256 of the bytes of mesh.yaml and of every file it includes."""
    endpoint: str
    server_key: bytes
    stat: tuple[tuple[int, int, int], ...]
    """(inode, size, mtime_ns) of each watched path when it was read: mesh.yaml, the files it includes
    and their folders (a file added where an include glob looks changes its folder)."""
    watched: tuple[Path, ...] = ()


class Stopped(BaseException):
    """SIGTERM or SIGINT: stop serving (a BaseException, so no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stat(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _stats(paths: tuple[Path, ...]) -> tuple[tuple[int, int, int], ...]:
    return tuple(_stat(p) for p in paths)


def compile_view(cfg: ServiceConfig) -> MeshView:
    """Compile the service's mesh; a UserError (one line) when it cannot be served."""
    from meshctl.compiler.compile import compile_bytes

    where = str(cfg.mesh)
    try:
        first, raw = _stat(cfg.mesh), cfg.mesh.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read the mesh: {(err.strerror or type(err).__name__).lower()}", where=where) from None
    result = compile_bytes(raw, cfg.mesh)
    parts = [cfg.mesh.parent / i.name for i in result.includes]
    watched = (cfg.mesh, *parts, *sorted({p.parent for p in parts} | ({cfg.mesh.parent} if parts else set())))
    try:
        stat = (first, *_stats(watched[1:]))
    except OSError:  # an included file went away while compiling: the next check reloads
        stat = (first,)
    digest = hashlib.sha256(raw)
    for i in result.includes:
        digest.update(b"\0" + i.name.encode() + b"\0" + i.raw)
    if result.plan is None:
        errors = result.errors
        first = errors[0] if errors else None
        what = f"{first.where}: {first.code}: {first.message}" if first else "no plan"
        raise UserError(f"the mesh does not compile ({len(errors)} error{'s' if len(errors) != 1 else ''}; "
                        f"first: {what})", where=where, hint=f"meshctl validate {cfg.mesh} shows them all")
    plan = result.plan
    if cfg.domain not in {d.name for d in plan.domains}:
        names = ", ".join(d.name for d in plan.domains)
        raise UserError(f"domain {cfg.domain!r} is not in the mesh (its domains: {names})", where=where)
    declared = plan.coordinator.public_key
    if not declared:
        raise UserError("the mesh declares no mesh.coordinator.public_key: a domain service needs the "
                        "coordinator's stable key", where=where,
                        hint="on the coordinator host: `meshctl keys generate coordinator`, then paste its "
                             "public_key line under mesh.coordinator")
    server = check_public_key(declared, where=f"{where}: mesh.coordinator.public_key")
    return MeshView(plan, digest.hexdigest(), dial_address(cfg.coordinator, plan.coordinator.address),
                    server, stat, watched)


def dial_address(given: str | None, declared: str) -> str:
    """Where to dial: `--coordinator`, else the mesh's coordinator address when it names a host."""
    if given is not None:
        if not _TCP.fullmatch(given):
            raise UserError(f"--coordinator {given!r} is not tcp://HOST:PORT")
        return given
    m = _TCP.fullmatch(declared)
    if m is None or m["host"] in _ANY_HOST:
        raise UserError(f"mesh.coordinator.address {declared} is where the coordinator binds, not an address "
                        "to dial", hint="give --coordinator tcp://HOST:PORT (the coordinator host's name)")
    return declared


def backoff(attempt: int, rng: random.Random, cap: float | None = None) -> float:
    """Seconds to wait before reconnection `attempt` (0, 1, ...): exponential, capped, with jitter
    (between half and all of min(cap, base * 2**attempt)), so domains that lost the same coordinator
    do not all dial again in the same instant."""
    cap = reconnect_cap() if cap is None else cap
    ceiling = min(cap, BACKOFF_BASE_S * 2 ** min(attempt, 30))
    return ceiling / 2 + rng.random() * ceiling / 2


def reconnect_cap() -> float:
    """`BACKOFF_CAP_S`, or MESHCTL_RECONNECT_MAX_S when set to a positive number."""
    return env_seconds("MESHCTL_RECONNECT_MAX_S", BACKOFF_CAP_S)


class Service:
    """A domain service. `run()` returns the exit code: 0 when stopped by SIGTERM/SIGINT."""

    def __init__(self, cfg: ServiceConfig):
        self.cfg = cfg
        self.view: MeshView | None = None
        self.daemon: Daemon | None = None
        """The Daemon of the run being served (kept across reconnections to the same run)."""
        self.attempt = 0
        """Reconnections since the last successful handshake (the backoff's exponent)."""
        self.lost = False
        """Whether the last connection was lost (the next handshake says `reconnected`)."""
        self.reload_asked = False
        self.next_check = 0.0
        self.said: set[str] = set()
        """Lines said once per cause (a refusal, an out-of-date plan), until the state changes."""
        self.rng = random.Random()
        self.trusted: tuple[str, bytes] | None = None
        """(endpoint, coordinator key) of the last handshake that succeeded."""

    # -- lifecycle -----------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; a configuration that cannot work raises UserError first."""
        self.view = compile_view(self.cfg)
        keys = KeyPair.load(self.cfg.key_path)
        self._check_own_key(keys, self.view, strict=True)
        if not self.cfg.base_dir.is_dir():
            raise UserError("the data root is not a directory", where=str(self.cfg.base_dir))
        torch.set_num_threads(max(1, self.cfg.threads))
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        ctx = zmq.Context()
        try:
            say(f"serving domain {self.cfg.domain} of mesh {self.view.plan.plan.mesh} (plan "
                f"{_short(self.view.plan.plan.hash)}; data root {self.cfg.base_dir})")
            say(f"connecting to {self.view.endpoint} (coordinator key {fingerprint(self.view.server_key)})")
            while True:
                outcome = self._session(ctx)
                if outcome == "done":
                    say("waiting for the next run")
                    self._sleep(NEXT_RUN_PAUSE_S)
                elif outcome in ("lost", "refused"):
                    self._sleep(backoff(self.attempt, self.rng))
                    self.attempt += 1
        except Stopped as stop:
            for sig in previous:  # a second signal must not cut the clean-up short
                signal.signal(sig, signal.SIG_IGN)
            say(f"stopped by {signal.Signals(stop.signum).name}")
            return 0
        finally:
            self._end_run()
            ctx.destroy(linger=0)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            self.reload_asked = True
            return
        raise Stopped(signum)

    def _sleep(self, seconds: float) -> None:
        """Wait, reloading the mesh when asked to meanwhile (signals interrupt the wait)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.2))
            self._maybe_reload()

    # -- one connection ------------------------------------------------------------
    def _session(self, ctx: zmq.Context) -> str:
        """One connection, from dialling to its end: "done" (the run ended), "lost", "refused", "reload"."""
        view = self.view
        assert view is not None
        try:
            keys = KeyPair.load(self.cfg.key_path)  # read on every connection: a rotated key is used at once
        except UserError as err:
            self._say_once(f"refused: {err.render()}")
            return "refused"
        sock, monitor = dial(ctx, keys, view.server_key, beat_every=heartbeat_interval())
        reconnect_ms = int(min(2.0, reconnect_cap()) * 1000)
        sock.reconnect_ivl, sock.reconnect_ivl_max = 100, reconnect_ms
        sock.connect(view.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        up, knocked = False, -math.inf
        try:
            while True:
                if self._maybe_reload():
                    if (self.view.endpoint, self.view.server_key) != (view.endpoint, view.server_key):
                        return "reload"  # dial the new address, or trust the new key, on a new socket
                    view, knocked = self.view, -math.inf  # the plan changed: ask again now
                if up and time.monotonic() - knocked > KNOCK_EVERY_S:
                    try:
                        sock.send_multipart(wire.encode(wire.Knock(sender=self.cfg.domain)), flags=zmq.NOBLOCK)
                        knocked = time.monotonic()
                    except zmq.Again:
                        pass
                ready = dict(poller.poll(POLL_MS))
                if monitor in ready and sock not in ready:
                    evt = recv_monitor_message(monitor)
                    outcome = self._link_event(evt["event"], up)
                    if outcome == "up":
                        up = True
                    elif outcome:
                        return outcome
                if sock not in ready:
                    continue
                got = _receive(sock)
                if got is None:
                    continue
                msg = got[0]
                if isinstance(msg, wire.RunInfo):
                    run = self._checked_run(msg.run)
                    if msg.plan_hash != view.plan.plan.hash:
                        self._out_of_date(msg.plan_hash, view)
                        continue
                    return self._serve_run(run, sock, monitor)
                if isinstance(msg, wire.Refused):
                    self._say_once(f"refused: {msg.reason}")
                    return "refused"
                if isinstance(msg, wire.Shutdown):
                    return "done"
        except UserError as err:  # another protocol, a bad run id: said, and tried again later
            self._say_once(f"refused: {err.message}")
            return "refused"
        finally:
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)

    def _link_event(self, kind: int, up: bool) -> str:
        """"up" after a handshake, "lost"/"refused" to end the connection, "" otherwise."""
        view = self.view
        assert view is not None
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if self.lost:
                say("reconnected")
            self.lost, self.attempt = False, 0
            self.trusted = (view.endpoint, view.server_key)
            self.said = {s for s in self.said if not s.endswith("; retrying")}  # say a new handshake refusal
            return "up"
        if kind == zmq.EVENT_DISCONNECTED and up:
            say("lost the coordinator (its connection closed); reconnecting")
            self.lost = True
            return "lost"
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self._say_once(f"refused: the coordinator at {view.endpoint} does not accept this domain's key "
                           f"(fingerprint {fingerprint(self._public())}); retrying")
            return "refused"
        if kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            if self.trusted == (view.endpoint, view.server_key):  # this key worked: the link is what fails
                return "lost"
            self._say_once(f"refused: Curve handshake with {view.endpoint} failed (is mesh.coordinator.public_key, "
                           f"fingerprint {fingerprint(view.server_key)}, the coordinator's key?); retrying")
            return "refused"
        return ""

    def _public(self) -> bytes:
        try:
            return KeyPair.load(self.cfg.key_path).public
        except UserError:
            return b""

    def _checked_run(self, run: str) -> str:
        from meshctl.runtime.daemon import RUN_ID

        if not RUN_ID.fullmatch(run):
            raise UserError(f"coordinator at {self.view.endpoint if self.view else '?'} sent no usable run id "
                            f"({run[:40]!r})")
        return run

    # -- one run -------------------------------------------------------------------
    def _serve_run(self, run: str, sock: zmq.Socket, monitor: zmq.Socket) -> str:
        """Serve run `run` on this connection until the coordinator's Shutdown ("done") or a loss."""
        view = self.view
        assert view is not None
        daemon = self.daemon
        if daemon is None or daemon.cfg.run != run or daemon.cfg.plan is not view.plan:
            self._end_run()
            daemon = self._new_daemon(run, sock)
            if daemon is None:
                return "refused"
        else:
            say(f"rejoining run {run}")
        daemon.link, daemon.lost_grace = "up", 0.0
        try:
            daemon._serve(sock, monitor)
        except CoordinatorLost:
            daemon._stop_pulse()
            self.lost = True
            return "lost"
        except UserError as err:  # the coordinator refused this domain, or named another run or plan
            self._say_once(f"refused: {err.message}")
            self._end_run()
            return "refused"
        self._end_run()
        self.said = {s for s in self.said if not s.startswith("refused")}  # a run went through: say the next
        return "done"

    def _new_daemon(self, run: str, sock: zmq.Socket) -> Daemon | None:
        """A Daemon for run `run` that has decided its jobs and read its data; None when it cannot start."""
        view = self.view
        assert view is not None
        keys = KeyPair.load(self.cfg.key_path)
        cfg = DaemonConfig(domain=self.cfg.domain, plan=view.plan, base_dir=self.cfg.base_dir,
                           coordinator=view.endpoint, server_key=view.server_key, keys=keys, run=run,
                           threads=self.cfg.threads, join_timeout_s=math.inf)
        daemon = Daemon(cfg)
        try:
            daemon.load()
        except Exception as err:  # noqa: BLE001 - whatever it was, only our own words leave
            safe = outbound(err)
            daemon._release()
            daemon._send(sock, wire.ErrorReply(code="data", reason=safe.message[:4096]), block=False)
            self._say_once(f"refused run {run}: {safe.message}")
            return None
        self.daemon = daemon
        return daemon

    def _end_run(self) -> None:
        """Let go of the run being served: stop its heartbeats, release its unspent ε reservations."""
        if self.daemon is not None:
            self.daemon._stop_pulse()
            self.daemon._release()
            if self.daemon.tap is not None:
                self.daemon.tap.close()
            self.daemon = None

    # -- the mesh: reload, and which side is behind --------------------------------
    def _maybe_reload(self) -> bool:
        """Reload the mesh when SIGHUP asked or the file changed; True when the plan changed."""
        now = time.monotonic()
        if not self.reload_asked and now < self.next_check:
            return False
        self.next_check = now + RELOAD_CHECK_S
        asked, self.reload_asked = self.reload_asked, False
        old = self.view
        assert old is not None
        try:
            changed = _stats(old.watched or (self.cfg.mesh,)) != old.stat
        except OSError:
            changed = True
        if not (asked or changed):
            return False
        try:
            view = compile_view(self.cfg)
        except MeshctlError as err:
            self._say_once(f"reload failed, still serving plan {_short(old.plan.plan.hash)}: {err.render()}")
            return False
        if view.digest == old.digest and view.endpoint == old.endpoint:
            self.view = view if view.stat != old.stat else old  # touched, not changed: nothing to say
            if asked:
                say(f"reloaded {self.cfg.mesh.name}: unchanged (plan {_short(old.plan.plan.hash)})")
            return False
        self.view = view
        self.said = {s for s in self.said if not s.startswith(("plan out of date", "reload failed"))}
        say(f"reloaded {self.cfg.mesh.name}: plan {_short(view.plan.plan.hash)} (was {_short(old.plan.plan.hash)})")
        try:
            self._check_own_key(KeyPair.load(self.cfg.key_path), view, strict=False)
        except UserError:
            pass  # said when the next connection reads it
        return view.plan.plan.hash != old.plan.plan.hash or view.server_key != old.server_key \
            or view.endpoint != old.endpoint

    def _check_own_key(self, keys: KeyPair, view: MeshView, *, strict: bool) -> None:
        """The mesh must declare this host's key for the domain (or the coordinator refuses it)."""
        declared = next((d.public_key for d in view.plan.domains if d.name == self.cfg.domain), "")
        if declared.encode() == keys.public:
            return
        what = (f"the mesh declares key {fingerprint(declared)} for domain {self.cfg.domain}, "
                f"this host's key {self.cfg.key_path} is {fingerprint(keys.public)}") if declared else \
            f"the mesh declares no public_key for domain {self.cfg.domain}"
        if strict:
            raise UserError(what, where=str(self.cfg.mesh),
                            hint=f"`meshctl keys show {self.cfg.domain}` prints the line to declare")
        self._say_once(f"warning: {what}")

    def _out_of_date(self, theirs: str, view: MeshView) -> None:
        line = (f"plan out of date: the coordinator runs plan {_short(theirs)}, this domain has "
                f"{_short(view.plan.plan.hash)}")
        if line in self.said:
            return
        why = which_is_behind(self.cfg.mesh, theirs, view.plan.plan.hash)
        self.said.add(line)
        say(f"{line}{'; ' + why if why else ''}; waiting for a plan both sides have")

    def _say_once(self, line: str) -> None:
        if line not in self.said:
            self.said.add(line)
            say(line)


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=20, check=False)


def which_is_behind(mesh: Path, theirs: str, mine: str, depth: int = 20) -> str:
    """Which side is behind, when the mesh is a file of a git checkout: the newest `depth` commits of
    the file (on every branch this checkout has) are compiled until one gives the coordinator's plan
    hash, and that commit is compared with HEAD (`git merge-base --is-ancestor`). "" when not in git."""
    from meshctl.compiler.compile import compile_bytes

    cwd = mesh.resolve().parent
    try:
        top = _git(cwd, "rev-parse", "--show-toplevel")
        if top.returncode != 0:
            return ""
        rel = mesh.resolve().relative_to(Path(top.stdout.decode().strip()).resolve()).as_posix()
        head = _git(cwd, "rev-parse", "--short=10", "HEAD").stdout.decode().strip()
        revs = _git(cwd, "log", "--all", f"-n{depth}", "--format=%H", "--", rel).stdout.decode().split()
        found = ""
        for rev in revs:
            shown = _git(cwd, "show", f"{rev}:{rel}")
            if shown.returncode == 0:
                result = compile_bytes(shown.stdout, mesh)
                if result.plan is not None and result.plan.plan.hash == theirs:
                    found = rev
                    break
        dirty = _git(cwd, "diff", "--quiet", "HEAD", "--", rel).returncode == 1
    except (OSError, ValueError, subprocess.SubprocessError):
        return ""
    local = " (with uncommitted changes to the mesh)" if dirty else ""
    if not found:
        return (f"no commit of this checkout compiles to the coordinator's plan: this domain may be behind "
                f"(git pull), or the two run other meshctl versions; this checkout is at {head}{local}")
    theirs_at = found[:10]
    if _git(cwd, "merge-base", "--is-ancestor", found, "HEAD").returncode == 0:
        if _git(cwd, "merge-base", "--is-ancestor", "HEAD", found).returncode == 0:  # HEAD itself
            return f"the coordinator runs this checkout's commit {theirs_at}; the mesh here has uncommitted changes"
        return f"the coordinator is behind: it runs commit {theirs_at}, this checkout is at {head}{local}"
    if _git(cwd, "merge-base", "--is-ancestor", "HEAD", found).returncode == 0:
        return f"this domain is behind: the coordinator runs commit {theirs_at}, this checkout is at {head}{local} " \
               "(git pull)"
    return f"the two have diverged: the coordinator runs commit {theirs_at}, this checkout is at {head}{local}"
