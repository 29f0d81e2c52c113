"""`meshctl codeowners`: a GitHub CODEOWNERS file from the owners the mesh declares.

Each included file is owned by the `owner`s of the domains it declares; mesh.yaml,
files that declare no domain (shared contracts) and the CODEOWNERS file itself are
owned by `mesh.owner`, the governance team. Paths are anchored at the root of the
git repository that holds mesh.yaml (its directory when it is in none). GitHub
lets the last matching line win, so the governance line comes first and covers the
mesh's whole directory.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from meshctl.compiler.compile import OWNER, CompileResult
from meshctl.compiler.include import MeshMap

_SPECIAL = re.compile(r"([\s#*?\[\]!\\])")


@dataclass(frozen=True)
class Problem:
    """An owner that cannot go into CODEOWNERS, at its position."""

    where: str
    message: str


@dataclass
class Codeowners:
    """The CODEOWNERS text, or the problems that keep it from being written."""

    text: str = ""
    problems: list[Problem] = field(default_factory=list)


def repo_top(directory: Path) -> Path:
    """The top of the git repository holding `directory`, else `directory` itself."""
    try:
        shown = subprocess.run(["git", "-C", str(directory), "rev-parse", "--show-toplevel"],
                               capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return directory
    return Path(shown.stdout.decode().strip()).resolve() if shown.returncode == 0 else directory


def pattern(path: Path, top: Path) -> str:
    """`/dir/file.yaml`: `path` anchored at `top`, with CODEOWNERS' special characters escaped."""
    rel = path.resolve().relative_to(top).as_posix()
    return "/" + _SPECIAL.sub(r"\\\1", rel)


def make_codeowners(result: CompileResult, mesh: Path, output: Path | None = None) -> Codeowners:
    """CODEOWNERS for a compiled mesh; `output` (when inside the repository) is owned by
    governance too."""
    spec, loaded = result.spec, result.loaded
    assert spec is not None and loaded is not None and spec.mesh is not None
    directory = mesh.resolve().parent
    top = repo_top(directory)
    out = Codeowners()
    smap = loaded.map
    governance = spec.mesh.owner
    if not governance:
        line, col = smap.locate(("mesh",), key=True)
        out.problems.append(Problem(f"{mesh}:{line}:{col}", "mesh.owner is not set: it names the "
                                    "governance team that owns mesh.yaml (an email, @user or @org/team)"))
    owners: dict[str, list[str]] = {i.name: [] for i in result.includes}
    inline: list[str] = []
    for domain in spec.domains:
        line, col = smap.locate((*domain.path, "owner"))
        part = smap.split(domain.path)[0] if isinstance(smap, MeshMap) else -1
        file = result.includes[part] if part >= 0 else None
        where = f"{file.label if file else mesh}:{line}:{col}"
        if not domain.owner:
            out.problems.append(Problem(where, f"domain '{domain.name}' has no owner"))
        elif not OWNER.fullmatch(domain.owner):
            out.problems.append(Problem(where, f"owner '{domain.owner}' of domain '{domain.name}' "
                                        "is not an email, @user or @org/team"))
        elif file is None:
            inline.append(domain.name)
        elif domain.owner not in owners[file.name]:
            owners[file.name].append(domain.owner)
    if out.problems:
        return out
    lines = ["# Written by `meshctl codeowners` from the owners in the mesh; edit them there.",
             "# Governance: mesh.yaml, shared files and everything else in the mesh's directory."]
    scope = pattern(directory, top).rstrip("/") + "/" if directory != top else "*"
    lines += [f"{scope} {governance}", f"{pattern(mesh, top)} {governance}"]
    if inline:
        lines.append(f"# Declared in mesh.yaml, so owned by governance: {', '.join(inline)}")
    lines.append("# Domain files, each reviewed by its domain's owners.")
    for included in result.includes:
        who = owners[included.name] or [governance]
        lines.append(f"{pattern(directory / included.name, top)} {' '.join(who)}")
    if output is not None and output.resolve().is_relative_to(top):
        lines.append(f"{pattern(output, top)} {governance}")
    out.text = "\n".join(lines) + "\n"
    return out


_LINE_OWNER = re.compile(r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:/[A-Za-z0-9._-]+)?"
                         r"|[^@\s]+@[^@\s]+\.[^@\s]+")


def check_codeowners(text: str) -> list[str]:
    """Problems GitHub would report in a CODEOWNERS file: `LINE: why` for each bad line.

    A line is blank, a `#` comment, or a path pattern followed by one or more owners
    (@user, @org/team, email); `!` negation and `[ ]` ranges are not supported; a space
    in a pattern must be escaped.
    """
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = re.split(r"(?<!\\)\s+", line.strip())
        path, owners = parts[0], parts[1:]
        if path.startswith("!"):
            problems.append(f"{n}: negation (!) is not supported")
        elif re.search(r"(?<!\\)[\[\]]", path):
            problems.append(f"{n}: character ranges ([ ]) are not supported")
        elif not owners:
            problems.append(f"{n}: a pattern needs at least one owner")
        for owner in owners:
            if owner.startswith("#"):
                break  # a trailing comment
            if not _LINE_OWNER.fullmatch(owner):
                problems.append(f"{n}: '{owner}' is not an email, @user or @org/team")
    return problems
