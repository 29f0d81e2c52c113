"""The Plan: what a mesh.yaml compiles to, and the only thing the runtime reads.

A Plan is frozen, fully resolved (every reference is an id, every shape is known)
and deterministic: the same mesh.yaml gives the same TOML bytes. It is written as
`mesh.plan.toml` (tomli-w's layout, by meshctl.compiler.tomlwrite) so that it can be
reviewed in git, and its content hash (sha256 of the TOML without the hash line and
without the trailing `[positions]` table) pins what the runtime executes.

Positions (`FILE:LINE:COL` of policies, grants and quality rules) say where an item is
written, not what it means: they are written last, in `[positions]`, outside the hashed
text, so that the same mesh as one file or as `include:`d files (or with a comment or a
blank line more) has one plan hash. A decision's position is its policy's.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import tomllib
import weakref
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from meshctl.compiler import plantext, tomlwrite

PLAN_FORMAT = 2
"""Version of the plan file layout: 2 writes positions in the unhashed `[positions]` table;
1 (before) wrote an `at` in each table, inside the hash. A format-1 plan is read and hashed
as it was written, so its recorded hash still verifies."""

PiiKind = Literal["none", "direct", "indirect"]
Effect = Literal["allow", "deny", "warn"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlanHeader(_Frozen):
    """Versions and hashes that pin what the runtime executes."""

    format: int = PLAN_FORMAT
    mesh: str
    """The mesh's name."""
    meshctl_version: str
    protocol_version: int
    spec_hash: str
    """sha256 of the mesh's content (meshctl.compiler.include.content_bytes): the data of
    mesh.yaml and its includes, merged, as canonical JSON; not of the files' bytes. Empty in
    the unhashed plan of `compile_mesh(hashed=False)` (validate)."""
    hash: str = ""
    """sha256 of this plan's TOML with this field empty; set by `with_hash()`."""


class PlanCoordinator(_Frozen):
    address: str
    """tcp://host:port the coordinator's ROUTER binds."""
    jurisdiction: str = ""
    public_key: str = ""
    """Z85 Curve public key; empty means `meshctl up` makes an ephemeral one."""


class PlanDomain(_Frozen):
    name: str
    owner: str = ""
    jurisdiction: str = ""
    address: str = "local"
    """`local` (spawned by `meshctl up`) or tcp://host:port of a remote daemon."""
    public_key: str = ""
    """Z85 Curve public key; empty for local domains means an ephemeral key per run."""


class PlanColumn(_Frozen):
    name: str
    type: str
    """string | int | float | bool | date | timestamp | category"""
    pii: PiiKind = "none"
    values: list[str] = Field(default_factory=list)
    """Allowed values of a category column, as strings, in declared order."""
    range: list[float] | None = None
    """[low, high] of a numeric column, if declared."""
    masking: Literal["drop", "hash", "generalize"] | None = None
    """How an indirect identifier is masked in the domain's SQL (None for pii none/direct:
    direct columns are never selected at all)."""
    generalize: str = ""
    """`year`, `month`, `prefix:N` or `bucket:W` when masking is generalize."""
    shape: list[int] | None = None
    """Shape of a `tensor` column (each row holds prod(shape) floats, row-major)."""


class PlanSla(_Frozen):
    freshness_s: float | None = None
    """Maximum data age in seconds (from e.g. `7d`)."""
    freshness: str = ""
    """As written, e.g. `7d`."""
    availability: str = ""
    retention: str = ""


class PlanQualityRule(_Frozen):
    """An ODCS quality rule, resolved for the runtime's DuckDB checks."""

    name: str
    """The rule's name, or a generated one such as `nullValues(radius_mean)`."""
    type: Literal["library", "sql", "text", "custom"] = "library"
    column: str = ""
    metric: str = ""
    query: str = ""
    unit: Literal["rows", "percent"] = "rows"
    valid_values: list[str] = Field(default_factory=list)
    valid_range: list[float] | None = None
    missing_values: list[str] = Field(default_factory=list)
    pattern: str = ""
    operator: str = ""
    """One of the ODCS operators, e.g. mustBeLessThan; empty for text rules."""
    threshold: float | list[float] | None = None
    severity: Literal["info", "warning", "error"] = "error"
    at: str = ""
    """`mesh.yaml:LINE:COL` of the rule."""


