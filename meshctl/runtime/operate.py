"""Operating a run from another shell: `meshctl logs` and `meshctl stop`.

A run is found with `meshctl.runtime.run.resolve_run` (an id, a directory or `latest`) and
read with `RunDir`. `stop_run` signals the run's supervisor (its pid is in `coordinator.pid`)
after writing who asked into the run's `stop` file, which becomes the run's stop reason; the
coordinator then ends the run in order (run_completed ok=false, daemons shut down, secrets
removed) exactly as on Ctrl-C in `meshctl up`.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from meshctl.errors import UserError
from meshctl.runtime.run import (
    PID_FILE,
    RUNNING,
    STOP_FILE,
    RunDir,
    resolve_run,
    run_ended,
    run_live,
    show_path,
)

__all__ = ["follow_logs", "log_files", "read_logs", "stop_run"]

COORDINATOR_LOG = "coordinator.log"


# -- logs ------------------------------------------------------------------------------


def log_files(run_dir: Path, domains: tuple[str, ...] = (), coordinator: bool = False) -> list[Path]:
    """The log files `meshctl logs` prints: the coordinator's and/or the named domains', or all of them.

    Raises:
        UserError: a named log does not exist (with the ones that do).
    """
    logs = run_dir / "logs"
    present = sorted(logs.glob("*.log"), key=lambda p: (p.name != COORDINATOR_LOG, p.name))
    if not domains and not coordinator:
        if not present:
            raise UserError(f"run {run_dir.name} has no logs", where=show_path(logs))
        return present
    wanted = ([COORDINATOR_LOG] if coordinator else []) + [f"{d}.log" for d in domains]
    have = [p.stem for p in present if p.name != COORDINATOR_LOG]
    for name in wanted:
        if not (logs / name).is_file():
            what = "the coordinator" if name == COORDINATOR_LOG else f"domain {name[:-4]}"
            raise UserError(f"run {run_dir.name} has no log of {what}", where=show_path(logs),
                            hint=f"domains with a log here: {', '.join(have) or 'none'}; "
                            "a remote domain logs on its own host")
    return [logs / name for name in wanted]


def _tail(path: Path, n: int | None) -> tuple[list[str], int]:
    """The last `n` lines of a file (all when None) and the offset after its last complete line."""
    try:
        data = path.read_bytes()
    except OSError:
        return [], 0
    end = data.rfind(b"\n") + 1
    lines = data[:end].decode("utf-8", errors="replace").splitlines()
    return (lines if n is None else lines[-n:] if n else []), end


def read_logs(files: list[Path], n: int | None = None) -> Iterator[str]:
    """Lines of the files; a `==> logs/NAME <==` header before each when there are several."""
    for i, path in enumerate(files):
        if len(files) > 1:
            yield f"{'' if i == 0 else chr(10)}==> {path.parent.name}/{path.name} <=="
        yield from _tail(path, n)[0]


def follow_logs(run_dir: Path, files: list[Path], echo: Callable[[str], None], *, n: int | None = 10,
                poll_s: float = 0.2, live: Callable[[], bool] | None = None) -> None:
    """Print the last `n` lines of each file, then new lines as they are written, until the run's
    processes have all ended (then the files are read one last time)."""
    is_live = live or (lambda: run_live(run_dir))
    offsets: dict[Path, int] = {}
    shown: Path | None = None
    for line in read_logs(files, n):
        echo(line)
    for path in files:
        offsets[path] = _tail(path, 0)[1]
        shown = path
    while True:
        going = is_live()
        for path in files:
            try:
                with path.open("rb") as f:
                    f.seek(offsets[path])
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1
            if not end:
                continue
            offsets[path] += end
            if len(files) > 1 and shown != path:
                echo(f"\n==> {path.parent.name}/{path.name} <==")
                shown = path
            for line in data[:end].decode("utf-8", errors="replace").splitlines():
                echo(line)
        if not going:
            return
        time.sleep(poll_s)


# -- stop ------------------------------------------------------------------------------


def stop_run(spec: str, root: str | Path, *, timeout_s: float = 60.0, poll_s: float = 0.1) -> RunDir:
    """`meshctl stop RUN`: SIGTERM the run's supervisor and wait for the run to end in order.

    Returns the run as it ended (its `completion` says how).

    Raises:
        UserError: the run is not running; its coordinator process is unknown; or it did not end
            within `timeout_s`.
    """
    run_dir = resolve_run(spec, root)
    run = RunDir(run_dir)
    state, reason = run.status
    where = show_path(run_dir)
    if state != RUNNING:
        why = reason if reason.startswith(state) else f"{state}: {reason}" if reason else state
        raise UserError(f"run {run.id} is not running ({why})",
                        where=where, hint="`meshctl runs` lists the runs and their status")
    pid = run.supervisor_pid()
    if pid is None:
        raise UserError(f"run {run.id} is running but its coordinator process is unknown (no live pid in "
                        f"{PID_FILE})", where=where, hint="stop it where it was started (Ctrl-C)")
    (run_dir / STOP_FILE).write_text(f"stopped by `meshctl stop` (SIGTERM from pid {os.getpid()})\n",
                                     encoding="utf-8")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:  # it ended just now: the wait below says how
        pass
    deadline = time.monotonic() + timeout_s
    while not run_ended(run_dir) and run_live(run_dir) and time.monotonic() < deadline:
        time.sleep(poll_s)
    while run_live(run_dir) and time.monotonic() < deadline:  # the run's processes exit after its last event
        time.sleep(poll_s)
    ended = RunDir(run_dir)
    if ended.completion is None and ended.live:
        raise UserError(f"run {run.id} did not stop within {timeout_s:g}s", where=where,
                        hint=f"its coordinator is pid {pid}: `meshctl stop` it again, or kill it and "
                        "`meshctl resume` later")
    return ended
