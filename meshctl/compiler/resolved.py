"""What resolving references produces, and the lookups analyses.py and grants.py resolve through.

resolve.py's `Resolver` implements `References`; analyses.py and grants.py take one, so
they depend on this module and not on resolve.py (which runs them): no import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from meshctl.compiler.diagnostics import Reporter, YamlPath
from meshctl.compiler.plan import PlanFeature
from meshctl.compiler.spec import (
    Analysis,
    AnalysisMetric,
    Column,
    Contract,
    Grant,
    MeshSpec,
    Model,
    Product,
)


@dataclass
class ResolvedModel:
    """A model whose references all resolved."""

    model: Model
    contract: Contract
    participants: list[str]
    products: list[Product]
    """One product per participant, in participant order."""
    features: list[str]
    target: Column
    evaluation: Product | None = None
    """The held-out evaluation product (`evaluation.product`), once checked (meshctl.compiler.evalproduct)."""
    evaluation_contract: Contract | None = None
    """The contract the evaluation product is published under, if any."""
    task: str = "classification"
    """classification, binary or regression: declared, or derived from the target's type."""
    network: Any = None
    """The model's `entrypoint.Network` (architecture, tensors, parameters), once computed."""
    inputs: list[PlanFeature] | None = None
    """Each feature's kind and slots (resolve.py); None when all are numeric."""
    input_shape: list[int] | None = None
    """One row's input shape as the model sees it; None when all features are numeric."""

    @property
    def input_width(self) -> int:
        """D: the float slots one row's features fill."""
        return sum(f.width for f in self.inputs) if self.inputs else len(self.features)


@dataclass
class ResolvedAnalysis:
    """An analysis whose references all resolved."""

    analysis: Analysis
    contract: Contract
    participants: list[str]
    products: list[Product]
    """One product per participant, in participant order."""
    group_by: list[Column]
    metrics: list[tuple[AnalysisMetric, Column | None]]
    """Each metric with its contract column (None for count)."""


@dataclass
class Resolution:
    """What the references resolved to."""

    contracts: dict[int, Contract] = field(default_factory=dict)
    """Resolved contract of each product, by id() of the product."""
    models: list[ResolvedModel] = field(default_factory=list)
    analyses: list[ResolvedAnalysis] = field(default_factory=list)
    grants: dict[tuple[str, str], Grant] = field(default_factory=dict)
    """Grants by (product id, subject), subject being `model:NAME` or `analysis:NAME`."""
    used_grants: dict[str, list[str]] = field(default_factory=dict)
    """Ids of the grants each subject (`model:NAME`, `analysis:NAME`) reads under."""
    kept: Any = field(default=None, compare=False, repr=False)
    """A compile server's parse.ItemMemo, for what later stages make from the same objects again
    (the policies' model variables); None in process."""


class References(Protocol):
    """The part of the Resolver that analyses and grants use: the spec, the report, the lookups."""

    spec: MeshSpec
    broken: dict[str, set[str]]
    invalid: dict[str, int]
    report: Reporter
    result: Resolution
    incomplete: bool

    def contract(self, ref: str, path: YamlPath, what: str) -> Contract | None: ...
    def publishers(self, contract: Contract) -> dict[str, list[Product]]: ...
    def column(self, contract: Contract, name: str) -> Column | None: ...
    def pii(self, name: str, contract: Contract) -> str | None: ...
    def products_have(self, products: list[Product], contract: Contract, columns: list[str],
                      what: str, path: YamlPath) -> bool: ...
    def participants(self, item: Model | Analysis, kind: str, ref: str,
                     publishers: dict[str, list[Product]]) -> list[str]: ...
    def unknown_column(self, name: str, contract: Contract, at: YamlPath, what: str,
                       code: str = "MESH305") -> None: ...
