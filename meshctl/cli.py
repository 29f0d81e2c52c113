"""The `meshctl` command line: parse, call one library function, render, exit code.

Every command body is short; the work lives in meshctl.compiler, meshctl.runtime
and meshctl.tui. User errors print one line and exit 1; internal errors exit 2.
Heavy imports (torch, textual) happen inside the commands that need them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from meshctl import __version__
from meshctl.errors import MeshctlError, UserError
from meshctl.tables import format_table

MESH_FILE = click.argument(
    "file", type=click.Path(dir_okay=False, path_type=Path), default="mesh.yaml", required=False
)


def coloured(stream: Any) -> bool:
    """Colour on `stream`: a terminal, NO_COLOR unset (https://no-color.org), TERM not `dumb`."""
    return (stream.isatty() and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb")


def say_err(text: str) -> None:
    """Error and diagnostic lines on stderr: `error`/`warning` and hints coloured on a terminal (rich);
    elsewhere exactly the text."""
    if not coloured(sys.stderr):
        click.echo(text, err=True)
        return
    from rich.console import Console
    from rich.text import Text

    line = Text(text)
    line.highlight_regex(r"\b(internal )?error(\[MESH\d+\])?:", "bold red")
    line.highlight_regex(r"\bwarning(\[MESH\d+\])?:", "bold yellow")
    line.highlight_regex(r"\(hint: [^\n]*\)|^ *hint: .*$", "cyan")
    Console(file=sys.stderr, highlight=False, soft_wrap=True).print(line)


@contextlib.contextmanager
def busy(what: str) -> Iterator[None]:
    """A spinner on stderr while something slow runs, on a terminal only (never in a pipe or a log)."""
    if not sys.stderr.isatty() or os.environ.get("TERM") == "dumb" or RESIDENT is not None:
        yield  # (a compile server's answer holds the output only)
        return
    from rich.console import Console

    with Console(file=sys.stderr, no_color=bool(os.environ.get("NO_COLOR"))).status(what):
        yield


@contextlib.contextmanager
def spinning(what: str) -> Iterator[Callable[[str], None]]:
    """An `echo` for lines on stdout under a spinner saying `what`, while a headless run goes: on a
    terminal only (stdout and stderr both), else plain `click.echo` (a pipe or a log gets the lines alone)."""
    if not (sys.stdout.isatty() and sys.stderr.isatty()) or os.environ.get("TERM") == "dumb":
        yield click.echo
        return
    from rich.console import Console
    from rich.text import Text

    console = Console(file=sys.stdout, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)
    with console.status(what):
        yield lambda line: console.print(Text(line), soft_wrap=True)


def reports_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn MeshctlError into one line on stderr and its exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MeshctlError as err:
            say_err(err.render())
            sys.exit(err.exit_code)
        except KeyboardInterrupt as err:  # launcher.Interrupted carries SIGTERM, SIGHUP, ...
            click.echo("interrupted", err=True)
            sys.exit(128 + getattr(err, "signum", 2))
        except BrokenPipeError:  # `meshctl ... | head` stopped reading: end quietly, as git does
            _silence_stdout()
            sys.exit(141)  # 128 + SIGPIPE, the status a shell shows for git in the same pipe
        except Exception as err:
            if os.environ.get("MESHCTL_DEBUG"):
                raise
            if isinstance(err, OSError) and err.filename:  # a path given (-o missing/dir/x): where and why
                click.echo(f"error: {err.filename}: {err.strerror or err}", err=True)
                sys.exit(1)
            click.echo(f"internal error: {type(err).__name__}: {err} (set MESHCTL_DEBUG=1 for the traceback)",
                       err=True)
            sys.exit(2)

    return wrapper


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the flush at exit cannot fail on the closed pipe again
    (the recipe of Python's `signal` documentation, "Note on SIGPIPE")."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (CliRunner): nothing to flush there
        pass


class UsageLine(click.ClickException):
    """A click usage error as meshctl's one line, `error: … (hint: …)`, exit 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        say_err(self.message)


def one_line(err: click.UsageError) -> UsageLine:
    """`error: <what> (hint: <command> --help)`: what click says, without its three-line usage block."""
    command = err.ctx.command_path if err.ctx is not None else "meshctl"
    message = err.format_message()
    param = getattr(err, "param", None)
    if isinstance(err, click.BadParameter) and param is not None and param.name == "file" \
            and "is a directory" in message:
        folder = Path(str(message.split("'")[3] if message.count("'") >= 4 else "."))
        inside = folder / "mesh.yaml"
        message = f"{folder}: is a folder, not a file"
        return UsageLine(f"error: {message} (hint: " + (f"`{command} {inside}`)" if inside.is_file()
                                                         else f"give a file; see `{command} --help`)"))
    quoted = message.count("'") >= 4  # "Invalid value for 'NAME': … 'VALUE' …": VALUE is the 4th piece
    if isinstance(err, click.BadParameter) and quoted and "' does not exist" in message:  # click.Path(exists=True)
        message = f"{message.split(chr(39))[3]}: no such file"
    if isinstance(err, click.BadParameter) and quoted and "does not match the format" in message:  # click.DateTime
        message = f"{param.opts[0] if param is not None else 'date'} {message.split(chr(39))[3]!r} is not a date, YYYY-MM-DD"
    message = message.rstrip(".")
    return UsageLine(f"error: {message[0].lower() + message[1:] if message else message} "
                     f"(hint: see `{command} --help`)")


class MeshctlGroup(click.Group):
    """A group whose usage errors (a folder as FILE, a missing file, a bad date, an unknown option)
    are one line, never click's usage block."""

    group_class = type  # `access`, `contract`, ... are MeshctlGroups too

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as err:
            if _asks_for_help(err):
                raise
            raise one_line(err) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            if _asks_for_help(err):
                raise
            raise one_line(err) from None


def _asks_for_help(err: click.UsageError) -> bool:
    """`meshctl` or `meshctl access` alone: click's help, as before (its own UsageError since click 8.2)."""
    return type(err).__name__ == "NoArgsIsHelpError"


@click.group(cls=MeshctlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshctl")
def main() -> None:
    """Run a federated data mesh declared in one mesh.yaml."""


# ---------------------------------------------------------------------------
# compiler commands: validate, plan, explain, schema  (meshctl.compiler)
# ---------------------------------------------------------------------------


RESIDENT: Any = None
"""In a compile server (meshctl.compiler.server), the cache it keeps across compiles."""


def _load_cache(file: Path):
    """The load cache of `validate` and `plan`: .meshctl/cache/ beside FILE (in a compile
    server: what it keeps in memory)."""
    from meshctl.compiler.cache import LoadCache

    if RESIDENT is not None:
        return RESIDENT

    return LoadCache(file.parent / ".meshctl" / "cache")


def _no_file(file: Path) -> UserError:
    """FILE is missing or not a file; outside a mesh folder the hint names `meshctl init`."""
    if file.exists():
        return UserError("not a file", where=str(file))
    if file.name == "mesh.yaml":
        return UserError("no such file: this is not a mesh folder", where=str(file),
                         hint="`meshctl init` writes a mesh.yaml here, or give the path of one")
    return UserError("no such file", where=str(file))


def _compile_or_exit(file: Path, *, hashed: bool = True, cached: bool = False):
    """Compile FILE; on errors print every diagnostic and `N errors`, then exit 1.

    With `cached`, files load through .meshctl/cache/ (validate and plan)."""
    from meshctl.compiler.compile import compile_mesh
    from meshctl.compiler.diagnostics import SHOWN

    if not file.is_file():
        raise _no_file(file)
    with busy(f"compiling {file}"):
        result = compile_mesh(file, hashed=hashed, cache=_load_cache(file) if cached else None)
    if result.diagnostics:
        say_err(result.render_diagnostics(limit=SHOWN))
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

        report = json_report(compile_mesh(file, hashed=False, cache=_load_cache(file)).diagnostics,
                             strict=strict)
        click.echo(json.dumps(report, indent=2))
        sys.exit(0 if report["valid"] else 1)
    result = _compile_or_exit(file, hashed=False, cached=True)
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
@click.option("--against", metavar="GIT_REV",
              help="Diff against FILE as compiled at GIT_REV (main, HEAD~1, REV:PATH) "
                   "instead of the plan file on disk.")
@click.option("--decisions", type=click.Choice(["auto", "summary", "all"]), default="auto",
              show_default=True, help="List every policy decision (all), or count them per policy and "
                                      "list only warns and denies (summary); auto lists up to 20.")
@reports_errors
def plan_command(file: Path, output: Path | None, detailed_exitcode: bool,
                 against: str | None, decisions: str) -> None:
    """Compile FILE into mesh.plan.toml, the reviewable plan the runtime executes.

    If the output file already holds a plan, print what changes against it
    (or, with --against, against the plan of FILE at a git revision).
    """
    from meshctl.compiler.plandiff import diff_plans, render_changes
    from meshctl.compiler.summary import render_plan_summary

    plan = _compile_or_exit(file, cached=True).plan
    out = output or file.with_name("mesh.plan.toml")
    previous = None  # the plan file's text, read once (the write compares it too)
    if against is None:
        changes, previous = _changes_since(out, plan)
    else:
        changes = diff_plans(_plan_at(against, file), plan)
    click.echo(render_plan_summary(plan, decisions))
    changed = True  # no previous plan: everything is new
    if changes is not None:
        click.echo(render_changes(changes))
        changed = bool(changes)
    plan.write(out, previous)
    click.echo(f"wrote {out}")
    if detailed_exitcode and changed:
        sys.exit(2)


def _plan_at(rev: str, file: Path) -> Any:
    """The Plan of FILE as it is at git revision `rev`; a one-line error if it has none."""
    from meshctl.gitrev import compile_revision

    revision, result = compile_revision(rev, file)
    if result.plan is None:
        n = len(result.errors)
        raise UserError(f"does not compile ({n} error{'s' if n != 1 else ''}); cannot diff "
                        "against it", where=revision.label,
                        hint=f"`git show {revision.label} > old.yaml && meshctl validate old.yaml`")
    return result.plan


def _changes_since(path: Path, plan: Any) -> tuple[Any, str | None]:
    """(what `plan` changes against the plan at `path` (parsing only the resources whose TOML
    differs), or None when there is none or it cannot be read (with a note); the text read)."""
    from meshctl.compiler.plandiff import diff_plan_texts

    if not path.is_file():
        return None, None
    text = None
    try:
        text = path.read_text(encoding="utf-8")
        return diff_plan_texts(text, plan.to_toml()), text
    except (OSError, ValueError) as err:  # TOML, UTF-8 and pydantic errors are ValueErrors
        reason = type(err).__name__
        click.echo(f"{path}: note: not a readable plan ({reason}); not diffing against it",
                   err=True)
        return None, text


@main.group("compile-server")
def compile_server() -> None:
    """A resident compiler for one mesh directory (docs/compiler-speed.md).

    While it runs, `meshctl validate` and `meshctl plan` of that directory's meshes ask it
    instead of compiling in process: same output, less time after an edit. It listens on
    .meshctl/compile.sock (0600, never a network port) and stops after --idle-minutes."""


def _mesh_dir(file: Path) -> Path:
    if not file.is_file():
        raise _no_file(file)
    return file.parent.resolve()


@compile_server.command("start")
@MESH_FILE
@click.option("--idle-minutes", type=click.FloatRange(min=0, min_open=True), default=30, show_default=True,
              help="Stop after this long without a request.")
@reports_errors
def compile_server_start(file: Path, idle_minutes: float) -> None:
    """Start the compile server of FILE's directory (default mesh.yaml); waits for its first compile."""
    from meshctl.client import build
    from meshctl.compiler import server

    root = _mesh_dir(file)
    running = server.request(root, "status")
    if running is not None and running.get("meshctl") == build():
        click.echo(f"compile server already running for {root} (pid {running.get('pid')})")
        return
    if running is not None:  # another meshctl's: it stops when asked by this version
        server.request(root, "stop")
    with busy(f"starting the compile server of {root}"):
        try:
            status = server.start(root, idle_minutes)
        except RuntimeError as err:
            raise UserError(f"the compile server did not start: {err}", where=str(root),
                            hint=f"see {root / '.meshctl' / server.LOG}") from None
    click.echo(f"compile server started for {root} (pid {status['pid']}, socket {status['socket']}); "
               f"it stops after {idle_minutes:g} idle minutes or on `meshctl compile-server stop`")


@compile_server.command("serve", hidden=True, context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def compile_server_serve(args: tuple[str, ...]) -> None:
    """The server process `start` runs (ROOT --idle-s S --ready-fd FD)."""
    from meshctl.compiler import server

    def resident(cache: Any) -> None:
        global RESIDENT
        RESIDENT = cache

    server.main(list(args), main, resident)


@compile_server.command("stop")
@MESH_FILE
@reports_errors
def compile_server_stop(file: Path) -> None:
    """Stop the compile server of FILE's directory (default mesh.yaml)."""
    from meshctl.compiler import server

    root = _mesh_dir(file)
    answer = server.request(root, "stop")
    if answer is None:
        click.echo(f"no compile server running for {root}")
        return
    click.echo(f"stopped the compile server of {root} (pid {answer.get('pid', '?')})")


@compile_server.command("status")
@MESH_FILE
@reports_errors
def compile_server_status(file: Path) -> None:
    """Whether a compile server runs for FILE's directory (default mesh.yaml), and what it holds.

    Exit 0 when one runs, 3 when none does."""
    from meshctl.client import build
    from meshctl.compiler import server

    root = _mesh_dir(file)
    status = server.request(root, "status")
    if status is None:
        stale = " (a stale socket is left: the next start replaces it)" if server.socket_of(root).exists() else ""
        click.echo(f"no compile server running for {root}{stale}")
        sys.exit(3)
    if status.get("meshctl") != build():
        click.echo(f"the compile server of {root} ran meshctl {str(status.get('meshctl')).split('+')[0]} "
                   "(older code than this one's): it stops now")
        sys.exit(3)
    click.echo(format_table(["pid", "socket", "requests", "files kept", "last compile", "stops in"],
                            [[str(status["pid"]), status["socket"], str(status["requests"]),
                              str(status["files"]), f"{status['last_seconds']:.2f} s",
                              f"{max(0, status['idle_stop_s']) // 60} min idle"]]))


@main.command()
@click.option("--mesh", "file", type=click.Path(dir_okay=False, path_type=Path),
              default="mesh.yaml", show_default=True, help="The mesh.yaml.")
@click.option("-o", "--output", default="-", show_default=True, metavar="FILE|-",
              help="Where to write CODEOWNERS (e.g. .github/CODEOWNERS); - is stdout.")
@reports_errors
def codeowners(file: Path, output: str) -> None:
    """Write CODEOWNERS: each domain file to its domains' owners, the rest to mesh.owner."""
    from meshctl.codeowners import make_codeowners
    from meshctl.compiler.compile import compile_mesh
    from meshctl.compiler.diagnostics import render_all

    if not file.is_file():
        raise _no_file(file)
    result = compile_mesh(file, hashed=False)
    if result.errors or result.spec is None:  # warnings say nothing about owners
        click.echo(render_all(result.errors, result.sources), err=True)
        sys.exit(1)
    target = None if output == "-" else Path(output)
    made = make_codeowners(result, file, target)
    for problem in made.problems:
        click.echo(f"{problem.where}: error: {problem.message}", err=True)
    if made.problems:
        sys.exit(1)
    if target is None:
        click.echo(made.text, nl=False)
        return
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(made.text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as err:
        raise UserError((err.strerror or type(err).__name__).lower(), where=str(target)) from None
    finally:
        tmp.unlink(missing_ok=True)
    click.echo(f"wrote {target}", err=True)


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
        from meshctl.compiler.diagnostics import did_you_mean

        near = did_you_mean(code.upper().replace("O", "0"), CODES) or did_you_mean(code.upper(), CODES)
        raise UserError(f"unknown diagnostic code '{code}'",
                        hint=near or "`meshctl explain` lists every code")
    click.echo(f"{known} ({stage_of(known)})")
    click.echo(CODES[known])


@main.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path), default=".", required=False)
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="CSV or Parquet file the first product serves (inspected with DuckDB).")
@click.option("--domain", metavar="NAME", help="Name of the first domain [default: my-domain].")
@click.option("--target", metavar="COLUMN", help="Column the model predicts [default: the last category].")
@reports_errors
def init(folder: Path, data: Path | None, domain: str | None, target: str | None) -> None:
    """Write FOLDER/mesh.yaml (default: here) from a data file: a domain, a product, a contract, a
    policy and a model. Never overwrites."""
    from meshctl.scaffold import init_mesh

    mesh = init_mesh(folder, data, domain=domain, target=target)
    click.echo(f"wrote {mesh}; next: meshctl validate {mesh}, then meshctl up {mesh}")


@main.command()
@reports_errors
def schema() -> None:
    """Print the JSON Schema of mesh.yaml, for editor completion."""
    import json

    from meshctl.compiler.schema import mesh_json_schema

    click.echo(json.dumps(mesh_json_schema(), indent=2))


# ---------------------------------------------------------------------------
# runtime commands: up, daemon, coordinator  (meshctl.runtime)
# ---------------------------------------------------------------------------
# (filled in by the runtime work)


COORDINATOR_KEY = click.option(
    "--coordinator-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Secret key file of the coordinator key mesh.yaml declares "
         "[default: .meshctl/keys/coordinator.key_secret beside it].")


@main.command()
@MESH_FILE
@click.option("--headless", is_flag=True, help="Print one line per round instead of the dashboard.")
@click.option("--address", metavar="tcp://HOST:PORT",
              help="Coordinator address instead of mesh.yaml's; port 0 picks free ports.")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True,
              help="torch threads per daemon.")
@COORDINATOR_KEY
@click.option("--join-timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Give up on remote domains that have not joined after SECONDS "
                   "[default: wait for them; local domains: 60 s].")
@reports_errors
def up(file: Path, headless: bool, address: str | None, threads: int, coordinator_key: Path | None,
       join_timeout: float | None) -> None:
    """Compile FILE, start a coordinator and one daemon per local domain, and train."""
    from meshctl.runtime.launcher import start_run

    _end(_launch(file, headless, lambda plan, warm: start_run(
        file, plan, address=address, threads=threads, warm=warm, coordinator_key=coordinator_key,
        join_timeout=join_timeout)))


@main.command()
@click.argument("run", default="latest")
@click.option("--mesh", "mesh_file", type=click.Path(dir_okay=False, path_type=Path), default="mesh.yaml",
              show_default=True, help="The mesh.yaml whose .meshctl/runs/ holds RUN.")
@click.option("--headless", is_flag=True, help="Print one line per round instead of the dashboard.")
@COORDINATOR_KEY
@reports_errors
def resume(run: str, mesh_file: Path, headless: bool, coordinator_key: Path | None) -> None:
    """Go on with a killed run RUN (id, directory or `latest`) from its newest checkpoints."""
    from meshctl.runtime.launcher import resume_run

    _end(_attend(resume_run(run, mesh_file, coordinator_key), headless))


# runs, status, logs, stop: operating runs from another shell (docs/operations.md)
RUNS_MESH = click.option("--mesh", "mesh_file", type=click.Path(dir_okay=False, path_type=Path),
                         default="mesh.yaml", show_default=True,
                         help="The mesh.yaml whose .meshctl/runs/ holds the runs.")
RUNS_FORMAT = click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
                           show_default=True)


@main.command()
@RUNS_MESH
@RUNS_FORMAT
@reports_errors
def runs(mesh_file: Path, fmt: str) -> None:
    """The mesh's runs, newest first: status, start, duration, jobs, rounds, metric, why one failed."""
    from meshctl.runview import render_runs

    click.echo(render_runs(mesh_file, fmt))


@main.command()
@click.argument("run", default="latest")
@RUNS_MESH
@RUNS_FORMAT
@reports_errors
def status(run: str, mesh_file: Path, fmt: str) -> None:
    """Where RUN (id, directory or `latest`, the default) stands: its domains connected, missing or
    lost and its jobs' progress while it runs; its outcome once it has ended."""
    from meshctl.runtime.run import resolve_run
    from meshctl.runview import render_status

    click.echo(render_status(resolve_run(run, mesh_file), fmt))


@main.command()
@click.argument("run", default="latest")
@click.option("--domain", "domains", multiple=True, metavar="D", help="Only domain D's log (repeatable).")
@click.option("--coordinator", "coord", is_flag=True, help="Only the coordinator's log (with --domain: too).")
@click.option("-n", "--lines", "n", type=click.IntRange(min=0), metavar="N",
              help="Only the last N lines of each log.")
@click.option("-f", "--follow", is_flag=True, help="Go on printing new lines until the run's processes end.")
@RUNS_MESH
@reports_errors
def logs(run: str, domains: tuple[str, ...], coord: bool, n: int | None, follow: bool, mesh_file: Path) -> None:
    """Print the log files of RUN (id, directory or `latest`): logs/coordinator.log, logs/DOMAIN.log."""
    from meshctl.runtime.operate import follow_logs, log_files, read_logs
    from meshctl.runtime.run import resolve_run

    run_dir = resolve_run(run, mesh_file)
    files = log_files(run_dir, domains, coord)
    if follow:
        return follow_logs(run_dir, files, click.echo, n=10 if n is None else n)
    for line in read_logs(files, n):
        click.echo(line)


@main.command()
@click.argument("run")
@RUNS_MESH
@click.option("--timeout", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Seconds to wait for the run to end.")
@reports_errors
def stop(run: str, mesh_file: Path, timeout: float) -> None:
    """Stop the live RUN (id, directory or `latest`) in order, from any shell, and say how it ended."""
    from meshctl.runtime.operate import stop_run
    from meshctl.runview import render_stopped

    click.echo(render_stopped(stop_run(run, mesh_file, timeout_s=timeout)))


def _end(result: Any) -> None:
    """Exit as the attended run ended: 128+N after signal N stopped it (Ctrl-C, the dashboard's "stop the
    run": 130), 1 when it failed. A run stopped on purpose says so in one line: stopped, not failed."""
    if result is not None and result.signal:
        click.echo(f"run stopped: {result.run_dir} ({result.reason})", err=True)
        sys.exit(128 + result.signal)
    if result is not None and not result.ok:
        raise UserError(result.reason or "run failed") from None


def _attend(run: Any, headless: bool) -> Any:
    """Follow a started run headless or in the dashboard; None when the user detached from it."""
    from meshctl.runtime.launcher import run_headless

    if headless or not sys.stdout.isatty():
        with spinning(f"run {run.m.run} going (Ctrl-C stops it)") as echo:
            return run_headless(run, echo)
    from meshctl.tui.run import run_dashboard

    return _in_dashboard(lambda: run_dashboard(run), run)


def _in_dashboard(show: Callable[[], Any], run: Any = None) -> Any:
    """`show()` the dashboard until the user quits, then print what headless prints at the end (the
    jobs' metrics and model paths, the run directory); None when the user detached from the run."""
    from meshctl.runtime.launcher import interrupted, stop_on_signals, summary_lines

    try:
        with stop_on_signals():  # SIGTERM/SIGHUP/SIGQUIT stop the run as the dashboard's quit does
            result = show()
    except KeyboardInterrupt as err:
        if run is None:  # not started yet: nothing to stop
            raise
        return interrupted(run, getattr(err, "signum", 2), click.echo)
    if result.detached:  # the run goes on in the background
        click.echo(result.reason)
        return None
    if not result.signal:  # a stopped run: `_end` says so
        for line in summary_lines(result):
            click.echo(line)
        click.echo(f"run {'completed' if result.ok else 'failed'}: {result.run_dir}")
    return result


class _NotCompiled(Exception):
    """The mesh has errors (the compile result says which)."""


def _launch(file: Path, headless: bool, launch: Callable[[Any, Any], Any]) -> Any:
    """Compile FILE, start its run with `launch(plan, warm)` and attend it (see `_attend`).

    In a terminal the dashboard shows at once (compiling, starting, waiting for domains) while the run
    starts beside it; the compiler's diagnostics are printed once it has closed."""
    if not file.is_file():
        raise _no_file(file)
    dashboard = not headless and sys.stdout.isatty()
    if dashboard and sys.stderr.isatty():  # a line at once, while the dashboard's code loads (~1 s)
        click.echo(f"meshctl: compiling {file}; the dashboard is on its way...", err=True)
    from meshctl.compiler.diagnostics import SHOWN
    from meshctl.runtime.launcher import WarmCoordinator

    warm = WarmCoordinator()  # imports torch while this process compiles
    if not dashboard:
        try:
            run = launch(_compile_or_exit(file).plan, warm)
        finally:
            warm.discard()
        return _attend(run, headless)
    from meshctl.compiler.compile import compile_mesh
    from meshctl.tui.run import start_dashboard

    compiled: list[Any] = []

    def start(say: Callable[[str], None]) -> Any:
        try:
            compiled.append(compile_mesh(file))
            if compiled[0].plan is None:
                raise _NotCompiled
            say("preparing the run")
            return launch(compiled[0].plan, warm)
        finally:
            warm.discard()

    def show() -> Any:
        try:
            return start_dashboard(start, f"compiling {file}")
        finally:
            if compiled and compiled[0].diagnostics:  # once the terminal is back
                say_err(compiled[0].render_diagnostics(limit=SHOWN))

    try:
        return _in_dashboard(show)
    except _NotCompiled:
        n = len(compiled[0].errors)
        click.echo(f"{n} error{'s' if n != 1 else ''}", err=True)
        sys.exit(1)


@main.command(hidden=True)
@click.option("--run-dir", type=click.Path(exists=True, file_okay=False))
@click.option("--warm", is_flag=True, help="Import first, then read the run directory from stdin.")
@click.option("--resume", is_flag=True, help="Take the run up from its newest checkpoints (meshctl resume).")
def coordinator(run_dir: str | None, warm: bool, resume: bool) -> None:
    """Internal: the coordinator process of a run prepared by `meshctl up`."""
    from meshctl.runtime.coordinator import main as coordinator_main
    from meshctl.runtime.coordinator import warm_main

    if warm:
        _exit_now(warm_main())
    if run_dir is None:
        raise click.UsageError("give --run-dir or --warm")
    _exit_now(coordinator_main(run_dir, resume=resume))


def _exit_now(code: int) -> NoReturn:
    """End a process that imported torch (coordinator, daemon, serve) without the interpreter's teardown.

    Tearing down an interpreter that imported torch costs 0.3-0.6 s of CPU, and `meshctl up`
    (or whoever started the process) waits for it. Nothing is left to tear down when these
    commands return: files are written and closed, ZeroMQ contexts terminated (their messages
    sent), run locks are released by the kernel and only daemon threads remain; stdio is
    flushed here. An error still ends the ordinary way (`reports_errors`), and so does a command
    run in another process's interpreter (click's CliRunner swaps sys.stdout).
    """
    if sys.stdout is not sys.__stdout__:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@main.command()
@click.option("--plan", "plan_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The mesh.plan.toml both sides share.")
@click.option("--domain", required=True, help="Which domain of the plan this daemon serves.")
@click.option("--coordinator", "endpoint", required=True, metavar="tcp://HOST:PORT")
@click.option("--server-key", default=None,
              help="The coordinator's Z85 Curve public key [default: the plan's mesh.coordinator.public_key].")
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="This domain's Curve secret key file.")
@click.option("--base-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory product sources are relative to (default: the plan's).")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True)
@reports_errors
def daemon(plan_file: Path, domain: str, endpoint: str, server_key: str | None, key_file: Path,
           base_dir: Path | None, threads: int) -> None:
    """Run one domain's daemon on this host and connect it to a coordinator."""
    from meshctl.compiler.plan import Plan
    from meshctl.runtime.keys import KeyPair, coordinator_server_key

    try:
        plan = Plan.read(plan_file)
    except (ValueError, OSError) as err:  # tomllib and pydantic errors are ValueErrors
        raise UserError(f"not a meshctl plan: {str(err).splitlines()[0]}", where=str(plan_file)) from None
    server = coordinator_server_key(plan.coordinator.public_key, server_key)
    keys = KeyPair.load(key_file)
    # (imports torch, ~2 s of CPU: once the inputs are known to be good)
    from meshctl.runtime.daemon import Daemon, DaemonConfig

    cfg = DaemonConfig(domain=domain, plan=plan, base_dir=base_dir or plan_file.parent,
                       coordinator=endpoint, server_key=server, keys=keys, threads=threads)
    _exit_now(Daemon(cfg).run())


