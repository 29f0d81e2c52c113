"""Models by entrypoint, and the built-ins, as the compiler sees them (torch-free).

An `architecture: {entrypoint: "pkg.module:factory", args: {...}}` is pinned by the hash
of its code: every .py file of the top-level package (or the single module file),
found with the mesh.yaml's directory first on sys.path, or the files an installed
distribution's RECORD lists. What the plan needs from the module (state names, shapes,
dtypes, parameter count) comes from one subprocess
(`python -m meshctl.runtime.kernels.introspect`), cached under `.meshctl/cache/models/`
by (code hash, args, input shape, output dim, meshctl version): a warm compile starts none.
A domain re-hashes the files with `check_code` before it builds the model.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib
import importlib.machinery
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshctl import __version__
from meshctl.compiler.diagnostics import Reporter
from meshctl.compiler.plan import (
    PlanArchitecture,
    PlanCode,
    PlanCodeFile,
    PlanTensor,
    cnn_tensors,
    mlp_tensors,
    parameter_count,
)
from meshctl.compiler.resolved import Resolution, ResolvedModel

ENTRYPOINT = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
"""`pkg.module:factory`."""
TIMEOUT_S = 120.0
"""How long the introspection subprocess may take."""
FORMAT = 2
"""Version of the cache entry; part of every key (2: answers name BatchNorm layers)."""


class CodeError(Exception):
    """The code of an entrypoint cannot be found or hashed; the message is one line."""


@dataclass(frozen=True)
class Network:
    """What the plan records of one model: architecture, state tensors, parameter count."""

    architecture: PlanArchitecture
    tensors: list[PlanTensor]
    parameters: int
    input_shape: list[int]
    batch_norm: list[str] = field(default_factory=list)
    """Its BatchNorm layers (entrypoint models), which DP-SGD cannot train (MESH534)."""


def builtin_hash() -> str:
    """What `model.architecture.code_hash` is for a built-in: meshctl's own version."""
    return f"meshctl-{__version__}"


# -- the code: where it is and what it hashes to --------------------------------------------

def search_path(root: Path) -> list[str]:
    """Where an entrypoint's module is looked for: `root` (the mesh.yaml's directory) first."""
    return [str(root), *(p for p in sys.path if p and Path(p).resolve() != root.resolve())]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def locate(module: str, root: Path) -> tuple[Path, list[str], str | None]:
    """(import root, .py files relative to it, `name==version` or None) of `module`'s top-level
    package, without importing it."""
    top = module.split(".")[0]
    importlib.invalidate_caches()  # a package written since this process last looked (a long-lived service)
    spec = importlib.machinery.PathFinder.find_spec(top, search_path(root))
    if spec is None:
        raise CodeError(f"no module named {top!r} beside the mesh.yaml or on sys.path")
    if spec.submodule_search_locations:
        locations = list(spec.submodule_search_locations)
        if len(locations) != 1:
            raise CodeError(f"{top!r} is a namespace package; give it an __init__.py")
        package = Path(locations[0])
        where = package.parent
        files = sorted(p.relative_to(where).as_posix() for p in package.rglob("*.py")
                       if "__pycache__" not in p.parts)
    elif spec.origin and spec.origin.endswith(".py"):
        where = Path(spec.origin).parent
        files = [Path(spec.origin).name]
    else:
        raise CodeError(f"{top!r} is not Python source (built-in or compiled); it cannot be pinned")
    dist = None
    if where.resolve() != root.resolve():
        dist = _distribution(top, where)
    return where, files, dist


def _distribution(top: str, where: Path) -> str | None:
    """`name==version` of the installed distribution that provides `top` from `where`, if any."""
    for name in importlib.metadata.packages_distributions().get(top, []):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if Path(str(dist.locate_file(""))).resolve() == where.resolve():
            return f"{dist.metadata['Name']}=={dist.version}"
    return None


def record_hashes(dist: str, where: Path) -> dict[str, str]:
    """The sha256 (hex) of each file a distribution's RECORD lists."""
    name = dist.partition("==")[0]
    text = importlib.metadata.distribution(name).read_text("RECORD") or ""
    out = {}
    for row in csv.reader(text.splitlines()):
        if len(row) >= 2 and row[1].startswith("sha256="):
            digest = row[1].removeprefix("sha256=")
            out[row[0]] = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return out


