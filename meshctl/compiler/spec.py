"""MeshSpec: the mesh.yaml language as pydantic models.

Every model forbids unknown keys and documents its fields with attribute
docstrings, which become descriptions in `meshctl schema`. Cross-references
(a product's domain, a model's contract) are plain strings here; resolve.py
checks them. Each top-level item remembers its YAML path in `path`.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

ColumnType = Literal["string", "int", "float", "bool", "date", "timestamp", "category", "tensor"]
PiiKind = Literal["none", "direct", "indirect"]
Classification = Literal["public", "internal", "restricted"]
QualityMetric = Literal[
    "nullValues", "missingValues", "invalidValues", "duplicateValues", "rowCount"
]
OPERATORS = (
    "mustBe", "mustNotBe", "mustBeGreaterThan", "mustBeGreaterOrEqualTo",
    "mustBeLessThan", "mustBeLessOrEqualTo", "mustBeBetween", "mustNotBeBetween",
)
"""ODCS v3 comparison operators of a quality rule."""

Name = str


TASK_METRICS = {"classification": ("loss", "accuracy", "auroc", "f1", "precision", "recall"),
                "binary": ("loss", "accuracy", "auroc", "f1", "precision", "recall"),
                "regression": ("loss", "mae", "rmse", "r2")}
"""The evaluation metrics of each task (meshctl/runtime/kernels/metrics.py computes them)."""
TASK_LOSSES = {"classification": ("cross_entropy",), "binary": ("bce",), "regression": ("mse", "mae", "huber")}
"""The losses each task trains with (the first is the default)."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True,
                              populate_by_name=True)


class _Item(_Spec):
    """A named item of a top-level section; remembers where it is in the YAML."""

    _path: tuple[str | int, ...] = PrivateAttr(default=())

    @property
    def path(self) -> tuple[str | int, ...]:
        """YAML path of this item, e.g. ("products", 2)."""
        return self.__pydantic_private__["_path"]  # (self._path goes through pydantic's __getattr__)


def _scalars_to_str(values: Any) -> Any:
    """Category values may be written as numbers or bools; the plan keeps strings."""
    if not isinstance(values, list):
        return values
    out = []
    for v in values:
        if isinstance(v, bool):
            out.append("true" if v else "false")
        elif isinstance(v, int | float):
            out.append(str(v))
        else:
            out.append(v)
    return out


class Coordinator(_Spec):
    """Where the coordinator listens."""

    address: str = "tcp://127.0.0.1:7700"
    """tcp://host:port the coordinator binds."""
    jurisdiction: str = ""
    """Legal jurisdiction the coordinator runs in (e.g. eu)."""
    public_key: str = ""
    """Z85 CurveZMQ public key; empty means `meshctl up` makes an ephemeral one."""


class MeshHeader(_Spec):
    """The mesh's identity."""

    name: Name
    """Name of the mesh."""
    description: str = ""
    """What the mesh is for."""
    coordinator: Coordinator = Coordinator()
    """Where the coordinator listens."""
    owner: str | None = None
    """Who reviews mesh.yaml and its governance (`meshctl codeowners`): an email, @user or
    @org/team."""


class Column(_Spec):
    """One column of a product or contract."""

    name: Name
    """Column name as in the data."""
    type: ColumnType
    """string | int | float | bool | date | timestamp | category | tensor"""
    pii: PiiKind = "none"
    """Whether the column identifies a person: direct, indirect or none."""
    shape: list[int] | None = None
    """Shape of a `tensor` column, e.g. [8, 8]: each row holds prod(shape) floats (row-major),
    as a list (Parquet list<float>, DuckDB FLOAT[]) or its text (`[0.5, 1, ...]` in csv)."""
    values: list[str] = Field(default_factory=list)
    """Allowed values of a category column, in class order."""
    range: list[float] | None = Field(default=None, min_length=2, max_length=2)
    """[low, high] a numeric column's values lie in (inclusive)."""
    required: bool = True
    """Whether a contract column must be present (contracts only)."""
    masking: Literal["drop", "hash", "generalize"] | None = None
    """How an `indirect` identifier is masked in the domain's SQL: drop (default),
    hash (keyed with the mesh secret) or generalize (see `generalize`)."""
    generalize: str | None = None
    """Generalization of a masked column: `year` or `month` for dates and
    timestamps, `prefix:N` for strings, `bucket:W` for numbers."""
    description: str = ""
    """What the column holds."""

    @field_validator("values", mode="before")
    @classmethod
    def _values_as_strings(cls, values: Any) -> Any:
        return _scalars_to_str(values)


