"""Issue 9 item 3: every signal `meshctl up` can receive stops the whole run in order; a killed
`up` or a killed supervisor is noticed by the run, which then ends itself (real processes)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from meshctl.runtime import events as ev
from meshctl.runtime.audit import verify_run
from meshctl.runtime.run import run_live

FREE = ["--address", "tcp://127.0.0.1:0"]


def _default_signals() -> None:
    """SIGINT and SIGHUP as a terminal's shell leaves them: a suite started under nohup or `&`
    ignores them, and `up` keeps a signal it inherits ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _start_up(hospitals: Path) -> subprocess.Popen[str]:
    """`meshctl up --headless` on a run too long to end by itself; returns once round 2 is done."""
    hospitals.write_text(hospitals.read_text().replace("rounds: 15,", "rounds: 100000,"))
    proc = subprocess.Popen([sys.executable, "-m", "meshctl", "up", "--headless", *FREE], cwd=hospitals.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)  # noqa: PLW1509
    assert proc.stdout is not None
    for line in proc.stdout:
        if re.match(r"malignancy +round +2/", line):
            return proc
    raise AssertionError(f"no round 2: {proc.communicate()[1]}")


def _run_dir(hospitals: Path) -> Path:
    return next((hospitals.parent / ".meshctl" / "runs").iterdir())


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _live(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def _wait_gone(procs: list[psutil.Process], seconds: float = 15) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    while _live(procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _live(procs)


def _last_event(run: Path, seconds: float = 20) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        lines = (run / "events.jsonl").read_text().splitlines()
        try:
            last = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:  # caught while the coordinator writes the line
            last = {}
        if last.get("type") == "run_completed":
            return last
        time.sleep(0.1)
    raise AssertionError(f"the run did not end: {lines[-1] if lines else 'no events'}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_to_up_stop_every_process_and_remove_the_secrets(hospitals, sig):
    up = _start_up(hospitals)
    procs = _tree(up.pid)
    assert len(procs) >= 5  # up, supervisor, coordinator proper, 3 daemons
    up.send_signal(sig)
    out, err = up.communicate(timeout=60)
    assert up.returncode == 128 + sig, err  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
    run = _run_dir(hospitals)
    last_line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last_line == f"run stopped: {run} (interrupted by {sig.name})"
    assert "failed" not in out + err  # a run stopped on purpose is stopped, not failed
    assert _wait_gone(procs) == []
    last = _last_event(run)
    assert not last["ok"] and last["reason"] == f"stopped by {sig.name}"  # the signal the user sent, as `up` said
    assert not list((run / "keys").glob("*.key_secret"))
    assert verify_run(run).ok


def test_a_killed_up_is_noticed_and_the_run_stops_by_itself(hospitals):
    up = _start_up(hospitals)
    procs = _tree(up.pid)
    up.kill()
    up.communicate(timeout=10)
    run = _run_dir(hospitals)
    last = _last_event(run, seconds=10)
    assert not last["ok"] and last["reason"] == f"meshctl up (pid {up.pid}) is gone"
    assert _wait_gone(procs) == []
    assert not list((run / "keys").glob("*.key_secret"))
    assert verify_run(run).ok


def test_a_killed_supervisor_ends_the_run_and_up_reports_the_failure(hospitals):
    up = _start_up(hospitals)
    procs = _tree(up.pid)
    [supervisor] = psutil.Process(up.pid).children()
    supervisor.kill()
    _, err = up.communicate(timeout=60)
    assert up.returncode == 1 and "Traceback" not in err
    assert "supervisor gone" in err.strip().splitlines()[-1]
    assert _wait_gone(procs) == []
    run = _run_dir(hospitals)
    last = ev.read_events(str(run / "events.jsonl"))[-1]
    assert isinstance(last, ev.RunCompleted) and not last.ok and "supervisor gone" in last.reason
    assert not list((run / "keys").glob("*.key_secret"))


def test_a_detached_run_outlives_the_up_that_started_it(mesh_file, make_plan):
    """The rule: only an `up` that dies while attached stops the run; one that detached does not."""
    code = ("import sys\nfrom pathlib import Path\nfrom meshctl.runtime.launcher import start_run\n"
            "from meshctl.compiler.plan import Plan\n"
            "run = start_run(Path(sys.argv[1]), Plan.read(sys.argv[2]))\n"
            "for e in run.follow():\n"
            "    if type(e).__name__ == 'RoundCompleted':\n"
            "        break\n"
            "run.detach()\nprint(run.m.run_dir, flush=True)\n")
    plan = mesh_file.parent / "plan.toml"
    make_plan(n=2, rounds=40).write(plan)
    out = subprocess.run([sys.executable, "-c", code, str(mesh_file), str(plan)], capture_output=True, text=True,
                         timeout=60, check=True)
    run = Path(out.stdout.strip())
    last = _last_event(run, seconds=60)
    assert last["ok"], last
    deadline = time.monotonic() + 15
    while run_live(run) and time.monotonic() < deadline:  # the run's last process lets go of its lock
        time.sleep(0.1)
    assert not run_live(run)
    assert not list((run / "keys").glob("*.key_secret"))
