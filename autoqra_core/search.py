"""The whole search: stage 1 (evolution, multi-fidelity) then stage 2 (TuRBO at the top rung), every
configuration that reaches the top rung raced against the incumbent on further seeds (``racing``), all
within a budget in the user's unit, whole fine-tunes (``SearchSettings.fine_tunes``): every batch runs
what still fits (``protocol.metered``), and the search ends when not even one more step of it does.

``advance`` is one step of the method (a generation or a TuRBO iteration) and
``run_search`` a loop over it; an orchestrator calls ``advance`` itself, one cached
task per step. The ``SearchState`` between steps is plain data (``to_dict`` -> JSON
-> ``from_dict``), and every random draw comes from seeds and generator states stored
in it, so a search continued from any intermediate state ends with the same result as an uninterrupted one with the same seed
(given an evaluate that returns the same results for the same (config, rung, seed), e.g.
because finished evaluations are cached).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

from . import evolution, turbo
from .evaluation import EvaluateMany, Evaluation
from .evolution import EvolutionSettings, EvolutionState
from .fidelity import Ladder
from .feasibility import check_budget
from .problem import Problem
from .protocol import charged_tokens, history_tokens, metered, race_seeds
from .racing import RaceSettings, incumbent, standings
from .turbo import TurboRun, TurboSettings


DEFAULT_STEPS = 54  # the library's fine-tune when none is given (the settings file's default is one epoch)
DEFAULT_FINE_TUNES = 8.0  # the search's budget in whole fine-tunes, racing included


def default_ladder() -> Ladder:
    """Checkpoints of a ``DEFAULT_STEPS``-step fine-tune at 1/9, 1/3 and its end (``fidelity.DEFAULT_RUNGS``)."""
    return Ladder.of(DEFAULT_STEPS)


@dataclass(frozen=True)
class SearchSettings:
    """The whole search's settings; with its parts' dataclasses, the one place that holds their defaults."""

    seed: int = 0
    generations: int = 3  # stage-1 generations at most, the initial population included
    ladder: Ladder = field(default_factory=default_ladder)
    fine_tunes: float | None = DEFAULT_FINE_TUNES  # the budget in whole fine-tunes, replicates included; None: no cap
    evolution: EvolutionSettings = EvolutionSettings()  # population size, offspring multiplier, ...
    turbo: TurboSettings = TurboSettings()  # iterations, batch size, trust region
    race: RaceSettings = RaceSettings()  # intensification at the top rung

    @property
    def cap_tokens(self) -> int | None:
        """The budget in fine-tuning tokens (None: the steps set by ``generations`` and ``turbo.iterations``)."""
        return None if self.fine_tunes is None else round(self.fine_tunes * self.ladder.full.train_tokens)

    @property
    def seeds(self) -> list[int]:
        """The training seeds the search races with (the first one at every rung)."""
        return race_seeds(self.seed, self.race.max_config_calls)

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "generations": self.generations,
            "ladder": self.ladder.to_dict(),
            "fine_tunes": self.fine_tunes,
            "evolution": asdict(self.evolution),
            "turbo": asdict(self.turbo),
            "race": asdict(self.race),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSettings":
        return cls(
            seed=int(d.get("seed", 0)),
            generations=int(d.get("generations", cls.generations)),
            ladder=Ladder.from_dict(d["ladder"]) if "ladder" in d else default_ladder(),
            fine_tunes=d.get("fine_tunes", DEFAULT_FINE_TUNES),
            evolution=EvolutionSettings(**d.get("evolution", {})),
            turbo=TurboSettings(**d.get("turbo", {})),
            race=RaceSettings(**d.get("race", {})),
        )


@dataclass
class SearchState:
    stage: str  # "evolution" -> "turbo" -> "done"
    evolution: EvolutionState
    turbo: TurboRun | None = None

    @classmethod
    def new(cls, seed: int) -> "SearchState":
        return cls("evolution", EvolutionState.new(seed))

    @property
    def history(self) -> list[Evaluation]:
        """Every evaluation, in the order it was made."""
        return self.evolution.history + (self.turbo.history if self.turbo else [])

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "evolution": self.evolution.to_dict(),
            "turbo": self.turbo.to_dict() if self.turbo else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SearchState":
        t = d.get("turbo")
        return cls(d["stage"], EvolutionState.from_dict(d["evolution"]), TurboRun.from_dict(t) if t else None)


@dataclass(frozen=True)
class ProgressPoint:
    """The incumbent's top-rung loss (its mean over its seeds) after ``evaluations`` evaluations (``steps``
    optimizer steps in all, each charged once): what the search would return if stopped there. It can rise when a lucky
    incumbent's replicates bring its mean back to its true level."""

    evaluations: int
    steps: int
    stage: str
    best_loss: float | None


