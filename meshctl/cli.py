"""The `meshctl` command line: parse, call one library function, render, exit code.

Every command body is short; the work lives in meshctl.compiler, meshctl.runtime
and meshctl.tui. User errors print one line and exit 1; internal errors exit 2.
Heavy imports (torch, textual) happen inside the commands that need them.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

import click

from meshctl import __version__
from meshctl.errors import MeshctlError

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

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshctl")
def main() -> None:
    """Run a federated data mesh declared in one mesh.yaml."""


# ---------------------------------------------------------------------------
# compiler commands: validate, plan  (meshctl.compiler)
# ---------------------------------------------------------------------------
# (filled in by the compiler work)


# ---------------------------------------------------------------------------
# runtime commands: up, daemon, coordinator  (meshctl.runtime)
# ---------------------------------------------------------------------------
# (filled in by the runtime work)
