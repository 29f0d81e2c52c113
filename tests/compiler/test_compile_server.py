"""The compile server (issue 16): a real server process on a real unix socket answers `meshctl
validate` and `plan` with the bytes and exit code of the same command in process; a stale server
(another meshctl version), a killed one and an idle one are handled in one line."""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from test_include import write_split
from test_include_cache import _same

from meshctl.cli import main
from meshctl.compiler.compile import compile_bytes, compile_mesh
from meshctl.compiler.include import DirFiles
from meshctl.compiler.server import ResidentCache, request, socket_of

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
ENV.pop("MESHCTL_NO_SERVER", None)


def meshctl(*args: str, cwd: Path, served: bool = True, python: tuple[str, ...] = ()) -> Ran:
    """`meshctl ARGS` in `cwd`: as a user runs it (python -m meshctl, through the server if one
    answers), or with `served=False` the same command in this process (meshctl.cli, no server)."""
    if served:
        out = subprocess.run([sys.executable, *python, "-m", "meshctl", *args], cwd=cwd, env=ENV,
                             capture_output=True, text=True, timeout=120, check=False)
        return Ran(out.returncode, out.stdout, out.stderr)
    here = os.getcwd()
    os.chdir(cwd)
    try:
        got = CliRunner().invoke(main, list(args), prog_name="meshctl")
    finally:
        os.chdir(here)
    return Ran(got.exit_code, got.stdout, got.stderr)


@dataclass
class Ran:
    """A command's exit code and output."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Path]:
    """A split mesh whose compile server, if a test starts one, is stopped afterwards."""
    mesh = write_split(tmp_path / "m")
    yield mesh
    status = request(mesh.parent.resolve(), "status")
    if status is not None:
        request(mesh.parent.resolve(), "stop")
        _wait_gone(status["pid"])


def _wait_gone(pid: int) -> None:
    """Wait until the server process `pid` has exited (not a child of the test: a pidfd says)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        readable, _, _ = select.select([fd], [], [], 60)
        assert readable, f"compile server {pid} did not exit"
    finally:
        os.close(fd)


def _started(mesh: Path) -> int:
    out = meshctl("compile-server", "start", "--idle-minutes", "5", cwd=mesh.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"compile server started for {mesh.parent.resolve()} (pid ")
    return int(out.stdout.split("(pid ")[1].split(",")[0])


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_served_commands_print_what_the_in_process_ones_print(mesh: Path) -> None:
    """Through a real server: the same stdout, stderr, exit code and plan file, over edits; the
    socket's mode and owner; status and stop; a client that imports neither pydantic nor yaml."""
    root = mesh.parent
    pid = _started(mesh)
    sock = socket_of(root)
    info = sock.stat()
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
    status = meshctl("compile-server", "status", cwd=root)
    assert status.returncode == 0 and str(pid) in status.stdout
    again = meshctl("compile-server", "start", cwd=root)  # one server per mesh directory
    assert again.stdout == f"compile server already running for {root.resolve()} (pid {pid})\n"
    domain, contracts = root / "domains" / "charite.yaml", root / "contracts.yaml"
    edits = [None,
             (contracts, "purposes: [cancer-research]", "purposes: [audit]"),  # a policy denies
             (domain, "  - name:", "  - name: [broken"),                         # and a syntax error
             (domain, "  - name: [broken", "  - name:"),
             (contracts, "purposes: [audit]", "purposes: [cancer-research]")]  # the plan changes back
    plan, codes = root / "p.toml", set()
    for edit in edits:
        if edit is not None:
            _edit(*edit)
        for args in (["validate", "--format", "json"] if edit is None else ["validate"],
                     ["plan", "-o", "p.toml", "--detailed-exitcode"]):
            before = plan.read_bytes() if plan.exists() else None
            here = meshctl(*args, cwd=root, served=False)
            written = plan.read_bytes() if plan.exists() else None
            if before is None:
                plan.unlink(missing_ok=True)
            else:
                plan.write_bytes(before)
            there = meshctl(*args, cwd=root)
            assert (there.returncode, there.stdout, there.stderr) == (here.returncode, here.stdout, here.stderr)
            assert (plan.read_bytes() if plan.exists() else None) == written
            codes.add(there.returncode)
    assert codes == {0, 1, 2}  # ok, errors, and a changed plan were each served
    row = meshctl("compile-server", "status", cwd=root).stdout.splitlines()[1].split()
    assert row[0] == str(pid) and row[2] == str(2 * len(edits))  # REQUESTS
    timed = meshctl("validate", cwd=root, python=("-X", "importtime"))  # the thin client's imports
    assert timed.returncode == 0 and timed.stdout.startswith("mesh.yaml: ok")
    imported = {line.split("|")[-1].strip() for line in timed.stderr.splitlines() if line.startswith("import time:")}
    assert "meshctl.client" in imported
    assert not {m for m in imported if m.split(".")[0] in ("pydantic", "yaml", "click", "rich", "torch")}
    out = meshctl("compile-server", "stop", cwd=root)
    assert out.stdout == f"stopped the compile server of {root.resolve()} (pid {pid})\n"
    _wait_gone(pid)
    assert not sock.exists()
    gone = meshctl("compile-server", "status", cwd=root)
    assert gone.returncode == 3 and gone.stdout.startswith("no compile server running")


