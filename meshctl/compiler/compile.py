"""compile_mesh(path): mesh.yaml -> Plan, or the diagnostics that say why not.

The stages run in order (load, parse, resolve (models, analyses, grants),
contracts, sources, policies, plan (build.py)); every stage reports into one Reporter and later stages work on whatever
earlier ones could make sense of, so one run shows every problem. Pure: reads
the mesh.yaml and checks that source files of `local` domains exist, nothing else
(a remote domain's data lives on its own host: its daemon checks it there), and
hashes an entrypoint model's code and asks one subprocess what the module is, once
per code hash (meshctl.compiler.entrypoint).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from meshctl.compiler.build import build_plan
from meshctl.compiler.cache import DecisionMemo, LoadCache
from meshctl.compiler.contracts import check_contracts
from meshctl.compiler.diagnostics import Diagnostic, Reporter, YamlPath, render_all
from meshctl.compiler.entrypoint import networks
from meshctl.compiler.identity import check_identity, remote_domains
from meshctl.compiler.include import (
    DirFiles,
    Files,
    Included,
    MeshMap,
    content_bytes,
    merge_includes,
)
from meshctl.compiler.loader import Source, SourceMap, load_bytes, no_gc
from meshctl.compiler.parse import ItemMemo, parse_spec
from meshctl.compiler.plan import ROBUST_STRATEGIES, STRATEGY_SETTINGS, Plan, PlanDecision
from meshctl.compiler.policy import compile_policies, decide, plan_policies
from meshctl.compiler.resolve import Resolution, ResolvedModel, resolve
from meshctl.compiler.sources import check_sources, source_kind
from meshctl.compiler.spec import TASK_LOSSES, TASK_METRICS, Domain, MeshSpec, Model, Policy
from meshctl.compiler.split import check_split_models
from meshctl.compiler.split_rounds import check_round_policies

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

    def declared_in(self, path: YamlPath) -> tuple[Included | None, YamlPath]:
        """The included file that declares a path of the merged mesh (None: mesh.yaml itself),
        and the path inside that file, e.g. ("contracts", 3) -> (contracts.yaml, ("contracts", 0))."""
        smap = self.loaded.map if self.loaded is not None else None
        if not isinstance(smap, MeshMap):
            return None, path
        part, inner = smap.split(path)
        return (smap.parts[part] if part >= 0 else None), inner

    def where(self, *path: str | int) -> str:
        """`FILE:LINE:COL` of a path of the merged mesh, FILE the one that declares it."""
        if self.loaded is None:
            return ""
        line, col = self.loaded.map.locate(path)
        part, _ = self.declared_in(path)
        return f"{part.label if part is not None else self.loaded.file}:{line}:{col}"


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
                        cache.load if cache is not None else load_bytes,
                        cache.decisions if cache is not None else None,
                        getattr(cache, "items", None))


def _compile(raw: bytes, path: str | Path, hashed: bool, files: Files, load: Load,
             memo: DecisionMemo | None = None, items: ItemMemo | None = None) -> CompileResult:
    file = str(path)
    source, loaded = load(raw, file)
    if source is None:
        return CompileResult(None, loaded, raw.decode("utf-8-sig", errors="replace"))
    smap: SourceMap = source.map
    report = Reporter(file, smap.locate, source.text)
    report.diagnostics += loaded
    includes = merge_includes(source, files, report, load)
    parsed = parse_spec(source.data, report, items)
    if parsed is None:
        return CompileResult(None, report.diagnostics, source.text, loaded=source)
    spec = parsed.spec
    resolution = resolve(parsed, report, items)
    check_contracts(spec, resolution, report, items)
    check_identity(spec, report)
    check_sources(spec.products, Path(path).parent, report, remote=remote_domains(spec))
    _check_jobs(resolution, report, spec)
    root = Path(path).parent.resolve()  # entrypoint code is imported from beside the mesh.yaml
    split_models = check_split_models(spec, resolution, report, root, root / ".meshctl" / "cache" / "models")
    networks(resolution, report, root, root / ".meshctl" / "cache" / "models")
    for resolved in resolution.models:  # what needs the model's modules: known once it is built
        _check_dp_module(resolved, report)
    _check_owner(spec, report)
    policies = compile_policies(spec, report)
    name = Path(path).name
    decisions: list[PlanDecision] = []
    if not report.has_errors:  # policies judge a consistent spec, or they add only noise
        decisions = decide(policies, resolution, spec, report, name, memo, split_models)
        if memo is not None:
            memo.save()
    plan = None
    if not report.has_errors and parsed.header_ok:

        # the spec hash covers the merged content, not the files' bytes or names (one hash for
        # the mesh as one file and as included files); validate's unhashed plan has none (0.1 s)
        hashed_bytes = content_bytes(source.data) if hashed else None
        plan = build_plan(spec, resolution, decisions, plan_policies(spec, report, name),
                          hashed_bytes, report.at, items)
        if split_models:
            plan = plan.model_copy(update={"split_models": split_models})
        if _check_built(plan, spec, report):  # what needs the model's tensors (entrypoints: known only now)
            plan = None
        elif hashed:
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
    _check_exclude_policies(spec, report)
    check_round_policies(spec, report)  # (round policies and split models, MESH572-575)
    governed = [d for d in spec.domains if d.policies]  # (once, not per model: 1,000 domains x 500 models)
    excluding = [(p.name, p) for p in spec.policies if _excludes(p)]  # (once, not per model: 200 x 500)
    for resolved in resolution.models:
        model = resolved.model
        _check_exclusion(resolved, spec, report, governed, excluding)
        _check_aggregation(resolved, report)
        _check_scaffold(resolved, report)
        _check_sampling(resolved, report)
        _check_metrics(resolved, report)
        _check_privacy(resolved.model, report)
        _check_client_dp(resolved.model, report)
        _check_evaluation(resolved.model, report)
        _check_personalization(resolved.model, report)
        _check_data(resolved, report)
        _check_compression(resolved.model, report)
        if model.privacy.secure_aggregation:
            _check_secure_aggregation(resolved, spec, report)
        if model.quorum is not None and model.quorum > len(resolved.participants):
            report.error("MESH504", f"quorum {model.quorum} is larger than the "
                         f"{len(resolved.participants)} participants of model '{model.name}'",
                         (*model.path, "quorum"))


def _check_exclude_policies(spec: MeshSpec, report: Reporter) -> None:
    """`effect: exclude` decides on one update of a round, so only a `scope: round` policy has it;
    `suspend_after` counts its exclusions (MESH543)."""
    local = [(f"{d.name}.{p.name}", p) for d in spec.domains for p in d.policies]
    for label, policy in [(p.name, p) for p in spec.policies] + local:
        if policy.effect == "exclude" and policy.scope != "round":
            report.error("MESH543", f"policy '{label}' has effect: exclude, but a `scope: {policy.scope}` policy "
                         "decides on no update to exclude", (*policy.path, "effect"),
                         hint="use `scope: round` (decided per update), or effect: deny or warn")
        elif policy.suspend_after is not None and policy.effect != "exclude":
            report.error("MESH543", f"policy '{label}' sets suspend_after, which counts the updates an "
                         f"`effect: exclude` policy excludes; its effect is {policy.effect}",
                         (*policy.path, "suspend_after"), hint="set `effect: exclude`, or drop suspend_after")
        elif policy.scope == "round" and policy.effect != "exclude" and _reads_update(policy):
            report.error("MESH543", f"round policy '{label}' reads `update`, which is bound only for "
                         f"`effect: exclude` (decided per update); its effect is {policy.effect}",
                         (*policy.path, "require"), hint="set `effect: exclude`, or read `round.updates`")


_UPDATE_VAR = re.compile(r"(?<![\w.])update\s*\.")
_UPDATE_BOUND = re.compile(r"\(\s*update\s*,")
"""`update.` as a free variable, and `update` bound by a macro (`round.updates.all(update, ...)`)."""


def _reads_update(policy: Policy) -> bool:
    text = f"{policy.when or ''} {policy.require}"
    return bool(_UPDATE_VAR.search(text)) and not _UPDATE_BOUND.search(text)


def _excludes(policy: Policy) -> bool:
    return policy.scope == "round" and policy.effect == "exclude"


def _check_exclusion(resolved: ResolvedModel, spec: MeshSpec, report: Reporter, governed: list[Domain],
                     excluding: list[tuple[str, Policy]]) -> None:
    """The round policies that may exclude a model's updates: they need single updates (not secure
    aggregation's sum, MESH544) and a quorum below the participants (else any exclusion fails, MESH545).
    `excluding`: the global ones, by name."""
    model = resolved.model
    taking = set(resolved.participants)  # (a set: 1,000 domains x 500 models)
    local = [(f"{d.name}.{p.name}", p) for d in governed if d.name in taking for p in d.policies if _excludes(p)]
    policies = [*excluding, *local]
    if not policies:
        return
    label = policies[0][0]
    if model.privacy.secure_aggregation:
        report.error("MESH544", f"round policy '{label}' excludes single updates, which the coordinator cannot "
                     f"see under the secure aggregation of model '{model.name}'",
                     (*model.path, "privacy", "secure_aggregation"),
                     hint="drop secure aggregation, or give the policy effect: deny or warn")
        return
    n = len(resolved.participants)
    sampling = model.sampling  # (the quorum applies to a round's sample)
    k = n if sampling is None else sampling.per_round or max(1, math.ceil(round(sampling.fraction * n, 9)))
    if k and (model.quorum is None or model.quorum >= k):
        every = f"every participant ({n})" if k == n else f"every domain of its sample ({k} per round)"
        report.warning("MESH545", f"round policy '{label}' may exclude updates of model '{model.name}', whose "
                       f"quorum is {every}: a round with an exclusion falls below it and fails",
                       (*model.path, "quorum") if model.quorum is not None else model.path,
                       hint=f"set `quorum:` to the updates a round must keep, e.g. {max(1, k - 1)}")


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
    if agg.strategy in ROBUST_STRATEGIES:
        _check_bucketing(resolved, report)
    if agg.strategy == "trimmed_mean" and (agg.bucketing if agg.bucketing is not None else own["bucketing"]) <= 1:
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


def _check_scaffold(resolved: ResolvedModel, report: Reporter) -> None:
    """SCAFFOLD sends each domain's control variate change in the clear (MESH549: not with secure
    aggregation), and its option II control variates assume plain SGD steps (MESH550: not with adam
    or DP-SGD)."""
    model = resolved.model
    if model.aggregation.strategy != "scaffold":
        return
    if model.privacy.secure_aggregation:
        report.error("MESH549", f"model '{model.name}' uses scaffold with secure aggregation, but each domain's "
                     "control variate change travels unmasked beside its masked update",
                     (*model.path, "privacy", "secure_aggregation"),
                     hint="use fedavg, fedprox, fedadam, fedyogi or fedavgm with secure aggregation")
    if model.training.optimizer != "sgd":
        report.error("MESH550", f"model '{model.name}' uses scaffold, whose control variates assume SGD "
                     f"steps, with optimizer {model.training.optimizer}", (*model.path, "training", "optimizer"),
                     hint="use `optimizer: sgd`, or another strategy")
    if model.privacy.dp is not None:
        report.error("MESH550", f"model '{model.name}' uses scaffold with DP-SGD, whose steps do not take "
                     "the control variate correction", (*model.path, "privacy", "dp"),
                     hint="drop DP, or use fedavg, fedprox, fedadam, fedyogi or fedavgm")
    for key, what in (("client_dp", "client-level DP, which clips and noises the update"),
                      ("compression", "compression, which sends the update as a compressed change")):
        holder = model.privacy if key == "client_dp" else model
        if getattr(holder, key, None) is not None:
            report.error("MESH550", f"model '{model.name}' uses scaffold with {what} but not its control "
                         "variate change", (*model.path, *(("privacy",) if key == "client_dp" else ()), key),
                         hint=f"drop `{key}`, or use another strategy")


def _check_sampling(resolved: ResolvedModel, report: Reporter) -> None:
    """A round's sample holds at most the participants, at least the quorum, and at least what the
    strategy needs per round (krum 2f + 3, bulyan 4f + 3, secure aggregation 3) (MESH551)."""
    model = resolved.model
    sampling = model.sampling
    if sampling is None:
        return
    path, n = (*model.path, "sampling"), len(resolved.participants)
    at = (*path, "per_round") if sampling.per_round is not None else (*path, "fraction")
    k = sampling.per_round if sampling.per_round is not None \
        else max(1, math.ceil(round((sampling.fraction or 1.0) * n, 9)))
    if k > n:
        report.error("MESH551", f"model '{model.name}' samples {k} participants per round but has {n}", at,
                     hint=f"sample at most {n}, or use `fraction`")
        return
    agg = model.aggregation
    f = int(agg.byzantine if agg.byzantine is not None else STRATEGY_SETTINGS[agg.strategy].get("byzantine", 0))
    needs = {"krum": 2 * f + 3, "multi_krum": 2 * f + 3, "bulyan": 4 * f + 3}.get(agg.strategy, 1)
    why = f"{agg.strategy} needs {needs} updates per round"
    if model.privacy.secure_aggregation and needs < 3:
        needs, why = 3, "secure aggregation needs 3 updates per round"
    if k < needs:
        report.error("MESH551", f"model '{model.name}' samples {k} participants per round, but {why}", at,
                     hint=f"sample at least {needs}")
    if model.quorum is not None and model.quorum > k:
        report.error("MESH551", f"model '{model.name}' has quorum {model.quorum}, but samples only {k} "
                     "participants per round (the quorum applies to the sample)", (*model.path, "quorum"),
                     hint=f"lower the quorum to at most {k}, or sample more")


def _check_bucketing(resolved: ResolvedModel, report: Reporter) -> None:
    """`bucketing: s` is at least 1, and the ceil(n / s) buckets of a round are enough for the rule:
    krum and multi_krum 2f + 3, bulyan 4f + 3, the others 3, multi_krum's `select` at most the
    buckets (MESH555); trimmed_mean over buckets that its trim cuts none of warns (MESH556)."""
    model = resolved.model
    agg = model.aggregation
    own = STRATEGY_SETTINGS[agg.strategy]
    path = (*model.path, "aggregation")
    size = int(agg.bucketing if agg.bucketing is not None else own["bucketing"])
    at = (*path, "bucketing") if agg.bucketing is not None else (*path, "strategy")
    if size < 1:
        report.error("MESH555", f"bucketing {size} of model '{model.name}': a bucket holds at least 1 update",
                     at, hint="use bucketing: 2 (or 1 for no buckets)")
        return
    if size == 1:
        return
    n = len(resolved.participants)
    have, what = min(n, model.quorum or n), \
        "quorum" if model.quorum is not None and model.quorum < n else "participants"
    sampling = getattr(model, "sampling", None)
    if sampling is not None:
        k = sampling.per_round if sampling.per_round is not None \
            else max(1, math.ceil(round((sampling.fraction or 1.0) * n, 9)))
        have, what = (k, "sampled per round") if k < have else (have, what)
    buckets = -(-have // size)
    f = int(agg.byzantine if agg.byzantine is not None else own.get("byzantine", 0))
    need, why = {"krum": (2 * f + 3, f"krum tolerating {f} needs 2f + 3 = {2 * f + 3}"),
                 "multi_krum": (2 * f + 3, f"multi_krum tolerating {f} needs 2f + 3 = {2 * f + 3}"),
                 "bulyan": (4 * f + 3, f"bulyan tolerating {f} needs 4f + 3 = {4 * f + 3}")}.get(
        agg.strategy, (3, f"{agg.strategy} needs 3 (over 2 it is a mean)"))
    if buckets < need:
        most = max(1, (have - 1) // (need - 1)) if need > 1 else have
        report.error("MESH555", f"bucketing {size} of model '{model.name}' makes ceil({have} / {size}) = "
                     f"{buckets} buckets per round ({have} {what}); {why}", at,
                     hint=f"use bucketing: {most} or less" if most > 1 else "remove bucketing, or add participants")
    elif agg.strategy == "multi_krum" and agg.select is not None and agg.select > buckets:
        report.error("MESH555", f"multi_krum selects {agg.select} of the {buckets} buckets per round of model "
                     f"'{model.name}' (bucketing {size}, {have} {what})", (*path, "select"),
                     hint=f"select at most {buckets}, or leave `select` out for buckets - f")
    if agg.strategy == "trimmed_mean":
        trim = agg.trim if agg.trim is not None else own["trim"]
        if trim > 0 and int(trim * buckets) == 0:
            least = -(-1000 // buckets) / 1000
            report.warning("MESH556", f"trimmed_mean with trim {trim} over {buckets} buckets (bucketing {size}) "
                           f"cuts floor({trim} x {buckets}) = 0 from each end: model '{model.name}' takes a "
                           f"plain mean of the bucket means", (*path, "trim") if agg.trim is not None else at,
                           hint=f"raise trim to {least:g} or more, or lower bucketing"
                           if least < 0.5 else "lower bucketing, or use median")


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




def _check_metrics(resolved: ResolvedModel, report: Reporter) -> None:
    """Every metric, and the loss, fit the model's task (MESH514, MESH528); huber_delta is huber's (MESH529)."""
    model, task = resolved.model, resolved.task
    for i, metric in enumerate(model.evaluation.metrics or []):
        if metric not in TASK_METRICS[task]:
            report.error("MESH514", f"evaluation metric '{metric}' of model '{model.name}' does not fit "
                         f"its task ({task})", (*model.path, "evaluation", "metrics", i),
                         hint=f"a {task} model reports {', '.join(TASK_METRICS[task])}")
    if model.loss is not None and model.loss not in TASK_LOSSES[task]:
        report.error("MESH528", f"loss {model.loss} of model '{model.name}' does not fit its task ({task})",
                     (*model.path, "loss"), hint=f"a {task} model trains with {' or '.join(TASK_LOSSES[task])}")
    if model.huber_delta is not None and model.loss != "huber":
        report.error("MESH529", f"huber_delta is a setting of `loss: huber`; model '{model.name}' trains with "
                     f"{model.loss or 'its default loss'}", (*model.path, "huber_delta"),
                     hint="remove huber_delta, or set `loss: huber`")


COORDINATE_WISE = ("median", "trimmed_mean", "bulyan")
"""Rules that take each coordinate's median or trimmed mean: a top-k update is 0 off its k share."""


