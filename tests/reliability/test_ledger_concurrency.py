"""The privacy ledger under concurrent runs: a DP run reserves its whole ε at admission,
atomically across processes, so two runs that fit the budget only one at a time cannot
both be admitted (and then both run out of ε mid-way with no model)."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshctl.compiler.compile import compile_mesh
from meshctl.runtime.daemon import Daemon, DaemonConfig
from meshctl.runtime.keys import KeyPair
from meshctl.runtime.ledger import BudgetExceeded, Ledger, LedgerRow, ledger_path, render_ledger

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"

RESERVE = """
import os, sys, time
from pathlib import Path
from meshctl.runtime.ledger import BudgetExceeded, Ledger
path, run, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
while not go.exists():  # start together
    time.sleep(0.001)
try:
    Ledger(path).reserve("a.p", 4.0, 6.0, subject="model:m", run=run)
    print("reserved", flush=True)
except BudgetExceeded as err:
    print(f"refused: {err}", flush=True)
sys.stdin.readline()  # stay alive (a live daemon) until the test has looked
"""


def _racers(path: Path, go: Path, n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", RESERVE, str(path), f"run-{i}", str(go)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True) for i in range(n)]


def test_processes_reserving_together_against_a_cap_that_fits_one_admit_exactly_one(tmp_path):
    # Prepare: a budget of 6 and runs of ε 4 each, started at the same instant
    path, go = ledger_path(tmp_path), tmp_path / "go"
    Ledger(path).spent("a.p")
    procs = _racers(path, go, 4)
    # Execute
    go.touch()
    answers = [p.stdout.readline().strip() for p in procs]  # type: ignore[union-attr]
    held = Ledger(path).rows({"a.p": 6.0})
    for p in procs:
        p.communicate("\n", timeout=30)
    # Assert: one reservation, the others refused with the product, what is held and the ε asked
    assert sorted(a.split(":")[0] for a in answers) == ["refused"] * 3 + ["reserved"], answers
    assert all(a == "refused: product a.p has spent ε 0 of its budget 6 (and other runs hold ε 4 of it); "
               "ε 4 more would exceed it" for a in answers if a != "reserved")
    assert held == [LedgerRow("a.p", 0.0, 6.0, 0, reserved=4.0)]
    # the winner has exited without releasing (as a killed daemon would): its hold is gone
    assert Ledger(path).held("a.p") == 0.0
    Ledger(path).reserve("a.p", 4.0, 6.0, subject="model:m", run="after")


def test_rounds_draw_on_their_own_reservation_and_what_they_spent_stays_after_release(tmp_path):
    ledger = Ledger(ledger_path(tmp_path))
    ledger.reserve("a.p", 4.0, 6.0, subject="model:m", run="r1")
    # an analysis of another subject cannot take what r1 holds, r1's own rounds can
    with pytest.raises(BudgetExceeded):
        ledger.charge("a.p", 2.5, 6.0, subject="analysis:x", run="r2")
    for _ in range(3):
        ledger.charge("a.p", 1.0, 6.0, subject="model:m", run="r1")
    assert (ledger.spent("a.p"), ledger.held("a.p")) == (3.0, 1.0)
    assert render_ledger(ledger.rows()).splitlines()[1].split() == ["a.p", "3", "1", "6", "2", "1"]
    # aborted after 3 rounds: the 3 rounds stay charged, the never-started round's ε is freed
    assert ledger.release("r1") == 1
    assert (ledger.spent("a.p"), ledger.held("a.p")) == (3.0, 0.0)
    ledger.charge("a.p", 3.0, 6.0, subject="analysis:x", run="r2")
    with pytest.raises(BudgetExceeded):
        ledger.charge("a.p", 0.1, 6.0, subject="model:m", run="r1")


def test_a_resumed_run_sees_its_own_reservation_and_charges_as_its_own(tmp_path):
    ledger = Ledger(ledger_path(tmp_path))
    ledger.reserve("a.p", 4.0, 6.0, subject="model:m", run="r1")
    ledger.charge("a.p", 1.5, 6.0, subject="model:m", run="r1")
    # the same run comes back (a new daemon process): its ε 4 still fits, 1.5 of it already spent
    again = ledger.reserve("a.p", 4.0, 6.0, subject="model:m", run="r1")
    assert (again.spent, again.others) == (0.0, 0.0)
    assert ledger.held("a.p") == 2.5 and ledger.held("a.p", exclude_run="r1") == 0.0
    with pytest.raises(BudgetExceeded):
        ledger.reserve("a.p", 4.0, 6.0, subject="model:m", run="r2")


def test_an_old_ledger_gains_the_reservations_table_and_keeps_its_charges(tmp_path):
    path = ledger_path(tmp_path)
    path.parent.mkdir(parents=True)
    con = sqlite3.connect(path)
    con.executescript("CREATE TABLE charges (id INTEGER PRIMARY KEY AUTOINCREMENT, product TEXT NOT NULL, "
                      "subject TEXT NOT NULL, run TEXT NOT NULL, epsilon REAL NOT NULL CHECK (epsilon >= 0), "
                      "cap REAL, ts REAL NOT NULL);"
                      "INSERT INTO charges (product, subject, run, epsilon, cap, ts) "
                      "VALUES ('a.p', 'model:m', 'old', 2.0, 6.0, 0);")
    con.close()
    ledger = Ledger(path)
    ledger.reserve("a.p", 4.0, 6.0, subject="model:m", run="new")
    assert ledger.rows() == [LedgerRow("a.p", 2.0, 6.0, 1, reserved=4.0)]
    with pytest.raises(BudgetExceeded):
        ledger.reserve("a.p", 0.5, 6.0, subject="model:n", run="other")


def _mesh(tmp_path: Path, budget: float, epsilon: float, rounds: int) -> Path:
    """The digits example with DP on the model and an ε budget on client-0's product only."""
    shutil.copytree(DIGITS, tmp_path / "digits", ignore=shutil.ignore_patterns(".meshctl"))
    mesh = tmp_path / "digits" / "mesh.yaml"
    text = mesh.read_text().replace(
        "    aggregation: {strategy: fedavg}\n",
        f"    aggregation: {{strategy: fedavg}}\n    privacy: {{dp: {{epsilon: {epsilon}, delta: 1.0e-5, clip: 1.0}}}}\n")
    text = text.replace("    source: data/client-0.parquet\n",
                        f"    source: data/client-0.parquet\n    epsilon_budget: {budget}\n")
    mesh.write_text(text.replace("rounds: 20,", f"rounds: {rounds},"))
    return mesh


