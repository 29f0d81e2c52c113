"""How fast the compiler is on a large mesh: 1,000 domains, 10,000 products.

Generates a synthetic mesh.yaml (1,000 domains, 10,000 products with a small data
file each, 1,000 contracts with quality rules, 200 CEL policies, 500 models),
then times, in this process, `validate` (load, parse, check, policies) and `plan`
(the same plus the plan's TOML and content hash), each the median of --repeat
runs. Next to them it prints the floor measured in the same run: libyaml's C
loader reading the same file into plain Python objects (yaml.CSafeLoader), and
the C parser's events alone, which any libyaml-based compiler must pay before it
checks anything. Then one more `plan` run, instrumented, splits the time into
phases (load, parse, resolve, contracts, sources, policies, plan build, TOML).

The 200 policies are different expressions (thresholds and shapes vary), so
nothing can be reused by caching on the text. `--cel celpy` evaluates them with
celpy's interpreter instead of meshctl.compiler.cel (only while policy.py still
builds celpy programs itself).

    python benchmarks/compile_scale.py                 # the issue's sizes
    python benchmarks/compile_scale.py --domains 100   # a tenth (products etc. scale along)
    python benchmarks/compile_scale.py --split --server  # + `meshctl` commands through a compile server
    python benchmarks/compile_scale.py --split --block   # every file in block style, one key per line

The generated files hold one product per line (flow style), which the loader reads by a fast
path; `--block` rewrites every file in block style, as people write YAML by hand, to time the
general path on the same mesh.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import meshctl.compiler.compile as compile_module
from meshctl.compiler import cel, policy
from meshctl.compiler.cache import LoadCache
from meshctl.compiler.compile import compile_mesh
from meshctl.compiler.plan import Plan
from meshctl.compiler.plandiff import diff_plan_texts, diff_plans

FEATURES = [f"x{i}" for i in range(6)]
JURISDICTIONS = ["eu", "us", "uk", "ch"]


def write_mesh(out: Path, domains: int, products_per_domain: int, contracts: int,
               policies: int, models: int, split: bool = False) -> Path:
    """A synthetic mesh.yaml with one tiny CSV per product; returns its path.

    With `split`, each domain and its products go to domains/dNNNN.yaml, which
    mesh.yaml includes (`include: [domains/*.yaml]`); the mesh is the same."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    header = ",".join(["patient_id", *FEATURES, "label"]) + "\n"
    lines = ["apiVersion: meshctl/v1",
             "mesh: {name: scale, coordinator: {address: 'tcp://127.0.0.1:7700', jurisdiction: eu}}",
             "domains:"]
    for d in range(domains):
        lines.append(f"  - {{name: d{d:04d}, owner: data@d{d:04d}.example, "
                     f"jurisdiction: {JURISDICTIONS[d % len(JURISDICTIONS)]}, address: local}}")
    cols = "".join(f", {{name: {f}, type: float}}" for f in FEATURES)
    product_columns = ("[{name: patient_id, type: string, pii: direct}" + cols
                       + ", {name: label, type: category, values: [no, yes]}]")
    lines.append("products:")
    for d in range(domains):
        for p in range(products_per_domain):
            c = (d * products_per_domain + p) % contracts
            src = data / f"d{d:04d}-p{p}.csv"
            if not src.exists():
                src.write_text(header)
            lines.append(f"  - {{name: p{p}, domain: d{d:04d}, source: data/{src.name}, "
                         f"classification: internal, contract: c{c:04d}@1, "
                         f"columns: {product_columns}}}")
    if split:
        (out / "domains").mkdir(exist_ok=True)
        first = lines.index("domains:")
        owned, lines = lines[first + 1:], [*lines[:first], "include: [domains/*.yaml]"]
        per = owned[domains + 1:]
        for d in range(domains):
            mine = per[d * products_per_domain:(d + 1) * products_per_domain]
            (out / "domains" / f"d{d:04d}.yaml").write_text(
                "\n".join(["domains:", owned[d], "products:", *mine]) + "\n")
    lines.append("contracts:")
    for c in range(contracts):
        lines.append(f"  - name: c{c:04d}\n    version: 1.{c % 7}.0\n    purposes: [research]\n"
                     f"    columns: [{cols[2:]}, {{name: label, type: category, values: [no, yes]}}]\n"
                     f"    quality:\n"
                     f"      - {{column: x0, metric: nullValues, unit: percent, mustBeLessThan: 5}}\n"
                     f"      - {{metric: rowCount, mustBeGreaterThan: 10}}")
    lines.append("policies:")
    for i in range(policies):
        lines.append(policy_yaml(i))
    lines.append("models:")
    for m in range(models):
        lines.append(f"  - name: m{m:03d}\n    purpose: research\n"
                     f"    inputs: {{contract: c{m % contracts:04d}, features: [x*], target: label}}\n"
                     f"    architecture: {{kind: mlp, hidden: [16]}}\n"
                     f"    training: {{rounds: 10, seed: {m}}}")
    path = out / "mesh.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


