"""The memory plan of a model before any weight is read: a configuration's breakdown, the uniform
baselines, the smallest configuration, and which of them fit a budget (``autoqra estimate``).

It is the search's own cost (``memory.memory_breakdown`` on the same ``ModelShape`` and ``MemorySettings``),
only the shape comes from the model's config on the meta device (``model.load_skeleton``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .baselines import BaselineSettings, uniform_name
from .formats import serving_bytes
from .memory import MemoryBreakdown, MemorySettings, ModelShape, budget_bytes, memory_breakdown
from .space import DEFAULT_BITS, DEFAULT_RANKS, Config, SearchSpace


def planning_space(names: tuple[str, ...], backend: str, config: Config | None = None) -> SearchSpace:
    """The space a plan compares in: the default bit-widths ``backend`` packs and the default ranks, with the
    levels of ``config`` (checked against the backend) added so that it lies inside."""
    from .quantize import BACKENDS, check_backend

    bits = tuple(b for b in DEFAULT_BITS if b in BACKENDS[backend][0])
    if config is None:
        return SearchSpace(names, bits, DEFAULT_RANKS)
    check_backend(backend, config.bits)
    return SearchSpace(names, tuple(sorted(set(bits) | set(config.bits))),
                       tuple(sorted(set(DEFAULT_RANKS) | set(config.ranks))))


@dataclass(frozen=True)
class Plan:
    settings: MemorySettings
    config: Config | None
    breakdown: MemoryBreakdown | None
    baselines: dict[str, MemoryBreakdown]  # "uniform-4bit-r16" -> breakdown
    smallest: tuple[str, MemoryBreakdown]
    budget_bytes: int | None
    serving: dict[str, dict[str, int]]  # row ("this config", a baseline, "smallest") -> export part -> weight bytes

    def fits(self, b: MemoryBreakdown) -> bool | None:
        return None if self.budget_bytes is None else b.total <= self.budget_bytes

    def to_dict(self) -> dict:
        def row(b: MemoryBreakdown, name: str) -> dict:
            return b.to_dict() | {"fits": self.fits(b), "serving": self.serving[name]}

        return {
            "settings": self.settings.__dict__,
            "budget_bytes": self.budget_bytes,
            "config": None if self.config is None else {"config": self.config.to_dict(),
                                                        **row(self.breakdown, "this config")},
            "baselines": {k: row(v, k) for k, v in self.baselines.items()},
            "smallest": {"name": self.smallest[0], **row(self.smallest[1], "smallest")},
        }


def plan(shape: ModelShape, space: SearchSpace, s: MemorySettings, config: Config | None = None,
         budget: str | None = None) -> Plan:
    """Breakdowns of ``config`` (validated against ``space``), of the uniform baselines' recipe (the baselines' rank,
    or the space's largest without it) at each of the space's bit-widths and of the smallest configuration (fewest
    bits, smallest rank), with the budget in bytes when one is given, and each one's serving weights per export
    part (``formats.serving_bytes``)."""
    if config is not None:
        space.validate(config)
    rank = BaselineSettings().rank
    rank = rank if rank in space.ranks else max(space.ranks)
    configs = {uniform_name(b, rank): space.uniform(b, rank) for b in space.bits}
    small = uniform_name(space.bits[0], space.ranks[0])
    smallest = space.uniform(space.bits[0], space.ranks[0])
    serving = {k: serving_bytes(c, shape, s.group_size) for k, c in
               [*configs.items(), ("smallest", smallest), *([("this config", config)] if config else [])]}
    return Plan(s, config, None if config is None else memory_breakdown(config, shape, s),
                {k: memory_breakdown(c, shape, s) for k, c in configs.items()}, (small, memory_breakdown(smallest, shape, s)),
                None if budget is None else budget_bytes(budget, space, shape, s), serving)
