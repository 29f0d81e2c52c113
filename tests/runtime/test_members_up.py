"""`meshctl up` with a remote domain that never comes: real processes, real sockets, real files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from meshctl.runtime.keys import KeyPair

ROOT = Path(__file__).resolve().parents[2]


def test_up_names_the_missing_remote_domain_with_its_command_and_gives_up_after_join_timeout(tmp_path):
    shutil.copytree(ROOT / "examples" / "hospitals" / "data", tmp_path / "examples" / "hospitals" / "data")
    key = KeyPair.generate().public.decode()
    text = (ROOT / "mesh.yaml").read_text()
    remote = text.replace("  - name: amsterdam-umc\n    owner: datamanagement@amsterdamumc.example\n"
                          "    jurisdiction: eu\n    address: local\n",
                          "  - name: amsterdam-umc\n    owner: datamanagement@amsterdamumc.example\n"
                          f"    jurisdiction: eu\n    address: tcp://amsterdam.example\n    public_key: \"{key}\"\n")
    assert remote != text
    (tmp_path / "mesh.yaml").write_text(remote)
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "meshctl", "up", "--headless", "--address", "tcp://127.0.0.1:0",
                          "--join-timeout", "12"], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                         env={**os.environ}, check=False)
    took = time.monotonic() - started
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert re.search(r"job malignancy waits for amsterdam-umc \(for 1\ds\)\n"
                     r"  amsterdam-umc: meshctl serve --domain amsterdam-umc --coordinator tcp://127\.0\.0\.1:\d+\n",
                     out.stdout), out.stdout
    assert "domains amsterdam-umc did not join within 12s" in out.stdout + out.stderr, out.stdout + out.stderr
    assert 12 < took < 120
