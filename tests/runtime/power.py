"""Killing a run as a power cut would: its whole process tree at once, no one left to clean up."""

from __future__ import annotations

import psutil

from meshctl.runtime.launcher import LocalRun, release_run


def power_cut(run: LocalRun) -> None:
    """SIGKILL `run`'s coordinator and every process under it, wait until they are gone, and release the
    run's lock (this process started the run, so it holds it): `meshctl resume` can then take it up."""
    procs = [psutil.Process(run.proc.pid), *psutil.Process(run.proc.pid).children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    run.proc.wait(timeout=10)
    release_run(run.m.run_dir)
