"""Stage 1: global multi-fidelity evolutionary search (DEAP).

One generation (``step``):
1. variation: tournament-selected parents, layer-wise uniform crossover (a layer's
   (bits, rank) pair travels together), then a one-level mutation of bits or rank on
   one layer drawn with probability biased by the priors (half the time paired with the
   opposite step elsewhere: a memory transfer); repair after each child;
2. screening: ``offspring_multiplier`` times more children than will be evaluated
   are generated; the surrogate keeps those with the lowest LCB;
3. multi-fidelity: new children are evaluated at rung 0; then, rung by rung, the
   best ``promote_fraction`` of everything seen at that rung is promoted one rung up
   (asynchronous successive halving: the pool grows each generation, so a good
   child of an early generation can still be promoted later);
4. intensification: every configuration new at the top rung is raced against the
   incumbent on further seeds (``racing``);
5. selection (mu + lambda): elites by score, then tournaments without replacement
   over the population, the children and everything that reached the top rung, configs
   deduplicated by key. A config's score is its loss at the highest rung it reached (the
   mean over its seeds at the top), shifted to the top rung by the surrogate's rung offsets.

The first ``step`` builds the initial population instead of varying: prior-derived
configs (memory split between bits and rank in several proportions, sensitive layers
first) plus random ones, all repaired. It also starts at full fidelity: the references
(uniform-4bit-r16 where it fits, the best prior-derived config, and for each bit-width
the largest uniform rank that fits) run at the top rung and are raced, so an incumbent at
least as good as every reference exists after the first generation (Hyperband's
full-fidelity bracket plays the same role).

Random draws and mutations reach a (layer, bits) pair whose measured damage is
catastrophic (``Priors.catastrophic``) only with probability ``catastrophic_prob``.

No (config, rung, seed) is evaluated twice. The state is plain data (JSON-able
with ``to_dict``) and checkpointed after every generation.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import zip_longest
from typing import Callable, Iterator, Sequence

from deap import base, creator, tools

from .baselines import REFERENCE, uniform_best_candidates
from .evaluation import EvaluateMany, Evaluation, evaluate_new
from .feasibility import fill, minimal, random_repaired, repair
from .fidelity import Ladder
from .priors import Priors
from .problem import Problem
from .protocol import race_seeds
from .racing import RaceSettings, incumbent, intensify
from .settings import bounded
from .space import Config, SearchSpace
from .surrogate import Surrogate, corrected_losses, screen

# --- settings and state --------------------------------------------------------------------


@dataclass(frozen=True)
class EvolutionSettings:
    """Stage 1's settings. These defaults are the only ones: the settings file's schema takes them from here."""

    population_size: int = bounded(10, ge=2)  # with the budget in fine-tunes: how stage 1 spends it, not how much
    offspring: int = bounded(6, ge=1)  # children evaluated (at rung 0) per generation
    offspring_multiplier: int = bounded(4, ge=1)  # children generated per evaluated one; the surrogate keeps the best
    crossover_prob: float = bounded(0.7, ge=0, le=1)
    transfer_prob: float = bounded(0.5, ge=0, le=1)  # share of mutations that also take a level from another layer
    tournament_size: int = bounded(3, ge=1)
    elite: int = bounded(2, ge=0)
    prior_fraction: float = bounded(0.5, ge=0, le=1)  # share of the initial population from the priors (0: none)
    kappa: float = bounded(1.0, ge=0)  # LCB = mean - kappa * std when screening
    surrogate_min_points: int = bounded(5, ge=2)
    full_fidelity_start: bool = True  # generation 0 also runs the references at the top rung
    catastrophic_ratio: float = bounded(1.0, gt=0)  # see ``Priors.catastrophic``
    catastrophic_prob: float = bounded(0.1, ge=0, le=1)  # chance a random draw or a mutation lands on such a pair


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng(state: list) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


@dataclass
class EvolutionState:
    """Everything needed to continue stage 1 exactly where it stopped."""

    population: list[Config]
    history: list[Evaluation]
    generation: int
    rng: list  # random.Random state as JSON-able data
    seed: int

    @classmethod
    def new(cls, seed: int) -> "EvolutionState":
        return cls([], [], 0, _rng_state(random.Random(seed)), seed)

    def to_dict(self) -> dict:
        return {
            "population": [c.to_dict() for c in self.population],
            "history": [e.to_dict() for e in self.history],
            "generation": self.generation,
            "rng": self.rng,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "EvolutionState":
        return cls(
            [Config.from_dict(c) for c in d["population"]],
            [Evaluation.from_dict(e) for e in d["history"]],
            int(d["generation"]),
            d["rng"],
            int(d["seed"]),
        )


# --- DEAP plumbing -------------------------------------------------------------------------


def _classes() -> type:
    """DEAP's creator is global: create our classes once, under names no one else uses."""
    if not hasattr(creator, "AutoQRAFitness"):
        creator.create("AutoQRAFitness", base.Fitness, weights=(-1.0,))
    if not hasattr(creator, "AutoQRAIndividual"):
        creator.create("AutoQRAIndividual", list, fitness=creator.AutoQRAFitness, touched=())
    return creator.AutoQRAIndividual


