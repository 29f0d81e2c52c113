"""Issue 9.1: nothing a domain sends carries a data value or a host path, whatever breaks in its data.

Real `meshctl up --headless` runs with the wire tap on, several breakages (one per hospital)
in each run: every frame a daemon sent, the run's events, the mesh's audit log and catalog,
and what `up` printed are searched for every patient name and MRN of the hospitals' data and
for the absolute path of the data directory. The errors must still name the product and the
column, and the domain's local log must hold the library's detail.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb

from meshctl.runtime.daemon import read_tap

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "hospitals" / "data"
SOURCES = {"charite": "charite.parquet", "karolinska": "karolinska.parquet", "amsterdam-umc": "amsterdam-umc.csv"}
FREE = ["--address", "tcp://127.0.0.1:0"]


def _secrets() -> set[str]:
    """Every patient name and MRN of the example data: none may leave a domain."""
    out: set[str] = set()
    for src in SOURCES.values():
        out |= {v for row in duckdb.sql(f"SELECT patient_name, mrn FROM '{DATA / src}'").fetchall() for v in row}
    return out


def _run_dir(stdout: str) -> Path:
    return Path(stdout.strip().splitlines()[-1].rsplit(": ", 1)[-1])


def _outputs(mesh_dir: Path, tap: Path, out) -> dict[str, bytes]:
    """Everything that left the domains or was written mesh-wide, by where it was found."""
    run = _run_dir(out.stdout)
    blobs = {f"tap {p.name}": b"\0".join(read_tap(p)) for p in sorted(tap.glob("*.tap"))}
    blobs |= {"events.jsonl": (run / "events.jsonl").read_bytes(),
              "audit.jsonl": (mesh_dir / ".meshctl" / "audit.jsonl").read_bytes(),
              "catalog.db": (mesh_dir / ".meshctl" / "catalog.db").read_bytes(),
              "stdout": out.stdout.encode(), "stderr": out.stderr.encode()}
    return blobs


def _assert_nothing_leaked(mesh_dir: Path, blobs: dict[str, bytes]) -> None:
    data_dir = str(mesh_dir / "examples" / "hospitals" / "data").encode()
    for where, blob in blobs.items():
        assert data_dir not in blob, f"the host path of the data reached {where}"
        leaked = sorted(s for s in _secrets() if s.encode() in blob)
        assert not leaked, f"{len(leaked)} patient values reached {where}, e.g. {leaked[:2]}"


def _rewrite_parquet(path: Path, select: str) -> None:
    """Replace a parquet file by `select` over it (`t` is the old file)."""
    tmp = path.with_suffix(".new")
    duckdb.sql(f"COPY ({select.format(t=f'read_parquet({str(path)!r})')}) TO '{tmp}' (FORMAT parquet)")
    tmp.replace(path)


def _up(meshctl, mesh_dir: Path, tap: Path):
    tap.mkdir()
    out = meshctl("up", "--headless", *FREE, cwd=mesh_dir, env={"MESHCTL_WIRE_TAP": str(tap)}, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    return out


def test_bad_cells_are_named_by_product_and_column_never_by_value(hospitals, meshctl, tmp_path):
    mesh_dir = hospitals.parent
    data = mesh_dir / "examples" / "hospitals" / "data"
    csv = data / "amsterdam-umc.csv"  # swapped headers: radius_mean holds the patients' names
    head, rest = csv.read_text().split("\n", 1)
    cols = head.split(",")
    i, j = cols.index("patient_name"), cols.index("radius_mean")
    cols[i], cols[j] = cols[j], cols[i]
    csv.write_text(",".join(cols) + "\n" + rest)
    # a wrong-type value: one texture_mean is a patient's name
    _rewrite_parquet(data / "charite.parquet", "SELECT * REPLACE (CASE WHEN mrn = (SELECT min(mrn) FROM {t}) "
                     "THEN patient_name ELSE CAST(texture_mean AS VARCHAR) END AS texture_mean) FROM {t}")
    # a target value outside the declared classes: one diagnosis is a patient's name
    _rewrite_parquet(data / "karolinska.parquet", "SELECT * REPLACE (CASE WHEN mrn = (SELECT min(mrn) FROM {t}) "
                     "THEN patient_name ELSE diagnosis END AS diagnosis) FROM {t}")

    out = _up(meshctl, mesh_dir, tmp_path / "tap")

    last = out.stderr.strip().splitlines()[-1]
    # the contract check finds them before any read (issue 11: a declared column's type is checked)
    assert "amsterdam-umc.biopsies fails its contract: type(radius_mean) observed 164" in last
    assert "charite.biopsies fails its contract: type(texture_mean) observed 1" in last
    assert "karolinska.biopsies fails its contract: values(diagnosis) observed 1" in last
    _assert_nothing_leaked(mesh_dir, _outputs(mesh_dir, tmp_path / "tap", out))
    logs = _run_dir(out.stdout) / "logs"  # each domain's log tells its operator which column
    for domain, column in (("amsterdam-umc", "radius_mean"), ("charite", "texture_mean")):
        assert f"fails its contract: type({column}) observed" in (logs / f"{domain}.log").read_text()


BAD_SQL = """    quality:
      - {name: names-are-numbers, type: sql, mustBe: 0,
         query: 'SELECT count(*) FROM {object} WHERE CAST(patient_name AS DOUBLE) > 0'}