def test_two_daemons_admitting_two_runs_reserve_for_one_and_refuse_the_other(tmp_path):
    # before: each daemon saw 0 spent and admitted its run; now the first holds ε 3 of 4
    mesh = _mesh(tmp_path, budget=4.0, epsilon=3.0, rounds=3)
    result = compile_mesh(mesh)
    assert result.plan is not None, result.render_diagnostics()
    keys = KeyPair.generate()

    def admit(run: str) -> Daemon:
        cfg = DaemonConfig(domain="client-0", plan=result.plan, base_dir=mesh.parent,
                           coordinator="tcp://127.0.0.1:1", server_key=b"", keys=keys, run=run)
        daemon = Daemon(cfg)
        daemon.govern()
        return daemon

    first, second = admit("run-a"), admit("run-b")
    assert first.refused == {}
    assert list(second.refused) == ["digits-mlp"]
    assert "client-0.digits" in second.refused["digits-mlp"] and "ε 3" in second.refused["digits-mlp"]
    first._release()
    assert admit("run-c").refused == {}


def test_two_meshctl_up_dp_runs_at_once_one_is_refused_at_admission_the_other_trains(tmp_path):
    mesh = _mesh(tmp_path, budget=4.0, epsilon=3.0, rounds=3)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "meshctl", "up", "--headless", "--address", "tcp://127.0.0.1:0"]
    start = time.monotonic()
    procs = [subprocess.Popen(cmd, cwd=mesh.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    took = time.monotonic() - start
    codes = sorted(p.returncode for p in procs)
    won = [o for p, o in zip(procs, outs, strict=True) if p.returncode == 0]
    lost = [o for p, o in zip(procs, outs, strict=True) if p.returncode != 0]
    assert codes == [0, 1], outs
    assert "round   3/3" in won[0][0], won[0][0]
    summary = won[0][0].splitlines()  # the model path may wrap onto its own line (120 columns)
    at = next(i for i, line in enumerate(summary) if line.startswith("job digits-mlp: 3 rounds"))
    assert "model " in summary[at] or summary[at + 1].lstrip().startswith("model "), summary[at:at + 2]
    text = lost[0][0] + lost[0][1]
    # refused at admission (before: admitted too, then out of ε in a round), naming the product and ε
    assert "domain client-0 refused the job: invariant:epsilon-budget" in text, text
    assert "client-0.digits" in text and re.search(r"ε 3\b", text), text
    assert "round   1/3" not in lost[0][0] and "Traceback" not in text
    ledger = subprocess.run([sys.executable, "-m", "meshctl", "ledger"], cwd=mesh.parent, capture_output=True,
                            text=True, timeout=60, check=False)
    row = next(ln.split() for ln in ledger.stdout.splitlines() if ln.startswith("client-0.digits"))
    assert 2.9 < float(row[1]) <= 3.0 and row[2] == "0" and row[5] == "1", ledger.stdout
    assert took < 120
