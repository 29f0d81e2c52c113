"""The `meshctl` command line: parse, call one library function, render, exit code.

Every command body is short; the work lives in meshctl.compiler, meshctl.runtime
and meshctl.tui. User errors print one line and exit 1; internal errors exit 2.
Heavy imports (torch, textual) happen inside the commands that need them.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from meshctl import __version__
from meshctl.errors import MeshctlError, UserError

MESH_FILE = click.argument(
    "file", type=click.Path(dir_okay=False, path_type=Path), default="mesh.yaml", required=False
)


def reports_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn MeshctlError into one line on stderr and its exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MeshctlError as err:
            click.echo(err.render(), err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as err:  # noqa: BLE001 - a bug: one line, the traceback only on request
            if os.environ.get("MESHCTL_DEBUG"):
                raise
            click.echo(f"internal error: {type(err).__name__}: {err} (set MESHCTL_DEBUG=1 for the traceback)",
                       err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshctl")
def main() -> None:
    """Run a federated data mesh declared in one mesh.yaml."""


# ---------------------------------------------------------------------------
# compiler commands: validate, plan, explain, schema  (meshctl.compiler)
# ---------------------------------------------------------------------------


def _compile_or_exit(file: Path):  # noqa: ANN202 - returns meshctl.compiler.compile.CompileResult
    """Compile FILE; on errors print every diagnostic and `N errors`, then exit 1."""
    from meshctl.compiler.compile import compile_mesh
    from meshctl.errors import UserError

    if not file.is_file():
        raise UserError("no such file" if not file.exists() else "not a file", where=str(file))
    result = compile_mesh(file)
    if result.diagnostics:
        click.echo(result.render_diagnostics(), err=True)
    if result.plan is None:
        n = len(result.errors)
        click.echo(f"{n} error{'s' if n != 1 else ''}", err=True)
        sys.exit(1)
    return result


@main.command()
@MESH_FILE
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True,
              help="json: one object like `terraform validate -json`, on stdout.")
@click.option("--strict", is_flag=True, help="Treat warnings as errors (exit 1).")
@reports_errors
def validate(file: Path, fmt: str, strict: bool) -> None:
    """Check FILE (default mesh.yaml) and report every problem with its position."""
    from meshctl.compiler.summary import describe_counts

    if fmt == "json":
        import json

        from meshctl.compiler.compile import compile_mesh
        from meshctl.compiler.diagnostics import json_report

        report = json_report(compile_mesh(file).diagnostics, strict=strict)
        click.echo(json.dumps(report, indent=2))
        sys.exit(0 if report["valid"] else 1)
    result = _compile_or_exit(file)
    n = len(result.warnings)
    if strict and n:
        plural = "s" if n != 1 else ""
        click.echo(f"{n} warning{plural} (--strict: warnings are errors)", err=True)
        sys.exit(1)
    tail = f" ({n} warning{'s' if n != 1 else ''})" if n else ""
    click.echo(f"{file}: ok \u2014 {describe_counts(result.spec)}{tail}")


@main.command("plan")
@MESH_FILE
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the plan [default: mesh.plan.toml beside FILE].")
@click.option("--detailed-exitcode", is_flag=True,
              help="Exit 0 when nothing changed, 1 on errors, 2 when the plan changed.")
@reports_errors
def plan_command(file: Path, output: Path | None, detailed_exitcode: bool) -> None:
    """Compile FILE into mesh.plan.toml, the reviewable plan the runtime executes.

    If the output file already holds a plan, print what changes against it.
    """
    from meshctl.compiler.plandiff import diff_plans, render_changes
    from meshctl.compiler.summary import render_plan_summary

    plan = _compile_or_exit(file).plan
    out = output or file.with_name("mesh.plan.toml")
    previous = _previous_plan(out)
    click.echo(render_plan_summary(plan))
    changed = True  # no previous plan: everything is new
    if previous is not None:
        changes = diff_plans(previous, plan)
        click.echo(render_changes(changes))
        changed = bool(changes)
    plan.write(out)
    click.echo(f"wrote {out}")
    if detailed_exitcode and changed:
        sys.exit(2)


def _previous_plan(path: Path):  # noqa: ANN202 - returns meshctl.compiler.plan.Plan | None
    """The plan at `path`, or None when there is none or it cannot be read (with a note)."""
    from meshctl.compiler.plan import Plan

    if not path.is_file():
        return None
    try:
        return Plan.read(path)
    except (OSError, ValueError) as err:  # TOML, UTF-8 and pydantic errors are ValueErrors
        reason = type(err).__name__
        click.echo(f"{path}: note: not a readable plan ({reason}); not diffing against it",
                   err=True)
        return None


@main.command()
@click.argument("code", required=False)
@reports_errors
def explain(code: str | None) -> None:
    """Explain a diagnostic CODE (MESH402 or 402); without CODE, list every code."""
    from meshctl.compiler.diagnostics import CODES, normalize_code, stage_of

    if code is None:
        for known, text in CODES.items():
            click.echo(f"{known}  {stage_of(known):<24}  {text}")
        return
    known = normalize_code(code)
    if known not in CODES:
        raise UserError(f"unknown diagnostic code '{code}'",
                        hint="`meshctl explain` lists every code")
    click.echo(f"{known} ({stage_of(known)})")
    click.echo(CODES[known])


@main.command()
def schema() -> None:
    """Print the JSON Schema of mesh.yaml, for editor completion."""
    import json

    from meshctl.compiler.spec import MeshSpec

    click.echo(json.dumps(MeshSpec.model_json_schema(by_alias=True), indent=2))


# ---------------------------------------------------------------------------
# runtime commands: up, daemon, coordinator  (meshctl.runtime)
# ---------------------------------------------------------------------------
# (filled in by the runtime work)


@main.command()
@MESH_FILE
@click.option("--headless", is_flag=True, help="Print one line per round instead of the dashboard.")
@click.option("--address", metavar="tcp://HOST:PORT",
              help="Coordinator address instead of mesh.yaml's; port 0 picks free ports.")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True,
              help="torch threads per daemon.")
@reports_errors
def up(file: Path, headless: bool, address: str | None, threads: int) -> None:
    """Compile FILE, start a coordinator and one daemon per local domain, and train."""
    from meshctl.runtime.launcher import run_headless, start_run

    plan = _compile_or_exit(file).plan
    run = start_run(file, plan, address=address, threads=threads)
    if headless or not sys.stdout.isatty():
        result = run_headless(run, click.echo)
    else:
        from meshctl.tui.run import run_dashboard

        result = run_dashboard(run)
        click.echo(f"run {'completed' if result.ok else 'failed'}: {result.run_dir}")
    if not result.ok:
        raise UserError(result.reason or "run failed") from None


@main.command(hidden=True)
@click.option("--run-dir", required=True, type=click.Path(exists=True, file_okay=False))
def coordinator(run_dir: str) -> None:
    """Internal: the coordinator process of a run prepared by `meshctl up`."""
    from meshctl.runtime.coordinator import main as coordinator_main

    sys.exit(coordinator_main(run_dir))


@main.command()
@click.option("--plan", "plan_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The mesh.plan.toml both sides share.")
@click.option("--domain", required=True, help="Which domain of the plan this daemon serves.")
@click.option("--coordinator", "endpoint", required=True, metavar="tcp://HOST:PORT")
@click.option("--server-key", required=True, help="The coordinator's Z85 Curve public key.")
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="This domain's Curve secret key file.")
@click.option("--base-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory product sources are relative to (default: the plan's).")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True)
@reports_errors
def daemon(plan_file: Path, domain: str, endpoint: str, server_key: str, key_file: Path,
           base_dir: Path | None, threads: int) -> None:
    """Run one domain's daemon on this host and connect it to a coordinator."""
    from meshctl.compiler.plan import Plan
    from meshctl.runtime.daemon import Daemon, DaemonConfig
    from meshctl.runtime.keys import KeyPair, check_public_key

    try:
        plan = Plan.read(plan_file)
    except (ValueError, OSError) as err:  # tomllib and pydantic errors are ValueErrors
        raise UserError(f"not a meshctl plan: {str(err).splitlines()[0]}", where=str(plan_file)) from None
    cfg = DaemonConfig(domain=domain, plan=plan, base_dir=base_dir or plan_file.parent,
                       coordinator=endpoint, server_key=check_public_key(server_key, where="--server-key"),
                       keys=KeyPair.load(key_file), threads=threads)
    sys.exit(Daemon(cfg).run())


