"""The first step of `meshctl` (meshctl.__main__): `validate` and `plan` through a running compile
server, else the CLI.

When `meshctl compile-server start` runs a server for a mesh directory, its unix socket is
`.meshctl/compile.sock` there. `meshctl validate` and `meshctl plan` of a mesh in that directory
send their arguments to it and print what it answers (the same bytes and exit code as compiling
in this process); everything else, and every case where no server answers, runs meshctl.cli as
before. This module imports only the standard library's socket and json, so a served
`validate` costs no pydantic, yaml or click import (docs/compiler-speed.md).
"""

from __future__ import annotations

import json
import os
import socket
import sys

from meshctl import __version__

__all__ = ["SOCKET", "ask", "build", "connect", "mesh_file", "served", "socket_path"]

SOCKET = "compile.sock"
"""The server's socket, in the `.meshctl/` directory beside mesh.yaml."""
SERVED = ("validate", "plan")
"""The commands a compile server answers."""
_VALUED = {"validate": ("--format",), "plan": ("-o", "--output", "--against", "--decisions")}
"""Options of each served command that take a value (the mesh file is the one other argument)."""
_FLAGS = ("--strict", "--detailed-exitcode")
"""Options of the served commands that take none (tests/compiler/test_compile_server.py checks both
lists against the commands' click options: an option missing here is not served)."""


def served(argv: list[str]) -> int | None:
    """The exit code of argv run by the compile server of its mesh when one answers (its output
    printed), else None: meshctl.__main__ then runs meshctl.cli."""
    return _served(argv)


def build() -> str:
    """This meshctl's version and the newest modification time of the code a compile runs
    (meshctl/*.py, meshctl/compiler/*.py): a server started before an upgrade, or before an edit
    of an editable install, has another build and is not used."""
    here = os.path.dirname(os.path.abspath(__file__))
    newest = 0
    for directory in (here, os.path.join(here, "compiler")):
        with os.scandir(directory) as entries:
            newest = max([newest, *(e.stat().st_mtime_ns for e in entries if e.name.endswith(".py"))])
    return f"{__version__}+{newest}"


def socket_path(mesh_dir: str) -> str:
    """The socket of the compile server of the mesh in `mesh_dir`."""
    return os.path.join(mesh_dir, ".meshctl", SOCKET)


def mesh_file(argv: list[str]) -> str | None:
    """The mesh file a served command names (default mesh.yaml), or None when argv is not one
    this module can read without click (help, unknown options: the CLI answers those)."""
    if not argv or argv[0] not in SERVED:
        return None
    valued, found = _VALUED[argv[0]], []
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in valued:
            i += 2
            continue
        if arg.startswith("-"):
            if arg in _FLAGS or any(arg.startswith(v + "=") for v in valued
                                                                  if v.startswith("--")):
                i += 1
                continue
            return None  # -h, --help, a typo: click says what it says
        found.append(arg)
        i += 1
    if i > len(argv) or len(found) > 1:
        return None
    return found[0] if found else "mesh.yaml"


def connect(path: str, timeout: float | None = None) -> socket.socket:
    """A connected socket to the server at `path` (OSError when none answers there).

    A path longer than a unix socket name may be (108 bytes) is reached from its directory."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        if len(os.fsencode(path)) < 100:
            sock.connect(path)
        else:
            here = os.open(".", os.O_RDONLY)
            try:
                os.chdir(os.path.dirname(path))
                sock.connect(os.path.basename(path))
            finally:
                os.fchdir(here)
                os.close(here)
    except OSError:
        sock.close()
        raise
    return sock


def ask(sock: socket.socket, request: dict) -> dict:
    """Send one JSON request line and read the one JSON answer line."""
    sock.sendall(json.dumps(request).encode() + b"\n")
    chunks = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            break
    data = b"".join(chunks)
    if not data.endswith(b"\n"):
        raise ConnectionError("the compile server closed the connection without an answer")
    return json.loads(data)


def _served(argv: list[str]) -> int | None:
    """The exit code of argv run by the compile server, or None to run it here."""
    if os.environ.get("MESHCTL_NO_SERVER") or os.environ.get("MESHCTL_DEBUG"):  # (debug: tracebacks here)
        return None
    file = mesh_file(argv)
    if file is None:
        return None
    path = os.path.normpath(socket_path(os.path.dirname(file) or "."))
    try:
        info = os.stat(path)
    except OSError:
        return None  # no server: the usual in-process compile, nothing said
    if info.st_uid != os.getuid():
        _note(f"{path} belongs to another user; not using it")
        return None
    try:
        sock = connect(path)
    except OSError:
        _note(f"the compile server at {path} is not running (killed?); compiling in process "
              "(`meshctl compile-server start` starts one again)")
        return None
    request = {"op": "run", "meshctl": build(), "argv": argv, "cwd": os.getcwd(),
               "tty": [sys.stdout.isatty(), sys.stderr.isatty()],
               "env": {k: os.environ[k] for k in ("NO_COLOR", "TERM", "COLUMNS") if k in os.environ}}
    try:
        with sock:
            answer = ask(sock, request)
    except (OSError, ValueError) as err:
        _note(f"the compile server at {path} did not answer ({type(err).__name__}); compiling in process")
        return None
    theirs = str(answer.get("meshctl"))
    if theirs != build():
        other = theirs.split("+")[0]
        what = f"meshctl {other}, this is meshctl {__version__}" if other != __version__ else \
            f"meshctl {other} as its files were when it started, older than this one's"
        _note(f"the compile server at {path} runs {what}: it stops now; compiling in process "
              "(`meshctl compile-server start` starts this version's)")
        return None
    if "exit" not in answer:
        _note(f"the compile server at {path} could not run it ({answer.get('error', 'no reason')}); "
              "compiling in process")
        return None
    chunks = answer.get("chunks")  # (stdout and stderr in the order the command wrote them)
    if not isinstance(chunks, list):
        chunks = [[1, answer.get("out", "")], [2, answer.get("err", "")]]
    for number, text in chunks:
        stream = sys.stdout if number == 1 else sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except BrokenPipeError:  # `meshctl plan | head`: end quietly, as the CLI does
            if stream is sys.stderr:
                continue
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
    return int(answer["exit"])


def _note(text: str) -> None:
    sys.stderr.write(f"note: {text}\n")

