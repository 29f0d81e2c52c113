"""A resident compile server for one mesh directory (`meshctl compile-server start`).

Like mypy's `dmypy`: a process that keeps, between compiles, what compiling each file
produced, so a compile after an edit of one domain file redoes only that file's load and
parse. It listens on a unix socket, `.meshctl/compile.sock` beside mesh.yaml (mode 0600,
answering only its own user), never on a network port; `meshctl validate` and `meshctl plan`
(meshctl.client) send it their arguments and print its answer, which is what the same command
prints in process, byte for byte, with the same exit code. It stops itself after idle minutes,
when its socket is removed, on `meshctl compile-server stop`, or when a client of another
meshctl version asks (after an upgrade).

What it keeps (ResidentCache), per file and keyed by the file's bytes: the loaded data and
positions; per item of that data (by the object's identity, which an unchanged file keeps): the
validated spec item; and the policy values (a DecisionMemo held in memory). Everything
else (resolve, checks, policies over the remembered values, plan objects, TOML) runs on each
compile, over the whole mesh, as in process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import meshctl
from meshctl.client import SOCKET, ask, build, connect
from meshctl.compiler import plantext
from meshctl.compiler.cache import DecisionMemo
from meshctl.compiler.diagnostics import Diagnostic
from meshctl.compiler.loader import Source, load_bytes
from meshctl.compiler.parse import ItemMemo
from meshctl.compiler.plantext import PlanTexts

IDLE_MINUTES = 30
"""A server with no request for this long stops."""
LOG = "compile-server.log"
"""What the server prints (its start and stop), in `.meshctl/`."""
ENV = ("NO_COLOR", "TERM", "COLUMNS", "LINES", "COLORTERM", "FORCE_COLOR")
"""The client's environment a served command sees (colour and width)."""


class ResidentMemo(DecisionMemo):
    """Policy values kept in memory, never written to `.meshctl/cache`.

    With `replays`, policy.decide also keeps, beside a subject's values, the decisions it made
    for the subject (by the subject, its exact variables and every field of the policies that
    apply), when they reported nothing, and hands the same decisions out again."""

    replays = True

    def __init__(self) -> None:  # (nothing read from disk: keys here are not the disk's)
        self.path = Path(os.devnull)
        self.hits = self.misses = 0
        self._old: dict[str, dict[Any, Any]] = {}
        self._used: dict[str, dict[Any, Any]] = {}
        self._texts: dict[int, tuple[Any, str]] = {}
        self._texts_used: dict[int, tuple[Any, str]] = {}

    def values(self, variables: dict[str, Any]) -> dict[Any, Any]:
        """The remembered values for exactly `variables`, keyed by their `repr`: exact for the
        plain data, dates and tuples variables are made of (types and key order show), and an
        object without such a repr only misses (its id is in it). Faster than the disk memo's JSON
        and its check that JSON holds the data exactly (0.1 s of 500 models' variables).

        The repr of a variable that is the very object of the previous compile (policy.py hands a
        model's variables again when they are made of the same objects: `_kept_activation`) is
        that compile's; these dicts are never changed once made."""
        return self._entry("{" + ", ".join(f"{k!r}: {self._text(v)}" for k, v in variables.items()) + "}")

    def _text(self, value: Any) -> str:
        """repr(value), kept by the identity of a dict (held, so the id is not reused)."""
        if type(value) is not dict:
            return repr(value)
        key = id(value)
        kept = self._texts_used.get(key) or self._texts.get(key)
        if kept is None or kept[0] is not value:
            kept = (value, repr(value))
        self._texts_used[key] = kept
        return kept[1]

    def save(self) -> None:
        """Keep what this compile used (the next one starts from it)."""
        self._old, self._used = self._used, {}
        self._texts, self._texts_used = self._texts_used, {}


