"""Deployment artefacts of the domain service (issue 10): the systemd unit, the Containerfile and
`meshctl deploy k8s`, checked with the tools that judge them where this machine has them
(systemd-analyze, the Kubernetes schemas of kubernetes-validate, pip building the image's
package from exactly the files the Containerfile copies) and by parsing where it has not
(no container engine runs here, so `docker build` cannot)."""

from __future__ import annotations

import hashlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from meshctl.compiler.compile import compile_mesh
from meshctl.deploy import UID

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
EXAMPLE = DEPLOY / "example" / "mesh.yaml"
UNIT = DEPLOY / "systemd" / "meshctl-domain@.service"
CONTAINERFILE = DEPLOY / "Containerfile"
K8S_VERSION = "1.37"
EXAMPLE_ARGS = ["--coordinator", "tcp://coordinator.oncology.example:7700", "--coordinator-cidr", "203.0.113.10/32"]
DOMAINS = ["charite", "karolinska", "amsterdam-umc"]


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def _one_line_error(out: subprocess.CompletedProcess, *words: str) -> str:
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in out.stderr, out.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------
# systemd
# ---------------------------------------------------------------------------


def _unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections -> (key, value) in order; the parse systemd does (comments, no continuations here)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert not line.endswith("\\"), "continuation lines: extend the parser"
        key, _, value = line.partition("=")
        assert current is not None, line
        current.append((key.strip(), value.strip()))
    return sections


def test_the_unit_runs_serve_per_domain_hardened_and_always_back():
    # Prepare
    service = dict(_unit_entries(UNIT.read_text())["Service"])
    argv = shlex.split(service["ExecStart"])
    # Assert: the service, per domain
    assert argv[1:4] == ["serve", "--domain", "%i"]
    assert argv[argv.index("--key") + 1] == "/srv/mesh/.meshctl/keys/%i.key_secret"
    assert argv[argv.index("--data-root") + 1] == "/srv/data/%i"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "always" and service["RestartSec"] and service["RestartMaxDelaySec"]
    # hardening: a user of its own, one writable place (the checkout's .meshctl/), data read-only
    assert service["User"] == "meshctl" and "DynamicUser" not in service
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/srv/mesh/.meshctl /srv/data/%i/.meshctl"  # keys; ledger
    assert service["ReadOnlyPaths"] == "/srv/data/%i"
    for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectHome", "RestrictSUIDSGID"):
        assert service[key] == "yes", key
    assert service["CapabilityBoundingSet"] == ""
    assert "MemoryDenyWriteExecute" not in service  # oneDNN's JIT needs W+X pages


def _verifiable_unit(tmp_path: Path) -> Path:
    """The unit as installed for charite, with the venv's meshctl where /opt/meshctl/bin/meshctl is
    (verify checks that ExecStart's program exists; nothing else changes)."""
    text = UNIT.read_text()
    assert text.count("/opt/meshctl/bin/meshctl") == 1
    local = Path(sys.executable).parent / "meshctl"
    (tmp_path / UNIT.name).write_text(text.replace("/opt/meshctl/bin/meshctl", str(local)))
    return tmp_path / "meshctl-domain@charite.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_passes(tmp_path):
    # Prepare
    unit = _verifiable_unit(tmp_path)
    version = int(subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True,
                                 check=True).stdout.split()[1])
    # Execute
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    # Assert: clean, apart from the two backoff keys systemd < 254 does not know yet
    lines = (out.stdout + out.stderr).splitlines()
    if version < 254:
        lines = [ln for ln in lines if not re.search(r"Unknown key '(RestartSteps|RestartMaxDelaySec)'", ln)]
    assert lines == [] and out.returncode == 0, "\n".join(lines)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_security_rates_the_unit_ok(tmp_path):
    # Execute
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                          str(_verifiable_unit(tmp_path))], capture_output=True, text=True, check=False)
    # Assert: exposure 0 (locked down) .. 10 (unprotected); OK is below 4.0, we stay below 2.0
    level = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", out.stdout)
    assert level, out.stdout + out.stderr
    assert float(level.group(1)) < 2.0, level.group(0)


# ---------------------------------------------------------------------------
# Containerfile (no engine here: parsed, and its package built by pip from what it copies)
# ---------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
    assert not pending, "a continuation line at the end"
    return out


