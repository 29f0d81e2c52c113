"""`meshctl deploy k8s`: Kubernetes manifests for one domain's service (`meshctl serve`).

The manifests are a pure function of the mesh file and the options: the same input
gives the same bytes, so they can be committed and reviewed like the plan. They hold
no key material: the domain's secret key lives in a Secret the operator creates, and
the manifests carry the `kubectl create secret` command as a comment.

What one domain gets (all named `meshctl-<domain>…`):

- a ConfigMap with the mesh file and every file it includes (`include:`), copied at
  start into the state volume at the same relative paths (the top directories of included
  files emptied first, so a file dropped from the mesh is not read), so `.meshctl/` (privacy
  ledger, hashing secret) sits writable beside them;
- a PersistentVolumeClaim for that state, which must outlive the pod (the ledger); it is
  also the data root (`--data-root`), with each of the domain's source files mounted
  read-only into it from the data volume, so the sources resolve as the mesh says;
- a Deployment of one replica, strategy Recreate (never two services of one domain),
  non-root, read-only root file system, every capability dropped, no ports; its pod
  template carries the mesh file's SHA-256, so applying a changed mesh restarts it;
- a NetworkPolicy: no ingress; egress only to the coordinator's port, a postgresql
  source's port, and DNS when one of them is a host name.

The domain's data is a PersistentVolumeClaim the operator binds to the volume that
holds it, laid out as the mesh's relative `source:` paths say; only the domain's own
source files (or, for a glob, its directory) are mounted, read-only.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml

from meshctl import __version__
from meshctl.errors import UserError

DEFAULT_IMAGE = f"meshctl:{__version__}"
"""The image `deploy/Containerfile` builds when tagged as docs/deploy.md says."""
UID = 10001
"""The non-root user of the image (`deploy/Containerfile`) and of the pod."""
MESH_DIR = "/srv/mesh"
"""The service's checkout in the pod: the mesh file and `.meshctl/` beside it (the state volume)."""
KEY_DIR = "/etc/meshctl/keys"
CONFIGMAP_MAX = 1024 * 1024
"""Kubernetes' limit on a ConfigMap's data."""
_UNDIALABLE = {"0.0.0.0", "::", "*", "localhost", ""}
"""Hosts a coordinator binds but another host cannot dial (loopback addresses too)."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes a multi-line string (the mesh file) as a literal block, and no aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


@dataclass(frozen=True)
class Manifests:
    """The objects for one domain, and the header comment that goes before them."""

    domain: str
    objects: list[dict[str, Any]]
    header: list[str]

    def render(self) -> str:
        """Multi-document YAML, headed by the comment lines."""
        docs = [yaml.dump(o, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True) for o in self.objects]
        head = "".join(f"# {line}".rstrip() + "\n" for line in self.header)
        return head + "---\n" + "---\n".join(docs)

    def write(self, directory: Path) -> Path:
        """Write `meshctl-<domain>.yaml` into `directory` (made if missing), atomically."""
        target = directory / f"meshctl-{self.domain}.yaml"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_text(self.render())
            os.replace(tmp, target)
        except OSError as err:
            raise UserError(f"cannot write the manifests: {(err.strerror or type(err).__name__).lower()}",
                            where=str(err.filename or target)) from None
        return target


def k8s_manifests(mesh_file: Path, domain: str, *, image: str = DEFAULT_IMAGE, coordinator: str | None = None,
                  coordinator_cidr: str | None = None, data_claim: str | None = None) -> Manifests:
    """The manifests of `domain`'s service, from the mesh file as the domain's host compiles it.

    `coordinator` is the tcp://HOST:PORT the domain dials (default: mesh.coordinator.address,
    which must then name a host, not a wildcard). `coordinator_cidr` narrows the egress rule
    when HOST is a name. Every user mistake is a UserError of one line.
    """
    raw, plan, where, included = _compile(mesh_file)
    text = raw.decode()
    names = [d.name for d in plan.domains]
    if domain not in names:
        from meshctl.compiler.diagnostics import did_you_mean

        raise UserError(f"no domain {domain!r} in the mesh", where=str(mesh_file),
                        hint=did_you_mean(domain, names) or "domains: " + ", ".join(names))
    index = names.index(domain)
    if plan.domains[index].address == "local":
        raise UserError(f"domain {domain} is `address: local`: `meshctl up` forks its daemon on the "
                        "coordinator host, so there is nothing to deploy", where=where("domains", index, "address"),
                        hint="a domain on its own host has `address: tcp://HOST` and a public_key")
    host, port = _dial_address(coordinator, plan.coordinator.address,
                               where("mesh", "coordinator", "address"))
    cidr = _cidr(host, coordinator_cidr)
    name = f"meshctl-{domain}"
    mesh_name = mesh_file.name
    carried = _carried(mesh_file, mesh_name, text, included)
    digest = hashlib.sha256(raw).hexdigest() if not included else _digest([(mesh_name, raw), *included])
    labels = {"app.kubernetes.io/name": "meshctl", "app.kubernetes.io/instance": domain,
              "app.kubernetes.io/component": "domain-service", "app.kubernetes.io/version": __version__}
    select = {"app.kubernetes.io/name": "meshctl", "app.kubernetes.io/instance": domain}
    claim = data_claim or f"{name}-data"
    args = ["serve", "--domain", domain, "--mesh", f"{MESH_DIR}/{mesh_name}",
            "--coordinator", f"tcp://{_bracket(host)}:{port}",
            "--key", f"{KEY_DIR}/{domain}.key_secret", "--data-root", MESH_DIR]
    products = [p for p in plan.products if p.domain == domain]
    sources = _source_paths(plan.products, domain, where)
    databases = [_database(p.source) for p in products if p.format == "postgresql"]
    given = [("--mesh", str(mesh_file)), ("--image", None if image == DEFAULT_IMAGE else image),
             ("--coordinator", coordinator), ("--coordinator-cidr", coordinator_cidr), ("--data-claim", data_claim)]
    command = " ".join(["meshctl deploy k8s --domain", shlex.quote(domain)]
                       + [f"{flag} {shlex.quote(value)}" for flag, value in given if value is not None])
    header = [
        command,
        (f"The service of domain {domain} in mesh {plan.plan.mesh}, made by meshctl {__version__} from "
         + (f"{mesh_name} and the {len(included)} files it includes (sha256 over all of them "
            f"{digest[:12]})." if included else f"{mesh_name} (sha256 {digest[:12]}).")),
        "No key material is in here.",
        "",
        f"Before `kubectl apply -f` this file, make the Secret from the key `meshctl keys generate {domain}`",
        "wrote (where that file is; then keep it only in your secret store):",
        f"  kubectl create secret generic {name}-key \\",
        f"    --from-file={domain}.key_secret=.meshctl/keys/{domain}.key_secret",
    ]
    if sources:
        header += [f"and bind the PersistentVolumeClaim {claim} to the volume that holds {domain}'s data; mounted",
                   "read-only from it: " + ", ".join(sources) + "."]
    if cidr is None:
        header += ["", f"The NetworkPolicy allows TCP port {port} to any address ({host} is a name):",
                   "--coordinator-cidr CIDR narrows it to the coordinator's addresses."]
    objects = [
        _configmap(name, labels, {key: body for key, _, body in carried}),
        _state_claim(name, labels),
        _deployment(name, labels, select, image, args, mesh_name, digest, domain, claim, sources,
                    [(key, path) for key, path, _ in carried] if included else None),
        _network_policy(name, labels, select, [(host, port, cidr), *databases]),
    ]
    return Manifests(domain, objects, header)


def _compile(mesh_file: Path) -> tuple[bytes, Any, Callable[..., str], list[tuple[str, bytes]]]:
    """The mesh file's bytes, its plan, a function YAML path -> `file:line:col`, and the files it
    includes (name relative to its directory, bytes), in the order the compile read them."""
    from meshctl.compiler.compile import compile_mesh

    if not mesh_file.is_file():
        raise UserError("no such file" if not mesh_file.exists() else "not a file", where=str(mesh_file),
                        hint="give the mesh with --mesh FILE")
    raw = mesh_file.read_bytes()
    if len(raw) > CONFIGMAP_MAX:
        raise UserError(f"the mesh file is {len(raw)} bytes; a ConfigMap holds at most {CONFIGMAP_MAX}",
                        where=str(mesh_file))
    result = compile_mesh(mesh_file, hashed=False)
    if result.plan is None:
        first = result.errors[0]
        n = len(result.errors)
        raise UserError(f"{first.message} ({n} error{'s' if n != 1 else ''} in all)", where=first.where,
                        hint=f"meshctl validate {mesh_file} lists them")

    def where(*path: str | int) -> str:  # in the file that declares it (mesh.yaml or an include)
        return result.where(*path) or str(mesh_file)

    included = [(part.name, part.raw) for part in result.includes]
    total = len(raw) + sum(len(body) for _, body in included)
    if included and total > CONFIGMAP_MAX:
        raise UserError(f"the mesh file and the {len(included)} files it includes are {total} bytes; a ConfigMap "
                        f"holds at most {CONFIGMAP_MAX}", where=str(mesh_file))
    return raw, result.plan, where, included


def _carried(mesh_file: Path, mesh_name: str, text: str,
             included: list[tuple[str, bytes]]) -> list[tuple[str, str, str]]:
    """(ConfigMap key, path beside the mesh file, text) of the mesh file and every file it includes.

    A key is the file's relative path with `/` written `.` (a key may not hold `/`); the volume
    puts each key back at its path. Two paths with one key, a name a key cannot hold, or a file
    under .meshctl/ (each start empties the directories of included files) are a UserError."""
    out = [(mesh_name, mesh_name, text)]
    for name, body in included:
        key = name.replace("/", ".")
        where = str(mesh_file.parent / name)
        if name.split("/")[0] == ".meshctl":
            raise UserError(f"include {name!r} is under .meshctl/, the service's state (privacy ledger)",
                            where=where, hint="keep mesh files outside .meshctl/")
        if not _KEY.fullmatch(key) or len(key) > 253:
            raise UserError(f"include {name!r}: a ConfigMap key holds only letters, digits, '-', '_' and '.'",
                            where=where, hint="rename the file")
        clash = next((path for k, path, _ in out if k == key), None)
        if clash is not None:
            raise UserError(f"include {name!r} and {clash!r} are both ConfigMap key {key!r}", where=where,
                            hint="rename one of the files")
        try:
            out.append((key, name, body.decode()))
        except UnicodeDecodeError:
            raise UserError(f"include {name!r} is not UTF-8 text", where=where) from None
    return out


_KEY = re.compile(r"[-._a-zA-Z0-9]+")


def _digest(files: list[tuple[str, bytes]]) -> str:
    """sha256 over each file's name and bytes (lengths first): changes when any file does."""
    h = hashlib.sha256()
    for name, body in files:
        h.update(f"{len(name)}:{name}:{len(body)}:".encode())
        h.update(body)
    return h.hexdigest()