def code_record(entrypoint: str, root: Path) -> PlanCode:
    """The pinned code of `entrypoint` as this host has it."""
    module = entrypoint.partition(":")[0]
    where, files, dist = locate(module, root)
    recorded = record_hashes(dist, where) if dist else {}
    entries = []
    for rel in files:
        try:
            entries.append(PlanCodeFile(path=rel, sha256=recorded.get(rel) or _sha256(where / rel)))
        except OSError as err:
            raise CodeError(f"cannot read {rel}: {(err.strerror or type(err).__name__).lower()}") from None
    return PlanCode(hash=code_hash(entries, dist), files=entries, distribution=dist)


def code_hash(files: list[PlanCodeFile], dist: str | None) -> str:
    """`sha256:` over (path, sha256) of each file, sorted, and the distribution."""
    h = hashlib.sha256(f"distribution\0{dist or ''}\n".encode())
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.sha256}\n".encode())
    return f"sha256:{h.hexdigest()}"


def check_code(arch: PlanArchitecture, root: Path) -> str | None:
    """Why this host must not run `arch`'s code (one line), or None when it hashes as pinned."""
    if arch.code is None or arch.entrypoint is None:
        return None
    plan = arch.code
    module = arch.entrypoint.partition(":")[0]
    try:
        where, files, dist = locate(module, root)
    except CodeError as err:
        return f"model code of {arch.entrypoint}: {err}"
    if dist != plan.distribution:
        return (f"model code of {arch.entrypoint}: distribution {dist or 'none (local files)'} here, "
                f"{plan.distribution or 'none (local files)'} in the plan")
    here = set(files)
    for f in plan.files:
        path = where / f.path
        if f.path not in here or not path.is_file():
            return f"model code file {f.path} is missing here (looked in {where})"
        if _sha256(path) != f.sha256:
            return f"model code file {f.path} differs from the plan's (sha256 {_sha256(path)[:12]} here, {f.sha256[:12]} in the plan)"
    extra = sorted(here - {f.path for f in plan.files})
    if extra:
        return f"model code file {extra[0]} is not in the plan (the package changed since the plan)"
    return None


# -- introspection -------------------------------------------------------------------------

def canonical_args(args: dict[str, Any]) -> str:
    """The factory's arguments as canonical JSON."""
    return json.dumps(args, sort_keys=True, separators=(",", ":"), allow_nan=False)


def introspect(request: dict[str, Any], cache: Path | None) -> dict[str, Any]:
    """What the introspection subprocess answers for `request` (from the cache when it can)."""
    key = hashlib.sha256(f"meshctl {__version__} model {FORMAT}\0".encode()
                         + json.dumps({k: v for k, v in request.items() if k != "root"},
                                      sort_keys=True).encode()).hexdigest()
    path = cache / f"{key}.json" if cache is not None else None
    if path is not None:
        try:
            answer = json.loads(path.read_bytes())
            if isinstance(answer, dict) and "tensors" in answer:
                return answer
        except (OSError, ValueError):
            pass
    answer = run_introspection(request)
    if path is not None and "tensors" in answer:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(answer), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:  # a read-only checkout compiles without a cache
            tmp.unlink(missing_ok=True)
    return answer


RUNS = 0
"""Introspection subprocesses this process started (tests read it)."""


def run_introspection(request: dict[str, Any]) -> dict[str, Any]:
    """Run `python -m meshctl.runtime.kernels.introspect` on `request`: its JSON answer, or
    `{"error": one line, "code": MESH5xx}`."""
    global RUNS
    RUNS += 1
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "meshctl.runtime.kernels.introspect"],
                              input=json.dumps(request), capture_output=True, text=True, check=False,
                              timeout=TIMEOUT_S, env=env, cwd=request["root"])
    except subprocess.TimeoutExpired:
        return {"code": "MESH505", "error": f"building the model took over {TIMEOUT_S:g} s"}
    except OSError as err:
        return {"code": "MESH505", "error": f"cannot start the model introspection: {err.strerror}"}
    mark = "meshctl-introspect: "  # kernels.introspect.MARK (not imported: that module needs torch)
    lines = [line for line in done.stdout.splitlines() if line.startswith(mark)]
    try:
        answer = json.loads(lines[-1].removeprefix(mark))
        if isinstance(answer, dict):
            return answer
    except (IndexError, ValueError):
        pass
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"code": "MESH505", "error": f"the model introspection failed: {last[:300]}"}


