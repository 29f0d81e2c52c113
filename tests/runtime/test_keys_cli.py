"""`meshctl keys generate/show`, and `up` refusing a declared coordinator key whose secret is wrong."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import zmq.auth

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits"


def meshctl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def two_domain_mesh(directory: Path, client1: list[str], coordinator: list[str] = ()) -> Path:
    """The digits mesh with client-0 (local, its data here) and client-1 given as block lines."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "data").mkdir(exist_ok=True)
    (directory / "data" / "client-0.parquet").symlink_to(DIGITS / "data" / "client-0.parquet")
    text = (DIGITS / "mesh.yaml").read_text()
    text = text.replace("training: {rounds: 20,", "training: {rounds: 2,")
    head, rest = text.split("domains:\n", 1)
    _, rest = rest.split("\nproducts:\n", 1)
    products = rest.split("  - name: digits\n    domain: client-2")[0]
    tail = rest[rest.index("contracts:"):]
    head = head.replace("  coordinator: {address: tcp://127.0.0.1:7710}\n",
                        "  coordinator:\n    address: tcp://127.0.0.1:7710\n"
                        + "".join(f"    {line}\n" for line in coordinator))
    domains = "  - name: client-0\n  - name: client-1\n" + "".join(f"    {line}\n" for line in client1)
    path = directory / "mesh.yaml"
    path.write_text(f"{head}domains:\n{domains}\nproducts:\n{products}{tail}")
    return path


def test_generate_writes_a_0600_secret_prints_the_line_and_refuses_to_overwrite(tmp_path):
    (tmp_path / "mesh.yaml").write_text("")
    out = meshctl("keys", "generate", "charite", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith('public_key: "') and len(line) == len('public_key: ""') + 40
    keys = tmp_path / ".meshctl" / "keys"
    secret, public = keys / "charite.key_secret", keys / "charite.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert (keys / ".gitignore").read_text().splitlines()[-1] == "*"
    pub, sec = zmq.auth.load_certificate(str(secret))
    assert line == f'public_key: "{pub.decode()}"' and len(sec) == 40
    assert zmq.auth.load_certificate(str(public)) == (pub, None)
    fp = hashlib.sha256(pub).hexdigest()[:8]
    assert fp in out.stderr and str(secret) in out.stderr and "Traceback" not in out.stderr

    shown = meshctl("keys", "show", "charite", cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout == f"{line}\nfingerprint: {fp}\n"

    again = meshctl("keys", "generate", "charite", cwd=tmp_path)
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.strip().splitlines() == [
        (f"{secret}: error: key charite exists already (hint: `meshctl keys show charite` prints its public key; "
        "--force replaces it (then the new public_key must replace the old one in mesh.yaml))")]
    assert zmq.auth.load_certificate(str(secret))[0] == pub, "the refused generate left the key alone"

    secret.chmod(0o644)  # a replaced secret must not keep a loose mode
    forced = meshctl("keys", "generate", "charite", "--force", cwd=tmp_path)
    assert forced.returncode == 0 and forced.stdout.strip() != line
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert meshctl("keys", "show", "charite", cwd=tmp_path).stdout.splitlines()[0] == forced.stdout.strip()


def test_dir_mesh_and_one_line_errors(tmp_path):
    elsewhere = tmp_path / "etc" / "keys"
    out = meshctl("keys", "generate", "coordinator", "--dir", str(elsewhere), cwd=tmp_path)
    assert out.returncode == 0 and (elsewhere / "coordinator.key_secret").is_file()
    assert not (elsewhere / ".gitignore").exists(), "a directory the user chose is left as it is"
    assert meshctl("keys", "show", "coordinator", "--dir", str(elsewhere), cwd=tmp_path).stdout.startswith(
        out.stdout.strip())
    (tmp_path / "m").mkdir()
    out = meshctl("keys", "generate", "d1", "--mesh", str(tmp_path / "m" / "mesh.yaml"), cwd=tmp_path)
    assert out.returncode == 0 and (tmp_path / "m" / ".meshctl" / "keys" / "d1.key_secret").is_file()
    for args, message in ((("show", "nobody"), "error: no key nobody in"),
                          (("generate", "../evil"), "error: key name '../evil' is not a plain file name"),
                          (("generate", ""), "error: key name '' is not a plain file name")):
        out = meshctl("keys", *args, cwd=tmp_path)
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "evil.key_secret").exists()


def test_printed_lines_paste_into_a_mesh_that_validates(tmp_path):
    host = tmp_path / "hospital"
    host.mkdir()
    domain = meshctl("keys", "generate", "client-1", cwd=host).stdout.strip()
    coord = tmp_path / "coordinator"
    coordinator = meshctl("keys", "generate", "coordinator", "--mesh", str(coord / "mesh.yaml"), cwd=tmp_path)
    missing = two_domain_mesh(coord, ["address: tcp://hospital.example.org"])
    out = meshctl("validate", str(missing), cwd=tmp_path)
    assert out.returncode == 1 and "error[MESH218]" in out.stderr and "meshctl keys generate client-1" in out.stderr
    (coord / "mesh.yaml").unlink()
    (coord / "data" / "client-0.parquet").unlink()
    path = two_domain_mesh(coord, ["address: tcp://hospital.example.org", domain], [coordinator.stdout.strip()])
    out = meshctl("validate", str(path), cwd=tmp_path)  # client-1's data is on its host only: no MESH307
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{path}: ok")


def test_up_refuses_a_declared_coordinator_key_without_its_secret_before_starting(tmp_path):
    elsewhere = tmp_path / "other"
    line = meshctl("keys", "generate", "coordinator", "--dir", str(elsewhere), cwd=tmp_path).stdout.strip()
    path = two_domain_mesh(tmp_path / "mesh", [], [line])
    (tmp_path / "mesh" / "data" / "client-1.parquet").symlink_to(DIGITS / "data" / "client-1.parquet")
    runs = path.parent / ".meshctl" / "runs"
    want = hashlib.sha256(line.split('"')[1].encode()).hexdigest()[:8]
    default = path.parent / ".meshctl" / "keys" / "coordinator.key_secret"

    out = meshctl("up", "--headless", "--address", "tcp://127.0.0.1:0", cwd=path.parent)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        (f"{default}: error: mesh.coordinator.public_key ({want}) is declared but its secret key is not on this "
        "host (hint: copy the coordinator's secret key here or pass --coordinator-key FILE; a new mesh makes one "
        "with `meshctl keys generate coordinator`)")]

    meshctl("keys", "generate", "coordinator", "--mesh", str(path), cwd=tmp_path)  # a different key
    out = meshctl("up", "--headless", "--address", "tcp://127.0.0.1:0", cwd=path.parent)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert f"is not the coordinator key mesh.yaml declares ({want})" in out.stderr

    right = elsewhere / "coordinator.key_secret"
    os.chmod(right, 0o640)
    out = meshctl("up", "--headless", "--coordinator-key", str(right), "--address", "tcp://127.0.0.1:0",
                  cwd=path.parent)
    assert out.returncode == 1 and "readable by others (mode 0640)" in out.stderr and "chmod 600" in out.stderr
    assert not runs.exists() or not list(runs.iterdir()), "a refused key starts nothing"
