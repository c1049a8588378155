"""Baselines, scored by the same ``evaluate`` as the search so the comparison is like for like.

* ``uniform-{b}bit-r{r}``: the same bits and rank everywhere (QLoRA-style), taken
  as they are (not repaired): they are reference points, their memory is reported;
* ``uniform-best``: what a careful engineer tries by hand: for each bit-width the largest
  uniform rank that fits the budget, the best of those on validation (mean over the seeds
  they share);
* ``sequential``: the two-step recipe the method argues against: bits first, by
  quantization error per byte under the budget (with a uniform rank reserved), then
  one uniform rank raised as far as the rest allows;
* ``random``: random configurations, repaired like the search's, given the search's fine-tuning
  compute (``protocol.equal_compute_count``); the best on validation is reported;
* ``fp-lora``: unquantized weights (16 bits) with rank-16 LoRA, the quality ceiling.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from .evaluation import EvaluateMany, Evaluation, evaluate_new
from .fidelity import Ladder
from .feasibility import random_repaired, repair
from .problem import Cost, Problem
from .protocol import equal_compute_count
from .racing import mean_loss, standings, summary, table
from .space import QUANTIZED_BITS, UNQUANTIZED, Config, SearchSpace


@dataclass(frozen=True)
class BaselineSettings:
    """Which baselines run (the only defaults: the settings file's schema and ``autoqra estimate`` take them from
    here): the uniform recipes' bit-widths, the LoRA rank of every fixed recipe (uniform, sequential, fp-lora)
    and how many random configurations random search fine-tunes."""

    uniform_bits: tuple[int, ...] = QUANTIZED_BITS
    rank: int = 16
    n_random: int | None = None  # None: as many top-rung fine-tunes as the search's compute pays for

    def random_count(self, tokens: int, ladder: Ladder) -> int:
        """``n_random``, or as many top-rung fine-tunes as ``tokens`` (the search's fine-tuning) pay for."""
        return self.n_random or equal_compute_count(tokens, ladder)

    @property
    def fixed(self) -> int:
        """Fine-tunes of the recipes that are one configuration each: every uniform bit-width, sequential and fp-lora
        (uniform-best's candidates, one per bit-width that fits, come on top)."""
        return len(self.uniform_bits) + 2

    @property
    def methods(self) -> int:
        """Baselines reported: every uniform bit-width, uniform-best, sequential, random and fp-lora."""
        return len(self.uniform_bits) + 4


DEFAULTS = BaselineSettings()
REFERENCE = (4, DEFAULTS.rank)  # uniform 4-bit QLoRA at the baselines' rank: the recipe the search has to beat


def uniform_name(bits: int, rank: int) -> str:
    return f"uniform-{bits}bit-r{rank}"


def uniform_best_candidates(space: SearchSpace, cost: Cost, budget: int) -> dict[str, Config]:
    """For each bit-width of the space, the uniform recipe at the largest rank level that fits (none if none fits)."""
    out = {}
    for b in space.bits:
        r = next((r for r in reversed(space.ranks) if cost(space.uniform(b, r)) <= budget), None)
        if r is not None:
            out[uniform_name(b, r)] = space.uniform(b, r)
    return out


def uniform_best(candidates: dict[str, Config], history: Sequence[Evaluation], rung: int,
                 seeds: Sequence[int]) -> Evaluation | None:
    """The best candidate on validation: the lowest mean over the seeds every finished candidate was run on."""
    tab = table(history, rung, seeds)
    runs = [tab[c.key()] for c in candidates.values() if c.key() in tab]
    if not runs:
        return None
    shared = [s for s in seeds if all(s in r for r in runs)] or [seeds[0]]
    ranked = [r for r in runs if all(s in r for s in shared)]
    best = min(ranked, key=lambda r: (mean_loss(r, shared), next(iter(r.values())).config.key()))
    return summary([best[s] for s in shared])


def uniform_configs(space: SearchSpace, bits: Sequence[int] = DEFAULTS.uniform_bits,
                    rank: int = DEFAULTS.rank) -> dict[str, Config]:
    return {uniform_name(b, rank): space.uniform(b, rank) for b in bits}


def fp_lora(space: SearchSpace, rank: int = DEFAULTS.rank) -> Config:
    return space.uniform(UNQUANTIZED, rank)


def sequential(p: Problem, rank: int = DEFAULTS.rank) -> Config:
    """Bits by quantization error under the budget (rank ``rank`` reserved), then one uniform rank filling the rest.

    The rank is the largest level <= ``rank`` that fits at the fewest bits. Bits: greedy one-level
    upgrades, the largest drop in ``priors.damage`` per byte first, while they fit. Rank: raised
    one level at a time on every layer while the whole config fits.
    """
    space, priors, cost, budget = p.space, p.priors, p.cost, p.budget
    ranks = [r for r in space.ranks if r <= rank] or [space.ranks[0]]
    r = next((r for r in reversed(ranks) if cost(space.uniform(space.bits[0], r)) <= budget), None)
    if r is None:
        # Nothing fits even at the smallest rank: repair raises the BudgetError that says so.
        return repair(space.uniform(space.bits[0], space.ranks[0]), p)
    config = space.uniform(space.bits[0], r)
    current = cost(config)
    while True:
        best = None
        for l, b in enumerate(config.bits):
            i = space.bits.index(b)
            if i + 1 == len(space.bits):
                continue
            up = config.replace(l, bits=space.bits[i + 1])
            c = cost(up)
            if c > budget:
                continue
            gain = priors.damage(l, b) - priors.damage(l, space.bits[i + 1])
            ratio = gain / max(c - current, 1)
            if best is None or ratio > best[0]:
                best = (ratio, up, c)
        if best is None:
            break
        _, config, current = best
    for higher in space.ranks[space.ranks.index(r) + 1 :]:
        up = space.config(config.bits, [higher] * len(space))
        if cost(up) > budget:
            break
        config = up
    return config


def random_search(p: Problem, n: int, rng: random.Random) -> list[Config]:
    """``n`` distinct feasible random configurations (repaired like the search's candidates)."""
    return random_repaired(lambda: p.space.random(rng), n, p)


def baseline_configs(p: Problem, settings: BaselineSettings, seed: int = 0) -> dict[str, list[Config]]:
    """Every baseline's configurations by name (one each, ``settings.n_random`` for "random": a count, which
    the caller resolves with ``random_count``)."""
    if settings.n_random is None:
        raise ValueError("baseline_configs needs a count of random configurations: BaselineSettings.random_count")
    out = {name: [c] for name, c in uniform_configs(p.space, settings.uniform_bits, settings.rank).items()}
    out["uniform-best"] = list(uniform_best_candidates(p.space, p.cost, p.budget).values())
    out["sequential"] = [sequential(p, settings.rank)]
    # Its own stream: with random.Random(seed) it would redraw the search's random initial individuals.
    out["random"] = random_search(p, settings.n_random, random.Random(f"random-baseline-{seed}"))
    out["fp-lora"] = [fp_lora(p.space, settings.rank)]
    return out


def run_baselines(
    p: Problem,
    evaluate_many: EvaluateMany,
    rung: int,
    settings: BaselineSettings,
    *,
    seed: int = 0,
    history: Sequence[Evaluation] = (),
    seeds: Sequence[int] = (0,),
) -> dict[str, Evaluation]:
    """Evaluate every baseline at ``rung`` on ``seeds[0]`` in one batch; per name its evaluation (random: its best
    single draw; uniform-best: ``uniform_best``), a mean over seeds where the history holds replicates of it
    (e.g. the search raced uniform-4bit-r16).

    Requests already in ``history`` (e.g. the search's) are reused, not re-run.
    """
    configs = baseline_configs(p, settings, seed)
    requests = [(c, rung, seeds[0]) for cs in configs.values() for c in cs]
    known = list(history)
    known += evaluate_new(requests, known, evaluate_many)
    tab = table(known, rung, seeds)
    measured = {e.config.key(): e for e in standings(known, rung, seeds)}  # means over each config's seeds

    out = {}
    for name, cs in configs.items():
        if name == "uniform-best":
            best = uniform_best({c.key(): c for c in cs}, known, rung, seeds)
            if best is not None:
                out[name] = best
            continue
        if name == "random":  # one draw each: what random search selects, with its winner's curse
            evals = [tab[c.key()][seeds[0]] for c in cs]
        else:
            evals = [measured[c.key()] for c in cs]
        ok = [e for e in evals if e.ok]
        out[name] = min(ok, key=lambda e: e.eval_loss) if ok else evals[0]
    return out