def _check_compression(model: Model, report: Reporter) -> None:
    """Compression (docs/compression.md): `k` is topk's share, 0 < k <= 1, and over 0.5 it sends more than
    float32 (MESH554, a warning); secure aggregation masks fixed-point words of the whole update (MESH552);
    a coordinate-wise rule would read the values top-k did not send as 0 (MESH553). (Scaffold: MESH550;
    top-k with client-level DP: MESH546.)"""
    comp = model.compression
    if comp is None:
        return
    where = (*model.path, "compression")
    if comp.kind == "topk" and comp.k is None:
        report.error("MESH554", f"model '{model.name}' compresses with topk but sets no `k`", (*where, "kind"),
                     hint="add the share of values sent per round, e.g. `k: 0.1`")
    elif comp.kind == "topk" and not 0 < comp.k <= 1:
        report.error("MESH554", f"model '{model.name}': topk's k {comp.k:g} is not a share in (0, 1]",
                     (*where, "k"), hint="e.g. `k: 0.1` sends the largest 10% of each tensor's values")
    elif comp.kind != "topk" and comp.k is not None:
        report.error("MESH554", f"model '{model.name}': `k` is a setting of topk, not of {comp.kind}",
                     (*where, "k"), hint="remove `k`, or use `kind: topk`")
    elif comp.kind == "topk" and comp.k > 0.5:
        report.warning("MESH554", f"model '{model.name}': topk with k {comp.k:g} sends more bytes than float32 "
                       "(an index and a value for each value kept)", (*where, "k"),
                       hint="use a k of at most 0.5, or `kind: fp16` or `int8`")
    if model.privacy.secure_aggregation:
        report.error("MESH552", f"model '{model.name}' compresses its updates with {comp.kind}, but secure "
                     "aggregation masks the full fixed-point update, which does not compress",
                     where, hint="remove `compression`, or secure_aggregation")
    strategy = model.aggregation.strategy
    if comp.kind == "topk" and strategy in COORDINATE_WISE:
        report.error("MESH553", f"model '{model.name}' sends top-k updates to {strategy}, which would read every "
                     "value a domain did not send as 0 and so keep the global weights wherever most did not",
                     where, hint="use fp16 or int8, or krum, multi_krum or centered_clip")


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
    taking = set(resolved.participants)
    local = {p.name: p for d in spec.domains if d.policies and d.name in taking for p in d.policies}
    for policy in [*spec.policies, *local.values()]:
        if policy.scope == "round" and "update_norm" in f"{policy.when or ''} {policy.require}":
            report.error("MESH513", f"round policy '{policy.name}' reads update norms, which the coordinator "
                         f"cannot see under the secure aggregation of model '{model.name}'", where,
                         hint="drop the norm condition, or secure aggregation")
    _check_secagg_threshold(resolved, report)


