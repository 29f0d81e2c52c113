"""The privacy ledger: atomic check-and-charge in SQLite, persistent across processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meshctl.runtime.ledger import BudgetExceeded, Ledger, LedgerRow, ledger_path, render_ledger

CHARGE = """
import sys
from meshctl.runtime.ledger import BudgetExceeded, Ledger
try:
    Ledger(sys.argv[1]).charge("a.p", float(sys.argv[2]), 1.0, subject="analysis:x", run=sys.argv[3])
except BudgetExceeded:
    sys.exit(3)
"""


def test_charges_add_up_and_the_budget_is_a_hard_cap(tmp_path):
    # Prepare
    ledger = Ledger(ledger_path(tmp_path))
    # Execute
    first = ledger.charge("a.p", 0.6, 1.0, subject="analysis:x", run="r1")
    with pytest.raises(BudgetExceeded) as err:
        ledger.charge("a.p", 0.6, 1.0, subject="analysis:x", run="r2")
    last = ledger.charge("a.p", 0.4, 1.0, subject="analysis:x", run="r3")
    # Assert
    assert (first.total, last.total) == (0.6, 1.0)
    assert str(err.value) == "product a.p has spent ε 0.6 of its budget 1; ε 0.6 more would exceed it"
    assert ledger.spent("a.p") == 1.0 and ledger.spent("b.q") == 0.0
    assert ledger.path == tmp_path / ".meshctl" / "ledger.db"


def test_the_ledger_persists_across_processes(tmp_path):
    path = ledger_path(tmp_path)
    one = subprocess.run([sys.executable, "-c", CHARGE, str(path), "0.6", "r1"], capture_output=True, text=True,
                         check=False)
    two = subprocess.run([sys.executable, "-c", CHARGE, str(path), "0.6", "r2"], capture_output=True, text=True,
                         check=False)
    assert (one.returncode, two.returncode) == (0, 3), one.stderr + two.stderr
    assert Ledger(path).rows({"a.p": 1.0}) == [LedgerRow("a.p", 0.6, 1.0, 1)]


def test_concurrent_processes_never_overspend(tmp_path):
    # Prepare: eight processes race for a budget of 1.0 with 0.3 each: exactly three can win
    path = ledger_path(tmp_path)
    Ledger(path).spent("a.p")  # create the file first, as a daemon's precheck does
    # Execute
    procs = [subprocess.Popen([sys.executable, "-c", CHARGE, str(path), "0.3", f"r{i}"]) for i in range(8)]
    codes = sorted(p.wait(timeout=120) for p in procs)
    # Assert
    assert codes == [0, 0, 0, 3, 3, 3, 3, 3]
    assert Ledger(path).spent("a.p") == pytest.approx(0.9)


def test_rows_and_the_printed_table(tmp_path):
    ledger = Ledger(ledger_path(tmp_path))
    assert ledger.rows() == [] and not ledger.path.exists()
    ledger.charge("b.q", 0.5, None, subject="analysis:y", run="r1")
    ledger.charge("b.q", 0.25, None, subject="analysis:y", run="r2")
    rows = ledger.rows({"a.p": 2.0})
    assert rows == [LedgerRow("a.p", 0.0, 2.0, 0), LedgerRow("b.q", 0.75, None, 2)]
    assert render_ledger(rows).splitlines() == [
        "product  spent ε  reserved ε  budget ε  left ε  runs",
        "a.p      0        0           2         2       0",
        "b.q      0.75     0           -         -       2",
    ]
    assert render_ledger([]).startswith("no product")


def test_a_corrupt_ledger_is_a_one_line_user_error(tmp_path):
    path = ledger_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a database" * 100)
    from meshctl.errors import UserError

    with pytest.raises(UserError, match="privacy ledger is not readable") as err:
        Ledger(path).spent("a.p")
    assert "\n" not in err.value.render()
