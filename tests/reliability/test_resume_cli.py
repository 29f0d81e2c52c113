"""Issue 9 item 3: a run whose whole process tree was killed leaves no secrets behind once meshctl
runs again, `meshctl resume RUN` finishes it from its newest checkpoint, and the supervisor that
gives up says so in its last line and ends the run."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from meshctl.runtime import events as ev
from meshctl.runtime.audit import verify_run
from meshctl.runtime.coordinator import MAX_RESUMES
from meshctl.runtime.launcher import prepare_run, start_run
from meshctl.runtime.run import last_line, run_live

FREE = ["--address", "tcp://127.0.0.1:0"]


def _kill_tree_after_checkpoint(hospitals: Path, rounds: int) -> tuple[Path, list[psutil.Process]]:
    """Start `meshctl up`, SIGKILL every process of it once round 3 is checkpointed."""
    hospitals.write_text(hospitals.read_text().replace("rounds: 15,", f"rounds: {rounds},"))
    up = subprocess.Popen([sys.executable, "-m", "meshctl", "up", "--headless", *FREE], cwd=hospitals.parent,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert up.stdout is not None
    for line in up.stdout:
        if re.match(r"malignancy +round +4/", line):
            break
    run = next((hospitals.parent / ".meshctl" / "runs").iterdir())
    deadline = time.monotonic() + 10
    while not (run / "checkpoints" / "malignancy" / "round-0003.safetensors").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    procs = [psutil.Process(up.pid), *psutil.Process(up.pid).children(recursive=True)]
    for p in procs:  # as the OOM killer or a power cut would: no one gets to clean up
        try:
            p.kill()
        except psutil.NoSuchProcess:  # it ended between listing and killing (a daemon whose parent died)
            pass
    up.communicate(timeout=10)
    psutil.wait_procs(procs, timeout=10)
    return run, procs


def test_kill_9_of_the_whole_tree_then_resume_completes_the_run(hospitals, meshctl):
    run, _ = _kill_tree_after_checkpoint(hospitals, rounds=8)
    assert list((run / "keys").glob("*.key_secret"))  # nothing was left alive to remove them
    assert not run_live(run)
    out = meshctl("resume", run.name, "--headless", cwd=hospitals.parent, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("run completed in ")
    events = ev.read_events(str(run / "events.jsonl"))
    [resumed] = [e for e in events if isinstance(e, ev.RunResumed)]
    assert resumed.rounds["malignancy"] >= 3 and "meshctl resume" in resumed.reason
    assert resumed.message().count("resumed") == 1  # not `resumed (resumed by meshctl resume (...))`
    assert f"job malignancy: 8 rounds (resumed after round {resumed.rounds['malignancy']}) in " in out.stdout
    assert isinstance(events[-1], ev.RunCompleted) and events[-1].ok
    with (run / "metrics.csv").open() as f:
        assert [int(r["round"]) for r in csv.DictReader(f)] == list(range(1, 9))
    assert (run / "models" / "malignancy.safetensors").is_file()
    assert not list((run / "keys").glob("*.key_secret"))
    v = meshctl("audit", "verify", run.name, cwd=hospitals.parent)
    assert v.returncode == 0, v.stdout + v.stderr
    again = meshctl("resume", run.name, cwd=hospitals.parent)
    assert again.returncode == 1 and "has ended: nothing to resume" in again.stderr.strip().splitlines()[-1]


def test_the_next_meshctl_removes_the_secrets_of_a_killed_run_but_not_a_live_ones(hospitals, meshctl, make_plan):
    dead, _ = _kill_tree_after_checkpoint(hospitals, rounds=100000)
    assert list((dead / "keys").glob("*.key_secret"))
    lines = (dead / "events.jsonl").read_text().count("\n")
    out = meshctl("coordinator", "--run-dir", str(dead), cwd=hospitals.parent, timeout=60)
    assert out.returncode == 1 and f"meshctl resume {dead.name}" in out.stderr  # not from round 1 again
    assert (dead / "events.jsonl").read_text().count("\n") == lines
    live = start_run(hospitals, make_plan(n=2, rounds=100000))  # what the next `meshctl up` does
    assert not list((dead / "keys").glob("*.key_secret"))
    secrets = list((live.m.path / "keys").glob("*.key_secret"))
    assert len(secrets) == 4  # coordinator, 2 domains, observer
    busy = meshctl("resume", live.m.run, cwd=hospitals.parent)  # cleans up too, but not a live run
    assert busy.returncode == 1 and f"run {live.m.run} is still running" in busy.stderr
    assert all(f.exists() for f in secrets)
    live.stop()
    assert not live.finish().ok


def test_a_supervisor_that_gives_up_says_so_last_and_ends_the_run(mesh_file, make_plan):
    run = start_run(mesh_file, make_plan(n=2, rounds=60))
    kills, armed, target, checkpointed = 0, False, 0, False
    for e in run.follow():  # kill each coordinator proper once it has checkpointed a round of its own
        if isinstance(e, (ev.RunResumed, ev.RunStarted)):  # (events of a killed one may still be in flight)
            armed, target, checkpointed = True, 0, False
        elif armed and isinstance(e, ev.DomainJoined) and not target:
            target = psutil.Process(e.pid).ppid()
            assert target not in (1, run.proc.pid, os.getpid())
        elif armed and isinstance(e, ev.CheckpointWritten):
            checkpointed = True
        elif armed and target and checkpointed and isinstance(e, ev.RoundCompleted) and kills <= MAX_RESUMES:
            os.kill(target, signal.SIGKILL)
            kills, armed = kills + 1, False
    result = run.finish()
    assert kills == MAX_RESUMES + 1
    assert not result.ok and f"gave up: {MAX_RESUMES} resumes (at most {MAX_RESUMES})" in result.reason
    assert last_line(run.log) == (f"coordinator killed by SIGKILL; gave up resuming the run: "
                                  f"{MAX_RESUMES} resumes (at most {MAX_RESUMES})")
    events = ev.read_events(str(run.m.path / "events.jsonl"))
    assert isinstance(events[-1], ev.RunCompleted) and not events[-1].ok
    assert len([e for e in events if isinstance(e, ev.RunResumed)]) == MAX_RESUMES
    assert verify_run(run.m.path).ok
    assert not list((run.m.path / "keys").glob("*.key_secret"))


def test_resume_refuses_a_run_that_never_started(mesh_file, make_plan, meshctl):
    manifest, _ = prepare_run(mesh_file, make_plan(n=2, rounds=3), address="tcp://127.0.0.1:0")
    from meshctl.runtime.launcher import release_run

    release_run(manifest.path)
    out = meshctl("resume", "latest", "--mesh", str(mesh_file), cwd=mesh_file.parent)
    assert out.returncode == 1 and f"run {manifest.run} never started" in out.stderr
    assert not list((manifest.path / "keys").glob("*.key_secret"))