# ---------------------------------------------------------------------------
# dashboard commands: dash  (meshctl.tui)
# ---------------------------------------------------------------------------


@main.command()
@click.option("--replay", "replay", metavar="RUN", required=True,
              help="A run directory, its events.jsonl, or a run id under ./.meshctl/runs/.")
@click.option("--speed", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Replay this many times faster than recorded; 0 = as fast as possible.")
@reports_errors
def dash(replay: str, speed: float) -> None:
    """Open the dashboard on a recorded run, replaying its events at --speed."""
    from meshctl.tui.app import make_app
    from meshctl.tui.replay import PacedReplay, find_events

    path = find_events(replay)
    source = PacedReplay(path, speed=speed)
    make_app(title=f"meshctl · replay {path.parent.name}", event_source=source).run()


# ---------------------------------------------------------------------------
# language tooling: diff, access, contract export/import  (meshctl.compiler)
# ---------------------------------------------------------------------------


@main.group()
def contract() -> None:
    """Data contracts: export/import as ODCS, test a product against its contract."""


# ---------------------------------------------------------------------------
# governance: contract test, catalog  (meshctl.runtime)
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# audit and lineage: audit verify/report, lineage export  (meshctl.runtime)
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# federated analytics: analyze  (meshctl.runtime)
# ---------------------------------------------------------------------------