class ResidentCache:
    """The compile server's cache: a LoadCache's interface (`load`, `decisions`) plus `items`.

    A file's load is kept by (name, bytes) and handed out as a fresh Source whose top-level
    mapping and section lists are copies (merging includes extends them); the items inside are the
    kept objects, so `items` (parse) finds them again. After a compile, `end()` keeps only what
    it used."""

    def __init__(self, directory: Path) -> None:
        self.decisions = ResidentMemo()
        self.items = ItemMemo()
        self.hits = 0
        self.misses = 0
        self._loads: dict[tuple[str, bytes], Source] = {}
        self._used: dict[tuple[str, bytes], Source] = {}

    def load(self, raw: bytes, file: str) -> tuple[Source | None, list[Diagnostic]]:
        """What `load_bytes(raw, file)` gives, from memory when this file had these bytes."""
        key = (file, raw)
        kept = self._used.get(key) or self._loads.get(key)
        if kept is None:
            self.misses += 1
            source, diagnostics = load_bytes(raw, file)
            if source is None or diagnostics:
                return source, diagnostics
            kept = source
        else:
            self.hits += 1
        self._used[key] = kept
        data = kept.data
        if type(data) is dict:
            data = {k: list(v) if type(v) is list else v for k, v in data.items()}
        return Source(kept.file, kept.text, data, kept.map), []

    def end(self) -> None:
        """A compile ended: keep what it used (nothing is dropped after one that loaded nothing)."""
        if self._used:
            self._loads, self._used = self._used, {}
            self.items.end()

    @property
    def files(self) -> int:
        """How many files' loads are kept."""
        return len(self._loads)


class _Out(io.BytesIO):
    """A captured stream that is a terminal when the client's is (colours as there); each write is
    also put, in order, in `order` beside the other stream's as (stream number, bytes), so that the
    client interleaves stdout and stderr as the command wrote them (`2>&1`, a terminal, a CI log)."""

    def __init__(self, tty: bool, number: int = 1, order: list[tuple[int, bytes]] | None = None) -> None:
        super().__init__()
        self.tty = tty
        self.number = number
        self.order = order if order is not None else []

    def isatty(self) -> bool:
        return self.tty

    def write(self, data: Any) -> int:
        order = self.order
        if order and order[-1][0] == self.number:
            order[-1] = (self.number, order[-1][1] + bytes(data))
        else:
            order.append((self.number, bytes(data)))
        return super().write(data)


def chunks(order: list[tuple[int, bytes]]) -> list[list[Any]]:
    """`order` as the answer's `chunks`: [stream number, text] in the order written."""
    return [[number, data.decode("utf-8", errors="replace")] for number, data in order if data]


