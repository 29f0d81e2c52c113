"""The coordinator's processes: the supervisor that resumes a dead coordinator, the warm fork, the forked daemons.

`main` is the coordinator process of a run (`meshctl coordinator RUN_DIR`);
`warm_main` the one `meshctl up` starts before it compiles; `_coordinate` the
coordinator proper, which forks the local daemons and runs `Coordinator`.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from pathlib import Path
from typing import Any

from meshctl.compiler.plan import Plan
from meshctl.runtime import events as ev
from meshctl.runtime.coordinator.outputs import _drop_torn_line
from meshctl.runtime.coordinator.service import INTERNAL_ERROR, Coordinator
from meshctl.runtime.keys import KeyPair
from meshctl.runtime.run import (
    DETACHED_FILE,
    EVENTS_FILE,
    PID_FILE,
    RunManifest,
    hold_run,
    last_line,
    run_ended,
)


def warm_main() -> int:
    """`meshctl coordinator --warm`: import what a run needs, then run the directory read from stdin.

    Started by `meshctl up` before it compiles (meshctl.runtime.launcher.WarmCoordinator);
    end-of-file instead of a directory means no run came of it: exit quietly.
    """
    import sys

    from meshctl.runtime import daemon, governance  # noqa: F401 - the forked daemons' imports
    from meshctl.runtime.daemon import prepare_fork

    prepare_fork(None)
    governance._environment()  # the CEL parser tables, before there is a plan to need them
    line = sys.stdin.readline().strip()
    if not line:
        return 0
    log = os.open(Path(line) / "logs" / "coordinator.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    return main(line)


MAX_RESUMES = 3
"""A coordinator that keeps dying without new checkpoints is not restarted more than this."""
WATCH_S = 0.2
"""How often the supervisor and the coordinator proper check that their parent is still there."""


def main(run_dir: str | Path, resume: bool = False) -> int:
    """The coordinator process: a supervisor that forks the coordinator proper and resumes it.

    The coordinator proper (`_coordinate`) runs in a child; when that child dies without
    ending the run (killed, or an internal error), the supervisor kills what it left
    behind and forks a new one that takes the run up from its newest checkpoints (a
    `run_resumed` event) — at most MAX_RESUMES times, and only while checkpoints
    advance. Analysis runs are not resumed (their ε would be charged twice). SIGTERM
    and SIGINT are passed on to the child, which ends the run in order.

    The process that started the supervisor (`meshctl up` or `meshctl resume`) owns the run:
    when it dies without having detached (the `detached` marker), the run is stopped in
    order. A run directory that has events already is only taken up with `resume`.
    """
    import sys

    manifest = RunManifest.read(run_dir)
    starter, label = os.getppid(), "meshctl resume" if resume else "meshctl up"
    has_events = (manifest.path / EVENTS_FILE).is_file() and (manifest.path / EVENTS_FILE).stat().st_size > 0
    if has_events != resume:
        print(f"{manifest.path}: error: " + (f"run {manifest.run} has events already: continue it with "
              f"`meshctl resume {manifest.run}`" if has_events else "the run never started: nothing to resume"),
              file=sys.stderr, flush=True)
        return 1
    hold_run(manifest.path)  # held (and inherited by every child) until the run's last process exits
    (manifest.path / PID_FILE).write_text(f"{os.getpid()}\n")  # whom `meshctl stop` signals
    if os.getpgrp() != os.getpid():  # `up` starts us in a session of our own; anyone else: a group
        os.setpgid(0, 0)             # of our own, so that _kill_leftovers reaches nothing else
    child = 0
    stopping: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        if child:
            try:
                os.kill(child, signal.SIGTERM if signum == signal.SIGHUP else signum)  # its SIGHUP: starter gone
            except ProcessLookupError:  # it has ended already
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    resumed = f"by {label}: its previous processes were gone" if resume else ""
    resumes, progress = 0, None
    while True:
        child = os.fork()
        if child == 0:
            _child(run_dir, resumed, f"{label} (pid {starter}) is gone")
        code, orphaned = _wait_child(child, manifest.path, starter)
        started = (manifest.path / EVENTS_FILE).is_file()
        over = (code in (0, 1, INTERNAL_ERROR) or bool(stopping) or orphaned or bool(manifest.analysis)
                or not manifest.checkpoint or not started or _run_ended(manifest.path))
        now = None if over else _checkpoint_rounds(manifest.path)
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        if code > 0:
            how += f" ({last_line(manifest.path / 'logs' / 'coordinator.log')})"
        if over or resumes >= MAX_RESUMES or (resumes and now == progress):
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # the run is over: a late signal
                signal.signal(sig, signal.SIG_IGN)                     # must not make it "killed"
            if not _run_ended(manifest.path):
                why = ("it never started" if not started else
                       "analysis runs are not resumed" if manifest.analysis else
                       "checkpoints are off" if not manifest.checkpoint else
                       "stopped" if stopping or orphaned else
                       f"{resumes} resumes (at most {MAX_RESUMES})" if resumes >= MAX_RESUMES else
                       "no new checkpoint since the last resume")
                _kill_leftovers()
                reason = f"the coordinator {how}; gave up: {why}"
                _end_run(manifest, reason)
                print(f"coordinator {how}; gave up resuming the run: {why}", flush=True)
            _remove_secrets(manifest.path)
            return code if code >= 0 else 2
        _kill_leftovers()
        print(f"coordinator {how}; resuming from the newest checkpoints", flush=True)
        resumed, resumes, progress = f"the coordinator {how}", resumes + 1, now


def _child(run_dir: str | Path, resumed: str, gone: str) -> None:
    """Body of the forked coordinator proper: never returns into the supervisor's code."""
    import traceback

    code = 2
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        code = _coordinate(run_dir, resumed, gone)
    except BaseException:  # noqa: BLE001 - e.g. a port taken between the check and the bind
        traceback.print_exc()
    finally:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait_child(child: int, run_dir: Path, starter: int) -> tuple[int, bool]:
    """Wait for the coordinator proper; SIGHUP it once when `starter` dies without detaching.

    Returns (exit code, whether the run was stopped because its starter is gone).
    """
    orphaned = False
    watched = _pidfds(child)
    try:
        while True:
            pid, status = os.waitpid(child, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status), orphaned
            if not orphaned and os.getppid() != starter and not (run_dir / DETACHED_FILE).exists():
                orphaned = True
                try:
                    os.kill(child, signal.SIGHUP)  # the coordinator proper ends the run: "... is gone"
                except ProcessLookupError:
                    pass
            # The child's end is seen at once (its pidfd); the starter's only by this poll, on purpose:
            # a `kill -9` of the whole tree (the starter first) must not find a supervisor quick enough
            # to end the run in order, which would leave nothing for `meshctl resume` (tests/multihost).
            if watched:
                select.select(watched, [], [], WATCH_S)
            else:
                time.sleep(WATCH_S)
    finally:
        for fd in watched:
            os.close(fd)


