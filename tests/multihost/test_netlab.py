"""The lab itself: namespaces made and removed (also those of a dead run), and the impairer's delay,
loss and down/up, measured by TCP handshakes from the coordinator's namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import netlab


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


def test_the_impairer_delays_drops_and_cuts_a_link(namespaces_ok, lab_factory):
    with lab_factory(["a", "b"], link="tap", delay=0.05) as lab:
        assert 0.095 < lab.rtt("a") < 0.2  # 50 ms each way
        lab.impair("a", delay=0.0)
        assert lab.rtt("a") < 0.05
        lab.impair("a", loss=1.0)
        assert lab.rtt("a", timeout=0.5) is None
        lab.impair("a", loss=0.0)
        assert lab.rtt("a") is not None
        lab.set_link("a", False)
        assert lab.rtt("a", timeout=0.5) is None
        assert lab.rtt("b") is not None  # only a's link is cut
        lab.set_link("a", True)
        assert lab.rtt("a") is not None
        assert lab.stats("a")["dropped"] >= 2


def test_a_lab_leaves_nothing_and_a_dead_runs_namespaces_are_swept(namespaces_ok, lab_factory):
    with lab_factory(["a"], link="veth") as lab:
        mine = {lab.hub, lab.coordinator, lab.links["a"].netns}
        assert mine <= _namespaces()
        assert lab.rtt("a") is not None
        lab.set_link("a", False)
        assert lab.rtt("a", timeout=0.5) is None
    assert not mine & _namespaces()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"mc{dead.pid}x1-hub"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    assert stale in netlab.sweep()
    assert stale not in _namespaces()


def test_without_root_they_fail_in_ci_and_skip_elsewhere(namespaces_ok):
    # the proof may never drop silently out of CI: as an unprivileged user, CI=1 fails with one line
    tmp = Path(tempfile.mkdtemp(prefix="mc-nobody-"))  # tmp_path's parents are root's only
    tmp.chmod(0o777)
    here = Path(__file__).parent

    def as_nobody(ci: bool) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": "1"} if ci else {})
        return subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "pytest",
             str(here / "test_netlab.py"), "-q", "-p", "no:cacheprovider", "-n", "0", "-k", "impairer",
             f"--basetemp={tmp / ('ci' if ci else 'dev')}"],
            check=False, capture_output=True, text=True, env=env, cwd=tmp, timeout=120)

    ci = as_nobody(ci=True)
    assert ci.returncode != 0, ci.stdout
    assert "multi-host tests cannot run: network namespaces need root" in ci.stdout, ci.stdout
    dev = as_nobody(ci=False)
    shutil.rmtree(tmp)
    assert dev.returncode == 0 and "1 skipped" in dev.stdout, dev.stdout
