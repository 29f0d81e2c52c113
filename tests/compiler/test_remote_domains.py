"""Remote domains at compile time: a key is required and checked; their data is not looked for."""

from __future__ import annotations

from pathlib import Path

import zmq
from compiler_util import ROOT

from meshctl.compiler.compile import compile_bytes, compile_mesh
from meshctl.compiler.identity import z85_key_problem

DIGITS = ROOT / "examples" / "digits" / "mesh.yaml"
KEY = zmq.curve_keypair()[0].decode()


def _mesh(tmp_path: Path, client1: str, coordinator: str = "", data: tuple[str, ...] = ("client-0",)) -> Path:
    """The digits mesh in tmp with client-1's domain line replaced by `client1`; only `data` files exist."""
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    for d in data:
        (tmp_path / "data" / f"{d}.parquet").symlink_to(ROOT / "examples" / "digits" / "data" / f"{d}.parquet")
    text = DIGITS.read_text()
    old = "  - {name: client-1, owner: client-1@digits.example, jurisdiction: eu, address: local}"
    assert old in text
    text = text.replace(old, client1)
    for d in ("client-2", "client-3"):  # two domains are enough here
        text = text.replace(f"  - {{name: {d}, owner: {d}@digits.example, jurisdiction: eu, address: local}}\n", "")
        text = text.replace(f"  - name: digits\n    domain: {d}\n    source: data/{d}.parquet\n"
                            "    description: A train partition and every N-th test row (column split).\n"
                            "    classification: internal\n    contract: digits@1\n    columns: *digits-columns\n", "")
    if coordinator:
        text = text.replace("coordinator: {address: tcp://127.0.0.1:7710}",
                            f"coordinator: {{address: tcp://127.0.0.1:7710, {coordinator}}}")
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    return path


def _codes(path: Path) -> list[str]:
    return [d.code for d in compile_mesh(path).errors]


def test_a_tcp_domain_without_a_key_is_mesh218_at_the_domain(tmp_path):
    path = _mesh(tmp_path, "  - {name: client-1, address: tcp://10.0.0.7}", data=("client-0", "client-1"))
    result = compile_mesh(path)
    assert [d.code for d in result.errors] == ["MESH218"]
    d = result.errors[0]
    assert d.message == "domain 'client-1' runs at tcp://10.0.0.7 but declares no public_key"
    assert path.read_text().splitlines()[d.line - 1].lstrip().startswith("- {name: client-1")
    assert d.hint == ("run `meshctl keys generate client-1` on the domain's host and paste the public_key line")


def test_a_remote_domains_missing_data_is_not_mesh307_and_a_local_ones_still_is(tmp_path):
    remote = _mesh(tmp_path / "a", f'  - {{name: client-1, address: tcp://10.0.0.7, public_key: "{KEY}"}}')
    result = compile_mesh(remote)
    assert result.errors == [], result.render_diagnostics()
    assert result.plan is not None and result.plan.domains[1].public_key == KEY
    local = _mesh(tmp_path / "b", "  - {name: client-1, address: local}")
    result = compile_mesh(local)
    assert [d.code for d in result.errors] == ["MESH307"]
    assert "data/client-1.parquet" in result.errors[0].message


def test_sqlite_source_of_a_remote_domain_is_not_looked_for_but_its_table_is_checked(tmp_path):
    path = _mesh(tmp_path, f'  - {{name: client-1, address: tcp://h1:7000, public_key: "{KEY}"}}')
    text = path.read_text().replace("source: data/client-1.parquet", "source: sqlite:data/nowhere.db")
    assert compile_bytes(text.encode(), path).errors[0].code == "MESH212"  # no table: still an error
    fixed = text.replace("source: sqlite:data/nowhere.db", "source: sqlite:data/nowhere.db\n    table: digits")
    assert compile_bytes(fixed.encode(), path).errors == []


def test_malformed_keys_and_addresses(tmp_path):
    cases = {
        '  - {name: client-1, address: tcp://h1, public_key: "short"}': ["MESH219"],
        '  - {name: client-1, address: tcp://h1, public_key: "' + "~" * 40 + '"}': ["MESH219"],
        '  - {name: client-1, address: "h1:7000", public_key: "' + KEY + '"}': ["MESH217"],
        '  - {name: client-1, address: tcp://h1:99999, public_key: "' + KEY + '"}': ["MESH217"],
        '  - {name: client-1, public_key: "' + KEY + '"}': ["MESH220"],
    }
    for i, (line, codes) in enumerate(cases.items()):
        assert _codes(_mesh(tmp_path / str(i), line, data=("client-0", "client-1"))) == codes, line
    ok = _mesh(tmp_path / "c", "  - {name: client-1, address: local}", f'public_key: "{KEY}"', ("client-0", "client-1"))
    assert _codes(ok) == []
    assert compile_mesh(ok).plan.coordinator.public_key == KEY
    bad = _mesh(tmp_path / "d", "  - {name: client-1, address: local}", 'public_key: "' + "0" * 39 + '"',
                ("client-0", "client-1"))
    assert _codes(bad) == ["MESH219"]
    no_port = ok.read_text().replace("tcp://127.0.0.1:7710", "tcp://127.0.0.1")
    assert [d.code for d in compile_bytes(no_port.encode(), ok).errors] == ["MESH217"]


def test_z85_check_agrees_with_zmq():
    for _ in range(300):
        public, secret = zmq.curve_keypair()
        assert z85_key_problem(public.decode()) is None and z85_key_problem(secret.decode()) is None
    for bad in ("", "x" * 39, "x" * 41, "#" * 40, "a b" + "c" * 37):
        assert z85_key_problem(bad) is not None
        try:
            decoded = zmq.utils.z85.decode(bad.encode())
        except (ValueError, KeyError, TypeError, OverflowError, Exception):  # noqa: BLE001, S112 - any refusal
            continue
        assert len(decoded) != 32, bad


def test_compiling_twice_gives_the_same_plan_bytes(tmp_path):
    path = _mesh(tmp_path, f'  - {{name: client-1, address: tcp://h1, public_key: "{KEY}"}}', f'public_key: "{KEY}"')
    assert compile_mesh(path).plan.to_toml() == compile_mesh(path).plan.to_toml()


def test_a_key_rotation_shows_in_meshctl_diff_with_both_fingerprints(tmp_path):
    import hashlib

    from meshctl.compiler.breaking import classify
    from meshctl.gitrev import load_side

    new_key = zmq.curve_keypair()[0].decode()
    base = _mesh(tmp_path / "base", f'  - {{name: client-1, address: tcp://h1, public_key: "{KEY}"}}',
                 f'public_key: "{KEY}"')
    head = _mesh(tmp_path / "head", f'  - {{name: client-1, address: tcp://h1, public_key: "{new_key}"}}',
                 f'public_key: "{new_key}"')
    found = classify(load_side(str(base), base), load_side(str(head), head))
    fp = {k: hashlib.sha256(k.encode()).hexdigest()[:8] for k in (KEY, new_key)}
    assert sorted((f.rule, f.subject, f.message) for f in found) == [
        ("INF006", "coordinator", f"public key {fp[KEY]} -> {fp[new_key]}"),
        ("INF006", "domain client-1", f"public key {fp[KEY]} -> {fp[new_key]}")]