def _pidfds(*pids: int) -> list[int]:
    """A pidfd (readable once the process has ended) per pid, or [] where the kernel has none."""
    fds: list[int] = []
    try:
        for pid in pids:
            fds.append(os.pidfd_open(pid))
    except (AttributeError, OSError):  # no pidfd_open (not Linux 5.3+), or a pid already gone
        for fd in fds:
            os.close(fd)
        return []
    return fds


def _end_run(manifest: RunManifest, reason: str) -> None:
    """Append run_completed ok=false to the audit chain (no coordinator is left to do it)."""
    from meshctl.runtime.audit import Chain

    path = manifest.path / EVENTS_FILE
    _drop_torn_line(path)
    chain = Chain.open(path)
    event = ev.RunCompleted(run=manifest.run, ok=False, seconds=0.0, reason=reason)
    event = event.model_copy(update={"seq": len(chain.hashes) + 1, "ts": time.time()})
    with path.open("a", encoding="utf-8") as f:
        f.write(chain.seal(event.to_dict()) + "\n")
    try:
        chain.finish(manifest.path)
    except (OSError, ValueError) as err:
        print(f"warning: audit head not recorded: {err}", flush=True)


def _remove_secrets(run_dir: Path) -> None:
    for secret in (run_dir / "keys").glob("*.key_secret"):
        secret.unlink(missing_ok=True)


def _checkpoint_rounds(run_dir: Path) -> dict[str, int]:
    return {d.name: len(list(d.glob("round-*.safetensors")))
            for d in sorted((run_dir / "checkpoints").glob("*")) if d.is_dir()}


