"""compile_mesh(path): mesh.yaml -> Plan, or the diagnostics that say why not.

The stages run in order (load, parse, resolve, contracts, sources, policies,
plan); every stage reports into one Reporter and later stages work on whatever
earlier ones could make sense of, so one run shows every problem. Pure: reads
the mesh.yaml and checks that source files exist, nothing else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from meshctl import PROTOCOL_VERSION, __version__
from meshctl.compiler.contracts import check_contracts
from meshctl.compiler.diagnostics import Diagnostic, Reporter, did_you_mean, render_all
from meshctl.compiler.loader import SourceMap, load_bytes
from meshctl.compiler.parse import parse_spec
from meshctl.compiler.plan import (
    Plan, PlanArchitecture, PlanColumn, PlanCoordinator, PlanDecision, PlanDomain,
    PlanEvaluation, PlanHeader, PlanJob, PlanProduct, PlanRead, PlanTraining, mlp_tensors,
)
from meshctl.compiler.policy import compile_policies, decide, parameter_count
from meshctl.compiler.resolve import Resolution, ResolvedModel, resolve
from meshctl.compiler.spec import MeshSpec, Product

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
"""Source file suffixes the plan supports, and their formats."""


@dataclass(frozen=True)
class CompileResult:
    """A plan (None when there are errors) and every diagnostic, in report order."""

    plan: Plan | None
    diagnostics: list[Diagnostic]
    source: str = ""
    """The mesh.yaml text, for excerpts."""
    spec: MeshSpec | None = field(default=None, compare=False)
    """The valid part of the spec, if the file could be parsed at all."""

    @property
    def errors(self) -> list[Diagnostic]:
        """The diagnostics that are errors."""
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def warnings(self) -> list[Diagnostic]:
        """The diagnostics that are warnings."""
        return [d for d in self.diagnostics if d.severity == "warning"]

    def render_diagnostics(self) -> str:
        """Every diagnostic with its source excerpt and hint."""
        return render_all(self.diagnostics, self.source)


def compile_mesh(path: str | Path) -> CompileResult:
    """Compile the mesh.yaml at `path` into a hashed Plan, collecting every diagnostic."""
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        return CompileResult(None, [Diagnostic("MESH104", "error",
                                               f"cannot read {file}: {reason.lower()}", file)])
    return compile_bytes(raw, path)


def compile_bytes(raw: bytes, path: str | Path) -> CompileResult:
    """Compile mesh.yaml bytes as if read from `path` (sources resolve beside it)."""
    file = str(path)
    source, loaded = load_bytes(raw, file)
    if source is None:
        return CompileResult(None, loaded, raw.decode("utf-8-sig", errors="replace"))
    smap: SourceMap = source.map
    report = Reporter(file, smap.locate, source.text)
    report.diagnostics += loaded
    parsed = parse_spec(source.data, report)
    if parsed is None:
        return CompileResult(None, report.diagnostics, source.text)
    spec = parsed.spec
    resolution = resolve(parsed, report)
    check_contracts(spec, resolution, report)
    _check_sources(spec.products, Path(path).parent, report)
    _check_jobs(resolution, report)
    policies = compile_policies(spec, report)
    decisions: list[PlanDecision] = []
    if not report.has_errors:  # policies judge a consistent spec, or they add only noise
        decisions = decide(policies, resolution, spec, report, Path(path).name)
    plan = None
    if not report.has_errors and parsed.header_ok:
        plan = build_plan(spec, resolution, decisions, raw).with_hash()
    return CompileResult(plan, _unique(report.diagnostics), source.text, spec)


def _unique(diagnostics: list[Diagnostic]) -> list[Diagnostic]:
    """Diagnostics without repeats (an aliased node is checked once per alias)."""
    return list(dict.fromkeys(diagnostics))


def _check_sources(products: list[Product], base: Path, report: Reporter) -> None:
    for product in products:
        at = (*product.path, "source")
        src = product.source
        suffix = PurePosixPath(src).suffix.lower()
        if "://" in src or suffix not in FORMATS:
            report.error("MESH501", f"source '{src}' of product '{product.domain}."
                         f"{product.name}' is not a csv or parquet file", at,
                         hint="this meshctl plans .csv and .parquet sources")
            continue
        target = base / src
        if not target.is_file():
            siblings = [p.name for p in target.parent.iterdir()] if target.parent.is_dir() else []
            report.error("MESH307", f"source file '{src}' of product '{product.domain}."
                         f"{product.name}' does not exist", at,
                         hint=did_you_mean(target.name, siblings)
                         or "paths are relative to the mesh.yaml's directory")


def _check_jobs(resolution: Resolution, report: Reporter) -> None:
    for resolved in resolution.models:
        model = resolved.model
        if model.architecture.entrypoint is not None:
            report.error("MESH505", "custom architectures (entrypoint) are not supported by "
                         "the plan yet", (*model.path, "architecture", "entrypoint"),
                         hint="use `architecture: {kind: mlp, hidden: [...]}`")
        if model.aggregation.strategy != "fedavg":
            report.error("MESH505", f"aggregation strategy '{model.aggregation.strategy}' is "
                         "not supported by the plan yet", (*model.path, "aggregation",
                                                           "strategy"),
                         hint="use `aggregation: {strategy: fedavg}`")
        if model.quorum is not None and model.quorum > len(resolved.participants):
            report.error("MESH504", f"quorum {model.quorum} is larger than the "
                         f"{len(resolved.participants)} participants of model '{model.name}'",
                         (*model.path, "quorum"))


def build_plan(spec: MeshSpec, resolution: Resolution, decisions: list[PlanDecision],
               raw: bytes) -> Plan:
    """The Plan of a spec that compiled without errors (unhashed)."""
    coordinator = spec.mesh.coordinator
    return Plan(
        plan=PlanHeader(mesh=spec.mesh.name, meshctl_version=__version__,
                        protocol_version=PROTOCOL_VERSION,
                        spec_hash="sha256:" + hashlib.sha256(raw).hexdigest()),
        coordinator=PlanCoordinator(**coordinator.model_dump()),
        domains=[PlanDomain(name=d.name, owner=d.owner, jurisdiction=d.jurisdiction,
                            address=d.address, public_key=d.public_key) for d in spec.domains],
        products=[_product(p, resolution) for p in spec.products],
        jobs=[_job(r) for r in resolution.models],
        decisions=decisions,
    )


def _product(product: Product, resolution: Resolution) -> PlanProduct:
    contract = resolution.contracts.get(id(product))
    return PlanProduct(
        id=f"{product.domain}.{product.name}", domain=product.domain, name=product.name,
        source=product.source, format=FORMATS[PurePosixPath(product.source).suffix.lower()],
        classification=product.classification,
        contract=f"{contract.name}@{contract.version}" if contract else "",
        columns=[PlanColumn(name=c.name, type=c.type, pii=c.pii, values=list(c.values))
                 for c in product.columns],
    )


def _job(resolved: ResolvedModel) -> PlanJob:
    model = resolved.model
    classes = list(resolved.target.values)
    arch = PlanArchitecture(input_dim=len(resolved.features), hidden=model.architecture.hidden,
                            output_dim=len(classes))
    tensors = mlp_tensors(arch.input_dim, arch.hidden, arch.output_dim)
    evaluation = model.evaluation
    return PlanJob(
        name=model.name, purpose=model.purpose, participants=resolved.participants,
        reads=[PlanRead(domain=p.domain, product=f"{p.domain}.{p.name}", client_id=i)
               for i, p in enumerate(resolved.products)],
        features=resolved.features, target=resolved.target.name, classes=classes,
        architecture=arch, tensors=tensors,
        parameters=parameter_count(tensors),
        training=PlanTraining(**model.training.model_dump()),
        evaluation=PlanEvaluation(holdout=evaluation.holdout,
                                  holdout_column=evaluation.holdout_column or "",
                                  holdout_value=evaluation.holdout_value,
                                  metrics=list(evaluation.metrics)),
        quorum=model.quorum or len(resolved.participants),
        round_timeout_s=model.round_timeout_s,
    )