class PlanContract(_Frozen):
    id: str
    """`name@version`"""
    name: str
    version: str
    purposes: list[str] = Field(default_factory=list)
    columns: list[PlanColumn] = Field(default_factory=list)
    quality: list[PlanQualityRule] = Field(default_factory=list)
    sla: PlanSla | None = None


class PlanProduct(_Frozen):
    id: str
    """`<domain>.<name>`"""
    domain: str
    name: str
    source: str
    """Path relative to the mesh.yaml directory, or a URI."""
    format: Literal["csv", "parquet", "sqlite", "duckdb", "postgresql"]
    table: str = ""
    """Table of a sqlite, duckdb or postgresql source."""
    classification: str = "internal"
    access: Literal["open", "request"] = "open"
    tags: list[str] = Field(default_factory=list)
    description: str = ""
    owner: str = ""
    """The owning domain's owner contact."""
    contract: str = ""
    """`name@version` of the contract the product is published under."""
    sla: PlanSla | None = None
    epsilon_budget: float | None = None
    """Lifetime ε of the product across runs (privacy ledger); None means no cap."""
    columns: list[PlanColumn]


class PlanTensor(_Frozen):
    name: str
    shape: list[int]
    dtype: Literal["float32"] = "float32"


class PlanCodeFile(_Frozen):
    path: str
    """Path relative to the import root (the mesh.yaml's directory, or site-packages)."""
    sha256: str


class PlanCode(_Frozen):
    """The code that defines an entrypoint model, pinned: each domain re-hashes it before it runs it."""

    hash: str
    """`sha256:<hex>` over the files (path and sha256, sorted) and the distribution, if any."""
    files: list[PlanCodeFile]
    distribution: str | None = None
    """`name==version` when the module comes from an installed distribution."""


class PlanArchitecture(_Frozen):
    kind: Literal["mlp", "cnn", "logistic", "custom"] = "mlp"
    """A built-in, or `custom` (an entrypoint)."""
    input_dim: int
    hidden: list[int]
    output_dim: int
    activation: Literal["relu"] = "relu"
    channels: list[int] | None = None
    """cnn: output channels of each conv layer."""
    kernel: int | None = None
    """cnn: square kernel size."""
    entrypoint: str | None = None
    """custom: `pkg.module:factory`."""
    args: str | None = None
    """custom: the factory's keyword arguments as canonical JSON (sorted keys)."""
    code: PlanCode | None = None
    """custom: the pinned code."""


class PlanTraining(_Frozen):
    rounds: int
    local_epochs: int = 1
    batch_size: int = 32
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    standardize: bool = False
    """Standardize features in each domain with that domain's own training statistics."""
    data: Literal["memory", "stream", "auto"] | None = None
    """memory, stream, or None (`auto`): the domain streams a product above
    `meshctl.runtime.stream.STREAM_ABOVE` rows (docs/streaming.md)."""
    buffer_rows: int | None = None
    """Streamed data: rows shuffled together (None: `meshctl.runtime.stream.BUFFER_ROWS`)."""

    @field_validator("data")
    @classmethod
    def _auto_is_none(cls, data: str | None) -> str | None:
        return None if data == "auto" else data  # one plan for `data: auto` and no `data:`


class PlanEvaluation(_Frozen):
    holdout: float = 0.2
    """Share of each domain's rows held out for evaluation (seeded, per domain)."""
    holdout_column: str = ""
    """If set, rows whose value in this column equals `holdout_value` are the holdout."""
    holdout_value: str = "test"
    metrics: list[str] = Field(default_factory=lambda: ["loss", "accuracy"])
    product: str | None = None
    """A held-out product `<domain>.<name>` the global model is also scored on (all rows are test data)."""
    cross_site: bool | None = None
    """True: at the end every participant scores every participant's last local model and the global one."""


