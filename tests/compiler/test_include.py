"""`include:`: a mesh split into domain-owned files compiles like the same mesh in one file,
and every diagnostic names the file, line and column it is about."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner
from compiler_util import ROOT, ROOT_MESH

from meshctl.cli import main
from meshctl.compiler.compile import CompileResult, compile_mesh
from meshctl.compiler.include import match
from meshctl.compiler.plan import hashed_text
from meshctl.compiler.schema import mesh_json_schema
from meshctl.gitrev import compile_revision


def _blocks(text: str) -> tuple[str, dict[str, list[str]]]:
    """The root mesh.yaml as its header text and, per section, each item's text."""
    text = text.replace("columns: &biopsy-columns\n", "columns:\n")
    columns = text.split("    columns:\n", 1)[1].split("\n    columns: *biopsy-columns")[0]
    columns = "\n".join(ln for ln in columns.splitlines() if ln.startswith("      - "))
    text = text.replace("columns: *biopsy-columns", "columns:\n" + columns)
    text = text.replace("source: examples/", f"source: {ROOT}/examples/")
    header, sections, current = [], {}, None
    for line in text.splitlines(keepends=True):
        if line.startswith("#"):
            continue
        if re.match(r"[a-z]+:\s*$", line) and line[:-2].strip() not in ("mesh",):
            current = line.split(":")[0]
            sections[current] = []
        elif current is None:
            header.append(line)
        elif line.startswith("  - "):
            sections[current].append(line)
        elif line.strip():
            sections[current][-1] += line
    return "".join(header), sections


HEADER, SECTIONS = _blocks(ROOT_MESH.read_text())
SECTIONS["contracts"][0] += ("    quality:\n"
                             "      - {column: radius_mean, metric: nullValues, mustBe: 0}\n"
                             "      - {metric: rowCount, mustBeGreaterThan: 10}\n")
ORDER = ["amsterdam-umc", "charite", "karolinska"]  # sorted, as the glob takes the files


def _domain_of(block: str) -> str:
    return re.search(r"(?:  - name|    domain): (\S+)\n(?!    domain)", block).group(1) \
        if "domain:" not in block else re.search(r"domain: (\S+)", block).group(1)


def _section(name: str, items: list[str]) -> str:
    return f"{name}:\n" + "".join(items)


def write_split(root: Path) -> Path:
    """The root mesh as mesh.yaml (governance) + domains/*.yaml + contracts.yaml."""
    (root / "domains").mkdir(parents=True)
    for domain in ORDER:
        own = [b for b in SECTIONS["domains"] if _domain_of(b) == domain]
        products = [b for b in SECTIONS["products"] if _domain_of(b) == domain]
        (root / "domains" / f"{domain}.yaml").write_text(
            f"# owned by {domain}\n" + _section("domains", own) + _section("products", products))
    (root / "contracts.yaml").write_text(_section("contracts", SECTIONS["contracts"]))
    mesh = root / "mesh.yaml"
    mesh.write_text(HEADER + "include: [domains/*.yaml, contracts.yaml]\n"
                    + _section("policies", SECTIONS["policies"])
                    + _section("models", SECTIONS["models"]))
    return mesh


def write_single(root: Path) -> Path:
    """The same mesh in one file, items in the order the includes merge them."""
    by = {d: i for i, d in enumerate(ORDER)}
    mesh = root / "single.yaml"
    mesh.write_text(HEADER
                    + _section("domains", sorted(SECTIONS["domains"], key=lambda b: by[_domain_of(b)]))
                    + _section("products", sorted(SECTIONS["products"], key=lambda b: by[_domain_of(b)]))
                    + _section("contracts", SECTIONS["contracts"])
                    + _section("policies", SECTIONS["policies"])
                    + _section("models", SECTIONS["models"]))
    return mesh


def _ok(result: CompileResult) -> CompileResult:
    assert result.errors == [], result.render_diagnostics()
    assert result.plan is not None
    return result