@dataclass
class SearchResult:
    best: Evaluation | None  # the incumbent at the top rung: its mean over the race's seeds
    history: list[Evaluation]
    pareto: list[Evaluation]  # top rung only: memory_bytes vs eval_loss, non-dominated
    progress: list[ProgressPoint]
    state: SearchState

    def to_dict(self) -> dict:
        return {
            "best": self.best.to_dict() if self.best else None,
            "evaluations": [e.to_dict() for e in self.history],
            "pareto": [{"memory_bytes": e.memory_bytes, "eval_loss": e.eval_loss, "config": e.config.to_dict()}
                       for e in self.pareto],
            "progress": [asdict(p) for p in self.progress],
        }


def pareto_front(history: Sequence[Evaluation], rung: int, seeds: Sequence[int] | None = None) -> list[Evaluation]:
    """Configurations at ``rung`` (means over their ``seeds``; default: every seed in the history) no other one
    beats on both memory and loss, by increasing memory.

    Top rung only: lower rungs' losses are biased (short fine-tunes) and not comparable.
    """
    seeds = sorted({e.seed for e in history}) if seeds is None else seeds
    front: list[Evaluation] = []
    for e in sorted((e for e in standings(history, rung, seeds) if e.ok), key=lambda e: (e.memory_bytes, e.eval_loss)):
        if not front or e.eval_loss < front[-1].eval_loss:
            front.append(e)
    return front


def progress(state: SearchState, ladder: Ladder, seeds: Sequence[int]) -> list[ProgressPoint]:
    """The incumbent's curve over all evaluations, each labelled with the stage that made it."""
    out, steps = [], 0
    labelled = [("evolution", e) for e in state.evolution.history]
    labelled += [("turbo", e) for e in (state.turbo.history if state.turbo else [])]
    charged = charged_tokens([e for _, e in labelled], ladder)
    so_far: list[Evaluation] = []
    inc = None
    for i, ((stage, e), tokens) in enumerate(zip(labelled, charged), 1):
        steps += tokens // (ladder[e.rung].batch_size * ladder[e.rung].seq_len)
        so_far.append(e)
        if e.rung == ladder.top:
            inc = incumbent(so_far, ladder.top, seeds)
        out.append(ProgressPoint(i, steps, stage, inc.eval_loss if inc else None))
    return out


def result(state: SearchState, settings: SearchSettings) -> SearchResult:
    history, ladder, seeds = state.history, settings.ladder, settings.seeds
    return SearchResult(incumbent(history, ladder.top, seeds), history, pareto_front(history, ladder.top, seeds),
                        progress(state, ladder, seeds), state)


def next_step(state: SearchState) -> str | None:
    """What ``advance`` does next, as the method names it: 'generation g' (0 is the initial population),
    'turbo t' (1-based), or None once the search is done."""
    if state.stage == "evolution":
        return f"generation {state.evolution.generation}"
    if state.stage == "turbo":
        return f"turbo {state.turbo.iteration + 1}"
    return None