@main.command()
@click.option("--domain", required=True, help="The domain of the mesh this host serves.")
@click.option("--mesh", "mesh_file", type=click.Path(dir_okay=False, path_type=Path), default="mesh.yaml",
              show_default=True, help="This host's checkout of the reviewed mesh.yaml.")
@click.option("--coordinator", "endpoint", metavar="tcp://HOST:PORT", default=None,
              help="Where to dial [default: mesh.coordinator.address].")
@click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="This domain's Curve secret key [default: .meshctl/keys/DOMAIN.key_secret beside the mesh].")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory the domain's product sources are relative to [default: the mesh's].")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True, help="torch threads.")
@reports_errors
def serve(domain: str, mesh_file: Path, endpoint: str | None, key_file: Path | None, data_root: Path | None,
          threads: int) -> None:
    """Serve DOMAIN run after run: dial the coordinator, rejoin after any loss, reload the mesh on change."""
    from meshctl.runtime.domain.service import Service, ServiceConfig

    cfg = ServiceConfig(domain=domain, mesh=mesh_file, coordinator=endpoint, key_file=key_file,
                        data_root=data_root, threads=threads)
    _exit_now(Service(cfg).run())


# ---------------------------------------------------------------------------
# identity: keys generate / show  (meshctl.runtime.keys)
# ---------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Curve key pairs: public keys go into mesh.yaml, secrets stay on their host."""