def individual(config: Config, score: float | None = None):
    """A DEAP individual: one (bits, rank) pair per layer, so crossover keeps pairs together."""
    ind = _classes()(zip(config.bits, config.ranks))
    if score is not None:
        ind.fitness.values = (score,)
    return ind


@contextmanager
def using_rng(rng: random.Random) -> Iterator[None]:
    """DEAP's tools draw from the module-level ``random``: run them on our generator's state
    (so a generation is reproducible and checkpointable) and leave the global state as it was.
    Evaluations never run inside this block."""
    saved = random.getstate()
    random.setstate(rng.getstate())
    try:
        yield
    finally:
        rng.setstate(random.getstate())
        random.setstate(saved)


def _move(ind, space: SearchSpace, layer: int, kind: str, direction: int, avoid: frozenset = frozenset(),
          prob: float = 1.0) -> bool:
    """Move one layer's bits or rank one level; False (and no change) at the end of the ladder, or (but with
    probability ``prob``) onto a (layer, bits) pair in ``avoid``."""
    bits, rank = ind[layer]
    levels, value = (space.bits, bits) if kind == "bits" else (space.ranks, rank)
    j = levels.index(value) + direction
    if not 0 <= j < len(levels):
        return False
    if kind == "bits" and (layer, levels[j]) in avoid and random.random() >= prob:
        return False
    ind[layer] = (levels[j], rank) if kind == "bits" else (bits, levels[j])
    return True


def random_config(space: SearchSpace, rng: random.Random, avoid: frozenset = frozenset(), prob: float = 1.0) -> Config:
    """Uniform levels per layer, except that a (layer, bits) pair in ``avoid`` keeps only ``prob`` of its weight."""
    bits = [rng.choices(space.bits, weights=[prob if (l, b) in avoid else 1.0 for b in space.bits])[0]
            for l in range(len(space))]
    return space.config(bits, [rng.choice(space.ranks) for _ in space.layers])


def mutate(ind, space: SearchSpace, layer_weights: Sequence[float], transfer_prob: float = 0.5,
           avoid: frozenset = frozenset(), prob: float = 1.0):
    """One level of bits or rank up or down on one layer (drawn by ``layer_weights``); with
    ``transfer_prob``, also the opposite step on another (layer, kind) drawn the same way.

    The transfer is the basic move under a budget: memory changes hands between two layers,
    or between bits and rank of one layer (low bits rescued by a higher rank). Repair then
    balances what is left without undoing the touched layers (``ind.touched``).
    """
    kinds = [k for k, levels in (("bits", space.bits), ("rank", space.ranks)) if len(levels) > 1]
    if not kinds:  # a single level of each: nothing can move
        return (ind,)
    layer = random.choices(range(len(ind)), weights=layer_weights)[0]
    kind, direction = random.choice(kinds), random.choice((-1, 1))
    if not _move(ind, space, layer, kind, direction, avoid, prob):
        direction = -direction
        _move(ind, space, layer, kind, direction, avoid, prob)
    touched = [layer]
    if random.random() < transfer_prob:
        other, other_kind = random.choices(range(len(ind)), weights=layer_weights)[0], random.choice(kinds)
        if (other, other_kind) == (layer, kind) and len(kinds) > 1:
            other_kind = kinds[1 - kinds.index(kind)]
        if (other, other_kind) != (layer, kind) and _move(ind, space, other, other_kind, -direction, avoid, prob):
            touched.append(other)
    ind.touched = tuple(touched)
    del ind.fitness.values
    return (ind,)