def _check_secagg_threshold(resolved: ResolvedModel, report: Reporter) -> None:
    """The reconstruction threshold: more than half of a round's participants and at most all of them
    (MESH540); a quorum below it lets a round go on with updates it cannot unmask (MESH541); a quorum of
    every participant tolerates no dropout, so a declared threshold would be idle (MESH542)."""
    from meshctl.compiler.build import _sampled

    model = resolved.model
    declared = getattr(model.privacy.secure_aggregation, "threshold", None)
    n = _sampled(resolved) or len(resolved.participants)
    t = declared if declared is not None else max(3, math.ceil(2 * n / 3))
    where = (*model.path, "privacy", "secure_aggregation", "threshold")
    if declared is not None and not n / 2 < declared <= n:
        report.error("MESH540", f"model '{model.name}' declares a secure aggregation threshold of {declared} for "
                     f"rounds of {n} participants; it must be more than half of them and at most all",
                     where, hint=f"a threshold between {n // 2 + 1} and {n} (default ceil(2n/3) = "
                     f"{max(3, math.ceil(2 * n / 3))})")
    elif model.quorum is not None and model.quorum < t:
        report.error("MESH541", f"model '{model.name}' has quorum {model.quorum}, below its secure aggregation "
                     f"threshold {t}: a round could go on with masked updates it cannot unmask",
                     (*model.path, "quorum"), hint=f"a quorum of at least {t}, or a lower threshold")
    elif declared is not None and (model.quorum or n) >= n > 0:
        hint = (f"set `quorum: {t}` to survive a dropout" if t == n - 1 else
                f"set a quorum between {t} and {n - 1} to survive dropouts" if t < n - 1 else
                "lower the threshold below the participants, and set a quorum from it")
        report.warning("MESH542", f"model '{model.name}' declares a secure aggregation threshold, but its quorum "
                       f"is every participant, so no round goes on without a dropped domain", where, hint=hint)


