"""Addresses and Curve identities of the coordinator and the domains.

A domain is `local` (forked by `meshctl up`, with an ephemeral key per run) or remote
(`tcp://HOST[:PORT]`: its daemon runs on its own host with its own key pair, whose public
half mesh.yaml declares). The coordinator may declare its own public key; then every run
uses that key pair. Keys are Z85 text, checked here without zmq (the compiler opens no
sockets).
"""

from __future__ import annotations

import re

from meshctl.compiler.diagnostics import Reporter
from meshctl.compiler.spec import MeshSpec

Z85_ALPHABET = ("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                ".-:+=^!/*?&<>()[]{}@%$#")
_Z85 = {c: i for i, c in enumerate(Z85_ALPHABET)}
_TCP = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+)(?::(\d{1,5}))?$")

KEYGEN_HINT = "run `meshctl keys generate {name}` on the {what}'s host and paste the public_key line"


def z85_key_problem(key: str) -> str | None:
    """Why `key` is not a Z85 Curve public key (40 characters encoding 32 bytes), or None."""
    if len(key) != 40:
        return f"{len(key)} characters, need 40"
    bad = sorted({c for c in key if c not in _Z85})
    if bad:
        return "characters outside Z85: " + " ".join(repr(c) for c in bad[:5])
    for i in range(0, 40, 5):
        value = 0
        for c in key[i:i + 5]:
            value = value * 85 + _Z85[c]
        if value >= 1 << 32:
            return f"characters {i + 1}-{i + 5} do not encode 4 bytes"
    return None


def remote_domains(spec: MeshSpec) -> set[str]:
    """Names of the domains whose daemons run on their own hosts (address other than `local`)."""
    return {d.name for d in spec.domains if d.address != "local"}


def check_identity(spec: MeshSpec, report: Reporter) -> None:
    """Addresses are `local` or tcp://; remote domains declare a key; every key is Z85."""
    coordinator = spec.mesh.coordinator if spec.mesh is not None else None
    if coordinator is not None:
        where = ("mesh", "coordinator")
        m = _TCP.match(coordinator.address)
        if m is None or m.group(2) is None or int(m.group(2)) > 65535:
            report.error("MESH217", f"coordinator address '{coordinator.address}' is not tcp://HOST:PORT",
                         (*where, "address"), hint="e.g. tcp://0.0.0.0:7700 (port 0 picks a free port)")
        if coordinator.public_key:
            _check_key(coordinator.public_key, "the coordinator", (*where, "public_key"), report)
    for d in spec.domains:
        if d.address == "local":
            if d.public_key:
                report.error("MESH220", f"domain '{d.name}' is local (forked by `meshctl up` with a key made "
                             "per run) but declares a public_key", (*d.path, "public_key"), key=True,
                             hint="remove public_key, or set `address: tcp://HOST` if its daemon runs on "
                                  "its own host")
            continue
        m = _TCP.match(d.address)
        if m is None or (m.group(2) is not None and int(m.group(2)) > 65535):
            report.error("MESH217", f"address '{d.address}' of domain '{d.name}' is neither `local` nor "
                         "tcp://HOST[:PORT]", (*d.path, "address"),
                         hint="`local` when `meshctl up` forks its daemon, else the host its daemon runs on")
        if not d.public_key:
            report.error("MESH218", f"domain '{d.name}' runs at {d.address} but declares no public_key",
                         d.path, hint=KEYGEN_HINT.format(name=d.name, what="domain"))
        else:
            _check_key(d.public_key, f"domain '{d.name}'", (*d.path, "public_key"), report)


def _check_key(key: str, owner: str, at: tuple[str | int, ...], report: Reporter) -> None:
    problem = z85_key_problem(key)
    if problem is not None:
        name = "coordinator" if owner == "the coordinator" else owner.split("'")[1]
        what = "coordinator" if owner == "the coordinator" else "domain"
        report.error("MESH219", f"public_key of {owner} is not a Curve public key ({problem})", at,
                     hint=KEYGEN_HINT.format(name=name, what=what))
