"""The old path of the aggregation strategies, kept for imports written against it.

They live in meshctl.runtime.coordinator.strategy (see docs/reliability.md, "The
coordinator in rooms"); `make_strategy(agg)` makes a job's strategy.
"""

from meshctl.runtime.coordinator.strategy import STRATEGIES, Strategy, make_strategy

__all__ = ["STRATEGIES", "Strategy", "make_strategy"]