STREAMED_FORMATS = ("csv", "parquet", "duckdb")
"""Sources DuckDB reads as a stream; sqlite and postgresql rows are copied into memory first."""


def _check_data(resolved: ResolvedModel, report: Reporter) -> None:
    """`data: stream` (docs/streaming.md): no DP-SGD (it samples from all rows), a buffer that
    holds a batch, and sources DuckDB can stream."""
    model = resolved.model
    t, path = model.training, (*model.path, "training")
    if t.buffer_rows is not None:
        if t.data == "memory":
            report.error("MESH525", f"model '{model.name}' sets `buffer_rows` but reads its data into memory",
                         (*path, "buffer_rows"), hint="drop `buffer_rows`, or use `data: stream`")
        elif t.buffer_rows < t.batch_size:
            report.error("MESH525", f"model '{model.name}': buffer_rows {t.buffer_rows} is smaller than "
                         f"its batch_size {t.batch_size}", (*path, "buffer_rows"),
                         hint=f"use at least {t.batch_size} rows")
    if t.data != "stream":
        return
    if model.privacy.dp is not None:
        report.error("MESH524", f"model '{model.name}' streams its data, but DP-SGD needs Poisson sampling "
                     "over all rows, which streamed batches do not give", (*path, "data"),
                     hint="use `data: memory` (or `auto`, which never streams a DP model)")
    for product in resolved.products:
        kind = source_kind(product.source)
        if kind is not None and kind.format not in STREAMED_FORMATS:
            report.error("MESH526", f"model '{model.name}' streams product '{product.domain}.{product.name}', "
                         f"whose {kind.format} rows are copied into memory before DuckDB reads them",
                         (*path, "data"), hint="use `data: memory`, or a parquet, csv or duckdb source")