class Server:
    """Serves the compiles of the mesh in `root` on `root/.meshctl/compile.sock`."""

    def __init__(self, root: Path, idle_s: float, command: Any = None, resident: Any = None) -> None:
        self.command = command
        """The click command that runs a served argv (meshctl.cli.main, handed in by `meshctl
        compile-server serve`: the compiler never imports the CLI)."""
        self.resident = resident
        """Called with the cache before a served command runs and with None after (sets
        meshctl.cli.RESIDENT)."""
        self.root = root.resolve()
        self.path = self.root / ".meshctl" / SOCKET
        self.idle_s = idle_s
        self.cache = ResidentCache(self.root / ".meshctl" / "cache")
        self.texts = PlanTexts()
        """The plan texts it made, per resource (meshctl.compiler.plantext)."""
        self.started = time.time()
        self.last = time.monotonic()
        self.requests = 0
        self.seconds = 0.0
        self._inode: int | None = None
        self.build = build()
        """meshctl's version and code the server runs (meshctl.client.build); clients must match."""

    def warm(self) -> None:
        """Compile mesh.yaml once, so the first request finds every file kept."""
        from meshctl.compiler.compile import compile_mesh

        mesh = self.root / "mesh.yaml"
        if mesh.is_file():
            here = os.getcwd()
            os.chdir(self.root)  # as `meshctl validate` in the mesh directory names its files (the keys)
            try:
                compile_mesh(Path("mesh.yaml"), hashed=False, cache=self.cache)  # type: ignore[arg-type]
            finally:
                os.chdir(here)
            self.cache.end()

    def listen(self) -> socket.socket:
        """Bind the socket (0600): SystemExit with one line when another server answers there."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with connect(str(self.path), timeout=5):
                raise SystemExit(f"error: a compile server already answers at {self.path}")
        except OSError:
            pass
        self.path.unlink(missing_ok=True)  # a killed server's socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        here = os.getcwd()
        try:
            os.chdir(self.path.parent)  # (a relative name: a long path fits no sockaddr_un)
            sock.bind(SOCKET)
            os.chmod(SOCKET, 0o600)
        finally:
            os.chdir(here)
            os.umask(old)
        sock.listen(8)
        self._inode = self.path.stat().st_ino
        return sock

    def serve(self, sock: socket.socket) -> None:
        """Answer requests one at a time until idle, stopped, or the socket is gone."""
        try:
            while True:
                left = self.idle_s - (time.monotonic() - self.last)
                if left <= 0:
                    print(f"stopping: idle for {self.idle_s:.0f} s", flush=True)
                    return
                if not self._ours():
                    print(f"stopping: {self.path} was removed or replaced", flush=True)
                    return
                sock.settimeout(min(left, 5.0))
                try:
                    conn, _ = sock.accept()
                except TimeoutError:
                    continue
                with conn:
                    if not self._handle(conn):
                        return
        finally:
            sock.close()
            if self._ours():
                self.path.unlink(missing_ok=True)

    def _ours(self) -> bool:
        try:
            return self.path.stat().st_ino == self._inode
        except OSError:
            return False

    def _handle(self, conn: socket.socket) -> bool:
        """Answer one request; False when the server should stop."""
        conn.settimeout(60)
        _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
        if uid != os.getuid():
            return True  # another user's process: no answer
        try:
            line = b""
            while not line.endswith(b"\n"):
                chunk = conn.recv(1 << 16)
                if not chunk:
                    return True
                line += chunk
            request = json.loads(line)
        except (OSError, ValueError):
            return True
        version = self.build
        if request.get("meshctl") != version:  # a client of another meshctl: this one is stale
            self._send(conn, {"meshctl": version, "pid": os.getpid()})
            print(f"stopping: a client of meshctl {request.get('meshctl')} asked (this is {version})", flush=True)
            return False
        op = request.get("op")
        if op == "stop":
            self._send(conn, {"meshctl": version, "stopped": True, "pid": os.getpid()})
            print("stopping: asked to", flush=True)
            return False
        if op == "status":
            self._send(conn, {"meshctl": version, **self.status()})
        elif op == "run":
            start = time.perf_counter()
            try:
                answer = self.run(request)
            except Exception as error:  # noqa: BLE001  (one request's failure never ends the server)
                answer = {"error": f"{type(error).__name__}: {error}"}
            self.seconds = time.perf_counter() - start
            self.requests += 1
            self._send(conn, {"meshctl": version, **answer})
        else:
            self._send(conn, {"meshctl": version, "error": f"unknown op {op!r}"})
        self.last = time.monotonic()
        return True

    @staticmethod
    def _send(conn: socket.socket, answer: dict[str, Any]) -> None:
        try:
            conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            pass  # the client went away (Ctrl-C)

    def status(self) -> dict[str, Any]:
        """What `meshctl compile-server status` shows."""
        return {"pid": os.getpid(), "root": str(self.root), "socket": str(self.path),
                "started": self.started, "requests": self.requests, "files": self.cache.files,
                "plan_texts": self.texts.status(),
                "last_seconds": round(self.seconds, 3), "cpu_s": time.process_time(),
                "idle_stop_s": round(self.idle_s - (time.monotonic() - self.last))}

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run a served command as meshctl.cli does, its output captured."""
        import click

        argv, cwd = request.get("argv"), request.get("cwd")
        if not isinstance(argv, list) or not argv or argv[0] not in ("validate", "plan") \
                or not isinstance(cwd, str):
            return {"error": "not a served command"}
        tty = request.get("tty") or [False, False]
        order: list[tuple[int, bytes]] = []
        out, err = _Out(bool(tty[0]), 1, order), _Out(bool(tty[1]), 2, order)
        saved_env = {k: os.environ.get(k) for k in ENV}
        saved = sys.stdout, sys.stderr
        code: Any = 0
        try:
            for k in ENV:
                os.environ.pop(k, None)
            os.environ.update({k: v for k, v in (request.get("env") or {}).items() if k in ENV})
            os.chdir(cwd)
            sys.stdout, sys.stderr = (io.TextIOWrapper(out, encoding="utf-8", errors="replace", write_through=True),
                                      io.TextIOWrapper(err, encoding="utf-8", errors="replace", write_through=True))
            self.resident(self.cache)
            plantext.RESIDENT = self.texts
            try:
                self.command.main(args=[str(a) for a in argv], prog_name="meshctl", standalone_mode=True)
            except SystemExit as stop:
                code = stop.code
            except click.exceptions.Exit as stop:
                code = stop.exit_code
            except Exception as error:  # noqa: BLE001  (what reports_errors lets through)
                sys.stderr.write(f"internal error: {type(error).__name__}: {error} (in the compile server)\n")
                code = 2
        except OSError as error:
            return {"error": f"{cwd}: {error.strerror or error}"}
        finally:
            self.resident(None)
            plantext.RESIDENT = None
            self.cache.end()
            for stream in (sys.stdout, sys.stderr):
                if stream not in saved:
                    stream.flush()
                    stream.detach()  # (a wrapper collected later would close the buffer it holds)
            sys.stdout, sys.stderr = saved
            os.chdir(self.root)
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        if code is None:
            code = 0
        elif not isinstance(code, int):
            err.write(f"{code}\n".encode())
            code = 1
        return {"exit": code, "out": out.getvalue().decode("utf-8"), "err": err.getvalue().decode("utf-8"),
                "chunks": chunks(order)}