def test_a_split_mesh_plans_like_the_same_mesh_in_one_file(tmp_path: Path) -> None:
    split = _ok(compile_mesh(write_split(tmp_path)))
    single = _ok(compile_mesh(write_single(tmp_path)))
    assert [i.name for i in split.includes] == [f"domains/{d}.yaml" for d in ORDER] + ["contracts.yaml"]
    # one plan hash: only the unhashed [positions] table names other files
    assert hashed_text(split.plan.to_toml()) == hashed_text(single.plan.to_toml())
    assert split.plan.plan.hash == single.plan.plan.hash and split.plan.plan.spec_hash == single.plan.plan.spec_hash
    assert split.plan.to_toml() != single.plan.to_toml()
    # every position in the plan names the file (beside mesh.yaml) and line that declares it
    contracts = (tmp_path / "contracts.yaml").read_text().splitlines()
    quality = [q for c in split.plan.contracts for q in c.quality]
    assert quality and all(q.at.startswith("contracts.yaml:") for q in quality)
    for q in quality:
        line, col = map(int, q.at.split(":")[1:])
        assert contracts[line - 1][col - 1:].startswith(("{", "column", "metric")), q.at
    mesh = (tmp_path / "mesh.yaml").read_text().splitlines()
    for policy in split.plan.policies:
        name, line, col = policy.at.split(":")
        assert name == "mesh.yaml" and mesh[int(line) - 1][int(col) - 1:] == f"name: {policy.name}"
    # the original one-file mesh (anchors, its own order) has the same participants
    assert sorted(split.plan.jobs[0].participants) == sorted(compile_mesh(ROOT_MESH).plan.jobs[0].participants)


def test_a_split_mesh_compiles_the_same_every_time_and_hashes_every_file(tmp_path: Path) -> None:
    mesh = write_split(tmp_path)
    first = _ok(compile_mesh(mesh)).plan
    assert first.to_toml() == _ok(compile_mesh(mesh)).plan.to_toml()
    charite = tmp_path / "domains" / "charite.yaml"
    charite.write_text(charite.read_text().replace("Fine-needle", "Fine needle"))
    edited = _ok(compile_mesh(mesh)).plan
    assert edited.plan.spec_hash != first.plan.spec_hash
    assert edited.plan.hash != first.plan.hash


def test_the_spec_hash_is_of_the_content_not_the_bytes(tmp_path: Path) -> None:
    plan = _ok(compile_mesh(ROOT_MESH)).plan
    assert plan.plan.spec_hash != "sha256:" + hashlib.sha256(ROOT_MESH.read_bytes()).hexdigest()
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("# a comment\n\n" + ROOT_MESH.read_text().replace("\npolicies:", "\n\n# more\npolicies:"))
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the sources
    moved = _ok(compile_mesh(mesh)).plan
    assert (moved.plan.spec_hash, moved.plan.hash) == (plan.plan.spec_hash, plan.plan.hash)
    assert moved.policies[0].at != plan.policies[0].at  # its positions moved, outside the hash


def _render(result: CompileResult) -> str:
    return result.render_diagnostics()


def test_a_diagnostic_in_an_included_file_shows_that_file_and_its_line(tmp_path: Path) -> None:
    mesh = write_split(tmp_path)
    karolinska = tmp_path / "domains" / "karolinska.yaml"
    text = karolinska.read_text().replace("domain: karolinska", "domain: karolinsca")
    karolinska.write_text(text)
    line = text.splitlines().index("    domain: karolinsca") + 1
    out = _render(compile_mesh(mesh))
    where = f"{tmp_path}/domains/karolinska.yaml:{line}:13: error[MESH302]"
    assert where in out, out
    assert f"{line:>5} |     domain: karolinsca\n" in out
    assert "hint: did you mean 'karolinska'?" in out


