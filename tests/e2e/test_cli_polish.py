"""Issue 14, "The command line": usage errors in meshctl's one line (`error: … (hint: …)`, exit 2, no
click usage block, no traceback), the hint outside a mesh folder, did-you-mean over diagnostic codes,
and `access request` on a product that needs no grant (real subprocesses)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _one_line(proc) -> str:
    assert proc.stdout == "" and "Traceback" not in proc.stderr and "Usage:" not in proc.stderr, proc.stderr
    [line] = proc.stderr.splitlines()
    return line


@pytest.mark.parametrize(("args", "code", "line"), [
    (["validate", "."], 2, "error: .: is a folder, not a file (hint: `meshctl validate mesh.yaml`)"),
    (["validate", "--bogus"], 2, "error: no such option '--bogus' (hint: see `meshctl validate --help`)"),
    (["contract", "import", "nope.json"], 2,
     "error: nope.json: no such file (hint: see `meshctl contract import --help`)"),
    (["access", "request", "charite.biopsies", "--for", "malignancy", "--purpose", "cancer-research",
      "--until", "2026-13-01"], 2,
     "error: --until '2026-13-01' is not a date, YYYY-MM-DD (hint: see `meshctl access request --help`)"),
    (["explain", "MESH4O2"], 1, "error: unknown diagnostic code 'MESH4O2' (hint: did you mean 'MESH402'?)"),
    (["access", "request", "charite.biopsies", "--for", "malignancy", "--purpose", "cancer-research"], 1,
     ("mesh.yaml: error: product 'charite.biopsies' is `access: open`: every model and analysis may read it, "
      "no grant is needed")),
])
def test_usage_errors_are_one_line(hospitals: Path, meshctl, args, code, line):
    proc = meshctl(*args, cwd=hospitals.parent)
    assert (proc.returncode, _one_line(proc)) == (code, line)


def test_outside_a_mesh_folder_the_hint_names_meshctl_init(tmp_path: Path, meshctl):
    proc = meshctl("validate", cwd=tmp_path)
    assert proc.returncode == 1
    assert _one_line(proc) == ("mesh.yaml: error: no such file: this is not a mesh folder "
                               "(hint: `meshctl init` writes a mesh.yaml here, or give the path of one)")


# -- meshctl init -------------------------------------------------------------------------


def test_init_scaffolds_a_mesh_that_validates_and_trains(tmp_path: Path, meshctl):
    shutil.copy(ROOT / "examples" / "hospitals" / "data" / "amsterdam-umc.csv", tmp_path / "biopsies.csv")
    made = meshctl("init", "--data", "biopsies.csv", "--domain", "Amsterdam UMC", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert made.stdout == "wrote mesh.yaml; next: meshctl validate mesh.yaml, then meshctl up mesh.yaml\n"
    text = (tmp_path / "mesh.yaml").read_text()
    assert "  - name: amsterdam-umc\n" in text and "      target: diagnosis\n" in text
    assert "{name: diagnosis, type: category, values: [benign, malignant]}" in text  # DuckDB saw its 2 values
    assert "{name: radius_mean, type: float}" in text and "{name: date_of_birth, type: date}" in text
    valid = meshctl("validate", cwd=tmp_path)
    assert valid.returncode == 0 and valid.stdout.startswith("mesh.yaml: ok"), valid.stderr
    up = meshctl("up", "--headless", "--address", "tcp://127.0.0.1:0", cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    assert "job predict-diagnosis: 5 rounds in " in up.stdout and "accuracy 0." in up.stdout
    again = meshctl("init", "--data", "biopsies.csv", cwd=tmp_path)
    assert again.returncode == 1 and (tmp_path / "mesh.yaml").read_text() == text
    assert _one_line(again) == ("mesh.yaml: error: already exists; meshctl init never overwrites it "
                                "(hint: `meshctl validate` checks it, or init into another folder)")


def test_init_takes_a_target_and_refuses_a_column_it_cannot_predict(tmp_path: Path, meshctl):
    rows = "\n".join(f"{i},{i * 0.5},{'north' if i % 3 else 'south'},{i % 7}" for i in range(60))
    (tmp_path / "sites.csv").write_text("id,dose,region,grade\n" + rows + "\n")
    made = meshctl("init", "mesh", "--data", "sites.csv", "--target", "grade", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    text = (tmp_path / "mesh" / "mesh.yaml").read_text()
    assert "      target: grade\n" in text and "{name: region, type: category, values: [north, south]}" in text
    assert "    source: ../sites.csv\n" in text  # relative to mesh.yaml
    assert meshctl("validate", "mesh/mesh.yaml", cwd=tmp_path).returncode == 0
    bad = meshctl("init", "other", "--data", "sites.csv", "--target", "nope", cwd=tmp_path)
    assert (bad.returncode, _one_line(bad)) == (1, ("sites.csv: error: --target nope: no such column "
                                                    "(hint: columns: id, dose, region, grade)"))


# -- headless round lines ------------------------------------------------------------------


def test_headless_round_lines_fit_120_columns_in_kib():
    from meshctl.runtime import events as ev
    from meshctl.runtime.launcher import render_event

    wide = ev.RoundCompleted(job="malignancy", round=15, rounds=15, participants=["a", "b", "c"], train_loss=0.3,
                             metrics={"loss": 0.4, "accuracy": 0.8, "auroc": 0.9, "f1": 0.8}, bytes_in=2560,
                             bytes_out=2300, update_bytes=2200, seconds=0.007, epsilon=3.99)
    assert render_event(wide).splitlines() == [
        ("malignancy  round  15/15  participants 3  ε 3.990  train_loss 0.3000  loss 0.4000  accuracy 0.8000  "
         "auroc 0.9000"),
        "    f1 0.8000  in 2.5 KiB (updates 2.1 KiB)  out 2.2 KiB  0.007s"]
    narrow = wide.model_copy(update={"job": "m", "metrics": {"loss": 0.4}, "epsilon": None, "bytes_in": 3 << 20})
    assert render_event(narrow) == ("m  round  15/15  participants 3  train_loss 0.3000  loss 0.4000  "
                                    "in 3.0 MiB (updates 2.1 KiB)  out 2.2 KiB  0.007s")


def test_the_end_of_run_summary_comes_from_the_audit_log_and_fits_120_columns(tmp_path: Path):
    """After the dashboard (which followed the events itself) `up` prints what headless prints."""
    from meshctl.runtime import events as ev
    from meshctl.runtime.launcher import RunResult, summary_lines

    run_dir = tmp_path / ("r" * 60)
    run_dir.mkdir()
    done = ev.JobCompleted(job="malignancy", rounds=15, metrics={"loss": 0.1878, "accuracy": 0.9211}, seconds=3.2,
                           model_path="models/malignancy.safetensors",
                           domain_metrics={"charite": {"accuracy": 0.94}}, domain_examples={"charite": 52})
    (run_dir / "events.jsonl").write_text(done.to_json() + "\n")
    assert summary_lines(RunResult(True, run_dir)) == [
        "job malignancy: 15 rounds in 3.20s  loss 0.1878  accuracy 0.9211",
        f"    model {run_dir / 'models' / 'malignancy.safetensors'}",
        "  charite      52 examples  accuracy 0.9400"]


# -- colour on a terminal ------------------------------------------------------------------


def _in_a_terminal(args: list[str], cwd: Path, module: bool = True, **env: str) -> bytes:
    """What `meshctl ARGS` (`python ARGS` without `module`) writes to a real pseudo-terminal (stdout and
    stderr both on it)."""
    import os
    import pty
    import subprocess
    import sys

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, *(["-m", "meshctl"] if module else []), *args], cwd=cwd, stdin=slave, stdout=slave,
                            stderr=slave, env={**os.environ, "TERM": "xterm-256color", **env})
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal's last writer is gone
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(master)
    return out


def test_errors_are_coloured_on_a_terminal_and_plain_with_no_color(tmp_path: Path):
    coloured = _in_a_terminal(["explain", "MESH4O2"], tmp_path, NO_COLOR="")  # empty: not set (no-color.org)
    assert b"\x1b[" in coloured and b"error:" in coloured and b"MESH402" in coloured
    plain = _in_a_terminal(["explain", "MESH4O2"], tmp_path, NO_COLOR="1")
    assert plain.replace(b"\r\n", b"\n") == (b"error: unknown diagnostic code 'MESH4O2' "
                                             b"(hint: did you mean 'MESH402'?)\n")


def test_validate_shows_a_spinner_on_a_terminal_only(hospitals: Path, meshctl):
    shown = _in_a_terminal(["validate"], hospitals.parent)
    assert b"compiling mesh.yaml" in shown and b"mesh.yaml: ok" in shown
    piped = meshctl("validate", cwd=hospitals.parent)
    assert "compiling" not in piped.stdout + piped.stderr and "\x1b" not in piped.stdout + piped.stderr


_SPIN = ("import time; from meshctl.cli import spinning\n"
         "with spinning('run r-1 going') as echo:\n    echo('round 1'); time.sleep(0.3); echo('round 2')\n")


def test_a_headless_run_spins_on_a_terminal_and_stays_plain_in_a_pipe(tmp_path: Path):
    """`analyze --headless` (42 s) and `up --headless` print their lines under a spinner on a terminal."""
    import subprocess
    import sys

    shown = _in_a_terminal(["-c", _SPIN], tmp_path, module=False)
    assert b"run r-1 going" in shown and b"round 1" in shown and b"round 2" in shown
    piped = subprocess.run([sys.executable, "-c", _SPIN], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert (piped.stdout, piped.stderr) == ("round 1\nround 2\n", "")


# -- shell completion ----------------------------------------------------------------------


@pytest.mark.parametrize(("shell", "first"), [("bash", "_meshctl_completion() {"), ("zsh", "#compdef meshctl"),
                                              ("fish", "function _meshctl_completion;")])
def test_the_completion_script_is_produced(tmp_path: Path, meshctl, shell, first):
    script = meshctl(cwd=tmp_path, env={"_MESHCTL_COMPLETE": f"{shell}_source"})
    assert script.returncode == 0 and script.stdout.splitlines()[0] == first, script.stderr


def test_completion_offers_commands(tmp_path: Path, meshctl):
    done = meshctl(cwd=tmp_path, env={"_MESHCTL_COMPLETE": "bash_complete", "COMP_WORDS": "meshctl in",
                                      "COMP_CWORD": "1"})
    assert done.stdout.split() == ["plain,init"]