def test_the_containerfile_pins_the_cpu_torch_runs_as_a_user_and_exposes_nothing():
    # Prepare
    steps = _instructions(CONTAINERFILE.read_text())
    kinds = [k for k, _ in steps]
    runs = [a for k, a in steps if k == "RUN"]
    pinned = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                  if d.startswith("torch"))
    # Assert
    assert steps[0] == ("FROM", "python:3.11-slim") and kinds.count("FROM") == 1
    assert f"pip install {pinned} --index-url https://download.pytorch.org/whl/cpu" in runs
    for run in runs:  # torch only ever pinned, and only from the CPU index
        for word in re.findall(r"\btorch\S*", run):
            assert word == pinned, run
    assert "EXPOSE" not in kinds
    users = [a for k, a in steps if k == "USER"]
    assert users and users[-1] == f"{UID}:{UID}" and kinds.index("USER") > max(
        i for i, k in enumerate(kinds) if k in ("RUN", "COPY"))
    assert steps[-2:] == [("ENTRYPOINT", '["meshctl"]'), ("CMD", '["--help"]')]


def test_the_package_builds_from_exactly_what_the_containerfile_copies(tmp_path):
    # Prepare: the build context as the .dockerignore leaves it, then only the COPY sources
    steps = _instructions(CONTAINERFILE.read_text())
    ignore = (DEPLOY / "Containerfile.dockerignore").read_text().split()
    kept = {ln[1:] for ln in ignore if ln.startswith("!")}
    sources = [src for k, a in steps if k == "COPY" for src in a.split()[:-1]]
    assert set(sources) <= kept, (sources, kept)
    src = tmp_path / "src"
    src.mkdir()
    for s in sources:
        (shutil.copytree if (ROOT / s).is_dir() else shutil.copy)(
            ROOT / s, src / s, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / s).is_dir() else {}))
    # Execute
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, check=False,
                         timeout=300)
    # Assert: the wheel has the CLI, this module and the dashboard's stylesheet
    assert out.returncode == 0, out.stderr
    names = zipfile.ZipFile(next((tmp_path / "wheel").glob("meshctl-*.whl"))).namelist()
    assert {"meshctl/cli.py", "meshctl/deploy.py", "meshctl/tui/meshctl.tcss"} <= set(names)


# ---------------------------------------------------------------------------
# Kubernetes: meshctl deploy k8s
# ---------------------------------------------------------------------------