def _dial_address(given: str | None, declared: str, declared_at: str) -> tuple[str, int]:
    """HOST, PORT the domain dials: `given` (--coordinator) or the mesh's coordinator address."""
    address, where = (given, "--coordinator") if given else (declared, declared_at)
    try:
        parts = urlsplit(address)
        scheme, host, port = parts.scheme, parts.hostname or "", parts.port
    except ValueError:
        scheme, host, port = "", "", None
    if scheme != "tcp" or not host or port is None:
        raise UserError(f"{address!r} is not tcp://HOST:PORT", where=where)
    ip = _ip(host)
    if host in _UNDIALABLE or (ip is not None and (ip.is_loopback or ip.is_unspecified)):
        raise UserError(f"{address} is where the coordinator binds, not an address another host can dial",
                        where=where, hint="give --coordinator tcp://HOST:PORT, the coordinator host as the "
                                          "domain's host reaches it")
    return host, port


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _cidr(host: str, given: str | None) -> str | None:
    """The egress block: `given`, or HOST itself when it is an IP address; None for a bare name."""
    if given is not None:
        try:
            return str(ipaddress.ip_network(given, strict=False))
        except ValueError:
            raise UserError(f"{given!r} is not an IP network (e.g. 203.0.113.10/32)",
                            where="--coordinator-cidr") from None
    ip = _ip(host)
    return None if ip is None else f"{ip}/{ip.max_prefixlen}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _meta(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "labels": dict(labels)}


