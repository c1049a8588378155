"""Feasibility repair: make any configuration fit the memory budget, then use what is left.

Every configuration the search evaluates goes through here, so operators can
propose freely (crossover, mutation, rounding of a continuous point) and never
waste a fine-tune on something that does not fit.

One rule drives both directions: *prior harm per byte*.

* Shrink (over budget): take the one-level step down (bits or rank, any layer)
  that adds the least prior harm per byte it frees, until the config fits.
  Low-sensitivity layers have small harm, so they give first; a big layer that
  frees many bytes for a small loss of precision gives before a small one.
* Fill (spare memory): take the one-level step up that removes the most prior
  harm per byte it costs, while it still fits. Sensitive layers get it first.

Prior harm of a layer at (bits b, rank level j), on one scale:
  bits: ``priors.damage(l, b)`` = sensitivity x relative quantization error;
  rank: ``scale_l * (1 - j / top_level)``, ``scale_l`` from ``rank_scales``: the whole rank
  ladder of a layer is assumed worth about the worst quantization damage an adapter
  would have to rescue (half the layer's own, half the model's mean).
That exchange rate is only a neutral starting guess; the search learns the true one.

Memory is assumed monotone (more bits or rank never costs less) but not additive:
per-step byte deltas are cached as if layers were independent (fast ranking), and
feasibility is always checked with the true ``cost``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Sequence

from .errors import BudgetError
from .priors import Priors
from .problem import Cost, Problem
from .space import Config, SearchSpace

KINDS = ("bits", "rank")


@dataclass(frozen=True)
class Step:
    """Move one layer's bits or rank to another level (index into the space's levels)."""

    layer: int
    kind: str  # "bits" | "rank"
    level: int


def minimal(space: SearchSpace) -> Config:
    """Fewest bits and smallest rank everywhere: the cheapest configuration (memory is monotone)."""
    return space.uniform(space.bits[0], space.ranks[0])


def rank_scales(space: SearchSpace, priors: Priors) -> list[float]:
    """Per layer, the prior harm of having no adapter at all (rank ladder's bottom vs top).

    Half of it is the layer's own damage at the lowest bit-width (what an adapter there
    would have to rescue), half the mean over layers: the priors measure sensitivity to
    quantization, not where adaptation helps the task, so that half is spread evenly.
    """
    own = [priors.damage(l, space.bits[0]) for l in range(len(space))]
    mean = sum(own) / len(own)
    return [0.5 * o + 0.5 * mean or priors.importance()[l] for l, o in enumerate(own)]


def harm(space: SearchSpace, priors: Priors, layer: int, kind: str, level: int, scales: Sequence[float]) -> float:
    """Prior harm of ``layer`` having ``kind`` at ``level`` (see module docstring); ``scales``: ``rank_scales``."""
    if kind == "bits":
        return priors.damage(layer, space.bits[level])
    top = len(space.ranks) - 1
    return scales[layer] * (1.0 - level / top) if top else 0.0


def _levels(space: SearchSpace, config: Config) -> tuple[list[int], list[int]]:
    return space.to_indices(config)


def _apply(space: SearchSpace, config: Config, step: Step) -> Config:
    if step.kind == "bits":
        return config.replace(step.layer, bits=space.bits[step.level])
    return config.replace(step.layer, rank=space.ranks[step.level])


class _Mover:
    """Ranks one-level steps by harm per byte for one repair call (caches per-layer byte deltas)."""

    def __init__(self, p: Problem):
        self.space, self.priors, self.cost = p.space, p.priors, p.cost
        self.importance = p.priors.importance()
        self.scales = rank_scales(p.space, p.priors)
        self._delta: dict[tuple, int] = {}

    def bytes_delta(self, config: Config, base: int, step: Step) -> int:
        layer = config.layers[step.layer]
        key = (step, layer.bits, layer.rank)  # same layer state -> same delta, if memory is additive
        if key not in self._delta:
            self._delta[key] = self.cost(_apply(self.space, config, step)) - base
        return self._delta[key]

    def steps(
        self, config: Config, direction: int, layers: Iterable[int], kinds: Collection[str]
    ) -> list[tuple[Step, float]]:
        """One-level steps up (+1) or down (-1) on ``layers``, each with its change in prior harm."""
        bit_idx, rank_idx = _levels(self.space, config)
        out = []
        for l in layers:
            for kind, idx, n in (("bits", bit_idx, len(self.space.bits)), ("rank", rank_idx, len(self.space.ranks))):
                new = idx[l] + direction
                if kind in kinds and 0 <= new < n:
                    change = harm(self.space, self.priors, l, kind, new, self.scales) - harm(
                        self.space, self.priors, l, kind, idx[l], self.scales
                    )
                    out.append((Step(l, kind, new), change))
        return out


def shrink(config: Config, p: Problem, pinned: Collection[int] = ()) -> Config:
    """Step down, least harm per freed byte first, until ``config`` fits. Pinned layers give last.

    Raises BudgetError if even the minimal configuration does not fit.
    """
    space, cost, budget = p.space, p.cost, p.budget
    check_budget(space, cost, budget)
    space.validate(config)
    mover = _Mover(p)
    free_layers = [l for l in range(len(space)) if l not in pinned]
    current = cost(config)
    while current > budget:
        best = None
        for layers in (free_layers, list(pinned)):  # pinned layers only when nothing else can give
            for step, change in mover.steps(config, -1, layers, KINDS):
                saved = -mover.bytes_delta(config, current, step)
                if saved <= 0:
                    continue
                key = (change / saved, mover.importance[step.layer], step.layer, step.kind)
                if best is None or key < best[0]:
                    best = (key, step)
            if best is not None:
                break
        if best is None:  # unreachable when memory is monotone and the minimal config fits
            raise BudgetError(f"cannot repair {config.short()} under {budget} bytes")
        config = _apply(space, config, best[1])
        current = cost(config)
    return config


def fill(config: Config, p: Problem, kinds: Collection[str] = KINDS, pinned: Collection[int] = ()) -> Config:
    """Step up, most harm removed per byte first, while the config still fits. Pinned layers stay.

    ``config`` must already fit. Steps the prior calls harmful are never taken; steps it
    calls neutral are taken last (more memory is assumed never to hurt).
    """
    space, cost, budget = p.space, p.cost, p.budget
    mover = _Mover(p)
    layers = [l for l in range(len(space)) if l not in pinned]
    current = cost(config)
    blocked: set[tuple[Step, Config]] = set()
    while True:
        ranked = []
        for step, change in mover.steps(config, +1, layers, kinds):
            added = mover.bytes_delta(config, current, step)
            gain = -change
            if current + added > budget or gain < 0 or (step, config) in blocked:
                continue
            ratio = gain / added if added > 0 else float("inf")
            ranked.append(((-ratio, -mover.importance[step.layer], step.layer, step.kind), step))
        if not ranked:
            return config
        step = min(ranked, key=lambda item: item[0])[1]
        candidate = _apply(space, config, step)
        new_cost = cost(candidate)
        if new_cost <= budget:
            config, current = candidate, new_cost
        else:  # the additive estimate was wrong for this step; the true cost says no
            blocked.add((step, config))


def repair(config: Config, p: Problem, pinned: Collection[int] = (), give_back: bool = True) -> Config:
    """Feasible version of ``config``: shrink until it fits, then (``give_back``) fill spare memory.

    ``pinned`` layers (the ones an operator just moved) are changed only when nothing else
    can give, and get no spare memory, so the repair does not simply undo the move.
    Deterministic; raises BudgetError naming the smallest feasible bytes if nothing fits.
    """
    config = shrink(config, p, pinned)
    if give_back:
        config = fill(config, p, pinned=pinned)
    return config


def random_repaired(draw: Callable[[], Config], n: int, p: Problem, start: Sequence[Config] = (),
                    seen: Collection[str] = ()) -> list[Config]:
    """``start`` topped up to ``n`` configurations with repaired random draws (``draw()``), each new: its key
    neither in ``seen`` nor already taken. At most ``50 n`` draws, so a space with few feasible configurations
    ends short rather than never."""
    out = list(start)
    taken = set(seen) | {c.key() for c in out}
    for _ in range(50 * n):
        if len(out) >= n:
            break
        c = repair(draw(), p)
        if c.key() not in taken:
            taken.add(c.key())
            out.append(c)
    return out


def check_budget(space: SearchSpace, cost: Cost, budget: int) -> None:
    """Raise BudgetError naming the smallest feasible bytes if even the minimal config does not fit."""
    smallest = cost(minimal(space))
    if smallest > budget:
        raise BudgetError(
            f"budget of {budget} bytes is below the smallest feasible configuration "
            f"({space.bits[0]}-bit, rank {space.ranks[0]} on every layer: {smallest} bytes); "
            f"raise the budget to at least {smallest} bytes"
        )