STRATEGY_SETTINGS: dict[str, dict[str, float]] = {
    "fedavg": {},
    "fedprox": {"mu": 0.01},
    "fedadam": {"server_lr": 0.03, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedyogi": {"server_lr": 0.03, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedavgm": {"server_lr": 1.0, "server_momentum": 0.9},
    "median": {"bucketing": 1, "server_momentum": 0.9},
    "trimmed_mean": {"trim": 0.1, "bucketing": 1, "server_momentum": 0.9},
    "krum": {"byzantine": 1, "bucketing": 1, "server_momentum": 0.9},
    "multi_krum": {"byzantine": 1, "select": 0, "bucketing": 1, "server_momentum": 0.9},
    "bulyan": {"byzantine": 1, "bucketing": 1, "server_momentum": 0.9},
    "centered_clip": {"radius": 0.0, "iterations": 3, "bucketing": 1, "server_momentum": 0.9},
    "scaffold": {"server_lr": 1.0},
}
"""Each strategy's settings and their defaults; the plan carries every setting of its strategy.
`select: 0` is n - f of the round's updates; `radius: 0` is the median distance of the round's
updates from the centre; `bucketing: 1` is no buckets. The robust rules' server momentum 0.9 is
benchmarks/robustness.py's choice (issue 13): without it they lose 1 to 24 points on clean non-IID data."""

ROBUST_STRATEGIES = ("median", "trimmed_mean", "krum", "multi_krum", "bulyan", "centered_clip")
"""Rules that need every single update (so none combines with secure aggregation)."""


def aggregation_settings(given: dict[str, Any]) -> dict[str, Any]:
    """`{strategy, **settings}` with every setting of the strategy, defaults filled in.

    `given` is a model's `aggregation:` as plain data (None for unset settings); what
    the plan carries and what policies see as `model.aggregation`, at compile and run time.
    """
    strategy = given.get("strategy", "fedavg")
    return {"strategy": strategy, **{k: given[k] if given.get(k) is not None else v
                                     for k, v in STRATEGY_SETTINGS[strategy].items()}}


class PlanAggregation(_Frozen):
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "median", "trimmed_mean", "krum",
                      "multi_krum", "bulyan", "centered_clip", "scaffold"] = "fedavg"
    mu: float | None = None
    server_lr: float | None = None
    beta_1: float | None = None
    beta_2: float | None = None
    tau: float | None = None
    trim: float | None = None
    byzantine: int | None = None
    select: int | None = None
    server_momentum: float | None = None
    radius: float | None = None
    iterations: int | None = None
    bucketing: int | None = None
    """Robust rules: updates per bucket (1: no bucketing); the rule runs over the bucket means."""

    def settings(self) -> dict[str, Any]:
        """Every setting of the strategy: the plan's value, else the default (a hand-built plan may omit them)."""
        return aggregation_settings(self.model_dump())

    def min_updates(self) -> int:
        """The fewest updates a round needs under this strategy (krum, multi_krum: 2f + 3; bulyan: 4f + 3);
        with `bucketing: s`, enough updates for that many buckets, (need - 1) s + 1."""
        return (self.min_inputs() - 1) * max(1, int(self.settings().get("bucketing") or 1)) + 1

    def min_inputs(self) -> int:
        """The fewest inputs (updates, or bucket means) the rule itself takes: krum, multi_krum 2f + 3,
        bulyan 4f + 3, else 1."""
        if self.strategy in ("krum", "multi_krum"):
            return 2 * int(self.settings()["byzantine"]) + 3
        if self.strategy == "bulyan":
            return 4 * int(self.settings()["byzantine"]) + 3
        return 1


class PlanSampling(_Frozen):
    """Client sampling: each round trains a seeded sample of the active participants."""

    per_round: int
    """Participants sampled per round (a `fraction` resolved against the participants at compile
    time, rounded up); all the active ones when fewer are active."""
    seed: int = 0
    """Round r's sample is drawn from `random.Random(f"{seed}:{r}")` over the active participants."""


class PlanCompression(_Frozen):
    """How domains compress their updates (meshctl.runtime.kernels.compress); `k` is topk's share."""

    kind: Literal["fp16", "int8", "topk"]
    k: float | None = None


class PlanDp(_Frozen):
    epsilon: float
    delta: float = 1e-5
    clip: float = 1.0


class PlanAdaptiveClip(_Frozen):
    target_quantile: float = 0.5
    lr: float = 0.2


class PlanClientDp(_Frozen):
    """Client-level DP (meshctl/runtime/kernels/client_dp.py)."""

    epsilon: float
    delta: float = 1e-5
    clip: float = 1.0
    adaptive: PlanAdaptiveClip | None = None
    noise: Literal["server", "domain"] = "server"


class PlanPrivacy(_Frozen):
    secure_aggregation: bool = False
    secagg_threshold: int | None = None
    """Secure aggregation: the declared reconstruction threshold; None is ceil(2n/3) of a round's n."""
    dp: PlanDp | None = None
    client_dp: PlanClientDp | None = None
    """Client-level DP; None without it."""