def test_the_thin_client_knows_every_option_of_the_served_commands() -> None:
    """An option the client does not know sends the command in process, unserved, without a word (how
    `plan --decisions` went unserved): every option of `validate` and `plan` is in its lists."""
    from meshctl import client

    for name in client.SERVED:
        for param in main.commands[name].params:
            if isinstance(param, click.Option) and param.name != "help":
                known = client._FLAGS if param.is_flag else client._VALUED[name]
                assert set(param.opts) <= set(known), (name, param.opts)
    assert client.mesh_file(["plan", "--decisions", "all"]) == "mesh.yaml"


def _merged(*args: str, cwd: Path, served: bool) -> str:
    """What `meshctl ARGS 2>&1` shows: stdout and stderr in one stream, in the order written."""
    env = ENV if served else {**ENV, "MESHCTL_NO_SERVER": "1"}
    return subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120, check=False).stdout


def test_served_output_interleaves_stdout_and_stderr_as_in_process(mesh: Path) -> None:
    """`meshctl plan 2>&1` through the server shows the warnings where the command wrote them (before
    the plan's summary), not all of stdout first (what a reviewer found)."""
    root = mesh.parent
    here = _merged("plan", "--decisions", "all", cwd=root, served=False)
    (root / "mesh.plan.toml").unlink()
    _started(mesh)
    there = _merged("plan", "--decisions", "all", cwd=root, served=True)
    assert here.index("warning[MESH411]") < here.index("wrote mesh.plan.toml")  # stderr, then stdout
    assert there == here


def test_a_killed_server_is_said_in_one_line_and_a_start_replaces_it(mesh: Path) -> None:
    root = mesh.parent
    pid = _started(mesh)
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)
    here = meshctl("validate", cwd=root, served=False)
    there = meshctl("validate", cwd=root)
    note, _, rest = there.stderr.partition("\n")
    assert note.startswith("note: the compile server at .meshctl/compile.sock is not running")
    assert (there.returncode, there.stdout, rest) == (here.returncode, here.stdout, here.stderr)
    assert "stale socket" in meshctl("compile-server", "status", cwd=root).stdout
    again = _started(mesh)
    assert again != pid and meshctl("validate", cwd=root).stderr == here.stderr


def _old_server(root: Path) -> subprocess.Popen[bytes]:
    """The server an earlier meshctl (0.0.1) started for `root` (before an upgrade), answering."""
    read, write = os.pipe()
    old = subprocess.Popen(
        [sys.executable, "-c", ("import sys, meshctl; meshctl.__version__ = '0.0.1'; "
                                "from meshctl.cli import main; main(['compile-server', 'serve', *sys.argv[1:]])"),
         str(root), "--ready-fd", str(write)], pass_fds=(write,), env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read, "rb") as ready:
        assert ready.read() == f"ready {old.pid}\n".encode()
    return old


def test_stop_names_the_pid_of_a_server_of_another_version(mesh: Path) -> None:
    old = _old_server(mesh.parent)
    out = meshctl("compile-server", "stop", cwd=mesh.parent)
    assert out.stdout == f"stopped the compile server of {mesh.parent.resolve()} (pid {old.pid})\n"  # not `pid ?`
    assert old.wait(timeout=60) == 0