class QualityRule(_Spec):
    """An ODCS v3 data quality rule (checked at run time, validated here)."""

    name: str = ""
    """Optional name of the rule."""
    description: str = ""
    """What the rule guards."""
    type: Literal["library", "sql", "text", "custom"] = "library"
    """library (a metric below), sql (a query), text (prose) or custom."""
    column: str | None = None
    """Column the metric applies to; absent for table-level metrics like rowCount."""
    metric: QualityMetric | None = None
    """ODCS library metric."""
    query: str | None = None
    """SQL query of a `type: sql` rule; its single value is compared."""
    unit: Literal["rows", "percent"] = "rows"
    """Whether the metric counts rows or a percentage."""
    validValues: list[str | int | float] | None = None
    """Values an invalidValues check accepts."""
    validRange: list[float] | None = Field(default=None, min_length=2, max_length=2)
    """[low, high] an invalidValues check accepts."""
    missingValues: list[str | int | float | None] | None = None
    """Values that count as missing."""
    pattern: str | None = None
    """Regular expression an invalidValues check accepts."""
    mustBe: float | None = None
    mustNotBe: float | None = None
    mustBeGreaterThan: float | None = None
    mustBeGreaterOrEqualTo: float | None = None
    mustBeLessThan: float | None = None
    mustBeLessOrEqualTo: float | None = None
    mustBeBetween: list[float] | None = Field(default=None, min_length=2, max_length=2)
    mustNotBeBetween: list[float] | None = Field(default=None, min_length=2, max_length=2)
    severity: Literal["info", "warning", "error"] = "error"
    """How a failed check is reported."""
    dimension: str = ""
    """ODCS quality dimension (accuracy, completeness, ...)."""

    def operators(self) -> list[str]:
        """The comparison operators this rule sets."""
        return [op for op in OPERATORS if getattr(self, op) is not None]


class Sla(_Spec):
    """Service levels a contract or product promises."""

    freshness: str | None = None
    """Maximum data age, e.g. 7d."""
    retention: str | None = None
    """How long data is kept, e.g. 5y."""
    availability: str | None = None
    """Availability of the product's daemon, e.g. 99%."""


class Policy(_Item):
    """A governance rule written in CEL."""

    name: Name
    """Policy name, unique in its scope."""
    description: str = ""
    """Why the policy exists."""
    scope: Literal["model", "analysis", "product", "round"] = "model"
    """What the policy decides on; model policies are decided at compile time."""
    when: str | None = None
    """CEL condition; the policy applies only where it is true."""
    require: str
    """CEL condition that must hold."""
    effect: Literal["deny", "warn", "exclude"] = "deny"
    """What a failed `require` does: deny (an error) or warn; `exclude` (scope: round only) is
    decided once per update, with `update` bound, and leaves that update out of the round."""
    suspend_after: int | None = Field(default=None, ge=1)
    """With `effect: exclude`: after this many of a domain's updates are excluded in a job, the
    domain takes no further part in it (docs/governance.md)."""
    message: str = ""
    """Shown when the policy does not hold."""


class Domain(_Item):
    """Who owns data, and where its daemon runs."""

    name: Name
    """Domain name, e.g. a hospital."""
    description: str = ""
    """Who the domain is."""
    owner: str = ""
    """Contact of the data owner."""
    jurisdiction: str = ""
    """Legal jurisdiction of the data (e.g. eu)."""
    address: str = "local"
    """`local` (spawned by `meshctl up`) or tcp://host:port of a remote daemon."""
    public_key: str = ""
    """Z85 CurveZMQ public key, reviewed in git."""
    policies: list[Policy] = Field(default_factory=list)
    """Domain-local policies, applied where this domain participates."""


class Product(_Item):
    """A data product: a domain's data, published under a contract."""

    name: Name
    """Product name, addressed as <domain>.<name>."""
    domain: Name
    """Owning domain."""
    source: str
    """Where the data is: a csv or parquet file relative to the mesh.yaml, or a
    `sqlite:PATH`, `duckdb:PATH` or `postgresql://...` URI (with `table`)."""
    table: str | None = None
    """Table of a sqlite, duckdb or postgresql source."""
    description: str = ""
    """What the product holds."""
    tags: list[str] = Field(default_factory=list)
    """Free-form tags for catalog search."""
    classification: Classification = "internal"
    """public | internal | restricted"""
    access: Literal["open", "request"] = "open"
    """`open`: any policy-allowed job may read it; `request`: only under a grant."""
    contract: str | None = None
    """`name@major` of the contract the product is published under."""
    sla: Sla | None = None
    """Service levels the domain promises for this product."""
    epsilon_budget: float | None = Field(default=None, gt=0)
    """Lifetime differential-privacy budget (ε) of this product across all runs,
    kept in the domain's privacy ledger; jobs that would exceed it are refused."""
    columns: list[Column] = Field(default_factory=list)
    """The product's columns."""


