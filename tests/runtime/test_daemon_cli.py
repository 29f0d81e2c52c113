"""`meshctl daemon` given bad inputs: one line, exit 1, never a traceback."""

from __future__ import annotations

import subprocess

from meshctl.runtime.keys import KeyPair


def test_bad_key_file_malformed_plan_and_bad_server_key(tmp_path, make_plan, meshctl_telling_torch):
    def _daemon(*args: str):
        out = subprocess.run([*meshctl_telling_torch, "daemon", *args], capture_output=True, text=True,
                             timeout=60, check=False)
        *lines, said = out.stderr.splitlines()
        out.stderr, out.torch = "\n".join(lines), said == "torch imported"  # bad inputs are refused before torch
        return out

    plan = tmp_path / "mesh.plan.toml"
    make_plan().write(plan)
    good = KeyPair.generate().save(tmp_path, "d")
    junk = tmp_path / "junk.key_secret"
    junk.write_text("this is not a key\n")
    server = KeyPair.generate().public.decode()
    base = ["--domain", "client-0", "--coordinator", "tcp://127.0.0.1:1"]

    out = _daemon("--plan", str(plan), *base, "--server-key", server, "--key", str(junk))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith(f"{junk}: error:") and not out.torch

    bad_plan = tmp_path / "bad.plan.toml"
    bad_plan.write_text("[plan]\nformat = 'x'\n")
    out = _daemon("--plan", str(bad_plan), *base, "--server-key", server, "--key", str(good))
    assert out.returncode == 1 and "not a meshctl plan" in out.stderr and "Traceback" not in out.stderr
    assert not out.torch

    out = _daemon("--plan", str(plan), *base, "--server-key", "short", "--key", str(good))
    assert out.returncode == 1 and "bad Curve public key" in out.stderr and "Traceback" not in out.stderr
    assert not out.torch

    out = _daemon("--plan", str(plan), "--domain", "nobody", "--coordinator", "tcp://127.0.0.1:1",
                  "--server-key", server, "--key", str(good))
    assert out.returncode == 1 and "domain 'nobody' is not in the plan" in out.stderr