@pytest.fixture
def keyed_mesh(tmp_path: Path, meshctl) -> tuple[Path, str]:
    """The example mesh in tmp with a real charite key pair generated there; returns (mesh, secret text)."""
    mesh = tmp_path / "mesh.yaml"
    shutil.copy(EXAMPLE, mesh)
    out = meshctl("keys", "generate", "charite", "--mesh", str(mesh), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    text = mesh.read_text()
    old = re.search(r'(- name: charite\n(?:    .*\n)*?    )public_key: ".*"', text)
    assert old
    mesh.write_text(text[:old.start()] + old.group(1) + line + text[old.end():])
    secret = re.search(r'secret-key = "(.*)"', (tmp_path / ".meshctl/keys/charite.key_secret").read_text())
    assert secret
    return mesh, secret.group(1)


@pytest.mark.parametrize("domain", DOMAINS)
def test_deploy_k8s_is_valid_against_the_kubernetes_schemas(domain, meshctl, tmp_path):
    # Execute
    out = meshctl("deploy", "k8s", "--domain", domain, "--mesh", str(EXAMPLE), *EXAMPLE_ARGS, cwd=tmp_path)
    # Assert
    assert out.returncode == 0, out.stderr
    docs = _docs(out.stdout)
    assert [d["kind"] for d in docs] == ["ConfigMap", "PersistentVolumeClaim", "Deployment", "NetworkPolicy"]
    for doc in docs:  # strict: an unknown field is an error too
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_schemas_catch_a_broken_manifest(meshctl, tmp_path):
    # Prepare: what the validation above would have to reject
    out = meshctl("deploy", "k8s", "--domain", "charite", "--mesh", str(EXAMPLE), *EXAMPLE_ARGS, cwd=tmp_path)
    deployment = _by_kind(_docs(out.stdout))["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True
    # Execute / Assert
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_deploy_k8s_runs_one_locked_down_service_that_opens_nothing(keyed_mesh, meshctl, tmp_path):
    # Prepare
    mesh, secret = keyed_mesh
    # Execute
    out = meshctl("deploy", "k8s", "--domain", "charite", "--mesh", str(mesh),
                  "--coordinator", "tcp://192.0.2.7:7700", "--image", "registry.example/meshctl:0.1.0",
                  cwd=tmp_path)
    # Assert
    assert out.returncode == 0, out.stderr
    objects = _by_kind(_docs(out.stdout))
    # no key material, a Secret reference, and the command that makes the Secret
    assert secret not in out.stdout and "Secret" not in objects
    assert ("#   kubectl create secret generic meshctl-charite-key \\\n"
            "#     --from-file=charite.key_secret=.meshctl/keys/charite.key_secret\n") in out.stdout
    deployment = objects["Deployment"]["spec"]
    pod = deployment["template"]["spec"]
    (main,) = pod["containers"]
    assert deployment["replicas"] == 1 and deployment["strategy"] == {"type": "Recreate"}
    assert main["image"] == "registry.example/meshctl:0.1.0"
    assert main["args"][:3] == ["serve", "--domain", "charite"]
    assert main["args"][main["args"].index("--coordinator") + 1] == "tcp://192.0.2.7:7700"
    assert "ports" not in main
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == UID
    for c in [main, *pod["initContainers"]]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["key"]["secret"]["secretName"] == "meshctl-charite-key"
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "meshctl-charite-data", "readOnly": True}
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    assert mounts["key"]["readOnly"] and not mounts["state"].get("readOnly")
    # the data root is the state volume; only charite's own source comes in, read-only
    assert main["args"][main["args"].index("--data-root") + 1] == mounts["state"]["mountPath"] == "/srv/mesh"
    assert [m for m in main["volumeMounts"] if m["name"] == "data"] == [
        {"name": "data", "mountPath": "/srv/mesh/charite.parquet", "subPath": "charite.parquet", "readOnly": True}]
    # the network: nothing in; out only to the coordinator's address and port (an IP: no DNS)
    policy = objects["NetworkPolicy"]["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["ingress"] == []
    assert policy["egress"] == [{"to": [{"ipBlock": {"cidr": "192.0.2.7/32"}}],
                                 "ports": [{"protocol": "TCP", "port": 7700}]}]


def test_deploy_k8s_carries_the_mesh_so_the_domain_compiles_the_same_plan(keyed_mesh, meshctl, tmp_path):
    # Prepare
    mesh, _ = keyed_mesh
    out = meshctl("deploy", "k8s", "--domain", "charite", "--mesh", str(mesh), *EXAMPLE_ARGS, cwd=tmp_path)
    objects = _by_kind(_docs(out.stdout))
    carried = objects["ConfigMap"]["data"]["mesh.yaml"]
    pod_dir = tmp_path / "pod"
    pod_dir.mkdir()
    (pod_dir / "mesh.yaml").write_text(carried)  # what the init container's cp leaves in /srv/mesh
    # Execute
    here, there = compile_mesh(mesh).plan, compile_mesh(pod_dir / "mesh.yaml").plan
    # Assert: byte for byte, so the plan hash the service computes equals the coordinator's
    assert carried == mesh.read_text()
    assert here is not None and there is not None and there.content_hash() == here.content_hash()
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["meshctl.dev/mesh-sha256"] == hashlib.sha256(mesh.read_bytes()).hexdigest()
    # a name needs DNS; without --coordinator-cidr the rule is the port alone
    bare = meshctl("deploy", "k8s", "--domain", "charite", "--mesh", str(mesh), "--coordinator",
                   "tcp://coordinator.oncology.example:7700", cwd=tmp_path)
    egress = _by_kind(_docs(bare.stdout))["NetworkPolicy"]["spec"]["egress"]
    assert egress[0] == {"ports": [{"protocol": "TCP", "port": 7700}]}
    assert egress[1]["ports"] == [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]


def _split_example(root: Path) -> Path:
    """The example mesh with each domain and its products in domains/<name>.yaml; returns mesh.yaml."""
    data = yaml.safe_load(EXAMPLE.read_text())
    (root / "domains").mkdir()
    for domain in data["domains"]:
        products = [p for p in data["products"] if p["domain"] == domain["name"]]
        (root / "domains" / f"{domain['name']}.yaml").write_text(
            yaml.safe_dump({"domains": [domain], "products": products}, sort_keys=False))
    rest = {k: v for k, v in data.items() if k not in ("domains", "products")}
    (root / "mesh.yaml").write_text(yaml.safe_dump({**rest, "include": ["domains/*.yaml"]}, sort_keys=False))
    return root / "mesh.yaml"


def _start_pod(objects: dict[str, dict], pod: Path) -> Path:
    """What the kubelet and the init containers (their real commands, run here) leave in the
    state volume under `pod`; returns its /srv/mesh."""
    spec = objects["Deployment"]["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "mesh")["configMap"]
    etc = pod / "etc/meshctl/mesh"
    shutil.rmtree(etc, ignore_errors=True)  # the ConfigMap volume is made afresh; the state volume stays
    for item in volume["items"]:  # each key at its path under ..data, a link at the top
        (etc / "..data" / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        (etc / "..data" / item["path"]).write_text(objects["ConfigMap"]["data"][item["key"]])
        top = item["path"].split("/")[0]
        if not (etc / top).is_symlink():
            (etc / top).symlink_to(f"..data/{top}")
    (pod / "srv/mesh").mkdir(parents=True, exist_ok=True)
    for init in spec["initContainers"]:
        command = [f"{pod}{a}" if a.startswith("/") else a for a in init["command"]]
        subprocess.run(command, cwd=f"{pod}{init['workingDir']}", check=True)
    return pod / "srv/mesh"


def test_deploy_k8s_carries_every_included_file_so_the_pod_compiles_the_same_plan(meshctl, tmp_path):
    """Issue 16: a mesh with `include:` deploys with every file it includes, at the same relative
    paths; the pod's init containers (their real `rm` and `cp`, run here) lay them out as the
    compile reads them, and a file dropped from the mesh is gone at the next start."""
    # Prepare
    mesh = _split_example(tmp_path)
    extra = tmp_path / "domains" / "extra.yaml"
    extra.write_text("domains:\n  - {name: extra, owner: data@extra.example}\n")
    deploy = ("deploy", "k8s", "--domain", "charite", "--mesh", str(mesh), *EXAMPLE_ARGS)
    # Execute
    out = meshctl(*deploy, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    docs = _docs(out.stdout)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    objects = _by_kind(docs)
    digest = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]["meshctl.dev/mesh-sha256"]
    assert f"from mesh.yaml and the 4 files it includes (sha256 over all of them {digest[:12]})." in out.stdout
    srv = _start_pod(objects, tmp_path / "pod")
    # Assert
    names = ["domains/amsterdam-umc.yaml", "domains/charite.yaml", "domains/extra.yaml",
             "domains/karolinska.yaml", "mesh.yaml"]
    assert sorted(p.relative_to(srv).as_posix() for p in srv.rglob("*") if p.is_file()) == names
    assert all((srv / n).read_bytes() == (tmp_path / n).read_bytes() and not (srv / n).is_symlink() for n in names)
    here, there = compile_mesh(mesh).plan, compile_mesh(srv / "mesh.yaml").plan
    assert here is not None and there is not None and there.content_hash() == here.content_hash()
    assert "extra" in [d.name for d in there.domains]
    # a file dropped from the mesh: a new pod template, and the restarted pod no longer reads it
    digest = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]["meshctl.dev/mesh-sha256"]
    extra.unlink()
    again = _by_kind(_docs(meshctl(*deploy, cwd=tmp_path).stdout))
    assert again["Deployment"]["spec"]["template"]["metadata"]["annotations"]["meshctl.dev/mesh-sha256"] != digest
    (srv / ".meshctl").mkdir()
    (srv / ".meshctl" / "ledger").write_text("kept")  # the state the cleaning must not touch
    srv = _start_pod(again, tmp_path / "pod")
    assert not (srv / "domains" / "extra.yaml").exists() and (srv / ".meshctl" / "ledger").read_text() == "kept"
    here, there = compile_mesh(mesh).plan, compile_mesh(srv / "mesh.yaml").plan
    assert here is not None and there is not None and there.content_hash() == here.content_hash()


def test_deploy_k8s_refuses_included_files_a_configmap_cannot_key_in_one_line(meshctl, tmp_path):
    # Prepare: domains/a.b.yaml and domains.a/b.yaml would both be key domains.a.b.yaml
    mesh = _split_example(tmp_path)
    (tmp_path / "domains.a").mkdir()
    (tmp_path / "domains.a" / "b.yaml").write_text("products: []\n")
    (tmp_path / "domains" / "a.b.yaml").write_text("products: []\n")
    mesh.write_text(mesh.read_text().replace("- domains/*.yaml", "- domains/*.yaml\n- domains.a/*.yaml"))
    # Execute
    out = meshctl("deploy", "k8s", "--domain", "charite", "--mesh", str(mesh), *EXAMPLE_ARGS, cwd=tmp_path)
    # Assert
    _one_line_error(out, "domains.a/b.yaml", "domains/a.b.yaml", "ConfigMap key")
    # a file under .meshctl/ (each start empties the directories of included files: the ledger)
    (tmp_path / ".meshctl").mkdir()
    (tmp_path / ".meshctl" / "x.yaml").write_text("products: []\n")
    mesh.write_text(mesh.read_text().replace("- domains.a/*.yaml", "- .meshctl/x.yaml"))
    out = meshctl("deploy", "k8s", "--domain", "charite", "--mesh", str(mesh), *EXAMPLE_ARGS, cwd=tmp_path)
    _one_line_error(out, ".meshctl/x.yaml", "privacy ledger")


def test_the_committed_examples_are_what_the_command_makes(meshctl, tmp_path):
    # Execute
    for domain in DOMAINS:
        out = meshctl("deploy", "k8s", "--domain", domain, "--mesh", "deploy/example/mesh.yaml", *EXAMPLE_ARGS,
                      "-o", str(tmp_path), cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert out.stderr.startswith(f"wrote {tmp_path}/meshctl-{domain}.yaml (ConfigMap, ")
    # Assert
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml"))
    for name in made:
        assert (tmp_path / name).read_text() == (DEPLOY / "k8s" / name).read_text(), name


def test_deploy_k8s_refuses_an_unknown_domain_in_one_line(meshctl, tmp_path):
    out = meshctl("deploy", "k8s", "--domain", "karolinsk", "--mesh", str(EXAMPLE), "-o", "out", cwd=tmp_path)
    _one_line_error(out, f"{EXAMPLE}: error: no domain 'karolinsk'", "did you mean 'karolinska'?")
    assert not (tmp_path / "out").exists()


def test_deploy_k8s_refuses_a_local_domain_in_one_line(hospitals, meshctl):
    # the root mesh: every domain is `address: local`, forked by `meshctl up`
    line = _one_line_error(meshctl("deploy", "k8s", "--domain", "charite", cwd=hospitals.parent),
                           "mesh.yaml:22:14: error: domain charite is `address: local`", "nothing to deploy")
    assert hospitals.read_text().splitlines()[21][13:] == "local", line  # the position is the value's


def test_deploy_k8s_refuses_a_missing_mesh_file_in_one_line(meshctl, tmp_path):
    _one_line_error(meshctl("deploy", "k8s", "--domain", "charite", cwd=tmp_path),
                    "mesh.yaml: error: no such file")


def test_deploy_k8s_refuses_an_address_no_host_can_dial(meshctl, tmp_path):
    # the example binds tcp://0.0.0.0:7700: a domain cannot dial that
    line = EXAMPLE.read_text().splitlines().index("    address: tcp://0.0.0.0:7700") + 1
    _one_line_error(meshctl("deploy", "k8s", "--domain", "charite", "--mesh", str(EXAMPLE), cwd=tmp_path),
                    f"{EXAMPLE}:{line}:14: error: tcp://0.0.0.0:7700 is where the coordinator binds",
                    "--coordinator")
    _one_line_error(meshctl("deploy", "k8s", "--domain", "charite", "--mesh", str(EXAMPLE),
                            "--coordinator", "coordinator.example:7700", cwd=tmp_path),
                    "--coordinator: error: 'coordinator.example:7700' is not tcp://HOST:PORT")
    _one_line_error(meshctl("deploy", "k8s", "--domain", "charite", "--mesh", str(EXAMPLE), *EXAMPLE_ARGS[:2],
                            "--coordinator-cidr", "10.0.0.300/32", cwd=tmp_path),
                    "--coordinator-cidr: error: '10.0.0.300/32' is not an IP network")


def test_deploy_k8s_refuses_a_mesh_that_does_not_compile_and_keeps_what_was_written(meshctl, tmp_path):
    # Prepare: manifests written before, then the mesh breaks
    mesh = tmp_path / "mesh.yaml"
    shutil.copy(EXAMPLE, mesh)
    out = meshctl("deploy", "k8s", "--domain", "charite", "--mesh", "mesh.yaml", *EXAMPLE_ARGS, "-o", "k8s",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    before = (tmp_path / "k8s" / "meshctl-charite.yaml").read_text()
    mesh.write_text(mesh.read_text().replace("contract: tumor-biopsy@1\n", "contract: tumor-biopsi@1\n", 1))
    # Execute
    out = meshctl("deploy", "k8s", "--domain", "charite", "--mesh", "mesh.yaml", *EXAMPLE_ARGS, "-o", "k8s",
                  cwd=tmp_path)
    # Assert
    _one_line_error(out, "mesh.yaml:", "meshctl validate mesh.yaml lists them")
    assert (tmp_path / "k8s" / "meshctl-charite.yaml").read_text() == before


def test_the_service_flags_are_those_of_meshctl_serve(meshctl, tmp_path):
    """The unit, the image's example and the Deployment call `meshctl serve` with flags it has."""
    helped = meshctl("serve", "--help", cwd=tmp_path)
    if helped.returncode != 0:
        pytest.skip("`meshctl serve` is not in this tree yet")
    known = set(re.findall(r"(--[a-z][a-z-]+)", helped.stdout))
    unit = shlex.split(dict(_unit_entries(UNIT.read_text())["Service"])["ExecStart"])
    out = meshctl("deploy", "k8s", "--domain", "charite", "--mesh", str(EXAMPLE), *EXAMPLE_ARGS, cwd=tmp_path)
    deployment = _by_kind(_docs(out.stdout))["Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    for argv in (unit[1:], args):
        assert argv[0] == "serve"
        assert {a for a in argv if a.startswith("--")} <= known, argv


def test_deploy_k8s_mounts_a_glob_by_its_directory_and_reaches_a_database(meshctl, tmp_path):
    # Prepare: karolinska reads a glob, charite a postgresql table
    mesh = tmp_path / "mesh.yaml"
    text = EXAMPLE.read_text().replace("source: karolinska.parquet", "source: exports/2026/*.parquet", 1)
    mesh.write_text(text.replace("source: charite.parquet",
                                 "source: postgresql://meshctl@10.1.2.3:6432/onco\n    table: biopsies", 1))
    # Execute
    glob, database = (meshctl("deploy", "k8s", "--domain", d, "--mesh", "mesh.yaml", *EXAMPLE_ARGS, cwd=tmp_path)
                      for d in ("karolinska", "charite"))
    # Assert
    assert glob.returncode == 0 and database.returncode == 0, glob.stderr + database.stderr
    pod = _by_kind(_docs(glob.stdout))["Deployment"]["spec"]["template"]["spec"]
    assert [(m["mountPath"], m["subPath"]) for m in pod["containers"][0]["volumeMounts"] if m["name"] == "data"] \
        == [("/srv/mesh/exports/2026", "exports/2026")]
    objects = _by_kind(_docs(database.stdout))
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert "data" not in {m["name"] for m in pod["containers"][0]["volumeMounts"]} | {v["name"] for v in pod["volumes"]}
    assert objects["NetworkPolicy"]["spec"]["egress"] == [
        {"to": [{"ipBlock": {"cidr": "203.0.113.10/32"}}], "ports": [{"protocol": "TCP", "port": 7700}]},
        {"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}], "ports": [{"protocol": "TCP", "port": 6432}]},
        {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
         "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]  # the coordinator's name
    for doc in [*_docs(glob.stdout), *objects.values()]:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_deploy_k8s_refuses_a_source_outside_the_data_root(meshctl, tmp_path):
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(EXAMPLE.read_text().replace("source: charite.parquet", "source: ../shared/charite.parquet", 1))
    out = meshctl("deploy", "k8s", "--domain", "charite", "--mesh", "mesh.yaml", *EXAMPLE_ARGS, cwd=tmp_path)
    line = _one_line_error(out, "error: product charite.biopsies: source ../shared/charite.parquet is outside")
    assert line.startswith("mesh.yaml:") and "source: ../shared" in mesh.read_text().splitlines()[
        int(line.split(":")[1]) - 1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", ["systemd", "k8s"])
def test_the_service_command_starts_a_real_service_in_its_layout(how, keyed_mesh, meshctl, tmp_path):
    """The unit's ExecStart and the pod's args, in their file layouts under tmp (a file of the
    data volume where the pod mounts it): `meshctl serve` compiles, loads the key, dials, and
    stops cleanly on SIGTERM."""
    # Prepare
    if meshctl("serve", "--help", cwd=tmp_path).returncode != 0:
        pytest.skip("`meshctl serve` is not in this tree yet")
    mesh, _ = keyed_mesh
    root = tmp_path / "root"
    data = ROOT / "examples" / "hospitals" / "data" / "charite.parquet"
    if how == "systemd":
        argv = shlex.split(dict(_unit_entries(UNIT.read_text())["Service"])["ExecStart"].replace("%i", "charite"))[1:]
        (root / "srv/mesh/.meshctl/keys").mkdir(parents=True)
        shutil.copy(tmp_path / ".meshctl/keys/charite.key_secret", root / "srv/mesh/.meshctl/keys")
        (root / "srv/data/charite/.meshctl").mkdir(parents=True)
        shutil.copy(data, root / "srv/data/charite")
        shutil.copy(mesh, root / "srv/mesh/mesh.yaml")  # the checkout
    else:
        out = meshctl("deploy", "k8s", "--domain", "charite", "--mesh", str(mesh), *EXAMPLE_ARGS, cwd=tmp_path)
        objects = _by_kind(_docs(out.stdout))
        argv = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
        (root / "srv/mesh").mkdir(parents=True)
        (root / "srv/mesh/mesh.yaml").write_text(objects["ConfigMap"]["data"]["mesh.yaml"])  # the init container
        shutil.copy(data, root / "srv/mesh/charite.parquet")  # the subPath mount
        (root / "etc/meshctl/keys").mkdir(parents=True)
        shutil.copy(tmp_path / ".meshctl/keys/charite.key_secret", root / "etc/meshctl/keys")
    port = _free_port()
    argv = [f"tcp://127.0.0.1:{port}" if a.startswith("tcp://") or a == "${MESHCTL_COORDINATOR}"
            else str(root) + a if a.startswith("/") else a for a in argv]
    # Execute
    proc = subprocess.Popen([sys.executable, "-m", "meshctl", *argv], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        second = proc.stderr.readline()
    finally:
        proc.terminate()
        _, rest = proc.communicate(timeout=60)
    # Assert
    assert argv[0] == "serve" and first.startswith("serving domain charite of mesh oncology-network"), first + rest
    data_root = root / ("srv/data/charite" if how == "systemd" else "srv/mesh")
    assert first.rstrip().endswith(f"data root {data_root})"), first
    assert second.startswith(f"connecting to tcp://127.0.0.1:{port}"), second + rest
    assert proc.returncode == 0 and "stopped by SIGTERM" in rest, rest


def _documented_commands() -> list[list[str]]:
    """Every meshctl command line (from its subcommand on) in the code blocks of docs/deploy.md's
    deployment sections, including `docker run … meshctl:VERSION serve …`."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    text = text[text.index("## Three hospitals on three hosts"):text.index("## What a domain daemon prints")]
    blocks, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            blocks += [[]] if inside else []
        elif inside:
            blocks[-1].append(line)
    commands = []
    for block in blocks:
        for line in "\n".join(block).replace("\\\n", " ").splitlines():
            line = line.removeprefix("$ ").split(" #")[0]
            if line.split(" ")[0] not in ("sudo", "meshctl", "cd", "docker"):
                continue  # output, not a command
            words = shlex.split(line)
            for i, w in enumerate(words[:-1]):
                if (re.fullmatch(r"(.*/)?meshctl(:[\w.]+)?", w) and not words[i + 1].startswith(("-", "/"))
                        and words[i - 1] not in ("-u", "-t")):  # sudo -u USER, docker build -t TAG
                    commands.append(words[i + 1:])
    return commands


def test_every_documented_command_has_those_subcommands_and_options(meshctl, tmp_path):
    commands = _documented_commands()
    assert {c[0] for c in commands} == {"keys", "up", "serve", "deploy"}, commands
    helps: dict[tuple[str, ...], set[str]] = {}
    for words in commands:
        sub = tuple(w for w in words[:2] if not w.startswith("-"))
        if sub[0] not in ("keys", "deploy"):
            sub = sub[:1]
        if sub not in helps:
            out = meshctl(*sub, "--help", cwd=tmp_path)
            assert out.returncode == 0, (sub, out.stderr)
            helps[sub] = set(re.findall(r"(--[a-z][a-z-]*|-o)\b", out.stdout))
        flags = {w for w in words if w.startswith("-") and not w.startswith("--from-file")}
        assert flags <= helps[sub], (words, flags - helps[sub])