class Contract(_Item):
    """The interface consumers rely on: columns, quality, purposes."""

    name: Name
    """Contract name."""
    version: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    """Semantic version, e.g. 1.2.0."""
    description: str = ""
    """What the contract describes."""
    purposes: list[str] = Field(default_factory=list)
    """Purposes a consumer may use the data for."""
    columns: list[Column] = Field(default_factory=list)
    """Required columns and their types."""
    quality: list[QualityRule] = Field(default_factory=list)
    """ODCS v3 quality rules."""
    sla: Sla | None = None
    """Service levels."""
    object_name: str = ""
    """Name of the ODCS schema object (the table) the contract describes, kept from an ODCS
    import; `contract export` writes the contract's name when empty."""

    @property
    def major(self) -> int:
        """The major version."""
        return int(self.version.split(".")[0])


class Inputs(_Spec):
    """What a model reads."""

    contract: str
    """Contract name, optionally `name@major`."""
    features: list[str]
    """Feature columns, or fnmatch globs such as px*."""
    target: str
    """Target column: a category (classification, binary) or an int/float (regression)."""
    categories: dict[str, int] = Field(default_factory=dict)
    """Most values a categorical feature one-hots, by column, e.g. {city: 20}: needed for
    a string feature, optional for a category one (default: all its declared values).
    One more slot holds "other"."""
    min_category_count: int = Field(default=10, ge=1)
    """Rows a value needs, in a domain's training rows and in the pooled counts, to get
    its own slot; rarer values count as "other" and never leave the domain."""


ModelArg = str | bool | int | float | None | list[Any]
"""A value an entrypoint factory may take (canonical JSON in the plan)."""


def _positive_widths(widths: list[int]) -> list[int]:
    """The layer widths of a model (`hidden`, `channels`), refused unless every one is positive."""
    if any(w <= 0 for w in widths):
        raise ValueError("layer widths must be positive")
    return widths


class Architecture(_Spec):
    """The network trained in every domain."""

    kind: Literal["mlp", "cnn", "logistic"] = "mlp"
    """Built-in model family: `mlp` (Linear/ReLU), `cnn` (conv layers, then an mlp head, for
    [C, H, W] inputs), `logistic` (one Linear). Not given with `entrypoint`."""
    hidden: list[int] = Field(default_factory=lambda: [64, 32])
    """Hidden layer widths (mlp; the dense head of a cnn)."""
    activation: Literal["relu"] = "relu"
    """Activation between layers."""
    channels: list[int] = Field(default_factory=lambda: [16, 32])
    """cnn: output channels of each conv layer (each followed by ReLU and a 2x2 max-pool)."""
    kernel: int = Field(default=3, ge=1, le=15)
    """cnn: square kernel size (odd; padded to keep H and W)."""
    entrypoint: str | None = None
    """`pkg.module:factory` of a custom model: called as `factory(input_shape, output_dim, **args)`,
    imported with the mesh.yaml's directory first on sys.path."""
    args: dict[str, ModelArg] = Field(default_factory=dict)
    """Keyword arguments of the entrypoint factory (JSON scalars and lists)."""

    _positive = field_validator("hidden", "channels")(staticmethod(_positive_widths))


class Training(_Spec):
    """Local training in each domain, and the number of rounds."""

    rounds: int = Field(default=10, ge=1)
    """Federated rounds."""
    local_epochs: int = Field(default=1, ge=1)
    """Epochs over local data per round."""
    batch_size: int = Field(default=32, ge=1)
    """Local mini-batch size."""
    optimizer: Literal["sgd", "adam"] = "sgd"
    """Local optimizer."""
    lr: float = Field(default=0.05, gt=0)
    """Learning rate."""
    momentum: float = Field(default=0.0, ge=0)
    """SGD momentum."""
    weight_decay: float = Field(default=0.0, ge=0)
    """L2 weight decay."""
    seed: int = 0
    """Seed of initialisation and shuffling."""
    standardize: bool = False
    """Standardize features with each domain's own statistics."""
    data: Literal["memory", "stream", "auto"] | None = None
    """How a domain reads its rows: `memory` loads them once as tensors; `stream` re-reads them
    in Arrow batches from DuckDB every epoch (bounded memory, docs/streaming.md); `auto` (the
    default) streams a product of more than 1,000,000 rows, unless the model trains with DP, the
    source is sqlite or postgresql, or pyarrow is not installed."""
    buffer_rows: int | None = Field(default=None, ge=1)
    """Streamed data: rows shuffled together (a seeded order within each buffer; default 65,536)."""