class PlanRead(_Frozen):
    """One product a job reads in one domain."""

    domain: str
    product: str
    """Product id `<domain>.<name>`."""
    client_id: int
    """Position of the domain among the job's participants (seeds local shuffling)."""


class PlanFeature(_Frozen):
    """One feature of a job and the run of input slots it fills (see meshctl/runtime/features.py)."""

    name: str
    kind: Literal["numeric", "categorical", "tensor"] = "numeric"
    width: int = 1
    """Slots: 1 (numeric), vocabulary cap + 1 for "other" (categorical), prod(shape) (tensor)."""
    shape: list[int] | None = None
    """A tensor feature's shape."""
    vocabulary: list[str] | None = None
    """A categorical feature's declared values (the order the agreed vocabulary keeps)."""
    min_count: int | None = None
    """A categorical feature: rows a value needs, in a domain and in the pool, to be in the vocabulary."""


class PlanPersonalization(_Frozen):
    """Per-domain personal models: tensors each domain keeps, and fine-tuning after the last round."""

    local: list[str] = Field(default_factory=list)
    """The mesh's globs over tensor names."""
    local_tensors: list[PlanTensor] = Field(default_factory=list)
    """The tensors the globs match: each domain keeps its own; never on the wire (not in `tensors`)."""
    fine_tune_epochs: int = 0
    fine_tune_lr: float | None = None


class PlanJob(_Frozen):
    name: str
    kind: Literal["train"] = "train"
    purpose: str = ""
    participants: list[str]
    reads: list[PlanRead]
    features: list[str]
    inputs: list[PlanFeature] | None = None
    """Each feature's kind and slots; None when every feature is numeric (one slot each)."""
    input_shape: list[int] | None = None
    """Shape of one row's input as the model sees it (`[D]`, or a lone tensor feature's shape);
    None means `[len(features)]`."""
    target: str
    classes: list[str]
    """Target values in class-index order (binary: the second is the positive class; regression: empty)."""
    task: Literal["binary", "regression"] | None = None
    """None: classification (a plan of before tasks existed reads the same)."""
    loss: Literal["bce", "mse", "mae", "huber"] | None = None
    """The training loss; None: the task's default (cross_entropy, bce, mse)."""
    huber_delta: float | None = None
    """`loss: huber`'s delta; None: 1.0."""
    architecture: PlanArchitecture
    tensors: list[PlanTensor]
    """The model's state, name by name, in the order the wire carries it."""
    personalization: PlanPersonalization | None = None
    """Per-domain personal models; `tensors` then holds only the shared state."""
    parameters: int
    training: PlanTraining
    aggregation: PlanAggregation = PlanAggregation()
    evaluation: PlanEvaluation = PlanEvaluation()
    privacy: PlanPrivacy = PlanPrivacy()
    compression: PlanCompression | None = None
    """Compression of updates on the wire; None: float32 (the TOML then has no such table)."""
    quorum: int
    """Participants an update round needs; fewer and the round waits, then fails. With `sampling`,
    of the round's sample (default: the whole sample)."""
    sampling: PlanSampling | None = None
    """Client sampling: each round trains a seeded sample of the participants; None: all of them."""
    round_timeout_s: float = 300.0
    """Per-round deadline for every participant's reply."""
    grants: list[str] = Field(default_factory=list)
    """Ids of the grants the job reads `access: request` products under."""

    @property
    def task_name(self) -> str:
        """classification, binary or regression."""
        return self.task or "classification"

    @property
    def loss_name(self) -> str:
        """The training loss, defaults filled in."""
        return self.loss or {"binary": "bce", "regression": "mse"}.get(self.task or "", "cross_entropy")

    @property
    def shared_parameters(self) -> int:
        """Scalars in `tensors`, the state the wire carries (`parameters` less a personal model's local ones)."""
        return sum(math.prod(t.shape) for t in self.tensors)

    @property
    def output_dim(self) -> int:
        """Outputs of the model: one per class (classification), else 1."""
        return len(self.classes) if self.task is None else 1


class PlanMetric(_Frozen):
    fn: Literal["count", "sum", "mean", "variance", "histogram", "quantile"]
    column: str = ""
    bins: int = 10
    range: list[float] | None = None
    q: list[float] = Field(default_factory=list)
    label: str
    """Canonical name, e.g. `mean(age)`."""


