"""The memory plan of a model before any weight is read: a configuration's breakdown, the uniform
baselines, the smallest configuration, and which of them fit a budget (``autoqra estimate``).

It is the search's own cost (``memory.memory`` on the same ``ModelShape`` and ``MemorySettings``),
only the shape comes from the model's config on the meta device (``model.load_skeleton``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .baselines import BaselineSettings, uniform_name
from .memory import MemoryBreakdown, MemorySettings, ModelShape, budget_bytes, memory
from .space import Config, SearchSpace


@dataclass(frozen=True)
class Plan:
    settings: MemorySettings
    config: Config | None
    breakdown: MemoryBreakdown | None
    baselines: dict[str, MemoryBreakdown]  # "uniform-4bit-r16" -> breakdown
    smallest: tuple[str, MemoryBreakdown]
    budget_bytes: int | None

    def fits(self, b: MemoryBreakdown) -> bool | None:
        return None if self.budget_bytes is None else b.total <= self.budget_bytes

    def to_dict(self) -> dict:
        def row(b: MemoryBreakdown) -> dict:
            return b.to_dict() | {"fits": self.fits(b)}

        return {
            "settings": self.settings.__dict__,
            "budget_bytes": self.budget_bytes,
            "config": None if self.config is None else {"config": self.config.to_dict(), **row(self.breakdown)},
            "baselines": {k: row(v) for k, v in self.baselines.items()},
            "smallest": {"name": self.smallest[0], **row(self.smallest[1])},
        }


def plan(shape: ModelShape, space: SearchSpace, s: MemorySettings, config: Config | None = None,
         budget: str | None = None) -> Plan:
    """Breakdowns of ``config`` (validated against ``space``), of the uniform baselines' recipe (the baselines' rank,
    or the space's largest without it) at each of the space's bit-widths and of the smallest configuration (fewest
    bits, smallest rank), with the budget in bytes when one is given."""
    if config is not None:
        space.validate(config)
    rank = BaselineSettings().rank
    rank = rank if rank in space.ranks else max(space.ranks)
    base = {uniform_name(b, rank): memory(space.uniform(b, rank), shape, s) for b in space.bits}
    small = uniform_name(space.bits[0], space.ranks[0])
    return Plan(s, config, None if config is None else memory(config, shape, s), base,
                (small, memory(space.uniform(space.bits[0], space.ranks[0]), shape, s)),
                None if budget is None else budget_bytes(budget, space, shape, s))
