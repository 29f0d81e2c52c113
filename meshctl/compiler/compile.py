"""compile_mesh(path): mesh.yaml -> Plan, or the diagnostics that say why not.

The stages run in order (load, parse, resolve (models, analyses, grants),
contracts, sources, policies, plan (build.py)); every stage reports into one Reporter and later stages work on whatever
earlier ones could make sense of, so one run shows every problem. Pure: reads
the mesh.yaml and checks that source files of `local` domains exist, nothing else
(a remote domain's data lives on its own host: its daemon checks it there).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from meshctl.compiler.build import build_plan
from meshctl.compiler.cache import LoadCache
from meshctl.compiler.contracts import check_contracts
from meshctl.compiler.diagnostics import Diagnostic, Reporter, render_all
from meshctl.compiler.identity import check_identity, remote_domains
from meshctl.compiler.include import DirFiles, Files, Included, merge_includes
from meshctl.compiler.loader import Source, SourceMap, load_bytes, no_gc
from meshctl.compiler.parse import parse_spec
from meshctl.compiler.plan import ROBUST_STRATEGIES, STRATEGY_SETTINGS, Plan, PlanDecision
from meshctl.compiler.policy import compile_policies, decide, plan_policies
from meshctl.compiler.resolve import Resolution, ResolvedModel, resolve
from meshctl.compiler.sources import check_sources
from meshctl.compiler.spec import MeshSpec, Model

Load = Callable[[bytes, str], tuple[Source | None, list[Diagnostic]]]
"""load_bytes, or a cache's load."""


@dataclass(frozen=True)
class CompileResult:
    """A plan (None when there are errors) and every diagnostic, in report order."""

    plan: Plan | None
    diagnostics: list[Diagnostic]
    source: str = ""
    """The mesh.yaml text, for excerpts."""
    spec: MeshSpec | None = field(default=None, compare=False)
    """The valid part of the spec, if the file could be parsed at all."""
    loaded: Source | None = field(default=None, compare=False, repr=False)
    """The loaded YAML (data and positions), if it loaded."""
    includes: list[Included] = field(default_factory=list, compare=False, repr=False)
    """The files mesh.yaml includes, in merge order."""

    @property
    def sources(self) -> dict[str, str] | str:
        """Every file's text by the name diagnostics show (or the one text), for excerpts."""
        if not self.includes or self.loaded is None:
            return self.source
        return {self.loaded.file: self.source, **{i.label: i.source.text for i in self.includes}}

    @property
    def errors(self) -> list[Diagnostic]:
        """The diagnostics that are errors."""
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def warnings(self) -> list[Diagnostic]:
        """The diagnostics that are warnings."""
        return [d for d in self.diagnostics if d.severity == "warning"]

    def render_diagnostics(self, limit: int | None = None) -> str:
        """Every diagnostic (the first `limit`, then a count) with its source excerpt and hint."""
        return render_all(self.diagnostics, self.sources, limit=limit)


def compile_mesh(path: str | Path, *, hashed: bool = True, cache: LoadCache | None = None,
                 ) -> CompileResult:
    """Compile the mesh.yaml at `path` into a Plan, collecting every diagnostic.

    With `hashed=False` (what `validate` needs) the plan's content hash is left
    empty, which saves serializing the plan to TOML.
    """
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        return CompileResult(None, [Diagnostic("MESH104", "error",
                                               f"cannot read {file}: {reason.lower()}", file)])
    return compile_bytes(raw, path, hashed=hashed, cache=cache)


def compile_bytes(raw: bytes, path: str | Path, *, hashed: bool = True,
                  files: Files | None = None, cache: LoadCache | None = None) -> CompileResult:
    """Compile mesh.yaml bytes as if read from `path` (sources resolve beside it).

    Included files are read from `files` (default: the directory of `path`), so a
    git revision's mesh compiles with that revision's includes. With `cache`, each
    file is loaded through it (same result, less time for unchanged files).
    """
    with no_gc():  # the compile allocates many long-lived objects and frees few
        return _compile(raw, path, hashed, files or DirFiles(Path(path).parent),
                        cache.load if cache is not None else load_bytes)