class PlanAnalysis(_Frozen):
    """A federated analysis: declared aggregates per group, never rows."""

    name: str
    purpose: str = ""
    participants: list[str]
    reads: list[PlanRead]
    group_by: list[str] = Field(default_factory=list)
    group_values: dict[str, list[str]] = Field(default_factory=dict)
    """Declared values of each group_by column (they are category columns)."""
    metrics: list[PlanMetric]
    columns: list[str] = Field(default_factory=list)
    """Every column the analysis reads (group_by plus metric columns)."""
    min_group_size: int = 10
    dp: PlanDp | None = None
    grants: list[str] = Field(default_factory=list)


class PlanSplitPart(_Frozen):
    """One domain's part of a split model."""

    domain: str
    product: str
    """Product id, `<domain>.<name>`."""
    contract: str = ""
    """`name@version` the product is published under; empty if none."""
    key: str
    """The entity key column; blinded for the intersection, never sent in clear."""
    features: list[str]
    hidden: list[int]
    out: int
    """Width of the part's activations (its cut layer); 0 for the label owner's label-only part
    (no features, no bottom model: `top_at` coordinator)."""
    tensors: list[PlanTensor]
    """The bottom model's state (an mlp), which stays in the domain; empty for a label-only part."""
    architecture: PlanArchitecture | None = None
    """An entrypoint bottom model (`kind: custom`, its code pinned); None: the built-in mlp."""
    inputs: list[PlanFeature] | None = None
    """Every feature's input slots when one is categorical (one-hot over its declared values, no
    "other" slot: an undeclared value is refused); None: all numeric, one slot each."""

    @property
    def input_width(self) -> int:
        """The bottom model's input width: one slot per numeric feature, one per declared value of a categorical one."""
        return sum(f.width for f in self.inputs) if self.inputs else len(self.features)


class PlanSplit(_Frozen):
    """A split-learning job (docs/split-learning.md): private set intersection, then per batch
    activations up to the label owner and gradients back; rows, labels and keys stay home."""

    name: str
    purpose: str = ""
    participants: list[str]
    """The parts' domains, in part order."""
    parts: list[PlanSplitPart]
    label_domain: str
    """The domain holding the label: it runs the top model and the loss."""
    label_product: str
    label_column: str
    classes: list[str]
    """The label's declared values, one output each; empty for a regression."""
    task: Literal["regression"] | None = None
    """`regression` for an int or float label (one output); None: a classification (cross entropy)."""
    loss: Literal["mse", "mae", "huber"] | None = None
    """A regression's loss; None: mse (and cross entropy for a classification)."""
    huber_delta: float | None = None
    """`loss: huber`'s delta; None: 1.0."""
    top_hidden: list[int] = Field(default_factory=list)
    top_tensors: list[PlanTensor]
    clip: float | None = None
    noise: float | None = None
    min_intersection: int = 1
    epochs: int
    batch_size: int
    optimizer: Literal["sgd", "adam"]
    lr: float
    seed: int = 0
    standardize: bool = True
    holdout: float = 0.2
    metrics: list[str] = Field(default_factory=lambda: ["loss", "accuracy"])
    round_timeout_s: float = 300.0
    grants: list[str] | None = None
    """Grant ids (`<product>->model:<name>`) the parts' `access: request` products are read under;
    None when no part's product needs one."""
    top_architecture: PlanArchitecture | None = None
    """An entrypoint top model (`kind: custom`, its code pinned); None: the built-in mlp."""
    top_at: Literal["coordinator"] | None = None
    """`coordinator`: the coordinator runs the top model and the label owner only the loss (it returns
    the gradient of the logits); None: the label owner runs both."""

    def part(self, domain: str) -> PlanSplitPart:
        return next(p for p in self.parts if p.domain == domain)


class PlanGrant(_Frozen):
    id: str
    """`<product>-><model|analysis>:<name>`, e.g. `charite.biopsies->model:malignancy`."""
    product: str
    subject: str
    """`model:NAME` or `analysis:NAME`."""
    purpose: str
    until: str = ""
    """ISO date of the last valid day; empty means no expiry. Checked at run time."""
    requested_by: str = ""
    at: str = ""


class PlanPolicy(_Frozen):
    """A policy carried into the plan so that domains can enforce it themselves."""

    name: str
    scope: str
    require: str
    when: str = ""
    effect: Literal["deny", "warn", "exclude"] = "deny"
    message: str = ""
    domain: str = ""
    """Owning domain of a domain-local policy; empty for a global one."""
    at: str = ""
    suspend_after: int | None = None
    """`effect: exclude`: a domain with this many updates excluded by the policy leaves the job."""