class Aggregation(_Spec):
    """How updates are combined."""

    strategy: Literal[
        "fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "median", "trimmed_mean", "krum",
        "multi_krum", "bulyan", "centered_clip", "scaffold"
    ] = "fedavg"
    """fedavg (weighted mean), fedprox (fedavg plus a proximal term in local training),
    fedadam / fedyogi (an adaptive server optimizer on the mean update), fedavgm (server
    momentum on the mean update), median or trimmed_mean (coordinate-wise, robust), krum
    (the update closest to its neighbours), multi_krum (the mean of the `select` closest),
    bulyan (Krum selection, then a trimmed mean around the median), centered_clip (the
    mean of updates clipped around the last global update), scaffold (control variates that
    correct each domain's drift on non-IID data, Karimireddy et al. 2020)."""
    mu: float | None = Field(default=None, ge=0)
    """fedprox: weight of the proximal term (mu/2)·||w - w_global||² (default 0.01)."""
    server_lr: float | None = Field(default=None, gt=0)
    """fedadam, fedyogi: the server's learning rate (default 0.03); fedavgm, scaffold: (default 1.0)."""
    beta_1: float | None = Field(default=None, ge=0, lt=1)
    """fedadam, fedyogi: first-moment decay (default 0.9)."""
    beta_2: float | None = Field(default=None, ge=0, lt=1)
    """fedadam, fedyogi: second-moment decay (default 0.99)."""
    tau: float | None = Field(default=None, gt=0)
    """fedadam, fedyogi: adaptivity, added to the root of the second moment (default 0.001)."""
    server_momentum: float | None = Field(default=None, ge=0, lt=1)
    """fedavgm: the server momentum beta in v = beta v + delta (default 0.9); median,
    trimmed_mean, krum, multi_krum, bulyan, centered_clip: the same momentum on the rule's step,
    off at 0 (default 0.9)."""
    trim: float | None = Field(default=None, ge=0, lt=0.5)
    """trimmed_mean: share of updates cut from each end, per coordinate (default 0.1)."""
    byzantine: int | None = Field(default=None, ge=0)
    """krum, multi_krum: Byzantine updates tolerated, f (default 1), needs 2f + 3 participants;
    bulyan: needs 4f + 3."""
    select: int | None = Field(default=None, ge=1)
    """multi_krum: how many updates (lowest Krum scores) are averaged (default n - f)."""
    radius: float | None = Field(default=None, gt=0)
    """centered_clip: the clipping radius tau, in weight-space L2 (default: each round, the
    median distance of the updates from the centre)."""
    iterations: int | None = Field(default=None, ge=1, le=100)
    """centered_clip: clipping iterations L per round (default 3)."""
    bucketing: int | None = None
    """median, trimmed_mean, krum, multi_krum, bulyan, centered_clip: bucketing (Karimireddy,
    He and Jaggi 2022): each round the updates are split at random (seeded) into buckets of
    this many, each bucket is averaged, and the rule runs over the bucket means (default 1:
    no buckets). `byzantine` and `select` then count buckets (MESH555)."""


class Sampling(_Spec):
    """Client sampling: each round trains a seeded sample of the active participants; the others
    sit the round out (they still evaluate). Give `fraction` or `per_round`."""

    fraction: float | None = Field(default=None, gt=0, le=1)
    """Share of the participants sampled per round, rounded up (0.5 of 16 is 8)."""
    per_round: int | None = Field(default=None, ge=1)
    """Participants sampled per round."""
    seed: int | None = None
    """Seed of the sampler (default: training.seed); the same seed draws the same samples."""

    @model_validator(mode="after")
    def _one_size(self) -> Sampling:
        if (self.fraction is None) == (self.per_round is None):
            raise ValueError("give exactly one of `fraction` and `per_round`")
        return self


class Compression(_Spec):
    """How a domain compresses its update (the change to the global weights) for the wire
    (docs/compression.md); the coordinator restores float32 before aggregating."""

    kind: Literal["fp16", "int8", "topk"]
    """fp16 (half precision, about 2x fewer bytes), int8 (one scale per tensor, about 4x), topk
    (only the largest `k` share of each tensor's values, with their indices; the rest is kept in
    the domain and added to the next round's update: error feedback)."""
    k: float | None = None
    """topk: the share of each tensor's values sent each round, 0 < k <= 1 (e.g. 0.1)."""


class DifferentialPrivacy(_Spec):
    """Differential privacy of updates."""

    epsilon: float = Field(gt=0)
    """Privacy budget per run."""
    delta: float = Field(default=1e-5, ge=0, lt=1)
    """Failure probability."""
    clip: float = Field(default=1.0, gt=0)
    """L2 norm bound of each update."""