def make_toolbox(space: SearchSpace, priors: Priors, settings: EvolutionSettings) -> base.Toolbox:
    _classes()
    n = len(space)
    # Half uniform, half importance: sensitive layers move more often, none is frozen.
    weights = [0.5 / n + 0.5 * w for w in priors.importance()]
    toolbox = base.Toolbox()
    toolbox.register("mate", tools.cxUniform, indpb=0.5)
    toolbox.register("mutate", mutate, space=space, layer_weights=weights, transfer_prob=settings.transfer_prob,
                     avoid=priors.catastrophic(settings.catastrophic_ratio), prob=settings.catastrophic_prob)
    toolbox.register("select", tools.selTournament, tournsize=settings.tournament_size)
    return toolbox


# --- the pieces of a generation -----------------------------------------------------------


def prior_configs(p: Problem, splits: Sequence[float] = (0.5, 1.0, 0.0, 0.75, 0.25)) -> list[Config]:
    """Configs built from the priors alone: several splits of the memory between bits and rank.

    Two families, interleaved (balanced ones first, then the extremes):
    * fraction f: from the fewest bits and smallest non-zero rank, bits take the most valuable
      upgrades (sensitive layers first) up to a share f of the spare memory, ranks the rest
      (per layer, by the priors); f=1 is "all memory to bits", f=0 "all to rank";
    * uniform rank r: one rank everywhere (each level), bits by the priors in what is left,
      i.e. the "sequential" recipe at several ranks.
    Any remainder is then given back by ``fill``. Duplicates are dropped.
    """
    space, cost, budget = p.space, p.cost, p.budget
    positive = [r for r in space.ranks if r > 0] or [space.ranks[0]]
    by_fraction, by_rank = [], []
    start = space.uniform(space.bits[0], positive[0])
    if cost(start) <= budget:
        low = cost(start)
        for f in splits:
            c = fill(start, replace(p, budget=int(low + f * (budget - low))), kinds=("bits",))
            by_fraction.append(fill(c, p, kinds=("rank",)))
    mid = len(positive) // 2
    for r in positive[mid:] + positive[:mid][::-1]:  # middle rank first, then outwards
        uniform_rank = space.uniform(space.bits[0], r)
        if cost(uniform_rank) <= budget:
            by_rank.append(fill(uniform_rank, p, kinds=("bits",)))
    out: list[Config] = []
    for pair in zip_longest(by_fraction, by_rank):
        for c in pair:
            if c is not None:
                c = fill(c, p)
                if c not in out:
                    out.append(c)
    return out or [repair(minimal(space), p)]


def initial_population(p: Problem, settings: EvolutionSettings, rng: random.Random,
                       refs: Sequence[Config] = ()) -> list[Config]:
    """The population that starts at rung 0, beside ``refs`` (generation 0's references, started at the top rung,
    so the two make ``population_size``): prior-derived configs (up to ``prior_fraction`` of the population), the
    uniform recipes that fit (each bit-width at its largest rank: the candidates of uniform-best), then repaired
    random ones. A reference is never among them: its run already passed rung 0, and evaluating it there again
    would train its first steps a second time."""
    size = settings.population_size
    n_prior = max(1, round(size * settings.prior_fraction)) if settings.prior_fraction > 0 else 0
    start = prior_configs(p)[:n_prior]
    start += list(uniform_best_candidates(p.space, p.cost, p.budget).values())[:max(0, size - len(start))]
    taken, n = {c.key() for c in refs}, max(1, size - len(refs))
    start = [c for c in {c.key(): c for c in start}.values() if c.key() not in taken][:n]
    return random_repaired(_draw(p.space, p.priors, settings, rng), n, p, start=start, seen=taken)


