"""Intensification: decisions at the top rung read means over shared seeds, never one fine-tune.

A fine-tune is a noisy measurement: another training seed (data order, LoRA initialisation)
moves one configuration's validation loss about as much as the differences the search ranks,
and the minimum of several single draws is optimistic. So, as SMAC3's intensifier does, every
configuration that reaches the top rung is raced against the incumbent on the incumbent's seeds:

* the race's seeds are one shared sequence (``protocol.race_seeds``); a configuration is run on
  a prefix of it, so two configurations are always compared on the same seeds;
* the incumbent is, among the configurations run on the most seeds, the one with the lowest mean
  (a configuration with a failed top-rung fine-tune is out of the race);
* a challenger whose mean on the shared seeds is worse than the incumbent's by more than
  ``margin`` standard errors of the difference is out; otherwise it is run on more of the
  incumbent's seeds, doubling (1 -> 2 -> 4 ...), and once it has all of them the incumbent is run
  on one more, until ``max_config_calls``;
* the noise is the pooled seed-to-seed sd of the replicates so far; until they give ``min_dof``
  degrees of freedom it is unknown and every challenger counts as within it.

Replicates are ordinary evaluations in the history (charged to the search's tokens).
``max_config_calls=1`` turns intensification off: one seed per configuration, the winner a single draw.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Sequence

from .evaluation import EvaluateMany, Evaluation, Request, evaluate_new
from .settings import bounded
from .space import Config


@dataclass(frozen=True)
class RaceSettings:
    """Intensification's settings (the only defaults: the settings file's schema takes them from here)."""

    max_config_calls: int = bounded(3, ge=1, le=100)  # seeds per configuration at the top rung, at most (SMAC3's)
    margin: float = bounded(1.0, ge=0)  # a challenger is out when worse by this many standard errors of the difference
    min_dof: int = bounded(3, ge=1)  # replicate degrees of freedom before the pooled noise estimate is trusted
    noise_sd: float | None = bounded(None, gt=0)  # a known seed-to-seed sd; None: pooled from the replicates


Table = dict[str, dict[int, Evaluation]]  # config key -> {seed: evaluation} at one rung


def table(history: Sequence[Evaluation], rung: int, seeds: Sequence[int]) -> Table:
    """The race's evaluations at ``rung`` by config and seed (seeds outside the race are not counted)."""
    allowed = set(seeds)
    out: Table = {}
    for e in history:
        if e.rung == rung and e.seed in allowed:
            out.setdefault(e.config.key(), {})[e.seed] = e
    return out


def mean_loss(evals: dict[int, Evaluation], seeds: Sequence[int] | None = None) -> float:
    """Mean validation loss over ``seeds`` (default: all of them); +inf if any of them failed."""
    chosen = [evals[s] for s in (seeds if seeds is not None else evals)]
    if not chosen or not all(e.ok for e in chosen):
        return math.inf
    return statistics.fmean(e.eval_loss for e in chosen)


def pooled_sd(tab: Table, min_dof: int = 1) -> float | None:
    """Pooled seed-to-seed sd of the configurations run on several seeds; None below ``min_dof``."""
    ss, dof = 0.0, 0
    for evals in tab.values():
        losses = [e.eval_loss for e in evals.values() if e.ok]
        if len(losses) > 1:
            m = statistics.fmean(losses)
            ss += sum((x - m) ** 2 for x in losses)
            dof += len(losses) - 1
    return math.sqrt(ss / dof) if dof >= max(1, min_dof) else None


def incumbent_key(tab: Table) -> str | None:
    """Among the configurations with no failed run, those run on the most seeds; of them the lowest mean."""
    alive = {k: v for k, v in tab.items() if v and all(e.ok for e in v.values())}
    if not alive:
        return None
    most = max(len(v) for v in alive.values())
    return min((k for k, v in alive.items() if len(v) == most), key=lambda k: (mean_loss(alive[k]), k))


def summary(evals: Sequence[Evaluation]) -> Evaluation:
    """One configuration's replicates as one Evaluation: mean loss and accuracy, ``replicates`` = their number."""
    first = evals[0]
    if len(evals) == 1:
        return first
    accs = [e.accuracy for e in evals]
    return replace(first, eval_loss=statistics.fmean(e.eval_loss for e in evals),
                   accuracy=statistics.fmean(accs) if all(a is not None for a in accs) else None,
                   train_loss=None, seconds=sum(e.seconds for e in evals), replicates=len(evals))


def incumbent(history: Sequence[Evaluation], rung: int, seeds: Sequence[int]) -> Evaluation | None:
    """The race's incumbent at ``rung`` as a summary over its seeds, or None when nothing finished."""
    tab = table(history, rung, seeds)
    key = incumbent_key(tab)
    return None if key is None else summary([tab[key][s] for s in seeds if s in tab[key]])


def standings(history: Sequence[Evaluation], rung: int, seeds: Sequence[int]) -> list[Evaluation]:
    """Every configuration at ``rung`` as a summary over its seeds (failed ones as they are), in first-seen order."""
    tab = table(history, rung, seeds)
    return [summary([evals[s] for s in seeds if s in evals]) if all(e.ok for e in evals.values())
            else next(e for e in evals.values() if not e.ok) for evals in tab.values()]


def next_requests(history: Sequence[Evaluation], contenders: Sequence[Config], rung: int, seeds: Sequence[int],
                  settings: RaceSettings = RaceSettings()) -> list[Request]:
    """One round of the race: the replicates the contenders and the incumbent need next (empty: decided)."""
    tab = table(history, rung, seeds)
    inc = incumbent_key(tab)
    if inc is None:
        return []
    sd = settings.noise_sd if settings.noise_sd is not None else pooled_sd(tab, settings.min_dof)
    inc_seeds = [s for s in seeds if s in tab[inc]]
    cap = min(settings.max_config_calls, len(seeds))
    out: list[Request] = []
    raise_incumbent = False
    for c in {c.key(): c for c in contenders}.values():
        mine = tab.get(c.key())
        if c.key() == inc or not mine or not all(e.ok for e in mine.values()):
            continue
        shared = [s for s in inc_seeds if s in mine]
        if not shared:
            continue
        diff = mean_loss(mine, shared) - mean_loss(tab[inc], shared)
        if sd is not None and diff > settings.margin * sd * math.sqrt(2.0 / len(shared)):
            continue  # separated: worse than the incumbent by more than the noise
        if len(mine) < len(inc_seeds):
            out += [(c, rung, s) for s in inc_seeds[len(mine):min(2 * len(mine), len(inc_seeds))]]
        elif len(inc_seeds) < cap:
            raise_incumbent = True
    if raise_incumbent:
        out.append((next(iter(tab[inc].values())).config, rung, seeds[len(inc_seeds)]))
    return out


def intensify(history: Sequence[Evaluation], contenders: Sequence[Config], rung: int, seeds: Sequence[int],
              evaluate_many: EvaluateMany, settings: RaceSettings = RaceSettings()) -> list[Evaluation]:
    """Race ``contenders`` (and the incumbent they meet) until each is separated or at the cap; returns the
    replicates run. Each round is one batch (parallel runners fan it out)."""
    if settings.max_config_calls <= 1:
        return []
    start = incumbent_key(table(history, rung, seeds))
    field_ = list(contenders) + [e.config for e in history if start and e.config.key() == start][:1]
    new: list[Evaluation] = []
    while todo := next_requests(list(history) + new, field_, rung, seeds, settings):
        done = evaluate_new(todo, list(history) + new, evaluate_many)
        if not done:  # every request already answered: nothing can change any more
            break
        new += done
    return new
