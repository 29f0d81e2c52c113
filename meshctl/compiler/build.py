"""build_plan: a spec that compiled without errors -> the (unhashed) Plan.

Everything here is a pure function of the checked spec and its resolution:
no checks are made (earlier stages made them) and every list has a fixed
order (declared order, or sorted where the spec's order carries no meaning),
so the same mesh.yaml gives the same plan bytes.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshctl import PROTOCOL_VERSION, __version__
from meshctl.compiler.analyses import metric_range
from meshctl.compiler.diagnostics import YamlPath
from meshctl.compiler.grants import grant_id
from meshctl.compiler.plan import (
    Plan,
    PlanAdaptiveClip,
    PlanAggregation,
    PlanAnalysis,
    PlanArchitecture,
    PlanClientDp,
    PlanColumn,
    PlanCompression,
    PlanContract,
    PlanCoordinator,
    PlanDecision,
    PlanDomain,
    PlanDp,
    PlanEvaluation,
    PlanGrant,
    PlanHeader,
    PlanJob,
    PlanMetric,
    PlanPersonalization,
    PlanPolicy,
    PlanPrivacy,
    PlanProduct,
    PlanQualityRule,
    PlanRead,
    PlanSampling,
    PlanTensor,
    PlanTraining,
    aggregation_settings,
    made,
    mlp_tensors,
    parameter_count,
)
from meshctl.compiler.resolve import Resolution, ResolvedAnalysis, ResolvedModel
from meshctl.compiler.sources import plan_sla, source_kind
from meshctl.compiler.spec import (
    Aggregation,
    ClientDp,
    Column,
    Contract,
    DifferentialPrivacy,
    Domain,
    Grant,
    MeshSpec,
    Personalization,
    Product,
    QualityRule,
)

if TYPE_CHECKING:
    from meshctl.compiler.parse import ItemMemo

At = Callable[[YamlPath], str]
"""Maps a YAML path to `mesh.yaml:LINE:COL`."""

def build_plan(spec: MeshSpec, resolution: Resolution, decisions: list[PlanDecision],
               policies: list[PlanPolicy], raw: bytes | None, at: At, kept: ItemMemo | None = None) -> Plan:
    """The Plan of a spec that compiled without errors (unhashed); its `spec_hash` is the sha256
    of `raw` (the mesh's content), empty when `raw` is None."""
    coordinator = spec.mesh.coordinator
    domains = {d.name: d for d in spec.domains}
    columns: dict[tuple, PlanColumn] = {}  # one PlanColumn per distinct column (frozen: shared)
    return Plan(
        plan=PlanHeader(mesh=spec.mesh.name, meshctl_version=__version__,
                        protocol_version=PROTOCOL_VERSION,
                        spec_hash="" if raw is None else "sha256:" + hashlib.sha256(raw).hexdigest()),
        coordinator=PlanCoordinator(**coordinator.model_dump()),
        domains=[made(PlanDomain, name=d.name, owner=d.owner, jurisdiction=d.jurisdiction,
                      address=d.address, public_key=d.public_key) for d in spec.domains],
        products=[_product(p, resolution, domains, columns) for p in spec.products] if kept is None else
                 _kept_products(spec.products, resolution, domains, columns, kept),
        contracts=[_contract(c, at, columns) if kept is None else _kept_contract(c, at, columns, kept)
                   for c in sorted(spec.contracts, key=_contract_key)],
        jobs=[_job(r, resolution) if kept is None else _kept_job(r, resolution, kept) for r in resolution.models],
        analyses=[_analysis(r, resolution) for r in resolution.analyses],
        grants=sorted((_grant(g, at) for g in resolution.grants.values()), key=lambda g: g.id),
        policies=policies,
        decisions=decisions,
    )


def _contract_key(contract: Contract) -> tuple[str, tuple[int, ...]]:
    return contract.name, tuple(int(x) for x in contract.version.split("."))


def _column(column: Column, made_columns: dict[tuple, PlanColumn]) -> PlanColumn:
    """The plan's column; equal columns (the same name, type, pii, values... in many products)
    share one frozen PlanColumn, made once."""
    key = (column.name, column.type, column.pii, tuple(column.values),
           tuple(map(repr, column.range)) if column.range is not None else None,  # -0.0 is not 0.0
           column.masking, column.generalize,
           tuple(column.shape) if column.shape is not None else None)
    found = made_columns.get(key)
    if found is None:
        found = made_columns[key] = _new_column(column)
    return found


def _new_column(column: Column) -> PlanColumn:
    masking = column.masking or ("drop" if column.pii == "indirect" else None)
    return made(PlanColumn, name=column.name, type=column.type, pii=column.pii,
                values=list(column.values),
                range=list(column.range) if column.range is not None else None,
                masking=masking if column.pii == "indirect" else None,
                generalize=(column.generalize or "") if masking == "generalize" else "",
                shape=list(column.shape) if column.type == "tensor" and column.shape else None)


def _product(product: Product, resolution: Resolution, domains: dict[str, Domain],
             made_columns: dict[tuple, PlanColumn]) -> PlanProduct:
    contract = resolution.contracts.get(id(product))
    kind = source_kind(product.source)
    assert kind is not None  # checked by sources.check_sources
    owner = domains.get(product.domain)
    return made(
        PlanProduct, id=f"{product.domain}.{product.name}", domain=product.domain, name=product.name,
        source=product.source, format=kind.format, table=product.table or "",
        classification=product.classification, access=product.access,
        tags=list(product.tags), description=product.description,
        owner=owner.owner if owner else "",
        contract=f"{contract.name}@{contract.version}" if contract else "",
        sla=plan_sla(product.sla), epsilon_budget=product.epsilon_budget,
        columns=[_column(c, made_columns) for c in product.columns],
    )


def _kept_products(products: list[Product], resolution: Resolution, domains: dict[str, Domain],
                   made_columns: dict[tuple, PlanColumn], kept: ItemMemo) -> list[PlanProduct]:
    """_product of each, or the PlanProduct a previous compile made from these very objects (a
    compile server's: the product, its contract and its domain are all it reads); one table by the
    product's id (10,000 products: `kept.kept` each is twice the time)."""
    old, new = kept.table("plan product")
    contracts = resolution.contracts
    out = []
    for product in products:
        key = id(product)
        contract, domain = contracts.get(key), domains.get(product.domain)
        entry = new.get(key) or old.get(key)
        if entry is None or entry[0] is not product or entry[1] is not contract or entry[2] is not domain:
            entry = (product, contract, domain, _product(product, resolution, domains, made_columns))
        new[key] = entry
        out.append(entry[3])
    return out


def _kept_contract(contract: Contract, at: At, made_columns: dict[tuple, PlanColumn],
                   kept: ItemMemo) -> PlanContract:
    """_contract, or the PlanContract a previous compile made from this very contract (its
    positions too: the same object comes from the same bytes of the same file)."""
    found = kept.kept("plan contract", contract)
    if found is None:
        found = _contract(contract, at, made_columns)
        kept.keep("plan contract", (contract,), found)
    return found


def _contract(contract: Contract, at: At, made_columns: dict[tuple, PlanColumn]) -> PlanContract:
    names: dict[str, int] = {}
    quality = []
    for i, rule in enumerate(contract.quality):
        name = rule.name or _rule_name(rule, i)
        names[name] = names.get(name, 0) + 1
        if not rule.name and names[name] > 1:
            name = f"{name}#{names[name]}"
        quality.append(_rule(rule, name, at((*contract.path, "quality", i))))
    return made(PlanContract, id=f"{contract.name}@{contract.version}", name=contract.name,
                version=contract.version, purposes=list(contract.purposes),
                columns=[_column(c, made_columns) for c in contract.columns], quality=quality,
                sla=plan_sla(contract.sla))


def _rule_name(rule: QualityRule, i: int) -> str:
    """`nullValues(radius_mean)`, `rowCount`, or `sql[2]` for a rule without a metric."""
    if rule.metric is None:
        return f"{rule.type}[{i}]"
    return f"{rule.metric}({rule.column})" if rule.column else rule.metric


def _rule(rule: QualityRule, name: str, at: str) -> PlanQualityRule:
    ops = rule.operators()
    threshold = getattr(rule, ops[0]) if ops else None
    return PlanQualityRule(
        name=name, type=rule.type, column=rule.column or "", metric=rule.metric or "",
        query=rule.query or "", unit=rule.unit,
        valid_values=[_text(v) for v in rule.validValues or []],
        valid_range=list(rule.validRange) if rule.validRange is not None else None,
        missing_values=[_text(v) for v in rule.missingValues or [] if v is not None],
        pattern=rule.pattern or "", operator=ops[0] if ops else "",
        threshold=list(threshold) if isinstance(threshold, list) else threshold,
        severity=rule.severity, at=at)


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _reads(products: list[Product]) -> list[PlanRead]:
    return [made(PlanRead, domain=p.domain, product=f"{p.domain}.{p.name}", client_id=i)
            for i, p in enumerate(products)]


def _dp(dp: DifferentialPrivacy | None) -> PlanDp | None:
    return PlanDp(epsilon=dp.epsilon, delta=dp.delta, clip=dp.clip) if dp else None


def _client_dp(cdp: ClientDp | None) -> PlanClientDp | None:
    if cdp is None:
        return None
    adaptive = PlanAdaptiveClip(**cdp.adaptive.model_dump()) if cdp.adaptive is not None else None
    return PlanClientDp(epsilon=cdp.epsilon, delta=cdp.delta, clip=cdp.clip, adaptive=adaptive, noise=cdp.noise)


def _aggregation(agg: Aggregation) -> PlanAggregation:
    """The strategy with every one of its settings: the mesh's value, else the default."""
    return PlanAggregation(**aggregation_settings(agg.model_dump()))


def _sampled(resolved: ResolvedModel) -> int | None:
    """Participants sampled per round: `per_round`, or `fraction` of the participants rounded up; None
    without sampling."""
    sampling = resolved.model.sampling
    if sampling is None:
        return None
    if sampling.per_round is not None:
        return sampling.per_round
    return max(1, math.ceil(round(sampling.fraction * len(resolved.participants), 9)))


def _sampling(resolved: ResolvedModel) -> PlanSampling | None:
    per_round = _sampled(resolved)
    if per_round is None:
        return None
    seed = resolved.model.sampling.seed
    return PlanSampling(per_round=per_round, seed=resolved.model.training.seed if seed is None else seed)


@functools.lru_cache(maxsize=1024)
def _mlp_tensors(input_dim: int, hidden: tuple[int, ...], output_dim: int) -> list[PlanTensor]:
    """mlp_tensors, made once per shape (frozen tensors, shared as columns are: 500 models of a
    few shapes); callers do not change the list."""
    return mlp_tensors(input_dim, list(hidden), output_dim)


def _kept_job(resolved: ResolvedModel, resolution: Resolution, kept: ItemMemo) -> PlanJob:
    """_job, or the PlanJob a previous compile made from the very model, target and products, and
    equal participants, features, task, inputs, network and grants (all `_job` reads)."""
    made_of = (resolved.model, resolved.target, *resolved.products)
    values = (resolved.participants, resolved.features, resolved.task, resolved.inputs, resolved.input_shape,
              network_key(resolved), resolution.used_grants.get(f"model:{resolved.model.name}"))
    found = kept.kept("plan job", *made_of)
    if found is not None and found[0] == values:
        return found[1]
    job = _job(resolved, resolution)
    kept.keep("plan job", made_of, (values, job))
    return job


def network_key(resolved: ResolvedModel) -> Any:
    """What a model's network is made of besides the model, its input shape and its target: for an
    entrypoint model the network itself (its code may change while the mesh does not), for a
    built-in only whether it was built (the rest is the model and the shape: comparing 500 networks
    costs more than making the job)."""
    if resolved.model.architecture.entrypoint is not None:
        return resolved.network
    return resolved.network is not None


def _job(resolved: ResolvedModel, resolution: Resolution) -> PlanJob:
    model = resolved.model
    classes = list(resolved.target.values) if resolved.task != "regression" else []
    arch = PlanArchitecture(input_dim=resolved.input_width, hidden=model.architecture.hidden,
                            output_dim=len(classes) if resolved.task == "classification" else 1)
    if resolved.network is not None:  # compiler.entrypoint: built-ins and entrypoint models
        arch, tensors = resolved.network.architecture, resolved.network.tensors
    else:
        tensors = _mlp_tensors(arch.input_dim, tuple(arch.hidden), arch.output_dim)
    evaluation = model.evaluation
    return PlanJob(
        name=model.name, purpose=model.purpose, participants=resolved.participants,
        reads=_reads(resolved.products),
        features=resolved.features, inputs=resolved.inputs, input_shape=resolved.input_shape,
        target=resolved.target.name, classes=classes,
        **_task(resolved),
        architecture=arch, tensors=shared_tensors(tensors, model.personalization),
        personalization=_personalization(tensors, model.personalization),
        parameters=parameter_count(tensors),
        training=PlanTraining(**model.training.model_dump()),
        evaluation=PlanEvaluation(holdout=evaluation.holdout,
                                  holdout_column=evaluation.holdout_column or "",
                                  holdout_value=evaluation.holdout_value,
                                  metrics=metrics_of(resolved), product=evaluation.product,
                                  cross_site=evaluation.cross_site or None),
        aggregation=_aggregation(model.aggregation),
        privacy=PlanPrivacy(secure_aggregation=bool(model.privacy.secure_aggregation),
                            secagg_threshold=getattr(model.privacy.secure_aggregation, "threshold", None),
                            dp=_dp(model.privacy.dp), client_dp=_client_dp(model.privacy.client_dp)),
        compression=PlanCompression(**model.compression.model_dump()) if model.compression else None,
        quorum=model.quorum or _sampled(resolved) or len(resolved.participants),
        sampling=_sampling(resolved),
        round_timeout_s=model.round_timeout_s,
        grants=resolution.used_grants.get(f"model:{model.name}", []),
    )


DEFAULT_LOSS = {"classification": "cross_entropy", "binary": "bce", "regression": "mse"}
DEFAULT_METRICS = {"classification": ["loss", "accuracy"], "binary": ["loss", "accuracy"],
                   "regression": ["loss", "mae", "rmse", "r2"]}


def metrics_of(resolved: ResolvedModel) -> list[str]:
    """The model's declared evaluation metrics, else its task's default."""
    declared = resolved.model.evaluation.metrics
    return list(declared) if declared is not None else list(DEFAULT_METRICS[resolved.task])


def _task(resolved: ResolvedModel) -> dict[str, object]:
    """PlanJob's task, loss and huber_delta; None (left out of the plan) for the defaults."""
    model = resolved.model
    loss = model.loss if model.loss != DEFAULT_LOSS[resolved.task] else None
    delta = model.huber_delta if model.huber_delta not in (None, 1.0) else None
    return {"task": None if resolved.task == "classification" else resolved.task, "loss": loss, "huber_delta": delta}


def local_tensors(tensors: list[PlanTensor], personal: Personalization | None) -> list[PlanTensor]:
    """The tensors a personalised model keeps in each domain: those a `local` glob matches."""
    globs = personal.local if personal is not None else []
    return [t for t in tensors if any(fnmatch.fnmatchcase(t.name, g) for g in globs)]


def shared_tensors(tensors: list[PlanTensor], personal: Personalization | None) -> list[PlanTensor]:
    """The tensors the wire carries and the coordinator aggregates: all but the local ones."""
    local = {t.name for t in local_tensors(tensors, personal)}
    return [t for t in tensors if t.name not in local]


def _personalization(tensors: list[PlanTensor], personal: Personalization | None) -> PlanPersonalization | None:
    if personal is None:
        return None
    return PlanPersonalization(local=list(personal.local), local_tensors=local_tensors(tensors, personal),
                               fine_tune_epochs=personal.fine_tune_epochs, fine_tune_lr=personal.fine_tune_lr)


def _analysis(resolved: ResolvedAnalysis, resolution: Resolution) -> PlanAnalysis:
    analysis = resolved.analysis
    metrics = [PlanMetric(fn=m.fn, column=m.column or "", bins=m.bins,
                          range=metric_range(m, column), q=list(m.q), label=m.label)
               for m, column in resolved.metrics]
    columns = [c.name for c in resolved.group_by]
    columns += [c.name for _, c in resolved.metrics if c is not None]
    return PlanAnalysis(
        name=analysis.name, purpose=analysis.purpose, participants=resolved.participants,
        reads=_reads(resolved.products), group_by=[c.name for c in resolved.group_by],
        group_values={c.name: list(c.values) for c in resolved.group_by},
        metrics=metrics, columns=sorted(set(columns)),
        min_group_size=analysis.min_group_size, dp=_dp(analysis.privacy.dp),
        grants=resolution.used_grants.get(f"analysis:{analysis.name}", []),
    )


def _grant(grant: Grant, at: At) -> PlanGrant:
    return PlanGrant(id=grant_id(grant.product, grant.subject), product=grant.product,
                     subject=grant.subject, purpose=grant.purpose,
                     until=grant.until.isoformat() if grant.until else "",
                     requested_by=grant.requested_by, at=at(grant.path))
