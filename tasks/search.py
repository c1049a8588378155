"""Prefect tasks for the method's steps: every generation and every TuRBO iteration, the baselines and the test
report, each one task run whose evaluations are its nested task runs (the flow run's graph shows which step
made which evaluation at which rung).

A step takes the search state as plain data and returns the next state. It is cached by its inputs (step,
state, settings, priors, and ``params``: budget, model/data fingerprints, run settings, code version) with its
result persisted, so re-running a search replays finished steps from Prefect's cache and continues at the
first unfinished one, whose finished evaluations are cached task runs too: Prefect's cache is the one resume
mechanism. What a step needs besides data (the space, the cost, the evaluation functions) it borrows by a
handle from the flow that lent it (``lend``), out of the cache key (``params`` determines them): task
parameters must stay plain data, since a parallel runner ships the parent step's context to its workers.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.transactions import CommitMode, transaction

from autoqra_core.baselines import BaselineSettings, run_baselines
from autoqra_core.evaluation import Evaluation
from autoqra_core.priors import Priors
from autoqra_core.problem import Problem
from autoqra_core.racing import incumbent
from autoqra_core.search import SearchSettings, SearchState, advance, highest_rungs, next_step, step_counts
from autoqra_core.space import Config, SearchSpace

STEP_CACHE = (INPUTS + TASK_SOURCE) - "live"  # the handle changes per process; what it lends, ``params`` fixes


@dataclass(frozen=True)
class Live:
    """What a run's steps call, in the flow's process: the space, the memory model, and evaluation."""

    space: SearchSpace
    cost: Callable[[Config], int]
    evaluate_many: Callable
    test_report: Callable | None = None


_LENT: dict[str, Live] = {}


@contextmanager
def _each_evaluation_commits() -> Iterator[None]:
    """Prefect commits a nested task run's cached result with its parent's transaction (lazily): a search killed
    mid-step would lose every evaluation that step had finished. Inside a step, each commits as it ends."""
    with transaction(commit_mode=CommitMode.EAGER):
        yield


@contextmanager
def lend(live: Live) -> Iterator[str]:
    """A handle for ``live``, valid in this process while the ``with`` block runs (steps run in the flow's
    process, their evaluations wherever the task runner puts them). Released at the end: a long-lived process
    (a worker, the test suite) running many flows would otherwise keep every finished run's model alive."""
    handle = uuid.uuid4().hex
    _LENT[handle] = live
    try:
        yield handle
    finally:
        del _LENT[handle]


def borrow(handle: str) -> Live:
    """What ``lend`` lent. Task bodies call this rather than read ``_LENT``: a parallel runner pickles the parent
    step's task by value with the globals its body reads, and the lent objects (models, locks) do not pickle."""
    return _LENT[handle]


def step_name(state: SearchState, settings: SearchSettings) -> str | None:
    """'generation 3 (6 children)', 'turbo 2 (region 0.40)': the step ``advance`` takes next, as the UI shows it."""
    name = next_step(state)
    if name is None:
        return None
    if state.stage == "evolution":
        n = settings.evolution.population_size if state.evolution.generation == 0 else settings.evolution.offspring
        return f"{name} ({n} children)"
    return f"{name} (region {state.turbo.state.length:.2f})"


def step_summary(before: SearchState, after: SearchState) -> str:
    """What a step did, for its run name once it is done: new evaluations at rung 0, promoted above it (and the
    references generation 0 starts at the top rung), and replicates on further seeds."""
    n = step_counts(before, after)
    if before.stage == "turbo":
        return f"{n['evaluated']} evaluated, {n['replicates']} replicates"
    refs = f", {n['references']} references" if n["references"] else ""
    return f"{n['children']} children, {n['promoted']} promoted{refs}, {n['replicates']} replicates"


def population_table(state: SearchState, settings: SearchSettings) -> list[dict[str, Any]]:
    """The population after a step (TuRBO: its evaluations so far), each at the highest rung it reached (at the
    top: its mean over the race's seeds), and the incumbent."""
    ladder_top = settings.ladder.top
    reached = highest_rungs(state.history, ladder_top, settings.seeds)
    configs = (state.evolution.population if state.stage == "evolution" or state.turbo is None
               else [e.config for e in state.turbo.history])
    rows = [_row("population" if state.stage == "evolution" else "turbo", reached.get(c.key()), c) for c in configs]
    best = incumbent(state.history, ladder_top, settings.seeds)
    if best:
        rows.append(_row(f"incumbent ({best.replicates} seeds)", best, best.config))
    return rows


def _row(role: str, e: Evaluation | None, config: Config) -> dict[str, Any]:
    return {"role": role, "bits/rank per layer": config.short(),
            "rung": None if e is None else e.rung,
            "loss": None if e is None or not e.ok else round(e.eval_loss, 4),
            "status": "-" if e is None else e.status, "key": config.key()[:10]}


@task(name="search step", cache_policy=STEP_CACHE, persist_result=True, task_run_name="{step}")
def search_step(step: str, state: dict, settings: dict, priors: dict, params: dict, live: str) -> dict:
    """One generation or TuRBO iteration (``autoqra_core.search.advance``); ``step`` names the task run."""
    settings_ = SearchSettings.from_dict(settings)
    before = SearchState.from_dict(state)
    lv = borrow(live)
    with _each_evaluation_commits():
        problem = Problem(lv.space, Priors.from_dict(priors), lv.cost, params["budget_bytes"])
        after = advance(before, problem, lv.evaluate_many, settings_)
    create_table_artifact(population_table(after, settings_),
                          description=f"**{step}**: {step_summary(before, after)}; the population (TuRBO: its "
                                      f"evaluations) at the highest rung each reached, and the best so far")
    return after.to_dict()


@task(name="baselines", cache_policy=STEP_CACHE, persist_result=True, task_run_name="baselines ({n_random} random)")
def baselines_step(history: list[dict], rung: int, n_random: int, priors: dict, params: dict, live: str,
                   uniform_bits: list[int], rank: int, seed: int, seeds: list[int]) -> dict:
    """Every baseline at ``rung`` (requests the search already ran are reused): name -> Evaluation.to_dict()."""
    lv = borrow(live)
    with _each_evaluation_commits():
        problem = Problem(lv.space, Priors.from_dict(priors), lv.cost, params["budget_bytes"])
        base = run_baselines(problem, lv.evaluate_many, rung, BaselineSettings(tuple(uniform_bits), rank, n_random), seed=seed,
                             history=[Evaluation.from_dict(e) for e in history], seeds=seeds)
    return {name: e.to_dict() for name, e in base.items()}


@task(name="report", cache_policy=STEP_CACHE, persist_result=True,
      task_run_name="report ({seeds} seeds x {n_methods} methods, test split)")
def report_step(methods: dict[str, dict], seeds: int, n_methods: int, params: dict, live: str) -> dict:
    """Each method re-fine-tuned with fresh seeds and scored on test: name -> SeedScores."""
    with _each_evaluation_commits():
        return borrow(live).test_report({name: Config.from_dict(c) for name, c in methods.items()})