def _check_evaluation(model: Model, report: Reporter) -> None:
    """Cross-site evaluation sends each local model to the other domains: never under secure aggregation
    or DP (MESH536). An evaluation product's domain gets no mesh-wide standardization (MESH537). Neither
    combines with personal layers (MESH538), which never leave their domain."""
    evaluation, privacy = model.evaluation, model.privacy
    at = (*model.path, "evaluation", "cross_site")
    if evaluation.cross_site and privacy.secure_aggregation:
        report.error("MESH536", f"model '{model.name}' uses secure aggregation, but cross_site evaluation sends "
                     "each domain's local model to the other domains", at,
                     hint="drop `cross_site`, or secure aggregation")
    if evaluation.cross_site and privacy.dp is not None:
        report.error("MESH536", f"model '{model.name}' trains with DP, but cross_site evaluation sends each "
                     "domain's local model, which only the noised aggregate protects, to the other domains", at,
                     hint="drop `cross_site`, or DP")
    personal = model.personalization.local if model.personalization is not None else []
    if personal and (evaluation.cross_site or evaluation.product is not None):
        what = "cross_site evaluation sends each domain's local model to the others" if evaluation.cross_site \
            else f"evaluation product '{evaluation.product}' is scored by a domain without personal layers"
        report.error("MESH538", f"model '{model.name}' keeps layers {', '.join(personal)} in each domain "
                     f"(personalization.local), but {what}", (*model.path, "personalization", "local"),
                     hint="a personal model never leaves its domain: drop `personalization.local`, "
                          "or the evaluation")
    if evaluation.product is not None and model.training.standardize:
        report.error("MESH537", f"model '{model.name}' standardizes features with the participants' statistics, "
                     f"which evaluation product '{evaluation.product}' is not scored with",
                     (*model.path, "training", "standardize"),
                     hint="standardize the data in the products, or drop `evaluation.product`")


