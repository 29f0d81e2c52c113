"""End to end: `meshctl up` with its dashboard in a real pseudo-terminal (tmux), read off the screen.

The test starts `meshctl up` on a copy of the root mesh.yaml in a detached tmux session
of 120×40 on a private socket, reads the screen with `capture-pane`, sees the
rounds advance on the Rounds tab and the final state (15/15, COMPLETED), quits with q
(the run is over: no question asked), and checks the run's audit log.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TMUX = shutil.which("tmux")

pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed")


def _tmux(sock: str, *args: str) -> str:
    assert TMUX is not None
    out = subprocess.run([TMUX, "-L", sock, *args], capture_output=True, text=True, timeout=20,
                         check=False)
    return out.stdout


def _screen(sock: str) -> str:
    return _tmux(sock, "capture-pane", "-p", "-J", "-t", "dash")


def _wait(sock: str, cond, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = _screen(sock)
        if cond(screen):
            return screen
        time.sleep(0.1)
    raise AssertionError(f"timed out; the screen was:\n{screen}")


def test_up_shows_the_rounds_advance_in_a_real_terminal(tmp_path: Path) -> None:
    shutil.copy(ROOT / "mesh.yaml", tmp_path / "mesh.yaml")
    shutil.copytree(ROOT / "examples" / "hospitals" / "data",
                    tmp_path / "examples" / "hospitals" / "data")
    meshctl = Path(sys.executable).parent / "meshctl"
    sock = f"meshctl-test-{uuid.uuid4().hex[:8]}"
    command = f"cd {tmp_path} && {meshctl} up --address tcp://127.0.0.1:0; sleep 30"
    _tmux(sock, "new-session", "-d", "-s", "dash", "-x", "120", "-y", "40", command)
    try:
        _wait(sock, lambda s: "1 Overview" in s, 60)
        _tmux(sock, "send-keys", "-t", "dash", "2")  # the Rounds tab
        seen: set[str] = set()

        def progressed(screen: str) -> bool:
            seen.update(f"{r}/15" for r in range(1, 16) if f" {r}/15 " in screen)
            # (the header says `malignancy 15/15` on every tab: wait for the Rounds tab's own row too)
            return "malignancy  15/15" in screen and "COMPLETED" in screen

        final = _wait(sock, progressed, 120)
        assert len(seen) >= 2, f"saw only {seen}"  # more than one frame of progress
        assert "malignancy  15/15" in final and "0.9211" in final  # last round's accuracy
        _tmux(sock, "send-keys", "-t", "dash", "1")
        # (the header's job line says `malignancy 15/15 completed` on every tab: wait for the Overview's own line)
        overview = _wait(sock, lambda s: "coordinator completed" in s, 10)
        assert "malignancy 15/15 completed" in overview
        _tmux(sock, "send-keys", "-t", "dash", "q")
        after = _wait(sock, lambda s: "run completed:" in s, 30)
        run_dir = Path(after.split("run completed:")[1].split()[0])
        # the summary headless prints: final metrics, the model's path, each domain's metrics
        assert "job malignancy: 15 rounds in " in after and "accuracy 0.9211" in after, after
        assert f"model {run_dir / 'models' / 'malignancy.safetensors'}" in after
        assert "  charite  " in after
        events = (run_dir / "events.jsonl").read_text()
        assert events.count('"type":"round_completed"') == 15
        assert not list((run_dir / "keys").glob("*.key_secret"))  # secrets removed at the end
    finally:
        _tmux(sock, "kill-server")


def test_up_on_a_mesh_with_errors_closes_the_app_and_prints_them(tmp_path: Path) -> None:
    """The app shows before the mesh is compiled; a mesh with errors closes it, and the errors are printed
    on the terminal it gave back, exit 1, as headless does."""
    text = (ROOT / "mesh.yaml").read_text()
    (tmp_path / "mesh.yaml").write_text(text.replace("rounds: 15", "rounds: fifteen", 1))
    shutil.copytree(ROOT / "examples" / "hospitals" / "data", tmp_path / "examples" / "hospitals" / "data")
    assert "rounds: fifteen" in (tmp_path / "mesh.yaml").read_text()
    meshctl = Path(sys.executable).parent / "meshctl"
    sock = f"meshctl-test-{uuid.uuid4().hex[:8]}"
    command = f"cd {tmp_path} && {meshctl} up; echo EXIT=$?; sleep 30"
    _tmux(sock, "new-session", "-d", "-s", "dash", "-x", "120", "-y", "40", command)
    try:
        after = _wait(sock, lambda s: "EXIT=" in s, 60)
        assert "EXIT=1" in after and "error[MESH" in after and "rounds: fifteen" in after, after
        assert after.rstrip().splitlines()[-2] == "1 error", after
        assert "Traceback" not in after
        assert "meshctl: compiling mesh.yaml" in after  # said at once, before the app and the compiler
    finally:
        _tmux(sock, "kill-server")