def _compile(raw: bytes, path: str | Path, hashed: bool, files: Files, load: Load) -> CompileResult:
    file = str(path)
    source, loaded = load(raw, file)
    if source is None:
        return CompileResult(None, loaded, raw.decode("utf-8-sig", errors="replace"))
    smap: SourceMap = source.map
    report = Reporter(file, smap.locate, source.text)
    report.diagnostics += loaded
    includes = merge_includes(source, files, report, load)
    parsed = parse_spec(source.data, report)
    if parsed is None:
        return CompileResult(None, report.diagnostics, source.text, loaded=source)
    spec = parsed.spec
    resolution = resolve(parsed, report)
    check_contracts(spec, resolution, report)
    check_identity(spec, report)
    check_sources(spec.products, Path(path).parent, report, remote=remote_domains(spec))
    _check_jobs(resolution, report, spec)
    _check_owner(spec, report)
    policies = compile_policies(spec, report)
    name = Path(path).name
    decisions: list[PlanDecision] = []
    if not report.has_errors:  # policies judge a consistent spec, or they add only noise
        decisions = decide(policies, resolution, spec, report, name)
    plan = None
    if not report.has_errors and parsed.header_ok:

        # the spec hash covers mesh.yaml and each include (name and bytes), in merge order
        hashed_bytes = raw + b"".join(b"\0%s\0%s" % (i.name.encode(), i.raw) for i in includes)
        plan = build_plan(spec, resolution, decisions, plan_policies(spec, report, name),
                          hashed_bytes, report.at)
        if hashed:
            plan = plan.with_hash()
    return CompileResult(plan, _unique(report.diagnostics), source.text, spec, source, includes)


def _unique(diagnostics: list[Diagnostic]) -> list[Diagnostic]:
    """Diagnostics without repeats (an aliased node is checked once per alias)."""
    return list(dict.fromkeys(diagnostics))


OWNER = re.compile(r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:/[A-Za-z0-9._-]+)?"
                   r"|[^@\s]+@[^@\s]+\.[^@\s]+")
"""A CODEOWNERS owner: @user, @org/team or an email address."""


def _check_owner(spec: MeshSpec, report: Reporter) -> None:
    """mesh.owner goes into CODEOWNERS as written, so it must be an owner GitHub reads."""
    owner = spec.mesh.owner if spec.mesh is not None else None
    if owner is not None and not OWNER.fullmatch(owner):
        report.error("MESH222", f"mesh owner '{owner}' is not an email, @user or @org/team",
                     ("mesh", "owner"), hint="e.g. `owner: '@acme/governance'` (quote a leading @)")


def _check_jobs(resolution: Resolution, report: Reporter, spec: MeshSpec) -> None:
    for resolved in resolution.models:
        model = resolved.model
        if model.architecture.entrypoint is not None:
            report.error("MESH505", "custom architectures (entrypoint) are not supported by "
                         "the plan yet", (*model.path, "architecture", "entrypoint"),
                         hint="use `architecture: {kind: mlp, hidden: [...]}`")
        _check_aggregation(resolved, report)
        _check_metrics(model, report)
        _check_privacy(resolved.model, report)
        if model.privacy.secure_aggregation:
            _check_secure_aggregation(resolved, spec, report)
        if model.quorum is not None and model.quorum > len(resolved.participants):
            report.error("MESH504", f"quorum {model.quorum} is larger than the "
                         f"{len(resolved.participants)} participants of model '{model.name}'",
                         (*model.path, "quorum"))