def _check_personalization(model: Model, report: Reporter) -> None:
    """Fine-tuning would train outside DP's accountant (MESH532). (Personal layers with cross_site
    evaluation or an evaluation product: MESH538, `_check_evaluation`.)"""
    personal = model.personalization
    if personal is None:
        return
    at = (*model.path, "personalization")
    if not personal.local and not personal.fine_tune_epochs:
        report.error("MESH531", f"model '{model.name}' declares personalization with neither local layers nor "
                     "fine-tuning, so nothing would be personal", at,
                     hint="add `local: [<tensor globs>]` or `fine_tune_epochs: N`, or drop `personalization`")
        return
    if personal.fine_tune_lr is not None and not personal.fine_tune_epochs:
        report.error("MESH531", f"model '{model.name}' sets fine_tune_lr without fine_tune_epochs, so it "
                     "would be ignored", (*at, "fine_tune_lr"), hint="add `fine_tune_epochs: N` or drop it")
    if personal.fine_tune_epochs and (model.privacy.dp is not None or model.privacy.client_dp is not None):
        report.error("MESH532", f"model '{model.name}' trains with DP, but fine-tuning trains each domain's "
                     "model again outside the DP accountant, and its metrics leave the domain",
                     (*at, "fine_tune_epochs"), hint="drop `fine_tune_epochs` (local layers train under DP)")