# --- the commands' side: start, stop, status -------------------------------------------------


def socket_of(root: Path) -> Path:
    """The socket of the server of the mesh directory `root`."""
    return root / ".meshctl" / SOCKET


def request(root: Path, op: str, timeout: float = 10) -> dict[str, Any] | None:
    """The answer of the server of `root` to `op`, or None when none answers there."""
    path = socket_of(root)
    if not path.exists():
        return None
    try:
        with connect(str(path), timeout=timeout) as sock:
            return ask(sock, {"op": op, "meshctl": build()})
    except (OSError, ValueError):
        return None


def start(root: Path, idle_minutes: float) -> dict[str, Any]:
    """Start a server for `root` and wait until it answers (its first, cold compile done).

    Returns its pid and socket; raises RuntimeError with the server's last words if it could not start."""
    import subprocess

    directory = root / ".meshctl"
    directory.mkdir(parents=True, exist_ok=True)
    read, write = os.pipe()
    with open(directory / LOG, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshctl", "compile-server", "serve", str(root), "--idle-s",
             str(idle_minutes * 60), "--ready-fd", str(write)],
            cwd=root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            pass_fds=(write,), start_new_session=True)
    os.close(write)
    with os.fdopen(read, "rb") as ready:
        said = ready.read().split()  # "ready PID" once it listens; EOF alone when it died first
    if said[:1] != [b"ready"]:
        proc.wait()
        tail = (directory / LOG).read_text(errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(tail[0] if tail else f"the compile server exited with {proc.returncode}")
    return {"pid": int(said[1]), "socket": str(socket_of(root))}


def main(argv: list[str], command: Any, resident: Any) -> None:
    """`meshctl compile-server serve ROOT` (hidden): what `meshctl compile-server start` runs;
    `command` runs a served argv (meshctl.cli.main), `resident(cache)` hands it the kept cache."""
    ap = argparse.ArgumentParser(prog="meshctl compile-server serve",
                                 description="meshctl's compile server (start it with `meshctl compile-server start`)")
    ap.add_argument("root", type=Path)
    ap.add_argument("--idle-s", type=float, default=IDLE_MINUTES * 60)
    ap.add_argument("--ready-fd", type=int)
    args = ap.parse_args(argv)
    server = Server(args.root, args.idle_s, command, resident)
    os.chdir(server.root)
    if request(server.root, "status") is not None:
        raise SystemExit(f"error: a compile server already answers at {server.path}")
    start = time.perf_counter()
    try:
        server.warm()
    except Exception as error:  # noqa: BLE001  (each request compiles, and reports, again)
        print(f"note: the first compile failed ({type(error).__name__}: {error})", flush=True)
    sock = server.listen()
    print(f"meshctl {meshctl.__version__} compile server, pid {os.getpid()}, on {server.path} "
          f"(warm in {time.perf_counter() - start:.2f} s; stops after {args.idle_s:.0f} idle s)", flush=True)
    if args.ready_fd is not None:
        os.write(args.ready_fd, f"ready {os.getpid()}\n".encode())
        os.close(args.ready_fd)
    server.serve(sock)

