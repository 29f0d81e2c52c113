"""A lab of Linux network namespaces that stands in for separate hosts (test and benchmark
infrastructure, not product code).

    hub namespace:  bridge br0 ─┬─ veth ── coordinator namespace  eth0 10.77.0.1/24
                                ├─ veth ── domain namespace 0     eth0 10.77.0.10/24
                                └─ tap ◀─ impair.py ─▶ tap ── domain namespace 1  eth0 10.77.0.11/24

Every namespace has `lo` up and its own address; nothing is configured outside the namespaces, so
nothing listens on the host's interfaces and no frame leaves them. A domain's link is a veth pair
(the kernel's own, `link="veth"`) or two TAP devices joined by the userspace impairer
(`link="tap"`, impair.py: delay, loss, rate cap, down/up). Names carry the creating pid
(`mc<pid>x<n>-…`), so `sweep()` can remove what a killed run left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

IMPAIR = Path(__file__).with_name("impair.py")
SUBNET = "10.77.0"
COORDINATOR_IP = f"{SUBNET}.1"
_NAME = re.compile(r"^mc(\d+)x\d+-")
_count = 0


class LabUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no `ip`, no /dev/net/tun)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def available() -> str | None:
    """None when namespaces, bridges and TAP devices can be made; else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the multi-host tests as root)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (the link impairer needs TAP devices)"
    probe = f"mc{os.getpid()}x0-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def sweep() -> list[str]:
    """Delete the `mc<pid>x…` namespaces whose creating process is dead; the names deleted."""
    out = _ip("netns", "list", check=False).stdout
    gone = []
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _ip("netns", "del", name, check=False)
            gone.append(name)
    return gone


@dataclass
class DomainLink:
    """One domain's namespace and its link to the hub."""

    name: str
    netns: str
    ip: str
    kind: str  # "veth" or "tap"
    hub_port: str  # the device on the hub's bridge
    impairer: subprocess.Popen[str] | None = None