class AdaptiveClip(_Spec):
    """Adaptive clipping (Andrew et al. 2021): the clip norm follows a quantile of the update norms."""

    target_quantile: float = Field(default=0.5, gt=0, lt=1)
    """Share of updates the clip norm should leave unclipped."""
    lr: float = Field(default=0.2, gt=0, le=10)
    """Geometric step: clip *= exp(-lr * (unclipped share - target_quantile)) each round."""


class ClientDp(_Spec):
    """Client-level DP (DP-FedAvg, McMahan et al. 2018): clip each domain's update, noise the mean."""

    epsilon: float = Field(gt=0)
    """Privacy budget of the whole job (every round together), per domain."""
    delta: float = Field(default=1e-5, gt=0, lt=1)
    """Failure probability."""
    clip: float = Field(default=1.0, gt=0)
    """L2 norm bound C of each domain's update (w_local - w_global); adaptive: the first round's."""
    adaptive: AdaptiveClip | None = None
    """Adapt the clip norm each round (Andrew et al. 2021), if given."""
    noise: Literal["server", "domain"] = "server"
    """server: the coordinator noises the mean; domain: each domain adds its share of the noise
    before secure aggregation masks its update (needs `secure_aggregation`)."""


class SecureAggregation(_Spec):
    """Secure aggregation with dropout recovery (docs/secure-aggregation.md)."""

    threshold: int | None = Field(default=None, ge=3)
    """Shares that rebuild a domain's masks: a round completes when up to n - threshold domains drop
    after sharing them (default ceil(2n/3) of the round's n participants, at least 3)."""


class Privacy(_Spec):
    """Privacy protections of a model's updates."""

    secure_aggregation: bool | SecureAggregation = False
    """Mask updates so the coordinator sees only their sum: `true`, or `{threshold: t}`."""
    dp: DifferentialPrivacy | None = None
    """Differential privacy, if any."""
    client_dp: ClientDp | None = None
    """Client-level differential privacy (DP-FedAvg, docs/privacy.md): each domain's whole update
    is clipped and the round's mean is noised, so the model hides any one domain's participation."""


class Evaluation(_Spec):
    """How each domain evaluates the global model."""

    holdout: float = Field(default=0.2, gt=0, lt=1)
    """Share of rows held out (seeded, per domain)."""
    holdout_column: str | None = None
    """If set, rows where this column equals holdout_value are the holdout."""
    holdout_value: str = "test"
    """Value of holdout_column that marks holdout rows."""
    product: str | None = None
    """`<domain>.<product>`: a held-out product (every row is test data) the global model is also
    scored on each round, by the domain that holds it; it never trains."""
    cross_site: bool = False
    """At the end, every participant's last local model and the global model are scored by every
    participant on its holdout (a model x site matrix); local models then leave their domains."""
    metrics: list[Literal["loss", "accuracy", "auroc", "f1", "precision", "recall", "mae", "rmse", "r2"]] | None = None
    """Metrics reported each round, pooled and per domain (docs/evaluation.md): loss, accuracy, auroc,
    f1, precision, recall (classification, binary); loss, mae, rmse, r2 (regression). Default: loss
    and accuracy; loss, mae, rmse and r2 for regression."""


class Personalization(_Spec):
    """Per-domain models (docs/personalization.md): layers kept in each domain (FedPer), and
    fine-tuning of the final global model in each domain. A personal model never leaves its domain."""

    local: list[str] = Field(default_factory=list)
    """Globs over the model's tensor names (e.g. `4.*`) that each domain keeps: never sent, never
    aggregated; each domain trains its own with the shared ones."""
    fine_tune_epochs: int = Field(default=0, ge=0, le=1000)
    """After the final round, each domain trains the final model this many epochs on its own rows
    and reports its holdout metrics before and after."""
    fine_tune_lr: float | None = Field(default=None, gt=0)
    """Learning rate of the fine-tuning; default `training.lr`."""