KEYS_MESH = click.option("--mesh", "mesh_file", type=click.Path(dir_okay=False, path_type=Path),
                         default="mesh.yaml", show_default=True,
                         help="The mesh.yaml beside whose .meshctl/keys/ keys live.")
KEYS_DIR = click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="Directory of the key files [default: .meshctl/keys/ beside the mesh.yaml].")


@keys.command("generate")
@click.argument("name")
@KEYS_MESH
@KEYS_DIR
@click.option("--force", is_flag=True, help="Replace an existing key pair (a rotation).")
@reports_errors
def keys_generate(name: str, mesh_file: Path, directory: Path | None, force: bool) -> None:
    """Make key pair NAME (a domain, or `coordinator`) and print the public_key line for mesh.yaml."""
    from meshctl.runtime.keys import fingerprint, generate_key, keys_dir, paste_line

    pair, secret = generate_key(name, directory or keys_dir(mesh_file), force=force)
    click.echo(f"wrote {secret} (mode 0600: it never leaves this host) and {secret.with_suffix('.key')}", err=True)
    click.echo(f"key {name}, fingerprint {fingerprint(pair.public)}; put this line under "
               f"{'mesh.coordinator' if name == 'coordinator' else 'the domain ' + name} in mesh.yaml:", err=True)
    click.echo(paste_line(pair.public))


