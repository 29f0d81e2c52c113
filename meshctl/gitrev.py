"""Read a mesh.yaml as it is at a git revision, and compile it.

`meshctl plan --against REV` and `meshctl diff BASE [HEAD]` name revisions the
way git does: `main`, `HEAD~1`, or `origin/main:path/mesh.yaml`. A revision
without a path means the working-tree mesh.yaml's path inside the repository.
This module runs `git` (a process), so it lives outside the pure compiler; the
text it reads is compiled with `compile_bytes`, as if it were the working-tree
file, so data paths resolve from the working tree's mesh.yaml directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from meshctl.compiler.breaking import Side
from meshctl.compiler.compile import CompileResult, compile_bytes
from meshctl.compiler.include import match
from meshctl.compiler.loader import Source
from meshctl.compiler.spec import SECTIONS
from meshctl.errors import UserError


class UnknownRevision(UserError):
    """A revision git does not know (its message says so; `load_side` may say "no such file")."""


@dataclass(frozen=True)
class Revision:
    """A mesh.yaml read from git: the revision, its path in the repository, its bytes."""

    rev: str
    path: str
    """Path inside the repository (as `git show REV:PATH` takes it)."""
    raw: bytes

    @property
    def label(self) -> str:
        """`REV:PATH`, the name positions and errors use."""
        return f"{self.rev}:{self.path}"


def split_revision(arg: str) -> tuple[str, str | None]:
    """`("origin/main", "sub/mesh.yaml")` for `origin/main:sub/mesh.yaml`, `("main", None)`."""
    rev, sep, path = arg.partition(":")
    return (rev, path or None) if sep else (arg, None)


def read_revision(arg: str, mesh: Path) -> Revision:
    """The mesh.yaml at revision `arg` (`REV` or `REV:PATH`); `mesh` is the working-tree file.

    Raises UserError (one line) when git is missing, the directory is not in a
    repository, the revision is unknown, or the file is absent at that revision.
    """
    rev, path = split_revision(arg)
    if not rev or rev.startswith("-"):
        raise UserError(f"'{arg}' is not a git revision", hint="e.g. main, HEAD~1, origin/main")
    cwd = _existing_dir(mesh.resolve().parent)
    top = repo_root(cwd)
    if path is None:
        try:
            path = mesh.resolve().relative_to(top).as_posix()
        except ValueError:
            raise UserError(f"{mesh} is not inside the git repository at {top}") from None
    if _git(cwd, "rev-parse", "--verify", "--quiet", "--end-of-options",
            f"{rev}^{{commit}}").returncode != 0:
        raise UnknownRevision(f"unknown git revision '{rev}'",
                        hint="`git branch -a` lists branches; fetch first in a shallow clone")
    shown = _git(cwd, "show", "--end-of-options", f"{rev}:{path}")
    if shown.returncode != 0:
        raise UserError(f"{path} does not exist at revision {rev}",
                        hint="name the file with REV:PATH, PATH relative to the repository root")
    return Revision(rev, path, shown.stdout)


class GitFiles:
    """The files beside a mesh.yaml as they are at a revision: what its `include:` reads."""

    def __init__(self, revision: Revision, mesh: Path) -> None:
        self.rev = revision.rev
        self.cwd = _existing_dir(mesh.resolve().parent)
        parent = Path(revision.path).parent.as_posix()
        self.dir = "" if parent == "." else parent + "/"
        self._names: list[str] | None = None

    def read(self, name: str) -> bytes:
        """`git show REV:DIR/NAME`; FileNotFoundError when the revision has no such file."""
        shown = _git(self.cwd, "show", "--end-of-options", f"{self.rev}:{self.dir}{name}")
        if shown.returncode != 0:
            raise FileNotFoundError(2, "no such file")
        return shown.stdout

    def glob(self, pattern: str) -> list[str]:
        """The revision's files under mesh.yaml's directory that match `pattern`, sorted."""
        if self._names is None:
            listed = _git(self.cwd, "ls-tree", "-r", "-z", "--name-only", "--full-tree",
                          "--end-of-options", self.rev, "--", self.dir or ".")
            names = listed.stdout.decode(errors="replace").split("\0")
            self._names = [n[len(self.dir):] for n in names if n.startswith(self.dir) and n]
        return match(pattern, self._names)


def compile_revision(arg: str, mesh: Path) -> tuple[Revision, CompileResult]:
    """Read and compile the mesh.yaml at revision `arg` with that revision's includes,
    resolving data beside `mesh`."""
    revision = read_revision(arg, mesh)
    return revision, compile_bytes(revision.raw, mesh, files=GitFiles(revision, mesh))


def load_side(arg: str, mesh: Path) -> Side:
    """BASE or HEAD of `meshctl diff`: an existing file, else a git revision.

    A side whose YAML or schema is broken is a one-line UserError; reference,
    policy and data-file errors do not stop a diff (the spec is complete).
    """
    file = Path(arg)
    files: GitFiles | None = None
    if file.is_file():
        label, raw, where = arg, file.read_bytes(), file
    else:
        if _looks_like_file(arg):
            raise UserError("not a file" if file.exists() else "no such file", where=arg)
        try:
            revision = read_revision(arg, mesh)
        except UnknownRevision:
            if "/" not in arg or ":" in arg:
                raise
            raise UserError("no such file or git revision", where=arg,
                            hint="BASE and HEAD are mesh.yaml files or revisions (main, HEAD~1)") from None
        label, raw, where = revision.label, revision.raw, mesh
        files = GitFiles(revision, mesh)
    result = compile_bytes(raw, where, hashed=False, files=files)  # a diff reads the spec
    source = result.loaded
    problem = _unusable(result, source)
    if problem:
        raise UserError(f"does not compile: {problem}", where=label,
                        hint="`meshctl validate` shows every problem")
    assert result.spec is not None and source is not None  # _unusable checked both
    return Side(result.spec, source.map, label)


def _looks_like_file(arg: str) -> bool:
    """`old/mesh.yaml` or `x.yml`, not `REV:PATH`: an argument no revision could mean."""
    return ":" not in arg and arg.endswith((".yaml", ".yml"))


def _unusable(result: CompileResult, source: Source | None) -> str | None:
    """Why a compiled side cannot be diffed: no spec, or items that failed to parse.

    Reference, policy and data-file errors leave every item in the spec, so the
    diff can still be made; YAML and schema errors drop items, which would show
    up as removals.
    """
    first = result.errors[0] if result.errors else None
    where = f"line {first.line}: {first.message}" if first else ""
    if result.spec is None or source is None or result.spec.mesh is None:
        return where or "not a mesh.yaml"
    data = source.data if isinstance(source.data, dict) else {}
    for section in SECTIONS:
        items = data.get(section) or []
        if isinstance(items, list) and len(getattr(result.spec, section)) != len(items):
            bad = next((e for e in result.errors if e.code.startswith("MESH2")), first)
            return f"line {bad.line}: {bad.message}" if bad else f"invalid {section}"
    return None


def repo_root(cwd: Path) -> Path:
    """The top directory of the git repository that contains `cwd`."""
    if shutil.which("git") is None:
        raise UserError("git is not installed", hint="install git, or compare two files")
    top = _git(cwd, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise UserError(f"{cwd} is not inside a git repository",
                        hint="run it in a clone, or compare two files")
    return Path(top.stdout.decode().strip()).resolve()


def _existing_dir(path: Path) -> Path:
    """`path` or its nearest existing ancestor (git needs a real working directory)."""
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run git in `cwd` without a prompt, capturing its output."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, env=env,
                          check=False)