def test_a_domain_declared_in_two_files_names_both_places(tmp_path: Path) -> None:
    mesh = write_split(tmp_path)
    (tmp_path / "domains" / "zz-copy.yaml").write_text(
        "domains:\n  - name: charite\n    owner: someone@else.example\n")
    result = compile_mesh(mesh)
    dup = [d for d in result.errors if d.code == "MESH301"]
    assert len(dup) == 1
    assert (dup[0].file, dup[0].line, dup[0].col) == (f"{tmp_path}/domains/zz-copy.yaml", 2, 11)
    charite = (tmp_path / "domains" / "charite.yaml").read_text().splitlines()
    first = charite.index("  - name: charite") + 1
    assert dup[0].hint == f"first declared at {tmp_path}/domains/charite.yaml:{first}:11"


@pytest.mark.parametrize(("include", "code", "message"), [
    ("[domains/nope.yaml]", "MESH108", "include 'domains/nope.yaml': no such file"),
    ("['teams/*.yaml']", "MESH108", "include 'teams/*.yaml': matches no file"),
    ("['*.yaml']", "MESH110", "include '*.yaml' includes mesh.yaml itself"),
    ("[../outside.yaml]", "MESH109", "include '../outside.yaml' is outside the mesh directory"),
    ("[/etc/hosts]", "MESH109", "include '/etc/hosts' is outside the mesh directory"),
    ("[link.yaml]", "MESH109", "include 'link.yaml': it resolves outside the mesh directory"),
    ("['']", "MESH108", "include is empty"),
])
def test_an_include_that_cannot_be_read_is_an_error_at_the_include(
        tmp_path: Path, include: str, code: str, message: str) -> None:
    root = tmp_path / "repo"
    mesh = write_split(root)
    (tmp_path / "outside.yaml").write_text("domains: []\n")
    (root / "link.yaml").symlink_to(tmp_path / "outside.yaml")
    text = mesh.read_text().replace("include: [domains/*.yaml, contracts.yaml]",
                                    f"include: [domains/*.yaml, contracts.yaml]\n_x: {include}")
    text = text.replace("include: [domains/*.yaml, contracts.yaml]\n_x: ", "include: ")
    mesh.write_text(text)
    result = compile_mesh(mesh)
    line = text.splitlines().index(f"include: {include}") + 1
    found = [(d.code, d.message, d.line) for d in result.errors]
    assert (code, message, line) in found, found
    assert result.plan is None


@pytest.mark.parametrize(("extra", "key"), [
    ("policies:\n  - {name: p, scope: model, require: 'true'}\n", "policies"),
    ("include: [other.yaml]\n", "include"),
    ("models: []\n", "models"),
    ("mesh: {name: x}\n", "mesh"),
])
def test_governance_stays_in_mesh_yaml(tmp_path: Path, extra: str, key: str) -> None:
    mesh = write_split(tmp_path)
    charite = tmp_path / "domains" / "charite.yaml"
    text = charite.read_text() + extra
    charite.write_text(text)
    result = compile_mesh(mesh)
    line = text.splitlines().index(extra.splitlines()[0]) + 1
    assert [(d.code, d.file, d.line, d.col) for d in result.errors] == [
        ("MESH111", str(charite), line, 1)]
    assert f"'{key}' is not allowed in an included file" in result.errors[0].message


def test_a_domain_local_policy_in_an_included_file_is_placed_there(tmp_path: Path) -> None:
    mesh = write_split(tmp_path)
    charite = tmp_path / "domains" / "charite.yaml"
    text = charite.read_text().replace(
        "    address: local\n",
        "    address: local\n    policies:\n      - {name: local-cohort, scope: model, require: 'size(('}\n")
    charite.write_text(text)
    result = compile_mesh(mesh)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "local-cohort" in ln)
    assert [(d.code, d.file, d.line) for d in result.errors] == [("MESH412", str(charite), line)]
    assert "size((" in _render(result)