class PlanDecision(_Frozen):
    """One policy decision made at compile time. Every field is a str (`Plan.to_toml` writes a
    decision's `__dict__` as model_dump would give it: 100,000 of them at full size)."""

    policy: str
    scope: str
    subject: str
    """What was decided on, e.g. `model.malignancy`."""
    effect: Effect
    reason: str
    at: str = ""
    """`mesh.yaml:LINE:COL` of the policy."""


_TOML: dict[int, str] = {}
"""TOML text of hashed plans, by id(plan), kept by `with_hash()` so that a plan is
serialized once; an entry goes when its plan is collected."""


_CONTENT: dict[int, str] = {}
"""Content hashes of plans, by id(plan), kept by `content_hash()`."""


class Plan(_Frozen):
    plan: PlanHeader
    coordinator: PlanCoordinator
    domains: list[PlanDomain]
    products: list[PlanProduct]
    contracts: list[PlanContract] = Field(default_factory=list)
    jobs: list[PlanJob] = Field(default_factory=list)
    analyses: list[PlanAnalysis] = Field(default_factory=list)
    grants: list[PlanGrant] = Field(default_factory=list)
    policies: list[PlanPolicy] = Field(default_factory=list)
    decisions: list[PlanDecision] = Field(default_factory=list)
    split_models: list[PlanSplit] = Field(default_factory=list)
    """Split-learning jobs; empty (no TOML table) in meshes without them."""

    # -- lookups ---------------------------------------------------------------
    def domain(self, name: str) -> PlanDomain:
        return next(d for d in self.domains if d.name == name)

    def product(self, product_id: str) -> PlanProduct:
        return next(p for p in self.products if p.id == product_id)

    def job(self, name: str) -> PlanJob:
        return next(j for j in self.jobs if j.name == name)

    def contract(self, contract_id: str) -> PlanContract:
        return next(c for c in self.contracts if c.id == contract_id)

    def analysis(self, name: str) -> PlanAnalysis:
        return next(a for a in self.analyses if a.name == name)

    # -- bytes -----------------------------------------------------------------
    def to_toml(self) -> str:
        """The plan as TOML text; deterministic for equal plans.

        Empty top-level sections are left out (they read back as empty), so that the
        file starts with its `[plan]` header rather than lines like `grants = []`.
        """
        if id(self) in _TOML:
            return _TOML[id(self)]
        return "".join(self._texts())

    def _texts(self) -> tuple[str, str]:
        """(the hashed TOML, the `[positions]` table or "")."""
        if self.plan.format >= 2:  # made per resource (plantext): the same bytes, cheaper
            made = plantext.assemble(self)
            return made.head + made.rest(), made.positions
        return self._dumped_texts()

    def _dumped_texts(self) -> tuple[str, str]:
        """`_texts()` from the whole plan's data, `tomlwrite.dumps`'d at once (format 1; the
        reference plantext's texts are tested against)."""
        from meshctl.compiler.loader import no_gc

        with no_gc():  # a million acyclic containers: collections would scan them all, often
            data = self.model_dump(mode="json", exclude_none=True, exclude={"decisions"})
            data = {k: [d.__dict__.copy() for d in self.decisions] if k == "decisions" else data[k]
                    for k in type(self).model_fields if k in data or k == "decisions"}  # (all str: as dumped)
            _share_columns(self, data)
            positions = _take_positions(data) if self.plan.format >= 2 else {}  # format 1: `at` inline
            body = tomlwrite.dumps({k: v for k, v in data.items() if v != []})  # tomli-w's bytes
            return body, ("\n" + tomlwrite.dumps({"positions": positions}) if positions else "")



    def content_hash(self) -> str:
        """The hash `with_hash()` would record for this plan's content; computed once per plan
        object (so forked daemons checking their inherited plan do not serialize it again)."""
        digest = _CONTENT.get(id(self))
        if digest is None:
            digest = _CONTENT[id(self)] = self.with_hash().plan.hash
            weakref.finalize(self, _CONTENT.pop, id(self), None)
        return digest

    def with_hash(self) -> Plan:
        """This plan with `plan.hash` set to the sha256 of its TOML (hash empty)."""
        unhashed = self.model_copy(update={"plan": self.plan.model_copy(update={"hash": ""})})
        made = None
        if self.plan.format >= 2:  # made per resource (in a compile server: from the texts it keeps)
            digest, made = plantext.hashed(unhashed)
            whole = made.text if made is not None else None
        else:
            text, positions = unhashed._texts()
            digest = f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"
            whole = plantext.fill_hash(text, digest)
            if whole is not None:
                whole += positions
        hashed = self.model_copy(update={"plan": self.plan.model_copy(update={"hash": digest})})
        if whole is not None:
            _TOML[id(hashed)] = whole
            weakref.finalize(hashed, _TOML.pop, id(hashed), None)
        if made is not None:  # its blocks, for `meshctl plan`'s diff (plandiff)
            plantext.own(hashed, made)
        return hashed

    @classmethod
    def from_toml(cls, text: str) -> Plan:
        from meshctl.compiler.loader import no_gc

        with no_gc():
            data = tomllib.loads(text)
            _put_positions(data, data.pop("positions", None))
            return cls.model_validate(data)

    @classmethod
    def read(cls, path: str | Path) -> Plan:
        return cls.from_toml(Path(path).read_text(encoding="utf-8"))

    def write(self, path: str | Path, previous: str | None = None) -> None:
        """Write the plan atomically: a failed write (full disk, a missing folder) leaves the
        previous plan at `path` as it was. A file that already holds these bytes is left
        untouched (its modification time too). `previous`: the text of `path` as the caller
        has just read it (not read again); None: read it here."""
        path = Path(path)
        text = self.to_toml()
        try:
            if (path.read_text(encoding="utf-8") if previous is None else previous) == text:
                return
        except (OSError, ValueError):  # none there, or not text: write it
            pass
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as err:  # name the file asked for, not the temporary one
            raise OSError(err.errno, err.strerror, str(path)) from None
        finally:
            tmp.unlink(missing_ok=True)