def planned_evaluations(s: SearchSettings) -> tuple[list[int], int, int]:
    """Evaluations a search at settings ``s`` will make (an estimate for its ETA): per rung in stage 1 (its
    asynchronous successive halving simulated on counts: each rung keeps at least ``promote_fraction`` of
    everything seen below it), the references started at the top rung, and the whole fine-tunes after stage 1
    (TuRBO's batches and about a quarter of the top-rung configurations' further race seeds)."""
    refs = 2 if s.evolution.full_fidelity_start else 0  # the best prior configuration and uniform-4bit-r16
    seen = [0] * len(s.ladder.rungs)
    for g in range(s.generations):
        seen[0] += max(1, s.evolution.population_size - refs) if g == 0 else s.evolution.offspring
        for r in range(1, len(seen)):
            seen[r] = max(seen[r], max(1, int(seen[r - 1] * s.ladder.promote_fraction)))
    turbo_runs = s.turbo.iterations * s.turbo.batch_size
    replicates = -(-(seen[-1] + refs + turbo_runs) * (s.race.max_config_calls - 1) // 4)  # rounded up
    return seen, refs, turbo_runs + replicates


def planned_tokens(s: SearchSettings) -> int:
    """Fine-tuning tokens a search at settings ``s`` will spend (``planned_evaluations``, at most its budget): a
    promoted run pays only the steps from its last checkpoint, a run started at the top rung the whole fine-tune."""
    seen, refs, later = planned_evaluations(s)
    tokens = [f.train_tokens for f in s.ladder.rungs]
    steps = sum(n * (t - (tokens[r - 1] if r else 0)) for r, (n, t) in enumerate(zip(seen, tokens)))
    planned = steps + (refs + later) * tokens[-1]
    return planned if s.cap_tokens is None else min(planned, s.cap_tokens)


def step_counts(before: SearchState, after: SearchState) -> dict[str, int]:
    """What one step evaluated: on the race's first seed, the configurations new at rung 0 (``children``),
    promoted from the rung below (``promoted``) and started at the top rung (generation 0's ``references``),
    all of them ``evaluated``; the rest are ``replicates`` on further seeds."""
    new = after.history[len(before.history):]
    first = [e for e in new if e.seed == after.evolution.seed]
    below = {(e.config.key(), e.rung) for e in after.history}
    promoted = sum(e.rung > 0 and (e.config.key(), e.rung - 1) in below for e in first)
    children = sum(e.rung == 0 for e in first)
    return {"evaluated": len(first), "children": children, "promoted": promoted,
            "references": len(first) - children - promoted, "replicates": len(new) - len(first)}


def highest_rungs(history: Sequence[Evaluation], top: int, seeds: Sequence[int]) -> dict[str, Evaluation]:
    """Each configuration's evaluation at the highest rung it reached; at the top rung its mean over ``seeds``."""
    reached: dict[str, Evaluation] = {}
    for e in history:
        if e.config.key() not in reached or e.rung > reached[e.config.key()].rung:
            reached[e.config.key()] = e
    return reached | {e.config.key(): e for e in standings(history, top, seeds)}


def advance(
    state: SearchState,
    p: Problem,
    evaluate_many: EvaluateMany,
    settings: SearchSettings = SearchSettings(),
) -> SearchState:
    """One step of the method, a pure function of (state, settings, evaluations): a generation, or a TuRBO
    iteration. The last generation also ends stage 1 (``evolution.finish``) and centres TuRBO, so every step
    is one unit an orchestrator can cache and replay. On a budget (``settings.fine_tunes``) every batch runs
    what still fits, a stage ends once not even one evaluation of its own fits, and ``finish`` runs regardless
    (a search with nothing finished at the top rung has no answer)."""
    ladder, race, cap = settings.ladder, settings.race, settings.cap_tokens

    def left(history: Sequence[Evaluation]) -> int:
        """Tokens the budget leaves after ``history`` (call only with a cap)."""
        return cap - history_tokens(history, ladder)

    def fits(history: Sequence[Evaluation], rung: int) -> bool:
        """One more evaluation started at ``rung`` fits in what the budget leaves after ``history``."""
        return cap is None or left(history) >= ladder[rung].train_tokens

    budgeted = evaluate_many if cap is None else metered(evaluate_many, state.history, ladder,
                                                         max(0, left(state.history)))
    if state.stage == "evolution":
        ev = state.evolution
        if ev.generation < settings.generations and fits(ev.history, 0):
            ev = evolution.step(ev, p, budgeted, ladder, settings.evolution, race)
        if ev.generation < settings.generations and fits(ev.history, 0):
            return replace(state, evolution=ev)
        ev = evolution.finish(ev, ladder, evaluate_many, settings.turbo.batch_size, race)
        if (settings.turbo.iterations > 0 and fits(ev.history, ladder.top)
                and incumbent(ev.history, ladder.top, settings.seeds)):
            return SearchState("turbo", ev, turbo.start(p.space, ev.history, ladder.top, settings.turbo, settings.seed))
        return SearchState("done", ev, None)
    if state.stage == "turbo":
        run = turbo.step(state.turbo, p, state.evolution.history, budgeted, ladder.top, settings.turbo, race)
        done = run.done or run.iteration >= settings.turbo.iterations
        done = done or not fits(state.evolution.history + run.history, ladder.top)
        return SearchState("done" if done else "turbo", state.evolution, run)
    return state


def run_search(
    p: Problem,
    evaluate_many: EvaluateMany,
    settings: SearchSettings = SearchSettings(),
    state: SearchState | None = None,
    on_checkpoint: Callable[[SearchState], None] | None = None,
) -> SearchResult:
    """Run (or continue, from ``state``) stage 1 then stage 2, step by step; BudgetError at once if nothing
    fits. ``on_checkpoint`` sees the state after every step."""
    check_budget(p.space, p.cost, p.budget)
    state = state or SearchState.new(settings.seed)
    while state.stage != "done":
        state = advance(state, p, evaluate_many, settings)
        if on_checkpoint:
            on_checkpoint(state)
    return result(state, settings)