def test_a_syntax_error_in_an_included_file_is_reported_there(tmp_path: Path) -> None:
    mesh = write_split(tmp_path)
    (tmp_path / "domains" / "charite.yaml").write_text("domains:\n  - name: [charite\n")
    out = _render(compile_mesh(mesh))
    assert f"{tmp_path}/domains/charite.yaml:3:1: error[MESH101]: YAML syntax error" in out, out


def test_glob_matching_is_pathlibs() -> None:
    names = ["a.yaml", "domains/b.yaml", "domains/x/c.yaml", "domains/.h.yaml", "d.yml"]
    assert match("domains/*.yaml", names) == ["domains/.h.yaml", "domains/b.yaml"]
    assert match("**/*.yaml", names) == ["a.yaml", "domains/.h.yaml", "domains/b.yaml",
                                         "domains/x/c.yaml"]
    assert match("d.ym[l]", names) == ["d.yml"] and match("?.yaml", names) == ["a.yaml"]


def test_validate_plan_and_schema_accept_a_split_mesh(tmp_path: Path) -> None:
    mesh = write_split(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(main, ["validate", str(mesh)])
    assert ok.exit_code == 0, ok.output
    planned = runner.invoke(main, ["plan", str(mesh), "-o", str(tmp_path / "p.toml")])
    assert planned.exit_code == 0, planned.output
    assert (tmp_path / "p.toml").read_text() == compile_mesh(mesh).plan.to_toml()
    import yaml
    jsonschema.validate(yaml.safe_load(mesh.read_text()), mesh_json_schema())
    bad = tmp_path / "domains" / "charite.yaml"
    bad.write_text(bad.read_text().replace("domain: charite", "domain: charit"))
    failed = runner.invoke(main, ["validate", str(mesh)])
    assert failed.exit_code == 1
    assert f"{bad}:" in failed.output and "Traceback" not in failed.output


def _git(cwd: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env=env)


def test_a_revision_compiles_with_the_includes_it_had(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    mesh = write_split(repo / "net")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "split")
    committed = _ok(compile_mesh(mesh)).plan
    # the working tree drops a domain file and adds another: HEAD still has the old ones
    (repo / "net" / "domains" / "charite.yaml").unlink()
    (repo / "net" / "domains" / "new.yaml").write_text("domains:\n  - name: new-site\n")
    _, at_head = compile_revision("HEAD", mesh)
    assert at_head.errors == [], at_head.render_diagnostics()
    assert at_head.plan.to_toml() == committed.to_toml()
    assert "new-site" not in at_head.plan.to_toml()
    diff = CliRunner().invoke(main, ["diff", "HEAD", str(mesh), "--mesh", str(mesh)])
    charite = subprocess.run(["git", "show", "HEAD:net/domains/charite.yaml"], cwd=repo,
                             capture_output=True, text=True, check=True).stdout.splitlines()
    line = charite.index("  - name: biopsies") + 1
    assert f"HEAD:net/domains/charite.yaml:{line}:5" in diff.output, diff.output
    assert diff.exit_code == 3  # a product removed: breaking


def test_serve_compiles_the_includes_beside_the_mesh(tmp_path: Path) -> None:
    """The domain service compiles the mesh itself: with its includes, to the same plan."""
    import zmq

    from meshctl.runtime.domain.service import ServiceConfig, compile_view

    mesh = write_split(tmp_path)
    public, _ = zmq.curve_keypair()
    mesh.write_text(mesh.read_text().replace("jurisdiction: eu}", f"jurisdiction: eu, public_key: '{public.decode()}'}}", 1))
    view = compile_view(ServiceConfig("charite", mesh))
    assert view.plan.to_toml() == _ok(compile_mesh(mesh)).plan.to_toml()
    assert [d.name for d in view.plan.domains] == ORDER


def test_an_empty_section_in_mesh_yaml_takes_the_included_items(tmp_path: Path) -> None:
    mesh = write_split(tmp_path)
    mesh.write_text(mesh.read_text().replace("include:", "domains:\nproducts: []\ninclude:"))
    result = _ok(compile_mesh(mesh))
    assert [d.name for d in result.plan.domains] == ORDER