@keys.command("show")
@click.argument("name")
@KEYS_MESH
@KEYS_DIR
@reports_errors
def keys_show(name: str, mesh_file: Path, directory: Path | None) -> None:
    """Print the public_key line and fingerprint of key pair NAME."""
    from meshctl.runtime.keys import fingerprint, keys_dir, paste_line, read_public

    public, _ = read_public(name, directory or keys_dir(mesh_file))
    click.echo(paste_line(public))
    click.echo(f"fingerprint: {fingerprint(public)}")


# ---------------------------------------------------------------------------
# deployment: deploy k8s  (meshctl.deploy; systemd unit and Containerfile in deploy/)
# ---------------------------------------------------------------------------


@main.group()
def deploy() -> None:
    """Deployment artefacts for a domain's service (`meshctl serve`) on its own host."""


@deploy.command("k8s")
@click.option("--domain", required=True, help="The domain whose service to deploy.")
@click.option("--mesh", "mesh_file", type=click.Path(dir_okay=False, path_type=Path), default="mesh.yaml",
              show_default=True, help="The reviewed mesh.yaml the service runs.")
@click.option("--image", default=None, help="Container image with meshctl [default: meshctl:VERSION].")
@click.option("--coordinator", default=None, metavar="tcp://HOST:PORT",
              help="Where the domain dials the coordinator [default: mesh.coordinator.address].")