POSITIONS = "\n[positions]\n"
"""The line that starts a plan text's unhashed tail (a value never starts a line with `[`)."""


def hashed_text(text: str) -> str:
    """A plan text without its `[positions]` table: what its hash covers (with the hash empty)."""
    return text.partition(POSITIONS)[0]


def _share_columns(plan: Plan, data: dict[str, Any]) -> None:
    """Make the dumped columns of one PlanColumn object one dict, so that the TOML writer
    formats each distinct column once (87,000 columns, 8 distinct, at the benchmark's full size)."""
    shared: dict[int, Any] = {}
    for item, dumped in zip([*plan.products, *plan.contracts], [*data.get("products", ()), *data.get("contracts", ())],
                            strict=True):
        if "columns" in dumped:
            dumped["columns"] = [shared.setdefault(id(c), d) for c, d in zip(item.columns, dumped["columns"],
                                                                              strict=True)]


def _policy_label(policy: dict[str, Any]) -> str:
    """A policy's name as its decisions give it: `name`, or `domain.name` for a domain-local one."""
    return f"{policy['domain']}.{policy['name']}" if policy.get("domain") else policy["name"]


def _take_positions(data: dict[str, Any]) -> dict[str, Any]:
    """Remove every `at` from a plan's dumped data; return them as the `[positions]` table: lists
    parallel to `policies`, `grants` and each contract's `quality` (only those with a position).
    A decision's `at` is dropped when it is its policy's; any other is kept (and hashed)."""
    positions: dict[str, Any] = {}
    for section in ("policies", "grants"):
        ats = [item.pop("at", "") for item in data.get(section, ())]
        if any(ats):
            positions[section] = ats
    quality = [[rule.pop("at", "") for rule in contract.get("quality", ())]
               for contract in data.get("contracts", ())]
    if any(any(ats) for ats in quality):
        positions["quality"] = quality
    of_policy = {_policy_label(p): at for p, at in zip(data.get("policies", ()), positions.get("policies", ()),
                                                        strict=False)}
    for decision in data.get("decisions", ()):
        if decision.get("at", "") == of_policy.get(decision["policy"], ""):
            decision.pop("at", None)
    return positions