class Model(_Item):
    """A federated training job."""

    name: Name
    """Model name."""
    description: str = ""
    """What the model predicts."""
    purpose: str = ""
    """Purpose the model serves; checked against contract purposes by policies."""
    inputs: Inputs
    """Contract, features and target."""
    task: Literal["classification", "binary", "regression"] | None = None
    """What the model predicts: `classification` (a category target), `binary` (a category target of
    exactly 2 values; the second is the positive class), `regression` (an int or float target).
    Default: regression for a numeric target, else classification."""
    loss: Literal["cross_entropy", "bce", "mse", "mae", "huber"] | None = None
    """Training loss; default cross_entropy (classification), bce (binary), mse (regression)."""
    huber_delta: float | None = Field(default=None, gt=0)
    """`loss: huber`: where the loss turns from quadratic to linear (default 1.0)."""
    participants: Literal["all"] | list[str] = "all"
    """`all` domains that publish under the contract, or a list of domain names."""
    architecture: Architecture = Architecture()
    """The network."""
    training: Training = Training()
    """Local training and rounds."""
    aggregation: Aggregation = Aggregation()
    """How updates are combined."""
    privacy: Privacy = Privacy()
    """Protections of updates."""
    compression: Compression | None = None
    """Compression of updates on the wire (fp16, int8, topk); default none: float32."""
    evaluation: Evaluation = Evaluation()
    """Evaluation of the global model."""
    personalization: Personalization | None = None
    """Per-domain personal models: local layers and/or local fine-tuning."""
    quorum: int | None = Field(default=None, ge=1)
    """Participants a round needs; default all participants (with `sampling`: the whole sample)."""
    sampling: Sampling | None = None
    """Client sampling: train a seeded sample of the participants each round (default: all)."""
    round_timeout_s: float = Field(default=300.0, gt=0)
    """Per-round deadline in seconds."""


class SplitBottom(_Spec):
    """The bottom model of one part: it runs in the part's domain on that domain's columns."""

    kind: Literal["mlp"] = "mlp"
    """Built-in family: `mlp` (Linear/ReLU layers; the last layer has no ReLU)."""
    hidden: list[int] = Field(default_factory=lambda: [16])
    """Hidden layer widths."""
    out: int = Field(default=8, ge=1)
    """Width of the activations the part sends per row (its cut layer). With `entrypoint` it is
    learned from the module (the factory gets `output_dim=None`); if given, it must agree (MESH576)."""
    entrypoint: str | None = None
    """`pkg.module:factory` of a custom bottom model: `factory([n_features], output_dim, **args)`,
    imported with the mesh.yaml's directory first on sys.path; its code is pinned in the plan."""
    args: dict[str, ModelArg] = Field(default_factory=dict)
    """Keyword arguments of the entrypoint factory (JSON scalars and lists)."""

    _positive = field_validator("hidden")(staticmethod(_positive_widths))


class SplitPart(_Spec):
    """One domain's share of a split model: its product, its columns and its bottom model."""

    product: str
    """`<domain>.<product>` holding this part's columns."""
    key: str | None = None
    """The entity key column in this product (default: the split model's `key`); it may be a PII
    column: it is blinded for the private set intersection and never leaves the domain in clear."""
    features: list[str] = Field(default_factory=list)
    """Numeric (int, float, bool) and category columns (one-hot over their values) of the product this
    part's bottom model reads. Only the
    label owner's part may read none, and only with `top: {at: coordinator}` (it then holds the label)."""
    bottom: SplitBottom = SplitBottom()
    """The bottom model, trained in the domain; it never leaves it."""


class SplitLabel(_Spec):
    """Which product (of one of the parts) holds the label."""

    product: str
    """`<domain>.<product>`: one of the parts' products; its domain runs the top model and the loss."""
    column: str
    """A category column with declared values (one class each), or an int or float column (a regression)."""


class SplitTop(_Spec):
    """The top model, run by the label owner (or the coordinator) on the concatenated activations of all parts."""

    at: str = "label_owner"
    """Who runs the top model: `label_owner` (default: the label owner runs it and the loss) or
    `coordinator` (it runs the top model; the label owner runs only the loss and returns the gradient
    of the logits, which reveals the labels to the coordinator: warning MESH580). Other values: MESH578."""
    kind: Literal["mlp"] = "mlp"
    """Built-in family: `mlp`."""
    hidden: list[int] = Field(default_factory=list)
    """Hidden layer widths ([] : one Linear layer)."""
    entrypoint: str | None = None
    """`pkg.module:factory` of a custom top model: `factory([sum of the parts' widths], n_classes, **args)`;
    its code is pinned in the plan."""
    args: dict[str, ModelArg] = Field(default_factory=dict)
    """Keyword arguments of the entrypoint factory (JSON scalars and lists)."""

    _positive = field_validator("hidden")(staticmethod(_positive_widths))


class SplitActivations(_Spec):
    """Protection of the activations a part sends."""

    clip: float | None = Field(default=None, ge=0)
    """L2 bound of each row's activation vector (rows above it are scaled down to it); 0 is off."""
    noise: float | None = Field(default=None, ge=0)
    """Standard deviation of Gaussian noise added to every activation before it leaves the domain; 0 is off."""


class SplitTraining(_Spec):
    """Training of a split model: epochs over the agreed rows, in seeded batches."""

    epochs: int = Field(default=10, ge=1)
    """Passes over the aligned training rows."""
    batch_size: int = Field(default=32, ge=1)
    """Rows per batch."""
    optimizer: Literal["sgd", "adam"] = "adam"
    """Optimizer of every bottom model and of the top model."""
    lr: float = Field(default=0.01, gt=0)
    """Learning rate."""
    seed: int = 0
    """Seed of initialisation, of the batch order and of the holdout split."""
    standardize: bool = True
    """Standardize each part's features with its domain's own statistics of the training rows."""