POLICY_SHAPES = [
    "size(model.participants) >= {a}",
    "model.training.rounds <= {b}",
    "model.reads.all(p, model.purpose in p.purposes && p.classification != 'secret{i}')",
    "model.architecture.kind == 'mlp' && size(model.architecture.hidden) <= {a}",
    "model.reads.exists(p, p.jurisdiction in ['eu', 'us', 'uk', 'ch', 'x{i}'])",
    "model.features.all(f, f.startsWith('x') || f == 'label{i}')",
    "model.parameters < {c}",
    "model.privacy.dp.epsilon <= {i}.5 || !model.privacy.secure_aggregation",
    "model.reads.map(p, p.domain).exists_one(d, d == model.reads[0].domain) || {i} < 0",
    "model.reads.filter(p, p.contract_version.startsWith('1.')).size() == size(model.reads)",
    "int(model.training.rounds / {a}) >= 0 && model.target != 'y{i}'",
    "has(model.training.rounds) ? model.training.rounds % {a} >= 0 : false",
]
"""Policy shapes: {i} is the policy's index, {a}, {b}, {c} thresholds derived from it."""


def policy_yaml(i: int) -> str:
    """One policy that every synthetic model satisfies, different for every i."""
    rule = POLICY_SHAPES[i % len(POLICY_SHAPES)].format(i=i, a=1 + i % 3, b=100 + i,
                                                        c=1000 + 37 * i)
    when = f", when: \"model.name.endsWith('{i % 10}') || true\"" if i % 5 == 0 else ""
    return (f"  - {{name: policy-{i:03d}, scope: model, require: \"{rule}\"{when},"
            f" message: rule {i}}}")


PHASES = {"load_bytes": "load", "parse_spec": "parse", "resolve": "resolve",
          "check_contracts": "contracts", "check_sources": "sources",
          "compile_policies": "policies", "decide": "policies", "plan_policies": "policies",
          "build_plan": "plan build"}
"""Functions compile.py calls, and the phase each one's time counts for."""


def phase_times(path: Path) -> dict[str, float]:
    """CPU seconds per phase of one compile plus TOML, by wrapping what compile.py calls."""
    spent: dict[str, float] = {}

    def wrap(fn, phase):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[phase] = spent.get(phase, 0.0) + time.process_time() - t0
        return inner

    saved = {name: getattr(compile_module, name) for name in PHASES
             if hasattr(compile_module, name)}
    saved_hash, saved_toml = Plan.with_hash, Plan.to_toml
    try:
        for name, fn in saved.items():
            setattr(compile_module, name, wrap(fn, PHASES[name]))
        Plan.with_hash = wrap(saved_hash, "hash (TOML)")
        t0 = time.process_time()
        result = compile_mesh(path)
        total = time.process_time() - t0
        Plan.to_toml = wrap(saved_toml, "TOML")
        result.plan.to_toml()
        spent["TOML"] = spent.get("TOML", 0.0)
    finally:
        for name, fn in saved.items():
            setattr(compile_module, name, fn)
        Plan.with_hash, Plan.to_toml = saved_hash, saved_toml
    spent["other (checks, diagnostics)"] = total - sum(
        v for k, v in spent.items() if k != "TOML")
    return spent


def timed(fn, repeat: int) -> tuple[float, object, float]:
    """Median wall seconds of `repeat` calls of fn, its last result, median CPU seconds."""
    times, cpu, result = [], [], None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), result, statistics.median(cpu)


class _CelpyAsWired:
    """policy.py's `celpy`, as it is once wired to meshctl.compiler.cel: plain activations."""

    Environment = cel.Environment

    @staticmethod
    def json_to_cel(value: object) -> object:
        """Plain data stays plain: meshctl.compiler.cel evaluates over it directly."""
        return value

    def __getattr__(self, name: str) -> object:
        import celpy

        return getattr(celpy, name)


def use_fast_cel() -> None:
    """Make policy.py evaluate with meshctl.compiler.cel (until it does so itself)."""
    policy.celpy = _CelpyAsWired()
    policy._ENV = cel.Environment()