# -- what the compiler records ------------------------------------------------------------

def input_shape_of(resolved: ResolvedModel) -> list[int]:
    """The model input's shape: what the features helper resolved, else one slot per feature."""
    shape = getattr(resolved, "input_shape", None)
    return list(shape) if shape else [len(resolved.features)]


def output_dim_of(resolved: ResolvedModel) -> int:
    """classification: the number of classes; binary and regression: 1."""
    task = getattr(resolved, "task", None) or getattr(resolved.model, "task", None)
    return 1 if task in ("binary", "regression") else len(resolved.target.values)


def networks(resolution: Resolution, report: Reporter, root: Path, cache: Path | None) -> None:
    """Set `network` of each resolved model, or report why it cannot be built."""
    for resolved in resolution.models:
        resolved.network = network(resolved, report, root, cache)


def network(resolved: ResolvedModel, report: Reporter, root: Path, cache: Path | None) -> Network | None:
    """The model's architecture, tensors and parameter count, or None after a diagnostic."""
    model = resolved.model
    spec = model.architecture
    at = (*model.path, "architecture")
    shape = input_shape_of(resolved)
    output_dim = output_dim_of(resolved)
    flat = math.prod(shape)
    given = spec.model_fields_set
    if spec.entrypoint is not None:
        return _custom(resolved, report, root, cache, shape, output_dim)
    if spec.args:
        report.error("MESH518", "`args` is for an entrypoint factory; a built-in takes its own keys",
                     (*at, "args"), hint="add `entrypoint: pkg.module:factory`, or remove `args`")
        return None
    wrong = {"cnn": set(), "logistic": {"hidden", "channels", "kernel"},
             "mlp": {"channels", "kernel"}}[spec.kind] & given
    if wrong:
        key = min(wrong)
        report.error("MESH518", f"`{key}` does not apply to `kind: {spec.kind}`", (*at, key),
                     hint="cnn: channels, kernel, hidden; mlp: hidden, activation; logistic: none")
        return None
    if spec.kind == "cnn":
        if len(shape) != 3:
            report.error("MESH519", f"`kind: cnn` needs an image input [C, H, W]; model '{model.name}' "
                         f"has input shape {shape}", (*at, "kind"),
                         hint="use one `tensor` column as the only feature, or `kind: mlp`")
            return None
        if spec.kernel % 2 == 0:
            report.error("MESH518", f"cnn kernel {spec.kernel} must be odd (it is padded to keep H and W)",
                         (*at, "kernel"))
            return None
        arch = PlanArchitecture(kind="cnn", input_dim=flat, hidden=list(spec.hidden), output_dim=output_dim,
                                channels=list(spec.channels), kernel=spec.kernel)
        tensors = cnn_tensors(shape, arch.channels or [], spec.kernel, arch.hidden, output_dim)
    else:
        hidden = list(spec.hidden) if spec.kind == "mlp" else []
        arch = PlanArchitecture(kind=spec.kind, input_dim=flat, hidden=hidden, output_dim=output_dim)
        tensors = mlp_tensors(flat, hidden, output_dim)
    return Network(arch, tensors, parameter_count(tensors), shape)


def _custom(resolved: ResolvedModel, report: Reporter, root: Path, cache: Path | None,
            shape: list[int], output_dim: int) -> Network | None:
    model = resolved.model
    return custom_network(model.architecture, (*model.path, "architecture"), report, root, cache, shape,
                          output_dim, {"kind", "hidden", "channels", "kernel", "activation"})