class SplitEvaluation(_Spec):
    """Evaluation of a split model on an aligned holdout after each epoch."""

    holdout: float = Field(default=0.2, gt=0, lt=1)
    """Share of the agreed rows held out (a seeded split of the agreed order)."""
    metrics: list[Literal["loss", "accuracy", "mae", "rmse", "r2"]] | None = None
    """Metrics reported each epoch (default: loss and accuracy; loss, mae, rmse and r2 for a
    numeric label, a regression)."""


class SplitModel(_Item):
    """A split-learning job: domains holding different columns of the same entities train one network
    together; each runs its bottom model locally and only activations and gradients cross."""

    name: Name
    """Model name."""
    description: str = ""
    """What the model predicts."""
    purpose: str = ""
    """Purpose the model serves."""
    key: str | None = None
    """The entity key column shared by every part (a part's own `key` overrides it)."""
    parts: list[SplitPart] = Field(min_length=2)
    """One part per domain, at least two."""
    label: SplitLabel
    """The label column and the product (of a part) that holds it."""
    loss: Literal["cross_entropy", "mse", "mae", "huber"] | None = None
    """Training loss, as a model's `loss`: cross_entropy (a category label), mse (default), mae or
    huber (an int or float label: a regression)."""
    huber_delta: float | None = Field(default=None, gt=0)
    """`loss: huber`: where the loss turns from quadratic to linear (default 1.0)."""
    top: SplitTop = SplitTop()
    """The top model."""
    activations: SplitActivations = SplitActivations()
    """Clipping and noise of the activations the parts send."""
    min_intersection: int = Field(default=1, ge=1)
    """Fewest entities the parts must share; fewer fail the job after the intersection."""
    training: SplitTraining = SplitTraining()
    """Epochs, batches, optimizer."""
    evaluation: SplitEvaluation = SplitEvaluation()
    """Holdout and metrics."""
    round_timeout_s: float = Field(default=300.0, gt=0)
    """Deadline of each step (an intersection stage, a batch) in seconds."""


AggregateFn = Literal["count", "sum", "mean", "variance", "histogram", "quantile"]
_METRIC_CALL = re.compile(r"^\s*([a-z]+)\s*(?:\(\s*([A-Za-z_][\w]*)\s*(?:,\s*([^)]*))?\))?\s*$")