def _configmap(name: str, labels: dict[str, str], data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(f"{name}-mesh", labels),
            "data": data}


def _state_claim(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(f"{name}-state", labels),
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}


def _deployment(name: str, labels: dict[str, str], select: dict[str, str], image: str, args: list[str],
                mesh_name: str, digest: str, domain: str, claim: str, sources: list[str],
                items: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """The service's Deployment. With `items` ((ConfigMap key, path) of the mesh file and its
    includes) the ConfigMap volume places each key at its path; an init container empties the
    top directories of those paths in the state volume (a file dropped from the mesh must not stay
    there and be included) and the next copies them all, at the same relative paths, beside the
    mesh file."""
    locked = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
              "capabilities": {"drop": ["ALL"]}}
    state = {"name": "state", "mountPath": MESH_DIR}
    init = {"name": "mesh", "image": image, "command": ["cp", f"/etc/meshctl/mesh/{mesh_name}",
                                                        f"{MESH_DIR}/{mesh_name}"],
            "volumeMounts": [{"name": "mesh", "mountPath": "/etc/meshctl/mesh", "readOnly": True}, state],
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
            "securityContext": locked}
    inits = [init]
    if items is not None:
        init["command"] = ["cp", "-L", "--parents", "--", *(path for _, path in items), f"{MESH_DIR}/"]
        init["workingDir"] = "/etc/meshctl/mesh"
        volume = {"name": f"{name}-mesh", "items": [{"key": key, "path": path} for key, path in items]}
        tops = sorted({path.split("/")[0] for _, path in items if "/" in path})
        if tops:  # the copies of the last start, so a file no longer included is not read
            inits.insert(0, {**init, "name": "mesh-clean", "workingDir": MESH_DIR,
                             "command": ["rm", "-rf", "--", *tops]})
    else:
        volume = {"name": f"{name}-mesh"}
    main = {"name": "domain", "image": image, "args": args,
            "env": [{"name": "HOME", "value": "/tmp"}],
            "volumeMounts": [state, {"name": "key", "mountPath": KEY_DIR, "readOnly": True},
                             *({"name": "data", "mountPath": f"{MESH_DIR}/{s}", "subPath": s, "readOnly": True}
                               for s in sources),
                             {"name": "tmp", "mountPath": "/tmp"}],
            "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
            "securityContext": locked}
    pod = {"automountServiceAccountToken": False, "enableServiceLinks": False,
           "terminationGracePeriodSeconds": 30,
           "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                               "seccompProfile": {"type": "RuntimeDefault"}},
           "initContainers": inits, "containers": [main],
           "volumes": [{"name": "mesh", "configMap": volume},
                       {"name": "state", "persistentVolumeClaim": {"claimName": f"{name}-state"}},
                       {"name": "key", "secret": {"secretName": f"{name}-key", "defaultMode": 0o400,
                                                  "items": [{"key": f"{domain}.key_secret",
                                                             "path": f"{domain}.key_secret"}]}},
                       *([{"name": "data", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}]
                         if sources else []),
                       {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, labels),
            "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": select},
                     "template": {"metadata": {"labels": dict(labels),
                                               "annotations": {"meshctl.dev/mesh-sha256": digest}},
                                  "spec": pod}}}