def _check_aggregation(resolved: ResolvedModel, report: Reporter) -> None:
    """Settings belong to their strategy; krum and multi_krum need 2f + 3 participants (and
    quorum), bulyan 4f + 3; multi_krum selects at most the participants."""
    model = resolved.model
    agg = model.aggregation
    own = STRATEGY_SETTINGS[agg.strategy]
    path = (*model.path, "aggregation")
    for name in dict.fromkeys(k for settings in STRATEGY_SETTINGS.values() for k in settings):
        if getattr(agg, name) is not None and name not in own:
            users = sorted(s for s, settings in STRATEGY_SETTINGS.items() if name in settings)
            report.error("MESH510", f"'{name}' does not apply to strategy {agg.strategy} "
                         f"(it is a setting of {', '.join(users[:-1]) + ' and ' if users[1:] else ''}{users[-1]})", (*path, name),
                         hint=f"remove it, or use strategy: {users[0]}")
    if agg.strategy in ("krum", "multi_krum", "bulyan"):
        _check_byzantine(resolved, report)
    if agg.strategy == "trimmed_mean":
        trim = agg.trim if agg.trim is not None else own["trim"]
        have = min(len(resolved.participants), model.quorum or len(resolved.participants))
        if have and trim > 0 and int(trim * have) == 0:
            low = "quorum" if model.quorum is not None and model.quorum < len(resolved.participants) \
                else "participants"
            least = -(-1000 // have) / 1000  # 1/have rounded up to 3 decimals: cuts 1
            raise_trim = f"raise trim to {least:g} or more, " if least < 0.5 else ""
            need = have + 1
            while need < 10**6 and int(trim * need) == 0:
                need += 1
            report.warning("MESH515", f"trimmed_mean with trim {trim} cuts floor({trim} x {have}) = 0 updates "
                           f"from each end: with {have} {low}, model '{model.name}' takes a plain mean",
                           (*path, "trim") if agg.trim is not None else (*path, "strategy"),
                           hint=f"{raise_trim}have {need} or more updates per round, or use median"
                           if need < 10**6 else f"{raise_trim}or use median")


def _check_byzantine(resolved: ResolvedModel, report: Reporter) -> None:
    """Krum and multi_krum tolerate f with 2f + 3 updates a round, bulyan with 4f + 3 (MESH511);
    multi_krum cannot select more updates than a round has (MESH516)."""
    model = resolved.model
    agg = model.aggregation
    path = (*model.path, "aggregation")
    f = int(agg.byzantine if agg.byzantine is not None else STRATEGY_SETTINGS[agg.strategy]["byzantine"])
    need = (4 if agg.strategy == "bulyan" else 2) * f + 3
    have = min(len(resolved.participants), model.quorum or len(resolved.participants))
    what = "quorum" if model.quorum is not None and model.quorum < len(resolved.participants) else "participants"
    if have < need:
        rule = "4f + 3" if agg.strategy == "bulyan" else "2f + 3"
        report.error("MESH511", f"{agg.strategy} tolerating {f} Byzantine update(s) needs at least {need} "
                     f"({rule}) updates per round; model '{model.name}' has {have} {what}",
                     (*path, "byzantine") if agg.byzantine is not None else (*path, "strategy"),
                     hint="lower `byzantine`, add participants, or use median, trimmed_mean or centered_clip")
    if agg.strategy == "multi_krum" and agg.select is not None and agg.select > have:
        report.error("MESH516", f"multi_krum selects {agg.select} updates per round; model '{model.name}' "
                     f"has {have} {what}", (*path, "select"),
                     hint=f"select at most {have}, or leave `select` out for n - f")


COMPUTED_METRICS = ("loss", "accuracy")
"""The evaluation metrics the coordinator computes from what daemons send (loss sums, correct counts)."""


def _check_metrics(model: Model, report: Reporter) -> None:
    """Every evaluation metric must be computed: auroc and f1 would need per-example scores."""
    for i, metric in enumerate(model.evaluation.metrics):
        if metric not in COMPUTED_METRICS:
            report.error("MESH514", f"evaluation metric '{metric}' of model '{model.name}' is not "
                         "computed: daemons report only loss sums and correct counts",
                         (*model.path, "evaluation", "metrics", i),
                         hint=f"remove it; the supported metrics are {' and '.join(COMPUTED_METRICS)}")


def _check_secure_aggregation(resolved: ResolvedModel, spec: MeshSpec, report: Reporter) -> None:
    """The coordinator sees only the sum: no rule that needs single updates, and three or more of them."""
    model = resolved.model
    where = (*model.path, "privacy", "secure_aggregation")
    if model.aggregation.strategy in ROBUST_STRATEGIES:
        report.error("MESH513", f"model '{model.name}' uses secure aggregation, but {model.aggregation.strategy} "
                     "needs every single update, which secure aggregation hides", where,
                     hint="use fedavg, fedprox, fedadam, fedyogi or fedavgm with secure aggregation")
    have = min(len(resolved.participants), model.quorum or len(resolved.participants))
    if have < 3:
        report.error("MESH513", f"model '{model.name}' uses secure aggregation with {have} participant(s) per "
                     "round; with fewer than 3 a participant can subtract its own update from the aggregate "
                     "it receives", where, hint="add participants (and a quorum of at least 3)")
    local = {p.name: p for d in spec.domains if d.name in resolved.participants for p in d.policies}
    for policy in [*spec.policies, *local.values()]:
        if policy.scope == "round" and "update_norm" in f"{policy.when or ''} {policy.require}":
            report.error("MESH513", f"round policy '{policy.name}' reads update norms, which the coordinator "
                         f"cannot see under the secure aggregation of model '{model.name}'", where,
                         hint="drop the norm condition, or secure aggregation")


def _check_privacy(model: Model, report: Reporter) -> None:
    """DP training is DP-SGD: settings it does not cover are errors."""
    privacy = model.privacy
    if privacy.dp is not None:
        if model.training.optimizer != "sgd":
            report.error("MESH512", f"model '{model.name}' trains with DP, which meshctl does with "
                         f"DP-SGD; optimizer {model.training.optimizer} is not private",
                         (*model.path, "training", "optimizer"), hint="use `optimizer: sgd` (momentum is fine)")
        if model.training.standardize:
            report.error("MESH512", f"model '{model.name}' trains with DP, but `standardize` sends "
                         "exact feature sums, which DP does not cover", (*model.path, "training", "standardize"),
                         hint="standardize the data in the product, or drop `standardize`")
