"""Issue 9 item 3, the dashboard path: `meshctl up` with its dashboard in a real terminal (tmux)
stops the whole run when it gets SIGTERM, and when its terminal goes away (SIGHUP)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

from meshctl.runtime.audit import verify_run

ROOT = Path(__file__).resolve().parents[2]
TMUX = shutil.which("tmux") or "tmux"


def _tmux(sock: str, *args: str) -> str:
    return subprocess.run([TMUX, "-L", sock, *args], capture_output=True, text=True, timeout=20,
                          check=False).stdout


def _wait(what, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out")


def _start(tmp_path: Path, sock: str) -> tuple[psutil.Process, list[psutil.Process]]:
    """A long run in the dashboard; returns `up` and its process tree once round 2 is done."""
    shutil.copytree(ROOT / "examples" / "hospitals" / "data", tmp_path / "examples" / "hospitals" / "data")
    (tmp_path / "mesh.yaml").write_text((ROOT / "mesh.yaml").read_text().replace("rounds: 15,", "rounds: 100000,"))
    meshctl = Path(sys.executable).parent / "meshctl"
    command = f"cd {tmp_path} && {meshctl} up --address tcp://127.0.0.1:0; echo exit=$?; sleep 60"
    _tmux(sock, "new-session", "-d", "-s", "dash", "-x", "120", "-y", "40", command)
    shell = psutil.Process(int(_tmux(sock, "display-message", "-p", "-t", "dash", "#{pane_pid}")))
    up = _wait(lambda: next((p for p in shell.children() if "up" in p.cmdline()), None), 30)
    runs = tmp_path / ".meshctl" / "runs"

    def round_two() -> bool:
        events = next(runs.iterdir(), None) if runs.is_dir() else None
        return events is not None and (events / "events.jsonl").is_file() and \
            (events / "events.jsonl").read_text().count('"type":"round_completed"') >= 2

    try:
        _wait(round_two, 60)
    except AssertionError:
        raise AssertionError(_tmux(sock, "capture-pane", "-p", "-t", "dash")) from None
    return up, [up, *up.children(recursive=True)]


def _alive(p: psutil.Process) -> bool:
    """Running and not a zombie; a process that exits between the two questions is not alive."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _ended(tmp_path: Path, procs: list[psutil.Process]) -> dict:
    run = next((tmp_path / ".meshctl" / "runs").iterdir())

    def last() -> dict | None:
        lines = (run / "events.jsonl").read_text().splitlines()
        try:
            event = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):  # caught while the coordinator writes the line
            return None
        return event if event["type"] == "run_completed" else None

    event = _wait(last, 30)
    _wait(lambda: not [p for p in procs if _alive(p)], 20)
    assert not list((run / "keys").glob("*.key_secret"))
    assert verify_run(run).ok
    return event


def test_sigterm_to_up_in_the_dashboard_stops_the_run_and_exits_143(tmp_path: Path) -> None:
    sock = f"meshctl-sig-{uuid.uuid4().hex[:8]}"
    try:
        up, procs = _start(tmp_path, sock)
        up.send_signal(signal.SIGTERM)
        event = _ended(tmp_path, procs)
        assert not event["ok"] and "SIGTERM" in event["reason"]
        _wait(lambda: "exit=143" in _tmux(sock, "capture-pane", "-p", "-t", "dash"), 20)
    finally:
        _tmux(sock, "kill-server")


def test_a_terminal_that_goes_away_stops_the_run(tmp_path: Path) -> None:
    sock = f"meshctl-hup-{uuid.uuid4().hex[:8]}"
    try:
        _, procs = _start(tmp_path, sock)
        _tmux(sock, "kill-server")  # the terminal is gone: SIGHUP to the session's processes
        event = _ended(tmp_path, procs)
        assert not event["ok"]
    finally:
        _tmux(sock, "kill-server")


def test_stop_the_run_in_the_quit_dialog_says_stopped_and_exits_130(tmp_path: Path) -> None:
    """Issue 14: "stop the run" is a stop on purpose, as Ctrl-C is: `run stopped: <run dir>`, exit 130."""
    sock = f"meshctl-stop-{uuid.uuid4().hex[:8]}"
    try:
        _, procs = _start(tmp_path, sock)
        _tmux(sock, "send-keys", "-t", "dash", "q")
        _wait(lambda: "Stop the run" in _tmux(sock, "capture-pane", "-p", "-t", "dash"), 20)
        _tmux(sock, "send-keys", "-t", "dash", "s")
        event = _ended(tmp_path, procs)
        assert not event["ok"]
        pane = _wait(lambda: (p := _tmux(sock, "capture-pane", "-p", "-J", "-t", "dash")) and "exit=" in p and p, 30)
        run = next((tmp_path / ".meshctl" / "runs").iterdir())
        assert "exit=130" in pane and f"run stopped: {run} (stopped from the dashboard)" in pane, pane
        assert "failed" not in pane, pane
    finally:
        _tmux(sock, "kill-server")