def _check_dp_module(resolved: ResolvedModel, report: Reporter) -> None:
    """DP-SGD needs each example's gradient, which a BatchNorm layer does not have (MESH534)."""
    model, network = resolved.model, resolved.network
    if model.privacy.dp is not None and network is not None and network.batch_norm:
        report.error("MESH534", f"model '{model.name}' trains with DP, but its layer '{network.batch_norm[0]}' is a "
                     "BatchNorm, which mixes the examples of a batch: per-example gradients (DP-SGD) are "
                     "undefined for it", (*model.path, "privacy", "dp"), hint="use GroupNorm or LayerNorm")


def _check_built(plan: Plan, spec: MeshSpec, report: Reporter) -> bool:
    """Checks of each job's tensors (an entrypoint's are known once it is introspected): personal
    layers (MESH531). True when one failed (the plan is then not built)."""
    models = {m.name: m for m in spec.models}
    failed = False
    for job in plan.jobs:
        model = models.get(job.name)
        if model is None:
            continue
        personal = job.personalization
        if personal is not None and personal.local:
            where = (*model.path, "personalization", "local")
            names = {t.name for t in (*job.tensors, *personal.local_tensors)}
            for i, glob in enumerate(personal.local):
                if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                    report.error("MESH531", f"personalization.local glob '{glob}' of model '{job.name}' matches "
                                 "none of its tensors", (*where, i),
                                 hint=f"its tensors are {', '.join(sorted(names)[:8])}")
                    failed = True
            if personal.local_tensors and not job.tensors:
                report.error("MESH531", f"personalization.local of model '{job.name}' keeps every tensor "
                             "local: nothing is shared, so there is nothing to train together", where,
                             hint="keep only the last layers local, e.g. the head")
                failed = True
    return failed


