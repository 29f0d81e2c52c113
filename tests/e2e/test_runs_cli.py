"""Operating a run from another shell, with real processes: `meshctl up` in the background, then
`meshctl runs`, `status latest`, `logs latest --domain`, `stop latest` from other processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

FREE = ["--address", "tcp://127.0.0.1:0"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (ProcessLookupError, OSError):
        return False


def test_runs_status_logs_and_stop_a_live_run_from_another_shell(hospitals, meshctl):
    cwd = hospitals.parent
    hospitals.write_text(hospitals.read_text().replace("rounds: 15,", "rounds: 100000,"))
    # a slow domain's pace (0.2 s a round): the run stays live for the commands below without
    # burning the CPU they need (the daemon's MESHCTL_TEST_SLOW_TRAIN_S hook)
    up = subprocess.Popen([sys.executable, "-m", "meshctl", "up", "--headless", *FREE], cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          env={**os.environ, "MESHCTL_TEST_SLOW_TRAIN_S": "0.2"})
    try:
        assert up.stdout is not None
        for line in up.stdout:  # wait until training is under way
            if re.match(r"malignancy +round +3/", line):
                break
        # keep reading what `up` prints (a line per round): a full pipe would block `up` on a write, and
        # `meshctl stop` waits for every process of the run, `up` included, to exit
        drain = threading.Thread(target=lambda: [None for _ in up.stdout], daemon=True)
        drain.start()
        run = next((cwd / ".meshctl" / "runs").iterdir())

        listed = meshctl("runs", cwd=cwd)
        assert listed.returncode == 0, listed.stderr
        head, row = listed.stdout.splitlines()[:2]
        assert head.split()[:3] == ["RUN", "STATUS", "STARTED"]
        assert row.split()[:2] == [run.name, "running"] and "malignancy" in row and "/100000" in row
        as_json = json.loads(meshctl("runs", "--format", "json", cwd=cwd).stdout)
        assert as_json[0]["run"] == run.name and as_json[0]["status"] == "running"

        status = meshctl("status", "latest", cwd=cwd)
        assert status.returncode == 0, status.stderr
        assert status.stdout.startswith(f"run {run.name}: running")
        assert "domains: 3 connected, 0 missing, 0 lost or refused" in status.stdout
        assert re.search(r"^malignancy +training +\d+/100000", status.stdout, re.MULTILINE), status.stdout

        logs = meshctl("logs", "latest", "--domain", "charite", "-n", "3", cwd=cwd)
        assert logs.returncode == 0, logs.stderr
        lines = logs.stdout.splitlines()
        assert len(lines) == 3 and all(re.match(r"job malignancy round \d+: trained \d+ examples", ln)
                                       for ln in lines), lines
        missing = meshctl("logs", "latest", "--domain", "nowhere", cwd=cwd)
        assert missing.returncode == 1 and missing.stderr.count("\n") == 1
        assert "has no log of domain nowhere" in missing.stderr and "charite" in missing.stderr

        pids = [json.loads(ln)["pid"] for ln in (run / "events.jsonl").read_text().splitlines()
                if '"type":"domain_joined"' in ln]
        supervisor = int((run / "coordinator.pid").read_text())
        assert len(pids) == 3 and _alive(supervisor)

        follow = subprocess.Popen([sys.executable, "-m", "meshctl", "logs", "latest", "--domain", "karolinska",
                                   "--follow"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        stopped = meshctl("stop", "latest", cwd=cwd, timeout=90)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.strip() == (f"run {run.name} stopped: stopped by `meshctl stop` "
                                          f"(SIGTERM from pid {stopped.stdout.split('pid ')[-1][:-2]})")
        assert time.monotonic() - t0 < 30
        up.wait(timeout=30)
        err = up.stderr.read()  # (stdout is the drain thread's)
        assert up.returncode == 1 and "Traceback" not in err  # `up` reports the failed run
        assert err.strip().splitlines()[-1].startswith("error: stopped by `meshctl stop`")
        followed, _ = follow.communicate(timeout=30)  # --follow returns once the run's processes are gone
        assert follow.returncode == 0 and len(re.findall(r"^job malignancy round \d+: trained", followed, re.MULTILINE)) > 3
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        if "follow" in locals() and follow.poll() is None:
            follow.kill()
            follow.wait()

    events = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "run_completed" and not events[-1]["ok"]
    assert "meshctl stop" in events[-1]["reason"] and "SIGTERM" in events[-1]["reason"]
    assert not any(_alive(p) for p in [*pids, supervisor]), "a process of the run outlived `meshctl stop`"
    assert not list((run / "keys").glob("*.key_secret"))

    after = meshctl("runs", cwd=cwd).stdout.splitlines()[1]
    assert after.split()[:2] == [run.name, "stopped"] and after.endswith(events[-1]["reason"])
    outcome = meshctl("status", cwd=cwd)
    assert outcome.stdout.startswith(f"run {run.name}: stopped: stopped by `meshctl stop`")
    again = meshctl("stop", run.name, cwd=cwd)
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert f"run {run.name} is not running (stopped by `meshctl stop`" in again.stderr
    coordinator_log = meshctl("logs", run.name, "--coordinator", cwd=cwd)
    assert coordinator_log.returncode == 0


def test_status_and_logs_of_a_completed_run_and_one_line_errors(hospitals, meshctl, tmp_path):
    cwd = hospitals.parent
    hospitals.write_text(hospitals.read_text().replace("rounds: 15,", "rounds: 2,"))
    none = meshctl("runs", cwd=cwd)
    assert none.returncode == 0 and none.stdout.startswith("no runs yet under .meshctl/runs/")
    for args in (("status",), ("logs",), ("stop", "latest")):
        out = meshctl(*args, cwd=cwd)
        assert out.returncode == 1 and out.stderr == (
            ".meshctl/runs: error: no runs yet (hint: start one with `meshctl up`)\n"), (args, out.stderr)
    done = meshctl("up", "--headless", *FREE, cwd=cwd)
    assert done.returncode == 0, done.stderr
    run = Path(done.stdout.strip().splitlines()[-1].rsplit(": ", 1)[-1])
    row = meshctl("runs", "--mesh", str(hospitals), cwd=tmp_path).stdout.splitlines()[1]
    assert row.split()[:2] == [run.name, "completed"] and "2/2" in row and "accuracy 0." in row
    status = meshctl("status", run.name[-4:], "--mesh", str(hospitals), cwd=tmp_path)
    assert status.returncode == 1 and f"did you mean {run.name}?" in status.stderr
    status = meshctl("status", str(run), cwd=tmp_path)
    assert status.stdout.startswith(f"run {run.name}: completed") and "malignancy  completed  2/2" in status.stdout
    logs = meshctl("logs", "latest", cwd=cwd)
    assert "==> logs/charite.log <==" in logs.stdout and "==> logs/karolinska.log <==" in logs.stdout
    follow = meshctl("logs", "latest", "--domain", "charite", "--follow", cwd=cwd, timeout=20)
    assert follow.returncode == 0 and "round 2: trained" in follow.stdout  # an ended run: print, then exit