def _run_ended(run_dir: Path) -> bool:
    return run_ended(run_dir)


def _kill_leftovers() -> None:
    """SIGKILL every other process of this process group (the dead coordinator's daemons)."""
    import psutil

    me, group = os.getpid(), os.getpgrp()
    for proc in psutil.process_iter(["pid"]):
        pid = proc.info["pid"]
        try:
            if pid != me and os.getpgid(pid) == group:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
    while True:  # reap the ones that are our children
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break


def _coordinate(run_dir: str | Path, resumed: str = "", gone: str = "") -> int:
    """The coordinator proper: fork the local daemons (sharing imported torch), then coordinate.

    Forking here, after the heavy imports and before any thread or socket exists,
    is what makes a local mesh start in about the time of one `import torch`.
    SIGHUP (from the supervisor: the run's starter is gone, `gone` says so) and the death of
    the supervisor itself end the run in order, with that reason.
    """
    import sys

    from meshctl.errors import MeshctlError

    reasons: list[str] = []
    coordinator: list[Coordinator] = []
    supervisor = os.getppid()

    def hang_up(_signum: int, _frame: Any) -> None:  # also wakes the coordinator's poller
        reasons.append(gone or "stopped by SIGHUP")
        if coordinator and not coordinator[0].stop_reason:
            coordinator[0].stop_reason = reasons[0]

    signal.signal(signal.SIGHUP, hang_up)
    manifest = RunManifest.read(run_dir)
    plan = Plan.read(manifest.path / "plan.toml")
    if manifest.local_domains:
        from meshctl.runtime.daemon import prepare_fork

        plan.content_hash()  # once here: every forked daemon checks it against plan.plan.hash
        prepare_fork(plan)
    children: dict[int, str] = {}
    for domain, key_file in manifest.local_domains.items():
        pid = os.fork()
        if pid == 0:
            os._exit(_daemon_child(manifest, plan, domain, key_file))
        children[pid] = domain
    try:  # the service runs the plan's training jobs, or the manifest's analysis (meshctl analyze)
        coordinator.append(Coordinator(manifest, plan, children, resumed=resumed))
        if reasons:
            coordinator[0].stop_reason = reasons[0]
        threading.Thread(target=_watch_supervisor, args=(supervisor, reasons), name="supervisor",
                         daemon=True).start()
        return coordinator[0].run(restore_signals=False)
    except MeshctlError as err:
        print(err.render(), file=sys.stderr)
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        return err.exit_code


def _watch_supervisor(supervisor: int, reasons: list[str]) -> None:
    """Thread of the coordinator proper: when the supervisor dies, end the run ("supervisor gone")."""
    while os.getppid() == supervisor:
        time.sleep(WATCH_S)
    reasons.insert(0, f"supervisor gone (pid {supervisor} died)")
    os.kill(os.getpid(), signal.SIGHUP)  # the handler runs in the main thread and wakes its poller


def _daemon_child(manifest: RunManifest, plan: Plan, domain: str, key_file: str) -> int:
    """Body of a forked daemon process; never returns into the parent's code."""
    import sys
    import traceback

    from meshctl.errors import MeshctlError
    from meshctl.runtime.daemon import Daemon, DaemonConfig

    code = 2
    try:
        log = os.open(manifest.path / "logs" / f"{domain}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        server = manifest.coordinator_public.encode()
        cfg = DaemonConfig(domain=domain, plan=plan, base_dir=Path(manifest.base_dir), coordinator=manifest.router,
                           server_key=server, keys=KeyPair.load(key_file), run=manifest.run,
                           threads=manifest.threads, parent_pid=os.getppid())
        code = Daemon(cfg).run()
    except MeshctlError as err:
        if err.where:  # the full story (a host path) for this log; its last line travels in DomainLost
            print(err.render(), file=sys.stderr)
        print(f"error: {err.message}" + (f" (hint: {err.hint})" if err.hint else ""), file=sys.stderr)
        code = err.exit_code
    except BaseException as err:  # noqa: BLE001 - a daemon must never die silently
        traceback.print_exc()  # may quote a value: it stays here; the last line, which travels, does not
        print(f"internal error: the daemon failed ({type(err).__name__}); the traceback is above",
              file=sys.stderr)
        code = 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code
