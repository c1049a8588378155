"""The search as a library, on a cheap synthetic objective with a known optimum (no model).

Objective: loss = 1 + sum_l f_l(bits_l, rank_l), with
  f_l(b, r) = w_l * q(b) * (1 - 0.8 * rho(r) * s_k) + t_l * 0.3 * (1 - rho(r)),  rho(r) = log2(1 + r) / log2(65)
so a low-bit layer is rescued by a high rank (compensation), and adapters matter most where
the task needs them (t_l), which the priors (noisy w_l) do not know. Lower rungs are biased
(higher loss, rank under-used: s_k < 1) and noisier. Memory is linear per layer, so the
optimum under the budget is a multiple-choice knapsack, solved exactly by DP.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import statistics

import numpy as np
import pytest

from autoqra_core import baselines, evolution, protocol, turbo
from autoqra_core.errors import BudgetError, CandidateFailed
from autoqra_core.evaluation import Evaluation, batched
from autoqra_core.protocol import race_seeds
from autoqra_core.racing import incumbent
from autoqra_core.fidelity import Fidelity, Ladder
from autoqra_core.priors import Priors
from autoqra_core.feasibility import minimal, repair
from autoqra_core.problem import Problem
from autoqra_core.search import DEFAULT_FINE_TUNES, SearchSettings, SearchState, pareto_front, run_search
from autoqra_core.space import Config, SearchSpace
from autoqra_core.surrogate import Surrogate, encode, rung_offsets

# --- synthetic problem ------------------------------------------------------------------------

W = (0.28, 0.04, 0.18, 0.02, 0.14, 0.06, 0.20, 0.08)  # true sensitivity to quantization
T = (0.04, 0.22, 0.06, 0.20, 0.04, 0.18, 0.06, 0.20)  # where adapters help the task: unknown to the priors
PARAMS = (2**24, 2**24, 2**25, 2**25, 2**24, 2**24, 2**25, 2**25)  # 4096 x 4096 and 4096 x 8192 weights
LORA_DIMS = (8192, 8192, 12288, 12288, 8192, 8192, 12288, 12288)  # in + out features
Q = {2: 1.0, 3: 0.45, 4: 0.2, 8: 0.03, 16: 0.0}
BASE_BYTES = 100 * 2**20
LADDER = Ladder((Fidelity(10, 0.25), Fidelity(30, 0.5), Fidelity(90, 1.0)), promote_fraction=1 / 3)
BIAS, NOISE, RANK_USE = (0.25, 0.08, 0.0), (0.01, 0.004, 0.001), (0.6, 0.85, 1.0)

SPACE = SearchSpace(tuple(f"model.layers.{i}" for i in range(len(W))))


def cost(config: Config) -> int:
    weights = sum(n * b // 8 for n, b in zip(PARAMS, config.bits))
    lora = sum(r * d * 16 for r, d in zip(config.ranks, LORA_DIMS))  # weights + grads + 2 AdamW moments, fp32
    return BASE_BYTES + weights + lora


BUDGET = cost(SPACE.uniform(4, 16))


def rho(r: int) -> float:
    return math.log2(1 + r) / math.log2(65)


def true_loss(config: Config, rung: int = LADDER.top) -> float:
    return 1.0 + sum(layer_loss(l, b, r, RANK_USE[rung]) for l, (b, r) in enumerate(zip(config.bits, config.ranks)))


def layer_loss(l: int, b: int, r: int, s: float = 1.0) -> float:
    return W[l] * Q[b] * (1 - 0.8 * rho(r) * s) + T[l] * 0.3 * (1 - rho(r))


def noise(config: Config, rung: int, seed: int = 0, sd: tuple = NOISE) -> float:
    """Drawn per (config, rung, seed): another seed is a fresh draw (a replicate)."""
    h = int(hashlib.sha256(f"{config.key()}/{rung}/{seed}".encode()).hexdigest()[:8], 16)
    return sd[rung] * random.Random(h).gauss(0, 1)


def evaluate(config: Config, rung: int, seed: int = 0) -> Evaluation:
    loss = true_loss(config, rung) + BIAS[rung] + noise(config, rung, seed)
    return Evaluation(config, rung, loss, cost(config), seed=seed)


def priors() -> Priors:
    # Imperfect priors: sensitivity is the true importance, distorted by up to +-30%.
    rng = random.Random(7)
    sens = [w * (1 + rng.uniform(-0.3, 0.3)) for w in W]
    sens = [s / sum(sens) for s in sens]
    return Priors(SPACE.layers, tuple(sens), {b: tuple(Q[b] * rng.uniform(0.9, 1.1) for _ in W) for b in SPACE.bits})


PRIORS = priors()
PROBLEM = Problem(SPACE, PRIORS, cost, BUDGET)


def optimum() -> float:
    """Exact best top-rung true loss under BUDGET (knapsack over layers, costs in KiB)."""
    unit, cap = 1024, (BUDGET - BASE_BYTES) // 1024
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    for l, w in enumerate(W):
        new = np.full(cap + 1, np.inf)
        for b in SPACE.bits:
            for r in SPACE.ranks:
                c = (PARAMS[l] * b // 8 + r * LORA_DIMS[l] * 16) // unit
                v = layer_loss(l, b, r)
                if c <= cap:
                    new[c:] = np.minimum(new[c:], best[: cap + 1 - c] + v)
        best = new
    return 1.0 + float(best.min())


class Recorder:
    """evaluate_many that records every (config, rung) asked for."""

    def __init__(self, fn=evaluate):
        self.calls: list[tuple[str, int]] = []
        self.batches = 0
        self.fn = batched(fn, cost)

    def __call__(self, requests):
        self.batches += 1
        self.calls += [(c.key(), r, s) for c, r, s in requests]
        return self.fn(requests)


SETTINGS = SearchSettings.from_dict({  # the suite's long search: every step it plans, no budget in fine-tunes
    "seed": 3,
    "fine_tunes": None,
    "generations": 5,
    "ladder": LADDER.to_dict(),
    "evolution": {"population_size": 10, "offspring": 6, "offspring_multiplier": 4},
    "turbo": {"iterations": 4, "batch_size": 2, "n_candidates": 128},
})


@pytest.fixture(scope="module")
def full_run():
    recorder = Recorder()
    checkpoints: list[str] = []
    result = run_search(PROBLEM, recorder, SETTINGS,
                        on_checkpoint=lambda s: checkpoints.append(json.dumps(s.to_dict())))
    return result, recorder, checkpoints


def fingerprint(result) -> str:
    return json.dumps(result.to_dict(), sort_keys=True)


# --- repair ------------------------------------------------------------------------------------


def test_repair_always_feasible_and_uses_the_memory():
    rng = random.Random(0)
    configs = [SPACE.random(rng) for _ in range(40)] + [SPACE.uniform(8, 64), minimal(SPACE)]
    for c in configs:
        fixed = repair(c, PROBLEM)
        SPACE.validate(fixed)
        assert cost(fixed) <= BUDGET
        assert repair(c, PROBLEM) == fixed  # deterministic
        # Spare memory was given back: no single step up still fits.
        bit_idx, rank_idx = SPACE.to_indices(fixed)
        for l in range(len(SPACE)):
            if bit_idx[l] + 1 < len(SPACE.bits):
                assert cost(fixed.replace(l, bits=SPACE.bits[bit_idx[l] + 1])) > BUDGET
            if rank_idx[l] + 1 < len(SPACE.ranks):
                assert cost(fixed.replace(l, rank=SPACE.ranks[rank_idx[l] + 1])) > BUDGET


def test_repair_cuts_the_least_important_layers_first():
    fixed = repair(SPACE.uniform(8, 16), PROBLEM, give_back=False)
    importance = PRIORS.importance()
    most, least = max(range(len(W)), key=importance.__getitem__), min(range(len(W)), key=importance.__getitem__)
    assert cost(fixed) <= BUDGET
    assert fixed.bits[most] > fixed.bits[least]
    # Pinned layers keep an operator's move unless nothing else can give.
    moved = SPACE.uniform(4, 16).replace(least, bits=8)
    kept = repair(moved, PROBLEM, pinned=(least,))
    assert kept.bits[least] == 8 and cost(kept) <= BUDGET


def test_repair_raises_when_nothing_fits():
    smallest = cost(minimal(SPACE))
    with pytest.raises(BudgetError, match=str(smallest)):
        repair(SPACE.uniform(4, 16), dataclasses.replace(PROBLEM, budget=smallest - 1))
    assert cost(repair(SPACE.uniform(4, 16), dataclasses.replace(PROBLEM, budget=smallest))) == smallest


# --- surrogate -----------------------------------------------------------------------------------


def test_surrogate_falls_back_then_learns():
    rng = random.Random(1)
    configs = [repair(SPACE.random(rng), PROBLEM) for _ in range(60)]
    few = Surrogate.fit(SPACE, [evaluate(c, 0) for c in configs[:3]], LADDER.top)
    assert not few.fitted and len(set(few.lcb(configs).tolist())) == 1
    history = [evaluate(c, k) for k, n in ((0, 40), (1, 12), (2, 4)) for c in configs[:n]]
    model = Surrogate.fit(SPACE, history, LADDER.top, seed=0)
    mean, std = model.predict(configs[40:])
    assert model.fitted and (std >= 0).all()
    truth = [true_loss(c) for c in configs[40:]]
    assert np.corrcoef(np.argsort(np.argsort(mean)), np.argsort(np.argsort(truth)))[0, 1] > 0.5
    offsets = rung_offsets(history, LADDER.top)
    assert offsets[0] < offsets[1] < 0 == offsets[2]  # lower rungs read higher: shift down
    assert encode(SPACE, SPACE.uniform(8, 64)).tolist() == [1.0] * 2 * len(SPACE)


# --- stage 1 -----------------------------------------------------------------------------------


def test_prior_individuals_are_feasible_and_split_memory():
    configs = evolution.prior_configs(PROBLEM)
    assert len(configs) >= 3 and all(cost(c) <= BUDGET for c in configs)
    all_bits, all_rank = configs[0], configs[-1]
    assert sum(all_bits.bits) > sum(all_rank.bits) and sum(all_bits.ranks) < sum(all_rank.ranks)


def test_ga_improves_over_its_initial_population():
    # Random start (the prior-derived configs alone already sit near the good basin):
    # this measures what the evolution itself adds.
    settings = SearchSettings(seed=2, generations=6, ladder=LADDER, fine_tunes=None,
                              evolution=dataclasses.replace(SETTINGS.evolution, prior_fraction=0.0),
                              turbo=turbo.TurboSettings(iterations=0))  # stage 1 alone
    recorder = Recorder()
    states = []
    final = run_search(PROBLEM, recorder, settings, on_checkpoint=states.append).state.evolution
    assert final.generation == 6
    initial = min(true_loss(e.config) for e in states[0].evolution.history if e.rung == 0)
    best = incumbent(final.history, LADDER.top, race_seeds(2, 3))
    assert true_loss(best.config) < initial
    assert len(final.population) == SETTINGS.evolution.population_size
    assert len({c.key() for c in final.population}) == len(final.population)
    assert all(cost(e.config) <= BUDGET for e in final.history)
    assert len(recorder.calls) == len(set(recorder.calls)) == len(final.history)
    # successive halving: fewer configurations at each rung up; the top rung holds the promoted ones and the
    # references of the full-fidelity start (generation 0), raced on further seeds
    at = {k: {e.config.key() for e in final.history if e.rung == k} for k in range(3)}
    refs = {c.key() for c in evolution.references(PROBLEM)}
    assert len(at[0]) > len(at[1]) > 0 and at[1] <= at[0] and at[2] - refs <= at[1] and refs <= at[2]
    assert {e.seed for e in final.history if e.rung < 2} == {2}


def test_references_are_never_evaluated_below_the_top_rung():
    """Generation 0 starts the references at the top rung. Evaluated again at rung 0 (as members of the initial
    population), their first steps would be trained a second time, which the cost does not charge (their run
    already passed that checkpoint); the population around them is still population_size."""
    result = run_search(PROBLEM, Recorder(), SETTINGS)
    refs = {c.key() for c in evolution.references(PROBLEM)}
    top = SETTINGS.ladder.top
    assert len(refs) == 2 and all(e.rung == top for e in result.history if e.config.key() in refs)
    gen0 = run_search(PROBLEM, Recorder(), dataclasses.replace(SETTINGS, generations=1, turbo=dataclasses.replace(
        SETTINGS.turbo, iterations=0))).state.evolution
    assert sum(e.rung == 0 for e in gen0.history) == SETTINGS.evolution.population_size - len(refs)


def test_step_leaves_global_random_alone():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    evolution.step(evolution.EvolutionState.new(0), PROBLEM, Recorder(), LADDER, SETTINGS.evolution)
    assert random.random() == expected


# --- stage 2 -----------------------------------------------------------------------------------


def turbo_alone(warm: list[Evaluation], settings: turbo.TurboSettings, recorder: Recorder,
                on_iteration=None) -> turbo.TurboRun:
    """Stage 2 alone through ``run_search``: centred on ``warm`` (as stage 1's history), seed 0."""
    state = SearchState("turbo", dataclasses.replace(evolution.EvolutionState.new(0), history=warm),
                        turbo.start(SPACE, warm, LADDER.top, settings, seed=0))
    result = run_search(PROBLEM, recorder, SearchSettings(ladder=LADDER, turbo=settings, fine_tunes=None),
                        state=state, on_checkpoint=None if on_iteration is None else lambda s: on_iteration(s.turbo))
    return result.state.turbo


def test_turbo_improves_over_its_start():
    rng = random.Random(5)
    warm = [evaluate(repair(SPACE.random(rng), PROBLEM), LADDER.top) for _ in range(4)]
    start = min(e.eval_loss for e in warm)
    recorder = Recorder()
    settings = turbo.TurboSettings(iterations=6, batch_size=2, n_candidates=128)
    run = turbo_alone(warm, settings, recorder)
    assert run.iteration == 6 and len(run.history) >= 6
    assert min(e.eval_loss for e in run.history) < start
    assert all(e.rung == LADDER.top and cost(e.config) <= BUDGET for e in run.history)
    seen = {e.config.key() for e in warm}
    assert not {(k, LADDER.top, 0) for k in seen} & set(recorder.calls)  # replicates of the warm start only
    assert len(set(recorder.calls)) == len(recorder.calls)
    restored = turbo.TurboRun.from_dict(json.loads(json.dumps(run.to_dict())))
    assert restored == run


def test_turbo_state_grows_and_shrinks():
    settings = turbo.TurboSettings(batch_size=1, failure_tolerance=2, success_tolerance=2)
    s = turbo.TurboState.new(dim=4, settings=settings, best_value=1.0)
    s = turbo.update_state(turbo.update_state(s, True, 0.9), True, 0.8)
    assert s.length == pytest.approx(1.6) and s.best_value == 0.8
    for _ in range(2 * 5):
        s = turbo.update_state(s, False, 0.8)
    assert s.length == pytest.approx(0.05) and s.restart_triggered
    assert turbo.TurboState.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_turbo_grows_shrinks_and_restarts_and_counts_failed_evaluations():
    """On the synthetic objective, with one success to double: an improving batch doubles the region; once every
    evaluation fails (diverged), the failed batches count as misses (halving it every 2) down to a restart."""
    failing = [False]

    def fails_after_three_batches(config, rung, seed):
        if failing[0]:
            raise CandidateFailed("diverged: loss is nan at step 3")
        return evaluate(config, rung, seed)

    def trace_and_fail(run):
        trace.append(run)
        failing[0] = run.iteration >= 3

    rng = random.Random(5)
    warm = [evaluate(repair(SPACE.random(rng), PROBLEM), LADDER.top) for _ in range(4)]
    settings = dataclasses.replace(turbo.TurboSettings(), iterations=14, n_candidates=128, success_tolerance=1)
    trace: list[turbo.TurboRun] = []
    run = turbo_alone(warm, settings, Recorder(fails_after_three_batches), on_iteration=trace_and_fail)
    lengths = [r.state.length for r in trace]
    init = settings.length_init
    grew = lengths.index(2 * init)
    shrank = next(i for i in range(grew, len(trace)) if lengths[i] < lengths[i - 1])
    restarted = next(i for i, r in enumerate(trace) if r.restarts == 1)
    assert grew < shrank < restarted and trace[restarted].state.length == init
    assert all(not e.ok for r in trace[3:restarted] for e in r.history[-2:])  # from batch 4 on, only failures
    # The failed evaluations are in the GP's data, at the worst ok loss, not dropped.
    data = turbo.gp_data(warm + run.history)
    worst = max(e.eval_loss for e in warm + run.history if e.ok)
    assert len(data) == len(warm) + len(run.history) and sum(y == worst for _, y in data) > len(run.history) // 2


def test_turbo_region_can_shrink_within_the_default_iterations():
    s = turbo.TurboState.new(2 * len(SPACE), turbo.TurboSettings(), best_value=1.0)
    for _ in range(turbo.TurboSettings().iterations):
        s = turbo.update_state(s, False, 1.0)  # a batch of failed evaluations
    assert s.length < turbo.TurboSettings().length_init


# --- the whole search ----------------------------------------------------------------------------


def test_search_beats_baselines_and_approaches_the_optimum(full_run):
    result, recorder, _ = full_run
    best = true_loss(result.best.config)
    uniform = true_loss(SPACE.uniform(4, 16))
    n = protocol.equal_compute_count(protocol.history_tokens(result.history, LADDER), LADDER)
    rand = baselines.run_baselines(PROBLEM, Recorder(), LADDER.top,
                                   baselines.BaselineSettings(n_random=n), seed=11)
    assert best < uniform
    assert best < true_loss(rand["random"].config)
    assert best < true_loss(rand["sequential"].config)
    opt = optimum()
    assert opt <= best + 1e-9
    assert best - opt < 0.3 * (uniform - opt)  # closes most of the gap from the QLoRA default
    assert cost(result.best.config) <= BUDGET


def test_search_result_is_consistent(full_run):
    result, recorder, checkpoints = full_run
    assert len(recorder.calls) == len(set(recorder.calls)) == len(result.history)  # nothing evaluated twice
    assert {e.rung for e in result.history} == {0, 1, 2}
    assert {p.stage for p in result.progress} == {"evolution", "turbo"}
    curve = [p.best_loss for p in result.progress if p.best_loss is not None]
    assert curve[-1] == result.best.eval_loss and result.best.replicates >= 2
    front = result.pareto
    assert front and all(a.memory_bytes <= b.memory_bytes and a.eval_loss > b.eval_loss for a, b in zip(front, front[1:]))
    assert result.best in front and front == pareto_front(result.history, LADDER.top)
    assert json.loads(checkpoints[-1])["stage"] == "done"


def test_same_seed_same_result(full_run):
    again = run_search(PROBLEM, Recorder(), SETTINGS)
    assert fingerprint(again) == fingerprint(full_run[0])


@pytest.mark.parametrize("stage", ["evolution", "turbo"])
def test_checkpoint_resume_gives_the_same_result(full_run, stage):
    result, _, checkpoints = full_run
    middle = [c for c in checkpoints if json.loads(c)["stage"] == stage]
    state = SearchState.from_dict(json.loads(middle[len(middle) // 2]))
    recorder = Recorder()
    resumed = run_search(PROBLEM, recorder, SETTINGS, state=state)
    assert fingerprint(resumed) == fingerprint(result)
    done = {(e.config.key(), e.rung, e.seed) for e in state.history}
    assert not done & set(recorder.calls)  # a resumed search redoes no finished evaluation


def test_failed_candidates_do_not_stop_the_search():
    def flaky(config: Config, rung: int, seed: int) -> Evaluation:
        if config.ranks[0] >= 32:  # say: out of memory on the device
            raise CandidateFailed("CUDA out of memory")
        return evaluate(config, rung, seed)

    settings = SearchSettings.from_dict({**SETTINGS.to_dict(), "generations": 3, "turbo": {"iterations": 2}})
    result = run_search(PROBLEM, Recorder(flaky), settings)
    failed = [e for e in result.history if not e.ok]
    assert failed
    assert result.best is not None and result.best.ok and result.best.config.ranks[0] < 32
    assert all(e.reason == "CUDA out of memory" and math.isinf(e.eval_loss) for e in failed)


def test_baselines():
    five = baselines.BaselineSettings(n_random=5)
    configs = baselines.baseline_configs(PROBLEM, five, seed=0)
    assert set(configs) == {"uniform-2bit-r16", "uniform-3bit-r16", "uniform-4bit-r16", "uniform-8bit-r16",
                            "uniform-best", "sequential", "random", "fp-lora"}
    # uniform-best: each bit-width at its largest fitting rank (4-bit: r16 exactly, at this budget)
    best_of = {c.bits[0]: c.ranks[0] for c in configs["uniform-best"]}
    assert best_of[4] == 16 and all(cost(SPACE.uniform(b, r)) <= BUDGET for b, r in best_of.items())
    assert all(SPACE.ranks.index(r) + 1 == len(SPACE.ranks) or cost(SPACE.uniform(b, SPACE.ranks[SPACE.ranks.index(r) + 1]))
               > BUDGET for b, r in best_of.items())
    seq = configs["sequential"][0]
    assert cost(seq) <= BUDGET and len(set(seq.ranks)) == 1 and seq.ranks[0] >= 16
    assert len(configs["random"]) == 5 and all(cost(c) <= BUDGET for c in configs["random"])
    assert configs["fp-lora"][0].bits == (16,) * len(SPACE)
    history = [evaluate(SPACE.uniform(4, 16), LADDER.top)]
    recorder = Recorder()
    out = baselines.run_baselines(PROBLEM, recorder, LADDER.top, five, history=history)
    assert out["uniform-4bit-r16"] == history[0] and (SPACE.uniform(4, 16).key(), 2, 0) not in recorder.calls
    assert recorder.batches == 1
    with pytest.raises(BudgetError):
        baselines.sequential(dataclasses.replace(PROBLEM, budget=cost(minimal(SPACE)) - 1))


# --- the search under noise ------------------------------------------------------------------------

TOP_SD = 0.015  # one configuration's seed-to-seed sd at the top rung, as measured on smollm2-135m


def noisy(top_sd: float):
    """The synthetic objective with noise drawn per (config, rung, seed), sd ``top_sd`` at the top rung."""
    sd = NOISE[:-1] + (top_sd,)

    def evaluate_noisy(config: Config, rung: int, seed: int) -> Evaluation:
        loss = true_loss(config, rung) + BIAS[rung] + noise(config, rung, seed, sd)
        return Evaluation(config, rung, loss, cost(config), seed=seed)

    return evaluate_noisy


@pytest.fixture(scope="module")
def noisy_runs():
    """10 search seeds at the test's settings within the default budget (``DEFAULT_FINE_TUNES``): with the measured
    noise (raced, and not raced), and without it. name -> [SearchResult]."""
    no_race = dataclasses.replace(SETTINGS.race, max_config_calls=1)
    out = {}
    for name, sd, race in (("raced", TOP_SD, SETTINGS.race), ("single draw", TOP_SD, no_race),
                           ("noiseless", 0.0, SETTINGS.race)):
        out[name] = [run_search(PROBLEM, Recorder(noisy(sd)),
                                dataclasses.replace(SETTINGS, seed=seed, race=race, fine_tunes=DEFAULT_FINE_TUNES))
                     for seed in range(10)]
    return out


@pytest.mark.slow
def test_search_under_noise_never_loses_to_the_reference_and_finds_most_of_the_gain(noisy_runs):
    uniform, opt = true_loss(SPACE.uniform(4, 16)), optimum()
    for name in ("raced", "noiseless"):
        truth = [true_loss(r.best.config) for r in noisy_runs[name]]
        assert all(t <= uniform for t in truth), (name, truth)  # never worse than the reference it raced
        regret = statistics.fmean(t - opt for t in truth)
        assert regret <= 0.5 * (uniform - opt), (name, regret, uniform - opt)
    spent = [LADDER.fine_tunes(protocol.history_tokens(r.history, LADDER)) for rs in noisy_runs.values() for r in rs]
    assert max(spent) <= DEFAULT_FINE_TUNES and min(spent) > DEFAULT_FINE_TUNES - 1  # the budget, used and kept


@pytest.mark.slow
def test_racing_halves_the_winners_optimism(noisy_runs):
    """Optimism: the winner's selected (mean) loss minus its true loss. The minimum of single draws is biased low;
    the mean over the race's seeds much less."""
    def optimism(results):
        return statistics.fmean(r.best.eval_loss - BIAS[LADDER.top] - true_loss(r.best.config) for r in results)

    raced, single = optimism(noisy_runs["raced"]), optimism(noisy_runs["single draw"])
    assert single < -0.5 * TOP_SD  # the winner's curse is real at this noise
    assert abs(raced) <= 0.5 * abs(single), (raced, single)
    assert all(r.best.replicates >= 2 for r in noisy_runs["raced"])
    assert all(r.best.replicates == 1 for r in noisy_runs["single draw"])


def test_the_budget_caps_every_batch_and_ends_the_search():
    """``fine_tunes`` is a hard cap on the tokens charged (promotions at their increment): a small budget ends the
    search early with an answer at the top rung, and a metered batch runs the prefix that fits."""
    for budget in (2.5, 5.0):
        recorder, states = Recorder(), []
        result = run_search(PROBLEM, recorder, dataclasses.replace(SETTINGS, fine_tunes=budget),
                            on_checkpoint=states.append)
        assert LADDER.fine_tunes(protocol.history_tokens(result.history, LADDER)) <= budget
        assert result.best is not None and result.state.stage == "done"
        sizes = [0] + [len(s.history) for s in states]
        assert all(b > a for a, b in zip(sizes, sizes[1:])), sizes  # no step that the budget left empty
    config = SPACE.uniform(4, 16)
    history = [evaluate(config, 0, 3)]  # its run is at rung 0: going on to rung 1 costs only the steps between
    ran = Recorder()
    metered = protocol.metered(ran, history, LADDER, LADDER[1].train_tokens - LADDER[0].train_tokens)
    out = metered([(config, 1, 3), (SPACE.uniform(8, 16), 0, 3)])
    assert [(e.config.key(), e.rung) for e in out] == [(config.key(), 1)] and len(ran.calls) == 1


def test_catastrophic_pairs_are_rarely_drawn():
    """A (layer, bits) pair whose measured damage alone exceeds the whole model's at 4 bits is marked; random draws
    reach it with ``catastrophic_prob`` of its weight, mutations move onto it only that often."""
    measured = {2: (5.0, 0.02, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01), 3: (0.05,) + (0.005,) * 7,
                4: (0.01,) * 8, 8: (0.0,) * 8}
    pri = dataclasses.replace(PRIORS, measured=measured)
    assert pri.catastrophic() == {(0, 2)} and Priors.uniform(SPACE.layers, SPACE.bits).catastrophic() == set()
    assert pri.damage(0, 2) == 5.0 and pri.importance()[0] > 0.9
    rng = random.Random(0)
    draws = [evolution.random_config(SPACE, rng, pri.catastrophic(), 0.1) for _ in range(4000)]
    share = sum(c.bits[0] == 2 for c in draws) / len(draws)
    assert share == pytest.approx(0.1 / 3.1, abs=0.01)  # weight 0.1 against 1 for each of the 3 other levels
    assert sum(c.bits[1] == 2 for c in draws) / len(draws) == pytest.approx(0.25, abs=0.03)
    moves = []
    for _ in range(2000):
        ind = evolution.individual(SPACE.uniform(3, 16))
        evolution._move(ind, SPACE, 0, "bits", -1, pri.catastrophic(), 0.1)
        moves.append(ind[0][0] == 2)
    assert sum(moves) / len(moves) == pytest.approx(0.1, abs=0.03)