@dataclass
class Lab:
    """The hub, the coordinator's namespace and one namespace per domain."""

    domains: list[str]
    link: str = "veth"
    delay: float = 0.0
    loss: float = 0.0
    rate: float = 0.0
    sysctl: dict[str, str] = field(default_factory=dict)
    """Set in every namespace made (e.g. {"net.ipv4.tcp_congestion_control": "reno"})."""
    prefix: str = ""
    hub: str = ""
    coordinator: str = ""
    links: dict[str, DomainLink] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        global _count
        _count += 1
        self.prefix = self.prefix or f"mc{os.getpid()}x{_count}"
        self.hub = f"{self.prefix}-hub"
        self.coordinator = f"{self.prefix}-co"

    # -- building and tearing down --------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.extra.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        for key, value in self.sysctl.items():
            subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", f"{key}={value}"], check=True)

    def up(self) -> None:
        sweep()
        self._netns(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        self._veth(self.coordinator, "v-co", f"{COORDINATOR_IP}/24")
        for i, domain in enumerate(self.domains):
            netns, ip = f"{self.prefix}-d{i}", f"{SUBNET}.{10 + i}"
            if self.link == "veth":
                self._veth(netns, f"v-d{i}", f"{ip}/24")
                self.links[domain] = DomainLink(domain, netns, ip, "veth", f"v-d{i}")
            else:
                self.links[domain] = self._tap(domain, netns, f"t-d{i}", ip, seed=i)
        for domain in self.domains:  # every link carries frames before anyone dials
            self.wait_reachable(domain)

    def _veth(self, netns: str, hub_port: str, cidr: str) -> None:
        self._netns(netns)
        _ip("-n", self.hub, "link", "add", hub_port, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("-n", self.hub, "link", "set", hub_port, "master", "br0", "up")
        _ip("-n", netns, "addr", "add", cidr, "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")

    def _tap(self, domain: str, netns: str, hub_port: str, ip: str, seed: int) -> DomainLink:
        self._netns(netns)
        _ip("-n", netns, "tuntap", "add", "dev", "eth0", "mode", "tap")
        _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", self.hub, "tuntap", "add", "dev", hub_port, "mode", "tap")
        _ip("-n", self.hub, "link", "set", hub_port, "master", "br0", "up")
        proc = subprocess.Popen(
            [sys.executable, str(IMPAIR), netns, "eth0", self.hub, hub_port, "--delay", str(self.delay),
             "--loss", str(self.loss), "--rate", str(self.rate), "--seed", str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        link = DomainLink(domain, netns, ip, "tap", hub_port, proc)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the link impairer for {domain} did not start (exit {proc.wait()})")
        return link

    def close(self) -> None:
        for link in self.links.values():
            if link.impairer is not None and link.impairer.poll() is None:
                link.impairer.terminate()
                try:
                    link.impairer.wait(5)
                except subprocess.TimeoutExpired:
                    link.impairer.kill()
                    link.impairer.wait()
        for name in reversed(self.extra):
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", name, check=False)
        self.extra.clear()

    # -- using it -----------------------------------------------------------------------------

    def popen(self, netns: str, argv: list[str], **kw: object) -> subprocess.Popen[str]:
        """`argv` in namespace `netns` (`ip netns exec` execs it: the pid is the program's)."""
        return subprocess.Popen(["ip", "netns", "exec", netns, *argv], **kw)  # type: ignore[call-overload]

    def run(self, netns: str, argv: list[str], timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", netns, *argv], check=False, capture_output=True, text=True,
                              timeout=timeout, **kw)  # type: ignore[call-overload]

    def rtt(self, domain: str, timeout: float = 2.0) -> float | None:
        """Seconds for a TCP handshake attempt from the coordinator's namespace to `domain` (SYN, then
        the RST of a closed port: one round trip), or None when nothing came back in `timeout`."""
        probe = ("import socket,sys,time\n"
                 "s=socket.socket(); s.settimeout(float(sys.argv[2])); t=time.monotonic()\n"
                 "try: s.connect((sys.argv[1], 9))\n"
                 "except ConnectionRefusedError: print(time.monotonic()-t)\n"
                 "except OSError: print('none')\n")
        out = self.run(self.coordinator, [sys.executable, "-c", probe, self.links[domain].ip, str(timeout)])
        word = out.stdout.strip()
        return None if word in ("none", "") else float(word)

    def wait_reachable(self, domain: str, timeout: float = 10.0) -> None:
        """Until the coordinator's namespace reaches `domain` (through bridge and impairer)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.rtt(domain, timeout=1.0) is not None:
                return
        raise RuntimeError(f"{domain} ({self.links[domain].ip}) is not reachable from the coordinator namespace")

    def _tell(self, domain: str, command: str) -> str:
        proc = self.links[domain].impairer
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    def impair(self, domain: str, delay: float | None = None, loss: float | None = None,
               rate: float | None = None) -> None:
        """Change a TAP link's one-way delay (s), loss (0..1) or rate (bit/s) while it carries traffic."""
        parts = [f"{k}={v}" for k, v in (("delay", delay), ("loss", loss), ("rate", rate)) if v is not None]
        reply = self._tell(domain, "set " + " ".join(parts))
        if not reply.startswith("ok"):
            raise RuntimeError(reply)

    def set_link(self, domain: str, up: bool) -> None:
        """Cut `domain`'s link at the hub (or mend it): a veth port goes down, an impairer drops all."""
        link = self.links[domain]
        if link.kind == "tap":
            self._tell(domain, "up" if up else "down")
        else:
            _ip("-n", self.hub, "link", "set", link.hub_port, "up" if up else "down")

    def bytes_between(self, domain: str, t1: float, t2: float) -> int:
        """Bytes of the frames a TAP link forwarded, both ways, between wall times t1 and t2."""
        return int(self._tell(domain, f"bytes {t1!r} {t2!r}").split()[1])

    def stats(self, domain: str) -> dict[str, int]:
        """Frames and bytes the impairer forwarded on a TAP link (a2b: from the domain)."""
        reply = self._tell(domain, "stats")
        return {k: int(v) for k, v in (w.split("=") for w in reply.split()[1:])}
