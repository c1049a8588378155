"""One search problem, passed whole: the layers' choices, the priors that guide the search, what a configuration
costs in bytes and the budget it must fit. Every stage, the repair and the baselines take it as one value, as
peft's tuners take one ``LoraConfig``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .priors import Priors
from .space import Config, SearchSpace

Cost = Callable[[Config], int]  # bytes to fine-tune a configuration (``memory.total_bytes`` on the model's shape)


@dataclass(frozen=True)
class Problem:
    space: SearchSpace
    priors: Priors
    cost: Cost
    budget: int  # bytes

    def fits(self, config: Config) -> bool:
        return self.cost(config) <= self.budget