"""


def test_unreadable_sources_and_a_bad_sql_rule_send_no_value_and_no_path(hospitals, meshctl, tmp_path):
    mesh_dir = hospitals.parent
    data = mesh_dir / "examples" / "hospitals" / "data"
    text = hospitals.read_text()
    anchor = "    purposes: [cancer-research]\n"
    hospitals.write_text(text.replace(anchor, anchor + BAD_SQL, 1))
    parquet = data / "karolinska.parquet"  # a truncated parquet file: rows, but no footer
    parquet.write_bytes(parquet.read_bytes()[: parquet.stat().st_size // 2])
    csv = data / "amsterdam-umc.csv"  # not UTF-8 (a latin-1 export): DuckDB's error quotes whole rows
    lines = csv.read_bytes().split(b"\n")
    lines[100] = lines[100].replace(b",", b"\xff,", 1)
    csv.write_bytes(b"\n".join(lines))

    out = _up(meshctl, mesh_dir, tmp_path / "tap")

    text = out.stdout + out.stderr
    assert "cannot read product karolinska.biopsies: its parquet source is unreadable or malformed" in text
    assert "cannot read product amsterdam-umc.biopsies: its csv source is unreadable or malformed" in text
    assert "charite.biopsies fails its contract: names-are-numbers observed nothing" in text
    # the contract check run by hand records into the mesh's catalog too
    shutil.copy(DATA / "amsterdam-umc.csv", csv)
    checked = meshctl("contract", "test", "charite.biopsies", "--format", "json", cwd=mesh_dir)
    assert checked.returncode == 1, checked.stderr
    rule = next(r for r in json.loads(checked.stdout) if r["rule"] == "names-are-numbers")
    assert rule["detail"] == "Conversion Error in rule names-are-numbers (its query)"
    blobs = _outputs(mesh_dir, tmp_path / "tap", out)
    blobs["contract test"] = (checked.stdout + checked.stderr).encode()
    _assert_nothing_leaked(mesh_dir, blobs)
    logs = _run_dir(out.stdout) / "logs"
    assert "Could not convert string" in (logs / "charite.log").read_text()
    assert str(parquet) in (logs / "karolinska.log").read_text()
    assert "Original Line" in (logs / "amsterdam-umc.log").read_text()


def _analytics_util():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_reliability_analytics_util",
                                                  ROOT / "tests" / "runtime" / "analytics_util.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_analysis_over_bad_cells_replies_without_values_or_path(tmp_path, capsys):
    from meshctl.runtime import wire
    from meshctl.runtime.analytics_domain import answer

    util = _analytics_util()
    util.copy_data(tmp_path)
    csv = tmp_path / "data" / "amsterdam-umc.csv"  # swapped headers: radius_mean holds the patients' names
    head, rest = csv.read_text().split("\n", 1)
    csv.write_text(head.replace("patient_name", "TMP").replace("radius_mean", "patient_name")
                   .replace("TMP", "radius_mean") + "\n" + rest)
    res = answer(util.hospitals_plan(), "amsterdam-umc", tmp_path, wire.AnalyzeIns(analysis="nuclei"), run="r")
    assert isinstance(res, wire.ErrorReply) and res.code == "data"
    assert res.reason == ("analysis nuclei: cannot read product amsterdam-umc.biopsies: 164 values in radius_mean "
                          "are not float (its declared type)")
    assert not [s for s in _secrets() if s in res.reason] and str(tmp_path) not in res.reason
    assert "Could not convert string" in capsys.readouterr().err  # the detail, in the daemon's log


def test_a_dead_daemons_log_line_travels_only_when_it_is_the_daemons_own_closing_line(tmp_path: Path) -> None:
    """A forked daemon's log holds the library's detail (a cell value, a host path) of what it refused;
    when it then dies, DomainLost carries its last log line only if that is its own `error: …` line."""
    from meshctl.runtime.coordinator import _daemon_said

    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "karolinska.log"
    log.write_text(f"{tmp_path}/karolinska.csv: error: cannot read product karolinska.biopsies: 3 values in "
                   "radius_mean are not float [detail: Could not convert string 'Karin Nilsson' to FLOAT]\n")
    assert _daemon_said(tmp_path, "karolinska") == "see its log"
    log.write_text("Traceback (most recent call last):\nValueError: 'Karin Nilsson'\n")
    assert _daemon_said(tmp_path, "karolinska") == "see its log"
    log.write_text("…\nerror: cannot read product karolinska.biopsies: 3 values in radius_mean are not float\n")
    assert _daemon_said(tmp_path, "karolinska").startswith("error: cannot read product karolinska.biopsies")
    assert _daemon_said(tmp_path, "charite") == "no log"


def test_a_sql_rules_result_stays_in_the_domain_and_only_its_verdict_leaves(hospitals, capsys) -> None:
    """A SQL rule's observed value is whatever its author's query returns (here the largest tumour radius
    of a patient): the Hello carries only the rule's verdict; the value is in the domain's log."""
    from meshctl.compiler.compile import compile_mesh
    from meshctl.runtime.daemon import Daemon, DaemonConfig
    from meshctl.runtime.keys import KeyPair

    rule = """    quality:
      - {name: oldest, type: sql, mustBeGreaterThan: 0, query: 'SELECT max(radius_mean) FROM {object}'}
"""
    anchor = "    purposes: [cancer-research]\n"
    hospitals.write_text(hospitals.read_text().replace(anchor, anchor + rule, 1))
    plan = compile_mesh(hospitals).plan
    assert plan is not None
    daemon = Daemon(DaemonConfig(domain="charite", plan=plan, base_dir=hospitals.parent,
                                 coordinator="tcp://127.0.0.1:1", server_key=b"", keys=KeyPair.generate()))
    daemon._check_contracts(list(plan.jobs))
    [check] = [c for c in daemon.checks if c.rule == "oldest"]
    assert check.passed and check.observed is None
    assert all(c.observed is not None for c in daemon.checks if c.rule != "oldest" and c.passed)
    oldest = duckdb.sql(f"SELECT max(radius_mean) FROM '{hospitals.parent / 'examples/hospitals/data/charite.parquet'}'")
    assert f"'oldest': {float(oldest.fetchall()[0][0])}" in capsys.readouterr().err