def celpy_env() -> type:
    """celpy's Environment class (policy.py's evaluator before meshctl.compiler.cel)."""
    import celpy

    return celpy.Environment


def served_rows(path: Path, edit, repeat: int) -> list[tuple[str, float, float, float]]:
    """(row, median wall s, median cpu s, goal) of `meshctl` commands through a compile server."""
    import os
    import subprocess

    from meshctl.compiler import server

    root = path.parent.resolve()
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("MESHCTL_NO_SERVER", None)

    def command(*args: str) -> None:
        out = subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=root, env=env, check=False,
                             capture_output=True, text=True)
        if out.returncode not in (0, 2):
            sys.exit(f"meshctl {' '.join(args)} failed: {out.stderr[-2000:]}")

    def server_cpu() -> float:
        status = server.request(root, "status")
        if status is None:
            sys.exit("the compile server stopped")
        return status["cpu_s"]

    def served(*args: str):
        def run() -> float:
            edit()
            before = server_cpu()
            command(*args)
            return server_cpu() - before
        times, cpu = [], []
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), os.times()
            spent = run()
            c1 = os.times()
            times.append(time.perf_counter() - t0)
            cpu.append(c1.children_user + c1.children_system - c0.children_user - c0.children_system + spent)
        return statistics.median(times), statistics.median(cpu)

    t0 = time.perf_counter()
    started = server.start(root, idle_minutes=10)
    t_start = time.perf_counter() - t0
    c_start = server_cpu()  # (the server's own cpu: import and its first compile)
    try:
        command("plan", "-o", "served.plan.toml")  # a previous plan to diff against
        rows = [("start>", t_start, c_start, 3.0),
                ("validate>~", *served("validate"), 0.5), ("plan>~", *served("plan", "-o", "served.plan.toml"), 1.0)]
        texts = (server.request(root, "status") or {}).get("plan_texts") or {}
    finally:
        server.request(root, "stop")
    print(f"(compile server pid {started['pid']}; plan texts: {texts.get('kept', 0):,} kept, "
          f"{texts.get('made', 0):,} made by the last `plan`, {texts.get('diffs', 0)} diffs from kept blocks)")
    return rows