def _put_positions(data: dict[str, Any], positions: Any) -> None:
    """Put the positions `_take_positions` took back into a plan's data (before validation);
    a decision without its own `at` gets its policy's. A table of another shape is a ValueError."""
    if positions is None:
        return
    if not isinstance(positions, dict) or not set(positions) <= {"policies", "grants", "quality"}:
        raise ValueError("[positions] is not a table of policies, grants and quality")
    for section in ("policies", "grants"):
        for item, at in zip(data.get(section, ()), positions.get(section, ()), strict=False):
            if isinstance(item, dict):
                item["at"] = at
    for contract, ats in zip(data.get("contracts", ()), positions.get("quality", ()), strict=False):
        for rule, at in zip(contract.get("quality", ()) if isinstance(contract, dict) else (),
                            ats if isinstance(ats, list) else (), strict=False):
            if isinstance(rule, dict):
                rule["at"] = at
    of_policy = {_policy_label(p): p.get("at", "") for p in data.get("policies", ())
                 if isinstance(p, dict) and isinstance(p.get("name"), str)}
    for decision in data.get("decisions", ()):
        if isinstance(decision, dict) and "at" not in decision and decision.get("policy") in of_policy:
            decision["at"] = of_policy[decision["policy"]]


def mlp_tensors(input_dim: int, hidden: list[int], output_dim: int) -> list[PlanTensor]:
    """State tensors of `kernels.models.mlp` (an nn.Sequential of Linear/ReLU), in order.

    Kept here so the compiler knows shapes and parameter counts without torch;
    tests/kernels check it against the real module.
    """
    dims = [input_dim, *hidden, output_dim]
    out: list[PlanTensor] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        layer = 2 * i  # Linear, ReLU, Linear, ...
        out.append(PlanTensor(name=f"{layer}.weight", shape=[d_out, d_in]))
        out.append(PlanTensor(name=f"{layer}.bias", shape=[d_out]))
    return out


def cnn_tensors(input_shape: list[int], channels: list[int], kernel: int, hidden: list[int],
                output_dim: int) -> list[PlanTensor]:
    """State tensors of `kernels.models.cnn` for a [C, H, W] input, in order: per conv layer
    Conv2d, ReLU and (while H and W are at least 2) MaxPool2d(2); then Flatten and an mlp head."""
    c, h, w = input_shape
    out: list[PlanTensor] = []
    layer = 0
    for ch in channels:
        out.append(PlanTensor(name=f"{layer}.weight", shape=[ch, c, kernel, kernel]))
        out.append(PlanTensor(name=f"{layer}.bias", shape=[ch]))
        layer += 2  # Conv2d, ReLU
        if h >= 2 and w >= 2:
            layer += 1  # MaxPool2d
            h, w = h // 2, w // 2
        c = ch
    layer += 1  # Flatten
    for t in mlp_tensors(c * h * w, hidden, output_dim):
        index, _, rest = t.name.partition(".")
        out.append(PlanTensor(name=f"{layer + int(index)}.{rest}", shape=t.shape))
    return out


def parameter_count(tensors: list[PlanTensor]) -> int:
    """Number of scalars in `tensors`."""
    return sum(math.prod(t.shape) for t in tensors)


M = TypeVar("M")
_set = object.__setattr__
_SHAPES: dict[type, tuple[dict[str, Any], tuple[tuple[str, Any], ...], frozenset[str]]] = {}


def made(cls: type[M], /, **values: Any) -> M:
    """`cls(**values)` without validating `values`, for values that already have the field's exact
    type (validation would keep each one as it is: a str for a str, a float for a float, a Plan
    object for a Plan object, a fresh list). The instance is the one `cls.model_construct(**values)`
    makes (same `__dict__` in field order, fields set, extra, private); unknown or missing required
    names are a TypeError. 10 to 20% cheaper than validating (the plan has 100,000 columns at full
    size), and a value validation would have converted (an int for a float) is not converted."""
    shape = _SHAPES.get(cls)
    if shape is None:
        fields = cls.model_fields  # type: ignore[attr-defined]
        shape = _SHAPES[cls] = (
            {name: None if f.is_required() or f.default_factory else f.default for name, f in fields.items()},
            tuple((name, f.default_factory) for name, f in fields.items() if f.default_factory),
            frozenset(name for name, f in fields.items() if f.is_required()))
    template, factories, required = shape
    state = template.copy()  # field order; plan defaults are immutable (str, int, float, bool, None)
    state.update(values)
    if len(state) != len(template) or not required <= values.keys():
        raise TypeError(f"{cls.__name__}: unknown or missing fields in {sorted(values)}")
    for name, factory in factories:
        if name not in values:
            state[name] = factory()
    instance = object.__new__(cls)
    _set(instance, "__dict__", state)
    _set(instance, "__pydantic_fields_set__", set(values))
    _set(instance, "__pydantic_extra__", None)
    _set(instance, "__pydantic_private__", None)
    return instance