def test_a_server_of_another_version_stops_and_the_client_compiles_itself(mesh: Path) -> None:
    root = mesh.parent
    old = _old_server(root)
    here = meshctl("validate", cwd=root, served=False)
    there = meshctl("validate", cwd=root)
    note, _, rest = there.stderr.partition("\n")
    assert note == ("note: the compile server at .meshctl/compile.sock runs meshctl 0.0.1, "
                    "this is meshctl 0.1.0: it stops now; compiling in process (`meshctl compile-server start` "
                    "starts this version's)")
    assert (there.returncode, there.stdout, rest) == (here.returncode, here.stdout, here.stderr)
    assert old.wait(timeout=60) == 0
    assert not socket_of(root).exists()


def test_an_idle_server_stops_itself(mesh: Path) -> None:
    out = meshctl("compile-server", "start", "--idle-minutes", "0.005", cwd=mesh.parent)
    assert out.returncode == 0, out.stderr
    _wait_gone(int(out.stdout.split("(pid ")[1].split(",")[0]))
    assert not socket_of(mesh.parent).exists()
    assert "stopping: idle for 0 s" in (mesh.parent / ".meshctl" / "compile-server.log").read_text()


class _EditedWhileRead(DirFiles):
    """The working tree, where one file is edited right after the compile read it."""

    def __init__(self, root: Path, name: str, old: str, new: str) -> None:
        super().__init__(root)
        self.edit = (name, old, new)

    def read(self, name: str) -> bytes:
        raw = super().read(name)
        if self.edit is not None and name == self.edit[0]:
            _edit(self.root / name, *self.edit[1:])
            self.edit = None
        return raw


def test_a_file_edited_while_compiling_is_compiled_as_read_then_as_edited(mesh: Path) -> None:
    resident = ResidentCache(mesh.parent / ".meshctl" / "cache")
    compile_mesh(mesh, cache=resident)  # type: ignore[arg-type]
    resident.end()
    contracts = mesh.parent / "contracts.yaml"
    before = contracts.read_text()
    files = _EditedWhileRead(mesh.parent, "contracts.yaml", "purposes: [cancer-research]", "purposes: [audit]")
    during = compile_bytes(mesh.read_bytes(), mesh, files=files, cache=resident)  # type: ignore[arg-type]
    resident.end()
    after = contracts.read_text()
    assert files.edit is None and after != before
    contracts.write_text(before)
    _same(compile_mesh(mesh), during)  # what the compile read: the file before the edit
    assert during.plan is not None
    contracts.write_text(after)
    served = compile_mesh(mesh, cache=resident)  # type: ignore[arg-type]
    resident.end()
    _same(compile_mesh(mesh), served)
    assert served.plan is None and "MESH410" in {d.code for d in served.diagnostics}  # the edit: denied


def test_served_plan_diffs_from_its_kept_blocks_and_any_other_file_as_before(mesh: Path) -> None:
    """`meshctl plan` through a server, against: no plan file, its own last plan (an edit, then
    none), a plan file edited by hand, a deleted one: the in-process command's output, exit code and
    file; the diff took its blocks from the server's kept texts only where the file was its text."""
    root = mesh.parent
    _started(mesh)
    domain, plan = root / "domains" / "charite.yaml", root / "mesh.plan.toml"

    def hand_edit() -> None:
        _edit(plan, 'classification = "restricted"', 'classification = "public"')

    steps = [("no plan file", None), ("its own plan, a domain edited", (domain, "description: ", "description: Edited. ")),
             ("its own plan, unchanged", None), ("a plan edited by hand", hand_edit),
             ("its own plan, a domain edited", (domain, "description: Edited. ", "description: ")),
             ("a deleted plan file", plan.unlink)]
    for name, edit in steps:
        if callable(edit):
            edit()
        elif edit is not None:
            _edit(*edit)
        before = plan.read_bytes() if plan.exists() else None
        here = meshctl("plan", "--detailed-exitcode", cwd=root, served=False)
        written = plan.read_bytes()
        if before is None:
            plan.unlink()
        else:
            plan.write_bytes(before)
        there = meshctl("plan", "--detailed-exitcode", cwd=root)
        assert (there.returncode, there.stdout, there.stderr) == (here.returncode, here.stdout, here.stderr), name
        assert plan.read_bytes() == written, name
    status = request(root.resolve(), "status")
    assert status is not None and status["plan_texts"]["diffs"] == 2  # the two edits of its own plan
    assert status["plan_texts"]["kept"] > status["plan_texts"]["made"]