def to_block_style(files: list[Path]) -> None:
    """Rewrite each file in block style: the data as meshctl loads it (yes/no stay strings, and
    PyYAML's dumper quotes them), one key per line, key order kept."""
    from meshctl.compiler.loader import load_bytes

    for file in files:
        source, problems = load_bytes(file.read_bytes(), str(file))
        assert source is not None and not problems, problems
        file.write_text(yaml.safe_dump(source.data, default_flow_style=False, sort_keys=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--split", action="store_true",
                    help="one file per domain (include: [domains/*.yaml]) instead of one mesh.yaml")
    ap.add_argument("--server", action="store_true",
                    help="also time `meshctl validate` and `meshctl plan` as commands through a compile "
                         "server (meshctl compile-server), one domain file edited before each")
    ap.add_argument("--block", action="store_true",
                    help="rewrite every file in block style (one key per line) before timing")
    ap.add_argument("--cel", choices=["fast", "celpy"], default="fast",
                    help="how policies are evaluated (fast: meshctl.compiler.cel)")
    args = ap.parse_args()
    if args.cel == "fast" and isinstance(getattr(policy, "_ENV", None), celpy_env()):
        use_fast_cel()
    scale = args.domains / 1000
    sizes = {"domains": args.domains, "products_per_domain": 10,
                 "contracts": max(1, round(1000 * scale)), "policies": max(1, round(200 * scale)),
                 "models": max(1, round(500 * scale))}
    with tempfile.TemporaryDirectory(prefix="meshctl-scale-") as tmp:
        path = write_mesh(Path(tmp), **sizes, split=args.split)
        if args.block:
            to_block_style([path, *sorted((path.parent / "domains").glob("*.yaml"))])
        texts = [p.read_text() for p in [path, *sorted((path.parent / "domains").glob("*"))]]
        text = "".join(texts)
        floor, _, floor_cpu = timed(lambda: [yaml.load(t, Loader=yaml.CSafeLoader) for t in texts],
                                    args.repeat)
        events, _, _ = timed(lambda: sum(1 for t in texts for _ in yaml.parse(t, Loader=yaml.CSafeLoader)),
                             args.repeat)

        def validate():
            return compile_mesh(path, hashed=False)  # what `meshctl validate` runs

        def plan():
            result = compile_mesh(path)
            return result.plan.to_toml() if result.plan else None

        t_validate, result, c_validate = timed(validate, args.repeat)
        t_plan, toml_text, c_plan = timed(plan, args.repeat)
        cache = LoadCache(Path(tmp) / ".meshctl" / "cache")
        compile_mesh(path, hashed=False, cache=cache)  # fills the cache
        edited = next(iter(sorted((path.parent / "domains").glob("*.yaml"))), path)
        original, edits = edited.read_text(), iter(range(10**6))

        def edit() -> None:
            """One edit of one domain file (of mesh.yaml when not split)."""
            n = next(edits)
            edited.write_text(original.replace("classification: internal",
                                               f"classification: {'public' if n % 2 else 'internal'}", 1))

        caches = [cache]

        def fresh() -> LoadCache:
            """The cache as a new `meshctl validate` process finds it: only what is on disk."""
            caches.append(LoadCache(cache.directory))
            return caches[-1]

        def warm_validate():
            edit()
            return compile_mesh(path, hashed=False, cache=fresh())

        def warm_plan():
            edit()
            result = compile_mesh(path, cache=fresh())
            return result.plan.to_toml() if result.plan else None

        t_wvalidate, _, c_wvalidate = timed(warm_validate, args.repeat)
        t_wplan, warm_text, c_wplan = timed(warm_plan, args.repeat)  # the last edit: public
        t_diff, changes, _ = timed(lambda: diff_plan_texts(toml_text, warm_text), args.repeat)
        t_whole, _, _ = timed(lambda: diff_plans(Plan.from_toml(toml_text), Plan.from_toml(warm_text)), 1)
        edited.write_text(original)
        assert compile_mesh(path, cache=cache).plan.to_toml() == toml_text, "warm plan differs"
        errors = [d for d in result.diagnostics if d.severity == "error"]
        if errors or toml_text is None:
            print(result.render_diagnostics(), file=sys.stderr)
            sys.exit("the synthetic mesh did not compile")
        plan_obj = result.plan
        files = 1 + len(list((path.parent / "domains").glob("*.yaml")))
        print(f"mesh ({files} file{'s' if files > 1 else ''}): {sizes['domains']} domains, {len(plan_obj.products)} products, "
              f"{sizes['contracts']} contracts, {sizes['policies']} policies, {len(plan_obj.jobs)} models;"
              f" {len(text) / 1e6:.1f} MB of YAML, {len(plan_obj.decisions)} policy decisions,"
              f" plan {len(toml_text) / 1e6:.1f} MB")
        print(f"{'step':<10} {'median s':>9} {'cpu s':>7} {'floor s':>8} {'ratio':>6} "
              f"{'goal s':>7}")
        rows = (("validate", t_validate, c_validate, 3.0), ("plan", t_plan, c_plan, 4.0),
                ("validate~", t_wvalidate, c_wvalidate, 0.5), ("plan~", t_wplan, c_wplan, 1.0))
        if args.server:
            rows = (*rows, *served_rows(path, edit, args.repeat))
        for name, t, c, goal in rows:
            print(f"{name:<10} {t:>9.3f} {c:>7.3f} {floor:>8.3f} {t / floor:>6.1f} {goal:>7.1f}")
        print(f"~ warm: .meshctl/cache filled, then {edited.name} edited before each run"
              f" ({sum(c.hits for c in caches)} loads from the cache,"
              f" {sum(c.misses for c in caches)} from YAML; policy subjects:"
              f" {sum(c.decisions.hits for c in caches[1:])} remembered,"
              f" {sum(c.decisions.misses for c in caches[1:])} decided)")
        if args.server:
            print("> through a compile server: `meshctl compile-server start` (its cold compile), then the"
                  " commands `meshctl validate` and `meshctl plan` (diff against the previous plan and write"
                  " included), one domain file edited before each; cpu s = client + server")
        print(f"`meshctl plan` diff against the previous plan, one product edited"
              f" ({len(changes)} found): by changed blocks {t_diff:.3f} s,"
              f" whole plans parsed {t_whole:.3f} s")
        print(f"floor: yaml.CSafeLoader on the same file, same process, same run"
              f" ({floor_cpu:.3f} s cpu);"
              f" libyaml's events alone: {events:.3f} s")
        print(f"phases of one plan run, cpu s (policies by {args.cel}):")
        for phase, seconds in phase_times(path).items():
            print(f"  {phase:<28} {seconds:>7.3f}")


if __name__ == "__main__":
    main()