def _split_args(text: str) -> list[str]:
    """Split `age, bins: 10, range: [0, 120]` at commas outside brackets."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    out.append(text[start:].strip())
    return [a for a in out if a]


class AnalysisMetric(_Spec):
    """One aggregate of an analysis. Written as `count`, `mean(age)`,
    `quantile(age, 0.5)`, or as a mapping such as
    `{fn: histogram, column: age, bins: 10, range: [0, 120]}`."""

    fn: AggregateFn
    """count | sum | mean | variance | histogram | quantile"""
    column: str | None = None
    """Column aggregated; absent only for count."""
    bins: int = Field(default=10, ge=1, le=1000)
    """Histogram bins (histogram, and quantile which is read off a histogram)."""
    range: list[float] | None = Field(default=None, min_length=2, max_length=2)
    """[low, high] of histogram bins; default the column's declared range."""
    q: list[float] = Field(default_factory=list)
    """Quantiles in (0, 1) of a quantile metric."""

    @model_validator(mode="before")
    @classmethod
    def _from_call(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        m = _METRIC_CALL.match(value)
        if not m:
            raise ValueError(f"{value!r} is not an aggregate such as count or mean(age)")
        fn, column, rest = m.groups()
        out: dict[str, Any] = {"fn": fn}
        if column:
            out["column"] = column
        if rest:
            for arg in _split_args(rest):
                key, sep, val = arg.partition(":") if ":" in arg else arg.partition("=")
                if not sep:  # positional: quantiles for quantile, bins for histogram
                    if fn == "quantile":
                        out.setdefault("q", []).append(arg)
                    elif fn == "histogram" and "bins" not in out:
                        out["bins"] = arg
                    else:
                        raise ValueError(f"unexpected argument {arg!r} in {value!r}")
                    continue
                key, val = key.strip(), val.strip()
                if key not in ("bins", "range", "q") or fn not in ("histogram", "quantile"):
                    raise ValueError(f"{fn} takes no argument {key!r}: {value!r}")
                if key == "bins":
                    out["bins"] = val
                else:
                    items = [v.strip() for v in val.strip("[]").split(",") if v.strip()]
                    out[key] = items
        if fn not in ("histogram", "quantile") and rest:
            raise ValueError(f"{fn} takes one column: {value!r}")
        return out

    @field_validator("q")
    @classmethod
    def _quantiles(cls, q: list[float]) -> list[float]:
        if any(not 0 < x < 1 for x in q):
            raise ValueError("quantiles must lie strictly between 0 and 1")
        return q

    @model_validator(mode="after")
    def _needs_column(self) -> AnalysisMetric:
        if self.fn != "count" and not self.column:
            raise ValueError(f"{self.fn} needs a column, e.g. {self.fn}(age)")
        if self.fn == "quantile" and not self.q:
            raise ValueError("quantile needs at least one q, e.g. quantile(age, 0.5)")
        return self

    @property
    def label(self) -> str:
        """Canonical name, e.g. `mean(age)`."""
        if self.fn == "count":
            return "count"
        if self.fn == "quantile":
            return f"quantile({self.column}, {', '.join(format(x, 'g') for x in self.q)})"
        return f"{self.fn}({self.column})"


class AnalysisInputs(_Spec):
    """What an analysis reads."""

    contract: str
    """Contract name, optionally `name@major`."""


class AnalysisPrivacy(_Spec):
    """Differential privacy of an analysis' aggregates."""

    dp: DifferentialPrivacy | None = None
    """Laplace/Gaussian noise on each domain's aggregates; `clip` bounds a row's value."""


class Analysis(_Item):
    """A federated analysis: declared aggregates, never rows."""

    name: Name
    """Analysis name."""
    description: str = ""
    """What the analysis answers."""
    purpose: str = ""
    """Purpose the analysis serves."""
    inputs: AnalysisInputs
    """Contract read."""
    participants: Literal["all"] | list[str] = "all"
    """`all` domains that publish under the contract, or a list of domain names."""
    group_by: list[str] = Field(default_factory=list)
    """Category columns to group by."""
    metrics: list[AnalysisMetric] = Field(min_length=1)
    """Aggregates computed per group."""
    min_group_size: int = Field(default=10, ge=1)
    """Groups with fewer rows (in a domain) are suppressed."""
    privacy: AnalysisPrivacy = AnalysisPrivacy()
    """Optional DP noise."""


class Grant(_Item):
    """Permission for one model or analysis to read one product, for a purpose,
    until a date. Merging a grant into main is its approval."""

    product: str
    """`<domain>.<name>` of the product."""
    model: Name | None = None
    """Model granted access (exactly one of model and analysis)."""
    analysis: Name | None = None
    """Analysis granted access (exactly one of model and analysis)."""
    purpose: str
    """Purpose the access serves; must be the model's or analysis' purpose."""
    until: date | None = None
    """Last day the grant is valid (checked by the runtime; absent means no expiry)."""
    requested_by: str = ""
    """Who asked for access."""
    reason: str = ""
    """Why access is needed."""

    @model_validator(mode="after")
    def _one_subject(self) -> Grant:
        if (self.model is None) == (self.analysis is None):
            raise ValueError("a grant names exactly one of `model` or `analysis`")
        return self

    @property
    def subject(self) -> str:
        """`model:NAME` or `analysis:NAME`."""
        return f"model:{self.model}" if self.model else f"analysis:{self.analysis}"


SECTIONS: dict[str, type[_Item]] = {
    "domains": Domain, "products": Product, "contracts": Contract,
    "policies": Policy, "models": Model, "analyses": Analysis, "grants": Grant,
    "split_models": SplitModel,
}
"""Top-level list sections and their item types, in checking order."""


class MeshSpec(_Spec):
    """A whole mesh.yaml."""

    api_version: Literal["meshctl/v1"] = Field(alias="apiVersion")
    """Language version: meshctl/v1."""
    mesh: MeshHeader
    """The mesh's name and coordinator."""
    include: list[str] = Field(default_factory=list)
    """Files or globs, relative to mesh.yaml's directory, holding domains, products and
    contracts (each domain team owns its file)."""
    domains: list[Domain] = Field(default_factory=list)
    """Who owns data."""
    products: list[Product] = Field(default_factory=list)
    """Data products."""
    contracts: list[Contract] = Field(default_factory=list)
    """Data contracts."""
    policies: list[Policy] = Field(default_factory=list)
    """Global policies."""
    models: list[Model] = Field(default_factory=list)
    """Federated models."""
    analyses: list[Analysis] = Field(default_factory=list)
    """Federated analyses."""
    grants: list[Grant] = Field(default_factory=list)
    """Access grants to `access: request` products."""
    split_models: list[SplitModel] = Field(default_factory=list)
    """Split-learning models over products that hold different columns of the same entities."""