def _network_policy(name: str, labels: dict[str, str], select: dict[str, str],
                    peers: list[tuple[str, int, str | None]]) -> dict[str, Any]:
    """No ingress; egress to each (host, port, cidr): the coordinator, and postgresql servers."""
    egress: list[dict[str, Any]] = []
    for _, port, cidr in peers:
        rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": port}]}
        egress.append(rule if cidr is None else {"to": [{"ipBlock": {"cidr": cidr}}], **rule})
    if any(_ip(host) is None for host, _, _ in peers):  # a host name needs DNS to be dialled
        egress.append({"to": [{"namespaceSelector": {},
                               "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                       "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(name, labels),
            "spec": {"podSelector": {"matchLabels": select}, "policyTypes": ["Ingress", "Egress"],
                     "ingress": [], "egress": egress}}


def _source_paths(products: list[Any], domain: str, where: Callable[..., str]) -> list[str]:
    """The relative paths of the data volume to mount for `domain`: each file source, or a glob's directory."""
    from meshctl.runtime.data import URI_PREFIXES

    paths: set[str] = set()
    for index, p in enumerate(products):  # the plan keeps the file's order of products
        if p.domain != domain or p.format == "postgresql":
            continue
        src = p.source.removeprefix(URI_PREFIXES.get(p.format, ""))
        parts = PurePosixPath(src).parts
        if PurePosixPath(src).is_absolute() or ".." in parts:
            raise UserError(f"product {p.id}: source {src} is outside the data root, so it cannot be mounted "
                            "into the pod", where=where("products", index, "source"),
                            hint="give the product a source relative to the data root")
        glob = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
        paths.add(str(PurePosixPath(*parts[:glob])) if glob else src)
    # a path inside another mounted directory comes with it
    return sorted(x for x in paths if not any(x.startswith(y + "/") for y in paths))


def _database(uri: str) -> tuple[str, int, str | None]:
    """(host, port, cidr) of a postgresql source, for the egress rule (5432 when not given)."""
    try:
        parts = urlsplit(uri)
        host, port = parts.hostname or "", parts.port or 5432
    except ValueError:
        host, port = "", 5432
    ip = _ip(host)
    return host, port, None if ip is None else f"{ip}/{ip.max_prefixlen}"