def custom_network(spec: Any, at: tuple[Any, ...], report: Reporter, root: Path, cache: Path | None,
                   shape: list[int], output_dim: int | None, builtin_keys: set[str]) -> Network | None:
    """An entrypoint model's network (`spec` has `entrypoint`, `args`), or None after a diagnostic at `at`.
    `builtin_keys` are the built-in's keys that must not be given beside `entrypoint`; `output_dim`
    None lets the module choose its output width (a split model's bottom), read from its forward."""
    entrypoint = spec.entrypoint or ""
    if not ENTRYPOINT.fullmatch(entrypoint):
        report.error("MESH518", f"entrypoint '{entrypoint}' is not `package.module:factory`",
                     (*at, "entrypoint"), hint='e.g. `entrypoint: "digits_cnn.model:build"`')
        return None
    extra = sorted(builtin_keys & spec.model_fields_set)
    if extra:
        report.error("MESH518", f"`{extra[0]}` does not apply to an entrypoint model (pass it in `args`)",
                     (*at, extra[0]))
        return None
    bad = next((k for k, v in spec.args.items() if not _json_arg(v)), None)
    if bad is not None:
        report.error("MESH518", f"entrypoint argument '{bad}' is not a JSON scalar or a list of them",
                     (*at, "args", bad))
        return None
    try:
        args = canonical_args(spec.args)
        code = code_record(entrypoint, root)
    except ValueError:
        report.error("MESH518", "entrypoint arguments must be finite numbers", (*at, "args"))
        return None
    except CodeError as err:
        report.error("MESH505", f"entrypoint {entrypoint}: {err}", (*at, "entrypoint"))
        return None
    answer = introspect({"root": str(root), "entrypoint": entrypoint, "args": json.loads(args),
                         "input_shape": shape, "output_dim": output_dim, "code": code.hash}, cache)
    if "error" in answer or "tensors" not in answer:
        code_id = answer.get("code") if answer.get("code") in ("MESH505", "MESH517", "MESH519", "MESH576") \
            else "MESH505"
        report.error(code_id, f"entrypoint {entrypoint}: {answer.get('error', 'no answer')}",
                     (*at, "entrypoint"))
        return None
    tensors = [PlanTensor(name=t["name"], shape=list(t["shape"])) for t in answer["tensors"]]
    if output_dim is None:
        output_dim = int(answer["output_dim"])
    arch = PlanArchitecture(kind="custom", input_dim=math.prod(shape), hidden=[], output_dim=output_dim,
                            entrypoint=entrypoint, args=args, code=code)
    return Network(arch, tensors, parameter_count(tensors), shape, [str(n) for n in answer.get("batch_norm", [])])


def _json_arg(value: Any) -> bool:
    if isinstance(value, list):
        return all(_json_arg(v) for v in value)
    return value is None or isinstance(value, (str, bool, int, float))


def architecture_facts(arch: PlanArchitecture) -> dict[str, Any]:
    """`model.architecture` as policies see it, at compile time and in the domains alike:
    kind, hidden, activation, entrypoint ("" for a built-in), code_hash (a built-in's is
    meshctl's version), and channels/kernel (cnn) or args (entrypoint) where they apply."""
    facts: dict[str, Any] = {"kind": arch.kind, "hidden": list(arch.hidden), "activation": arch.activation,
                             "entrypoint": arch.entrypoint or "",
                             "code_hash": arch.code.hash if arch.code is not None else builtin_hash()}
    if arch.channels is not None:
        facts |= {"channels": list(arch.channels), "kernel": arch.kernel}
    if arch.args is not None:
        facts["args"] = json.loads(arch.args)
    return facts


def short_hash(code: PlanCode | None) -> str:
    """`sha256:362633c8ed38` (12 hex digits), or "" for a built-in."""
    return code.hash[:19] if code is not None else ""


def label(arch: PlanArchitecture) -> str:
    """How `plan`, `show` and plan diffs name a model: `mlp 10-32-2`, `cnn[16,32] 64-64-10`,
    `digits_cnn.model:build(channels=16) 64->10, code sha256:362633c8ed38`."""
    dims = "-".join(str(d) for d in [arch.input_dim, *arch.hidden, arch.output_dim])
    if arch.kind == "cnn":
        return f"cnn[{','.join(str(c) for c in arch.channels or [])}] {dims}"
    if arch.kind != "custom":
        return f"{arch.kind} {dims}"
    args = ", ".join(f"{k}={json.dumps(v)}" for k, v in json.loads(arch.args or "{}").items())
    return f"{arch.entrypoint}({args}) {arch.input_dim}->{arch.output_dim}, code {short_hash(arch.code)}"
