"""`meshctl up --headless` on the example mesh: real processes, sockets, files."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest

from meshctl.runtime import wire
from meshctl.runtime.daemon import read_tap

FREE = ["--address", "tcp://127.0.0.1:0"]
ROOT = Path(__file__).resolve().parents[2]
ONE_RUN = pytest.mark.xdist_group("up-one-run")  # the tests of one tapped run, on the worker that made it


@pytest.fixture(scope="module")
def tapped_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """One `meshctl up --headless` of a tmp copy of the root mesh, every daemon's frames tapped
    (MESHCTL_WIRE_TAP); returns (the finished `up`, its directory, the tap directory)."""
    base = tmp_path_factory.mktemp("up")
    shutil.copy(ROOT / "mesh.yaml", base / "mesh.yaml")
    shutil.copytree(ROOT / "examples" / "hospitals" / "data", base / "examples" / "hospitals" / "data")
    tap = base / "tap"
    tap.mkdir()
    out = subprocess.run([sys.executable, "-m", "meshctl", "up", "--headless", *FREE], cwd=base, capture_output=True,
                         text=True, timeout=180, env={**os.environ, "MESHCTL_WIRE_TAP": str(tap)}, check=False)
    return out, base, tap


def _run_dir(stdout: str) -> Path:
    return Path(stdout.strip().splitlines()[-1].rsplit(": ", 1)[-1])


@ONE_RUN
def test_up_trains_the_hospitals_model_and_leaves_the_run(tapped_run):
    out, base, _ = tapped_run
    assert out.returncode == 0, out.stderr + out.stdout
    round_lines = [ln for ln in out.stdout.splitlines() if re.match(r"malignancy +round|    in ", ln)]
    assert max(len(ln) for ln in round_lines) <= 120  # what does not fit goes on below, indented
    rounds = [ln for ln in out.stdout.replace("\n    ", "  ").splitlines() if re.match(r"malignancy +round", ln)]
    assert len(rounds) == 15
    assert all(re.search(r"participants 3 .*train_loss [\d.]+ .*accuracy [\d.]+ .*in .* KiB .* out .* [\d.]+s$", ln)
               for ln in rounds)
    run = _run_dir(out.stdout)
    assert run.parent == base / ".meshctl" / "runs"
    metrics = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(metrics) == 15 and float(metrics[-1]["test_accuracy"]) >= 0.90
    assert float(metrics[-1]["test_auroc"]) >= 0.95 and 0.85 <= float(metrics[-1]["test_f1"]) <= 1  # declared
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_completed" and events[-1]["ok"]
    assert kinds.count("domain_joined") == 3 and kinds.count("round_completed") == 15
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    decisions = {e["policy"]: e["effect"] for e in events
                 if e["type"] == "policy_decided" and e["stage"] == "compile"}
    assert decisions == {"minimum-cohort": "allow", "purpose-limitation": "allow", "restricted-needs-privacy": "warn"}
    assert len(list((run / "checkpoints" / "malignancy").glob("round-*.safetensors"))) == 15
    from safetensors import safe_open

    with safe_open(run / "models" / "malignancy.safetensors", "pt") as f:
        assert f.metadata()["classes"] == "benign,malignant"
        assert len(json.loads(f.metadata()["standardize"])["mean"]) == 10
    assert "\n[plan]\n" in "\n" + (run / "plan.toml").read_text()
    assert "warning[MESH411]" in out.stderr  # the warn decision is shown, not hidden


def _without_eval_counts(frame: bytes) -> bytes:
    """An eval_res header without its count vectors (checked to be whole counts), else the frame."""
    try:
        head = json.loads(frame)
    except ValueError:
        return frame
    if not isinstance(head, dict) or head.get("type") != "eval_res":
        return frame
    counts = {k: head["stats"].pop(k) for k in ("confusion", "score_hist", "pos_hist")}
    assert all(float(v).is_integer() and v >= 0 for values in counts.values() for v in values)
    return json.dumps(head).encode()


@ONE_RUN
def test_no_pii_and_no_raw_row_leaves_a_domain(tapped_run):
    out, base, tap = tapped_run
    assert out.returncode == 0, out.stderr
    data = base / "examples" / "hospitals" / "data"
    for domain, src in [("charite", "charite.parquet"), ("karolinska", "karolinska.parquet"),
                        ("amsterdam-umc", "amsterdam-umc.csv")]:
        frames = read_tap(tap / f"{domain}.tap")
        assert frames, f"{domain} sent nothing?"
        blob = b"\0".join(frames)
        rows = duckdb.sql(f"SELECT * FROM '{data / src}'").fetchall()
        cols = [c[0] for c in duckdb.sql(f"DESCRIBE SELECT * FROM '{data / src}'").fetchall()]
        # no PII value, in any encoding a row could take
        for row in rows:
            rec = dict(zip(cols, row))
            for pii in ("patient_name", "mrn", "date_of_birth"):
                value = str(rec[pii]).encode()
                assert value not in blob, f"{pii} {value!r} of {domain} crossed the wire"
        # no raw row: no row's feature vector as float32 or float64 bytes, nor as text (evaluation sums
        # aside: they are counts, a confusion matrix and probability histograms, so a count of 12 reads
        # "12.0," like a radius of 12.0 would)
        feats = [c for c in cols if c.endswith("_mean")]
        text = b"\0".join(_without_eval_counts(f) for f in frames)
        for row in rows[:50]:
            rec = dict(zip(cols, row))
            vec = np.array([rec[f] for f in feats])
            assert vec.astype(np.float32).tobytes() not in blob
            assert vec.astype(np.float64).tobytes() not in blob
            assert repr(rec["radius_mean"]).encode() + b"," not in text
        # and every message is a known header plus exactly the plan's model tensors
        i = 0
        while i < len(frames):
            head = json.loads(frames[i])
            assert head["type"] in {"hello", "train_res", "eval_res", "heartbeat"}, head["type"]
            names = [t["name"] for t in head["tensors"]]
            assert names in ([], ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"])
            if head["type"] == "hello":
                assert set(head["rows"]) == {f"{domain}.biopsies"}
                assert set(head["stats"]["malignancy"]) == {"count", "sum", "sumsq"}
            i += 1 + sum(t["chunks"] for t in head["tensors"])
            wire.decode([frames[i - 1 - sum(t["chunks"] for t in head["tensors"])], *frames[i - sum(
                t["chunks"] for t in head["tensors"]):i]])


def test_a_broken_data_file_fails_up_with_one_line(hospitals, meshctl):
    (hospitals.parent / "examples" / "hospitals" / "data" / "karolinska.parquet").write_bytes(b"PAR1 not parquet")
    out = meshctl("up", "--headless", *FREE, cwd=hospitals.parent)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr + out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert "karolinska" in last and "cannot read product karolinska.biopsies" in last and "karolinska.log" in last


def test_a_bad_mesh_yaml_starts_nothing(hospitals, meshctl):
    text = hospitals.read_text().replace("target: diagnosis", "target: patient_name")
    hospitals.write_text(text)
    out = meshctl("up", "--headless", *FREE, cwd=hospitals.parent)
    assert out.returncode == 1
    assert "error[MESH402]" in out.stderr and "Traceback" not in out.stderr
    assert not (hospitals.parent / ".meshctl").exists()
    assert _processes_in(hospitals.parent) == [], "the coordinator `up` started early outlived the failed compile"


def test_a_missing_mesh_file_and_a_busy_port_are_one_line_errors(hospitals, meshctl, tmp_path):
    out = meshctl("up", "--headless", "nope.yaml", cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.strip() == "nope.yaml: error: no such file"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = meshctl("up", "--headless", "--address", f"tcp://127.0.0.1:{port}", cwd=hospitals.parent)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert _processes_in(hospitals.parent) == []
    assert f"port {port} on 127.0.0.1 is in use" in out.stderr.strip().splitlines()[-1]


def test_ctrl_c_stops_every_process_up_started(hospitals, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    hospitals.write_text(hospitals.read_text().replace("rounds: 15,", "rounds: 100000,"))
    # as in a terminal's foreground job: SIGINT at its default even when this test runs as a
    # background job (`cmd &` in a script ignores SIGINT, and children inherit that)
    proc = subprocess.Popen([sys.executable, "-m", "meshctl", "up", "--headless", *FREE], cwd=hospitals.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    for line in proc.stdout:  # wait until training is under way
        if re.match(r"malignancy +round +3/", line):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err  # 128 + SIGINT, as the shell expects
    run = next((hospitals.parent / ".meshctl" / "runs").iterdir())
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "run_completed" and not events[-1]["ok"]
    assert events[-1]["reason"] == "stopped by SIGINT"  # the signal the user sent (up stops the run with SIGTERM)
    pids = [e["pid"] for e in events if e["type"] == "domain_joined"]
    assert len(pids) == 3
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a daemon outlived `meshctl up`"
    assert not list((run / "keys").glob("*.key_secret"))


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _processes_in(cwd: Path) -> list[str]:
    """Command lines of the live (not zombie) processes whose working directory is `cwd`."""
    import os

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cwd").resolve() != cwd.resolve() or not _alive(int(pid)):
                continue
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
        except OSError:
            continue
    return found