@click.option("--coordinator-cidr", default=None, metavar="CIDR",
              help="The coordinator's addresses, for the egress rule [default: HOST if it is an IP].")
@click.option("--data-claim", default=None, metavar="NAME",
              help="PersistentVolumeClaim of the domain's data, mounted read-only [default: meshctl-DOMAIN-data].")
@click.option("-o", "--output", default="-", show_default=True, metavar="DIR|-",
              help="Write DIR/meshctl-DOMAIN.yaml, or print to stdout (-).")
@reports_errors
def deploy_k8s(domain: str, mesh_file: Path, image: str | None, coordinator: str | None,
               coordinator_cidr: str | None, data_claim: str | None, output: str) -> None:
    """Print (or write) the Kubernetes manifests of DOMAIN's service; no key material."""
    from meshctl.deploy import DEFAULT_IMAGE, k8s_manifests

    manifests = k8s_manifests(mesh_file, domain, image=image or DEFAULT_IMAGE, coordinator=coordinator,
                              coordinator_cidr=coordinator_cidr, data_claim=data_claim)
    if output == "-":
        click.echo(manifests.render(), nl=False)
        return
    path = manifests.write(Path(output))
    kinds = ", ".join(o["kind"] for o in manifests.objects)
    click.echo(f"wrote {path} ({kinds}); create the Secret meshctl-{domain}-key first (see its head)", err=True)