def _draw(space: SearchSpace, priors: Priors, settings: EvolutionSettings, rng: random.Random) -> Callable[[], Config]:
    """The search's random configurations: ``random_config`` off the catastrophic pairs but with ``catastrophic_prob``."""
    avoid = priors.catastrophic(settings.catastrophic_ratio)
    return lambda: random_config(space, rng, avoid, settings.catastrophic_prob)


def references(p: Problem) -> list[Config]:
    """What generation 0 runs at the top rung, best guess first: the best prior-derived configuration and
    uniform-4bit-r16 (where it fits and is in the space), so the race has an incumbent and the recipe users pick
    by hand from the start. The other uniform recipes start at rung 0 (``initial_population``)."""
    ref = p.space.uniform(*REFERENCE)
    out = prior_configs(p)[:1]
    out += [ref] if REFERENCE[0] in p.space.bits and REFERENCE[1] in p.space.ranks and p.fits(ref) else []
    return list({c.key(): c for c in out}.values())


def vary(
    parents: list,
    toolbox: base.Toolbox,
    n: int,
    fix: Callable[[object], Config],
    seen: set[str],
    crossover_prob: float,
    rng: random.Random,
) -> list[Config]:
    """Up to ``n`` new repaired children (keys not in ``seen``), DEAP's operators drawing from ``rng``."""
    out: list[Config] = []
    with using_rng(rng):
        for _ in range(20 * n):
            if len(out) >= n:
                break
            a, b = (toolbox.clone(p) for p in toolbox.select(parents, 2))
            if random.random() < crossover_prob:
                toolbox.mate(a, b)
            for child in (a, b):
                toolbox.mutate(child)
                config = fix(child)
                if config.key() not in seen:
                    seen.add(config.key())
                    out.append(config)
    return out[:n]


def select_population(
    pool: Sequence[Config], scores: dict[str, float], size: int, elite: int, toolbox: base.Toolbox,
    rng: random.Random,
) -> list[Config]:
    """Elites by score, then tournaments without replacement (drawing from ``rng``); unique configs."""
    unique = list({c.key(): c for c in pool}.values())
    inds = [individual(c, scores.get(c.key(), math.inf)) for c in unique]
    chosen = tools.selBest(inds, min(elite, size))
    rest = [i for i in inds if all(i is not c for c in chosen)]
    with using_rng(rng):
        while len(chosen) < size and rest:
            winner = toolbox.select(rest, 1)[0]
            chosen.append(winner)
            rest = [i for i in rest if i is not winner]
    by_id = {id(i): c for i, c in zip(inds, unique)}
    return [by_id[id(i)] for i in chosen]


def promotions(history: Sequence[Evaluation], rung: int, fraction: float) -> list[Config]:
    """Configs in the best ``fraction`` of everything ok at ``rung`` that have not been run at ``rung + 1``."""
    done = {e.config.key() for e in history if e.rung == rung + 1}
    ranked = sorted((e for e in history if e.rung == rung and e.ok), key=lambda e: (e.eval_loss, e.config.key()))
    n = max(1, int(len(ranked) * fraction)) if ranked else 0
    return [e.config for e in ranked[:n] if e.config.key() not in done]


def climb(history: list[Evaluation], ladder: Ladder, evaluate_many: EvaluateMany, seed: int = 0) -> list[Evaluation]:
    """Successive halving: promote rung by rung (one batch per rung, training seed ``seed``); returns the new
    evaluations."""
    new: list[Evaluation] = []
    for rung in range(ladder.top):
        batch = [(c, rung + 1, seed) for c in promotions(history + new, rung, ladder.promote_fraction)]
        new += evaluate_new(batch, history + new, evaluate_many)
    return new