def _check_client_dp(model: Model, report: Reporter) -> None:
    """Client-level DP noises the mean of clipped updates: nothing may leave a domain outside it
    (MESH546), the rule must be a mean (MESH547), and domain noise needs secure aggregation (MESH548)."""
    privacy, cdp = model.privacy, model.privacy.client_dp
    if cdp is None:
        return
    at = (*model.path, "privacy", "client_dp")
    if privacy.dp is not None:
        report.error("MESH546", f"model '{model.name}' declares both record-level `dp` (DP-SGD in each domain) and "
                     "`client_dp`; meshctl accounts for one of them per job", at,
                     hint="keep `client_dp` to protect each domain's participation, or `dp` for each record")
    if model.training.standardize:
        report.error("MESH546", f"model '{model.name}' trains with client-level DP, but `standardize` sends "
                     "exact feature sums, which DP does not cover", (*model.path, "training", "standardize"),
                     hint="standardize the data in the product, or drop `standardize`")
    if model.evaluation.cross_site:
        report.error("MESH546", f"model '{model.name}' trains with client-level DP, but cross_site evaluation "
                     "sends each domain's local model, which only the noised mean protects, to the others",
                     (*model.path, "evaluation", "cross_site"), hint="drop `cross_site`, or client_dp")
    if model.aggregation.strategy in ROBUST_STRATEGIES:  # (scaffold with client_dp: MESH550)
        report.error("MESH547", f"model '{model.name}' trains with client-level DP, which noises the mean of "
                     f"clipped updates; strategy {model.aggregation.strategy} needs more than that mean",
                     (*model.path, "aggregation", "strategy"),
                     hint="use fedavg, fedprox, fedavgm, fedadam or fedyogi (clipping bounds each domain)")
    if model.compression is not None and model.compression.kind == "topk":
        report.error("MESH546", f"model '{model.name}' trains with client-level DP, but topk compression's error "
                     "feedback adds what earlier rounds did not send to a clipped update, past the clip norm",
                     (*model.path, "compression", "kind"), hint="use `kind: fp16` or `int8`, or drop compression")
    if cdp.noise == "domain" and not privacy.secure_aggregation:
        report.error("MESH548", f"model '{model.name}' adds client-level DP noise in the domains, but each domain's "
                     "share is too small to hide its update unless secure aggregation masks it",
                     (*at, "noise"), hint="set `secure_aggregation: true`, or `noise: server`")


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