# ---------------------------------------------------------------------------
# dashboard commands: dash  (meshctl.tui)
# ---------------------------------------------------------------------------


@main.command()
@click.argument("run", required=False, metavar="[RUN]")
@click.option("--replay", "replay", metavar="RUN",
              help="Replay a recorded run: its directory, events.jsonl, or run id.")
@click.option("--speed", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Replay this many times faster than recorded; 0 = as fast as possible.")
@click.option("--address", metavar="tcp://HOST:PORT",
              help="Attach to a coordinator's event stream by address instead of RUN.")
@click.option("--server-key", metavar="KEY", help="With --address: the coordinator's public key.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path),
              help="With --address: an observer secret key file the run allows.")
@reports_errors
def dash(run: str | None, replay: str | None, speed: float, address: str | None,
         server_key: str | None, key_file: Path | None) -> None:
    """Attach the dashboard to a live RUN (id or directory), or replay one with --replay."""
    from meshctl.tui.dash import dash_app

    dash_app(run, replay=replay, speed=speed, address=address, server_key=server_key,
             key_file=key_file).run()


# ---------------------------------------------------------------------------
# language tooling: diff, access, contract export/import  (meshctl.compiler)
# ---------------------------------------------------------------------------


@main.command()
@click.argument("base")
@click.argument("head", required=False)
@click.option("--mesh", "mesh", type=click.Path(dir_okay=False, path_type=Path),
              default="mesh.yaml", show_default=True,
              help="Working-tree mesh.yaml: HEAD's default, and the path inside a bare REV.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@click.option("--allow-governance", is_flag=True,
              help="Do not fail on governance changes (GOVxxx); they are still listed.")
@reports_errors
def diff(base: str, head: str | None, mesh: Path, fmt: str, allow_governance: bool) -> None:
    """Classify every change from BASE to HEAD as breaking, non-breaking or info.

    BASE and HEAD are files or git revisions (main, HEAD~1, origin/main:mesh.yaml);
    HEAD defaults to the working-tree mesh.yaml. Exit 3 when a breaking change is
    not covered by a major version bump of its contract (governance changes are
    never covered, unless --allow-governance), 1 on errors, else 0.
    """
    import json

    from meshctl.compiler.breaking import classify, render, summary, to_json
    from meshctl.gitrev import load_side

    if head is not None and Path(head).is_file():
        mesh = Path(head)
    old, new = load_side(base, mesh), load_side(head or str(mesh), mesh)
    findings = classify(old, new)
    if fmt == "json":
        click.echo(json.dumps(to_json(findings, old.file, new.file, allow_governance), indent=2))
    else:
        click.echo(render(findings, allow_governance))
    sys.exit(3 if summary(findings, allow_governance)["blocking"] else 0)


@main.group()
def contract() -> None:
    """Data contracts: export/import as ODCS, test a product against its contract."""


MESH_OPTION = click.option("--mesh", type=click.Path(dir_okay=False, path_type=Path),
                           default="mesh.yaml", show_default=True, help="The mesh.yaml.")


def _spec_or_exit(file: Path) -> Any:
    """The MeshSpec of FILE; on errors print them (not warnings) and exit 1."""
    from meshctl.compiler.compile import compile_mesh
    from meshctl.compiler.diagnostics import render_all

    if not file.is_file():
        raise _no_file(file)
    result = compile_mesh(file)
    if result.errors or result.spec is None:
        click.echo(render_all(result.errors, result.sources), err=True)
        n = len(result.errors)
        click.echo(f"{n} error{'s' if n != 1 else ''}", err=True)
        sys.exit(1)
    return result.spec


@contract.command("export")
@click.argument("name")
@MESH_OPTION
@click.option("--format", "fmt", type=click.Choice(["odcs"]), default="odcs", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file instead of stdout.")
@reports_errors
def contract_export(name: str, mesh: Path, fmt: str, output: Path | None) -> None:
    """Export contract NAME (NAME, NAME@MAJOR or NAME@x.y.z) as an ODCS v3 YAML document."""
    from meshctl.compiler.odcs import dump, export_contract, find_contract, product_classification

    spec = _spec_or_exit(mesh)
    try:
        found = find_contract(spec, name)
    except LookupError as err:
        raise UserError(str(err.args[0]), where=str(mesh)) from None
    text = dump(export_contract(found, product_classification(spec, found)))
    if output is None:
        click.echo(text, nl=False)
    else:
        if not output.parent.is_dir():  # as `terraform plan -out`: an error, no directories made
            raise UserError(f"cannot write {output}: directory {output.parent} does not exist",
                            hint="create it first, or name another -o path")
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as err:
            reason = (err.strerror or type(err).__name__).lower()
            raise UserError(f"cannot write {output}: {reason}") from None
        click.echo(f"wrote {output} ({fmt} {found.name} {found.version})")


@contract.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@MESH_OPTION
@click.option("--replace", is_flag=True, help="Replace the contract of the same name and major.")
@click.option("--name", help="Contract name to use instead of the document's name or id.")
@click.option("-v", "--verbose", is_flag=True, help="One warning line per dropped ODCS field.")
@reports_errors
def contract_import(file: Path, mesh: Path, replace: bool, name: str | None,
                    verbose: bool) -> None:
    """Add the ODCS v3 contract in FILE to mesh.yaml, keeping its comments and order.

    An ODCS field meshctl cannot express is dropped with a warning: one line per dropped
    column, quality rule or SLA property, and one line naming the other fields (--verbose:
    one line per field).
    """
    from meshctl.compiler.odcs import summarize
    from meshctl.specedit import import_odcs

    status, imported = import_odcs(mesh, file, replace=replace, name=name)
    for line in imported.dropped if verbose else summarize(imported.dropped):
        click.echo(f"{file}: warning: dropped {line}", err=True)
    c = imported.contract
    click.echo(f"{mesh}: {status} contract {c['name']} {c['version']} "
               f"({len(c.get('columns', []))} columns, {len(c.get('quality', []))} quality "
               f"rules; {len(imported.dropped)} ODCS fields dropped)")


@main.group()
def access() -> None:
    """Access to `access: request` products: grants, approved by merging them."""


@access.command("request")
@click.argument("product")
@click.option("--for", "subject", required=True, metavar="MODEL_OR_ANALYSIS",
              help="Model or analysis to grant (model:NAME / analysis:NAME if ambiguous).")
@click.option("--purpose", required=True, help="Purpose the access serves.")
@click.option("--until", type=click.DateTime(["%Y-%m-%d"]), help="Last valid day, YYYY-MM-DD.")
@click.option("--reason", default="", help="Why access is needed.")
@click.option("--by", "by", help="Who asks [default: the current user].")
@MESH_OPTION
@reports_errors
def access_request(product: str, subject: str, purpose: str, until: Any, reason: str,
                   by: str | None, mesh: Path) -> None:
    """Append a grant of PRODUCT to mesh.yaml; merging the change approves it."""
    import datetime
    import getpass

    from meshctl.specedit import request_access

    grant = request_access(mesh, product, subject, purpose,
                           until=until.date() if until else None, reason=reason,
                           by=by or getpass.getuser(), today=datetime.date.today())
    who = grant.get("model") or grant.get("analysis")
    click.echo(f"{mesh}: added grant of {product} to {who} for {purpose}"
               f"{' until ' + str(grant['until']) if 'until' in grant else ''}; open a pull "
               "request: merging it approves the access")


# ---------------------------------------------------------------------------
# governance: contract test, catalog  (meshctl.runtime)
# ---------------------------------------------------------------------------

OPTIONAL_MESH = click.option("--mesh", "mesh_file", type=click.Path(dir_okay=False, path_type=Path),
                             default=None, help="The mesh.yaml [default: ./mesh.yaml].")
"""--mesh that may be absent (the `catalog` group passes its own down to subcommands)."""


def _plan_one_line(file: Path):
    """FILE's plan; a mesh that does not compile is one UserError naming its first error."""
    from meshctl.compiler.compile import compile_mesh

    if not file.is_file():
        raise _no_file(file)
    result = compile_mesh(file)
    if result.plan is None:
        first, n = result.errors[0], len(result.errors)
        raise UserError(f"mesh does not compile: {first.message}", where=first.where,
                        hint=f"`meshctl validate {file}` shows "
                        + (f"all {n} errors" if n > 1 else "it in context"))
    return result.plan


def _product_id(name: str, ids: list[str]) -> str:
    """NAME as a product id (`domain.name`, or a unique `name`), with did-you-mean."""
    from meshctl.compiler.diagnostics import did_you_mean

    matches = [i for i in ids if i == name or i.split(".", 1)[-1] == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(f"product name {name!r} is ambiguous", hint="one of " + ", ".join(matches))
    raise UserError(f"no product {name!r} in the mesh",
                    hint=did_you_mean(name, ids) or "products: " + ", ".join(ids))


@contract.command("test")
@click.argument("product", required=False)
@OPTIONAL_MESH
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@reports_errors
def contract_test(product: str | None, mesh_file: Path | None, fmt: str) -> None:
    """Check PRODUCT (default: every product) against its contract, in its domain's data.

    Exits 1 when an error-severity rule fails; warnings are shown but pass.
    """
    import json

    from meshctl.runtime import catalog, quality

    file = mesh_file or Path("mesh.yaml")
    plan = _plan_one_line(file)
    only = _product_id(product, [p.id for p in plan.products]) if product else None
    with busy("testing contracts"):
        results = quality.check_plan(plan, file.resolve().parent, only)
    db = catalog.catalog_path(file)
    catalog.sync_plan(db, plan)
    for pid, rs in results.items():
        catalog.record_checks(db, pid, rs)
    if fmt == "json":
        click.echo(json.dumps([{"product": p, **r.event_fields(), "skipped": r.skipped}
                               for p, rs in results.items() for r in rs], indent=2))
    else:
        click.echo(format_table(quality.RESULT_HEADERS, quality.result_rows(results)))
        click.echo(quality.summary(results))
    sys.exit(1 if any(r.blocking for rs in results.values() for r in rs) else 0)


def _catalog_db(ctx: click.Context, mesh_file: Path | None) -> Path:
    """The catalog of the mesh (--mesh here, on `catalog`, or ./mesh.yaml), refreshed."""
    from meshctl.runtime import catalog

    file = mesh_file or (ctx.obj or {}).get("mesh") or Path("mesh.yaml")
    plan = _plan_one_line(file)
    db = catalog.catalog_path(file)
    catalog.refresh(db, plan, db.parent / "runs")
    return db


@main.group("catalog", invoke_without_command=True)
@OPTIONAL_MESH
@click.pass_context
@reports_errors
def catalog_group(ctx: click.Context, mesh_file: Path | None) -> None:
    """The mesh's products with owner, contract, latest checks and scorecard."""
    ctx.obj = {"mesh": mesh_file}
    if ctx.invoked_subcommand is None:
        from meshctl.runtime import catalog

        db = _catalog_db(ctx, mesh_file)
        items = catalog.products(db)
        click.echo(format_table(catalog.LIST_HEADERS, catalog.list_rows(items)))


@catalog_group.command("search")
@click.argument("term")
@OPTIONAL_MESH
@click.pass_context
@reports_errors
def catalog_search(ctx: click.Context, term: str, mesh_file: Path | None) -> None:
    """Products whose id, owner, description, tags, contract or columns contain TERM."""
    from meshctl.runtime import catalog

    found = catalog.search(_catalog_db(ctx, mesh_file), term)
    if not found:
        raise UserError(f"no product matches {term!r}")
    click.echo(format_table(catalog.LIST_HEADERS, catalog.list_rows(found)))


@catalog_group.command("show")
@click.argument("product")
@OPTIONAL_MESH
@click.pass_context
@reports_errors
def catalog_show(ctx: click.Context, product: str, mesh_file: Path | None) -> None:
    """PRODUCT's schema (PII and masking), latest checks, scorecard and lineage."""
    from meshctl.runtime import catalog

    db = _catalog_db(ctx, mesh_file)
    click.echo(catalog.render_show(catalog.show(db, _product_id(product, catalog.product_ids(db)))))


# ---------------------------------------------------------------------------
# audit and lineage: audit verify/report, lineage export  (meshctl.runtime)
# ---------------------------------------------------------------------------

AUDIT_MESH = click.option("--mesh", "audit_mesh", type=click.Path(dir_okay=False, path_type=Path),
                          default="mesh.yaml", show_default=True,
                          help="The mesh.yaml whose .meshctl/ holds the runs.")


@main.group()
def audit() -> None:
    """The hash-chained audit log: verify it, write a run's compliance report."""


@audit.command("verify")
@click.argument("run", required=False)
@AUDIT_MESH
@reports_errors
def audit_verify(run: str | None, audit_mesh: Path) -> None:
    """Recompute the audit chain of RUN, or without RUN the mesh's whole history.

    One line per problem (FILE:LINE: entry N: ...) and exit 1; else `N entries verified`.
    """
    from meshctl.runtime.audit import verify

    result = verify(run, audit_mesh)
    for line in result.problems:
        click.echo(line)
    for line in result.notes:
        click.echo(f"note: {line}", err=True)
    click.echo(result.summary())
    sys.exit(0 if result.ok else 1)


@audit.command("report")
@click.argument("run")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Directory for audit-RUN.md and audit-RUN.json [default: the run directory].")
@AUDIT_MESH
@reports_errors
def audit_report(run: str, output: Path | None, audit_mesh: Path) -> None:
    """Write a compliance report of RUN as Markdown and JSON. RUN is a run id, a run directory or `latest`."""
    from meshctl.runtime.audit_report import write_report
    from meshctl.runtime.run import resolve_run

    md, js, report = write_report(resolve_run(run, audit_mesh.resolve().parent), output)
    click.echo(f"wrote {md}\nwrote {js}")
    if not report["audit"]["verified"]:
        click.echo(f"warning: the run's audit log does not verify: {report['audit']['problems'][0]}", err=True)


@main.group()
def lineage() -> None:
    """Export a run's lineage for data catalogs."""


@lineage.command("export")
@click.argument("run")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON lines here instead of stdout.")
@AUDIT_MESH
@reports_errors
def lineage_export(run: str, output: Path | None, audit_mesh: Path) -> None:
    """Print RUN's OpenLineage RunEvents as JSON lines. RUN is a run id, a run directory or `latest`."""
    import json

    from meshctl.runtime.lineage import write_events
    from meshctl.runtime.run import resolve_run

    events, path = write_events(resolve_run(run, audit_mesh.resolve().parent), output)
    if path is None:
        for e in events:
            click.echo(json.dumps(e, separators=(",", ":")))
    else:
        failed = sum(e["eventType"] == "FAIL" for e in events)
        click.echo(f"wrote {len(events)} RunEvents ({failed} FAIL) to {path}", err=True)


# ---------------------------------------------------------------------------
# federated analytics: analyze  (meshctl.runtime)
# ---------------------------------------------------------------------------


@main.command()
@click.argument("name")
@MESH_FILE
@click.option("--headless", is_flag=True, help="Print one line per event instead of the dashboard.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the result JSON here.")
@click.option("--address", metavar="tcp://HOST:PORT",
              help="Coordinator address instead of mesh.yaml's; port 0 picks free ports.")
@reports_errors
def analyze(name: str, file: Path, headless: bool, output: Path | None, address: str | None) -> None:
    """Run analysis NAME of FILE: each domain sends only aggregates; print the merged table."""
    from meshctl.runtime import analytics
    from meshctl.runtime.launcher import start_run

    def launch(plan: Any, warm: Any) -> Any:
        analytics.check_sources(plan, analytics.find_analysis(plan, name, str(file)), file.resolve().parent)
        return start_run(file, plan, address=address, analysis=name, warm=warm)

    result = _launch(file, headless, launch)
    if result is None:  # detached: the result is written when the run ends
        return
    if result.signal:
        _end(result)
    if not result.ok:
        raise UserError(result.reason or "analysis failed") from None
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None  # (a pipe: the table)
    click.echo(analytics.render_result(analytics.read_result(result.run_dir, name, output), width))


@main.command()
@OPTIONAL_MESH
@reports_errors
def ledger(mesh_file: Path | None) -> None:
    """Print the privacy ledger: ε spent per product across runs, its budget, and the runs."""
    from meshctl.runtime.ledger import Ledger, ledger_path, render_ledger

    file = mesh_file or Path("mesh.yaml")
    plan = _compile_or_exit(file).plan
    budgets = {p.id: p.epsilon_budget for p in plan.products if p.epsilon_budget is not None}
    click.echo(render_ledger(Ledger(ledger_path(file.resolve().parent)).rows(budgets)))