def step(
    state: EvolutionState,
    p: Problem,
    evaluate_many: EvaluateMany,
    ladder: Ladder,
    settings: EvolutionSettings = EvolutionSettings(),
    race: RaceSettings = RaceSettings(),
) -> EvolutionState:
    """One generation: its children (the first generation: the initial population, and the references at the
    top rung), their fine-tunes (``evaluate_generation``), then the next population. Returns a new state."""
    rng = _rng(state.rng)
    toolbox = make_toolbox(p.space, p.priors, settings)
    refs: list[Config] = []
    if not state.population:
        refs = references(p) if settings.full_fidelity_start and ladder.top > 0 else []
        children = initial_population(p, settings, rng, refs)
    else:
        children = offspring(state, p, toolbox, ladder, settings, rng)
    seeds = race_seeds(state.seed, race.max_config_calls)
    history = evaluate_generation(list(state.history), refs, children, ladder, evaluate_many, seeds, race)
    scores = corrected_losses(history, ladder.top)
    finished = [e.config for e in history if e.rung == ladder.top]  # every top-rung config may be chosen
    population = select_population(list(state.population) + children + finished, scores, settings.population_size,
                                   settings.elite, toolbox, rng)
    return EvolutionState(population, history, state.generation + 1, _rng_state(rng), state.seed)


def offspring(state: EvolutionState, p: Problem, toolbox: base.Toolbox, ladder: Ladder,
              settings: EvolutionSettings, rng: random.Random) -> list[Config]:
    """A later generation's children: the population varied (crossover, then mutation; each child repaired with
    the layers it moved pinned), topped up at random where a converged population yields few new ones, and
    screened by the surrogate down to ``settings.offspring``."""
    history = list(state.history)
    scores = corrected_losses(history, ladder.top)
    parents = [individual(c, scores.get(c.key(), math.inf)) for c in state.population]
    seen = {e.config.key() for e in history} | {c.key() for c in state.population}

    def fix(child) -> Config:
        config = p.space.config([b for b, _ in child], [r for _, r in child])
        return repair(config, p, pinned=child.touched)

    want = settings.offspring * settings.offspring_multiplier
    children = vary(parents, toolbox, want, fix, seen, settings.crossover_prob, rng)
    children = random_repaired(_draw(p.space, p.priors, settings, rng), want, p, start=children, seen=seen)
    surrogate = Surrogate.fit(p.space, history, ladder.top, seed=state.seed + state.generation,
                              min_points=settings.surrogate_min_points)
    return screen(surrogate, children, settings.offspring, settings.kappa)


def evaluate_generation(history: list[Evaluation], refs: Sequence[Config], children: Sequence[Config],
                        ladder: Ladder, evaluate_many: EvaluateMany, seeds: Sequence[int],
                        race: RaceSettings) -> list[Evaluation]:
    """A generation's fine-tunes, appended to ``history``: the references at the top rung and the children at
    rung 0 (one batch), successive halving up the rungs, then every configuration new at the top raced against
    the incumbent on the shared seeds."""
    at_top = {e.config.key() for e in history if e.rung == ladder.top}
    history = history + evaluate_new([(c, ladder.top, seeds[0]) for c in refs] + [(c, 0, seeds[0]) for c in children],
                                     history, evaluate_many)
    history += climb(history, ladder, evaluate_many, seeds[0])
    new_at_top = list({e.config.key(): e.config for e in history
                       if e.rung == ladder.top and e.config.key() not in at_top}.values())
    return history + intensify(history, new_at_top, ladder.top, seeds, evaluate_many, race)


def finish(
    state: EvolutionState, ladder: Ladder, evaluate_many: EvaluateMany, batch: int = 2,
    race: RaceSettings = RaceSettings(),
) -> EvolutionState:
    """Make sure stage 1 ends with an ok top-rung evaluation (TuRBO needs a centre):
    if none, run the best-scored configs at the top rung, ``batch`` at a time, until one is ok."""
    history = list(state.history)
    seeds = race_seeds(state.seed, race.max_config_calls)
    scores = corrected_losses(history, ladder.top)
    at_top = {e.config.key() for e in history if e.rung == ladder.top}
    unfinished = {e.config for e in history if e.config.key() not in at_top}
    candidates = sorted(unfinished, key=lambda c: (scores[c.key()], c.key()))
    while incumbent(history, ladder.top, seeds) is None and candidates:
        todo, candidates = candidates[:batch], candidates[batch:]
        history += evaluate_new([(c, ladder.top, seeds[0]) for c in todo], history, evaluate_many)
        history += intensify(history, todo, ladder.top, seeds, evaluate_many, race)
    return EvolutionState(list(state.population), history, state.generation, state.rng, state.seed)
