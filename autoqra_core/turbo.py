"""Stage 2: trust-region Bayesian optimization (TuRBO-1) around the best stage-1 configuration.

Follows BoTorch's TuRBO-1 tutorial (Eriksson et al., 2019), adapted to a discrete,
budget-constrained space:
* continuous relaxation: per layer two coordinates in [0, 1], the bit level index
  and the rank level index scaled (``surrogate.encode``);
* a ``SingleTaskGP`` (BoTorch's defaults: standardized outcome, dimension-scaled
  lengthscale prior) on every ok top-rung evaluation, stage 1's included (warm start);
* a trust region centred at the best point of the current run, its side lengths
  scaled by the GP's lengthscales; Sobol candidates that perturb a few coordinates
  of the centre are *rounded to the allowed levels and repaired first*, deduplicated
  against history, and Thompson sampling picks the batch among those (so the batch is
  made of distinct, feasible, never-evaluated configurations);
* evaluation at the top rung, each new configuration raced against the incumbent on
  further seeds (``racing``); the region doubles after ``success_tolerance``
  consecutive improvements, halves after ``failure_tolerance`` consecutive misses;
  below ``length_min`` a restart re-centres on the best top-rung configuration not
  yet used as a centre, up to ``max_restarts`` times, after which the stage stops.

Noise-aware, as the reference code itself warns an argmin centre is not: every replicate is
a row of the GP's data, which fits the noise (a homoscedastic likelihood); the centre is the
evaluated configuration with the lowest *posterior mean*, and a batch is a success only when
its best posterior mean improves on the centre's by more than the fitted noise sd.

Two departures from the tutorial, both because the space is a grid of levels:
* ``length_min`` is 0.5**3, not 0.5**7: once the region is smaller than about one level
  step, rounding maps every candidate back onto the centre;
* a candidate perturbs ``perturb_dims`` (default 4) coordinates of the centre on average,
  not 20: with 2 coordinates per layer the tutorial's rule moves every coordinate in
  models of up to 10 layers, i.e. random jumps; a few level steps at a time is a local
  search the GP can rank.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Iterator, Sequence

import numpy as np
import torch
from botorch.exceptions.errors import ModelFittingError
from botorch.fit import fit_gpytorch_mll
from botorch.generation import MaxPosteriorSampling
from botorch.models import SingleTaskGP
from gpytorch.mlls import ExactMarginalLogLikelihood
from torch.quasirandom import SobolEngine

from .evaluation import EvaluateMany, Evaluation, evaluate_new
from .feasibility import repair
from .problem import Problem
from .protocol import race_seeds
from .racing import RaceSettings, intensify
from .settings import bounded
from .space import Config, SearchSpace
from .surrogate import encode


@dataclass(frozen=True)
class TurboSettings:
    """Stage 2's settings (the only defaults: the settings file's schema takes them from here).

    The tolerances are small because stage 2 is short (a few batches): with the tutorial's
    ``ceil(max(4, dim) / batch_size)`` the region could never shrink within the iterations.
    """

    iterations: int = bounded(3, ge=0)  # batches evaluated in stage 2 (0: no stage 2)
    batch_size: int = bounded(2, ge=1)
    n_candidates: int = bounded(256, ge=1)  # continuous candidates per batch, before rounding and repair
    length_init: float = bounded(0.8, gt=0)
    length_min: float = bounded(0.5**3, gt=0)
    length_max: float = bounded(1.6, gt=0)
    success_tolerance: int = bounded(2, ge=1)  # consecutive improving batches that double the region
    failure_tolerance: int | None = bounded(2, ge=1)  # misses in a row that halve it; None: the tutorial's rule
    max_restarts: int = bounded(1, ge=0)
    perturb_dims: float = bounded(4.0, gt=0)  # expected coordinates of the centre a candidate changes (tutorial: 20)


@dataclass(frozen=True)
class TurboState:
    """The trust region's size and its success/failure bookkeeping (losses: lower is better). Made by ``new``
    from ``TurboSettings``, which alone holds the defaults."""

    dim: int
    length: float
    length_min: float
    length_max: float
    success_tolerance: int
    failure_tolerance: int
    best_value: float = math.inf
    success_counter: int = 0
    failure_counter: int = 0
    restart_triggered: bool = False

    @classmethod
    def new(cls, dim: int, settings: TurboSettings, best_value: float) -> "TurboState":
        tol = settings.failure_tolerance or math.ceil(max(4.0 / settings.batch_size, dim / settings.batch_size))
        return cls(dim, settings.length_init, settings.length_min, settings.length_max,
                   success_tolerance=settings.success_tolerance, failure_tolerance=tol, best_value=best_value)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["best_value"] = self.best_value if math.isfinite(self.best_value) else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TurboState":
        known = {f.name for f in fields(cls)} - {"best_value"}  # a field since dropped (batch_size) is skipped
        best = math.inf if d["best_value"] is None else d["best_value"]
        return cls(**{k: v for k, v in d.items() if k in known}, best_value=best)


def update_state(state: TurboState, improved: bool, best_value: float) -> TurboState:
    """TuRBO's rule, the success decided by the caller (``noisy_success``): grow after ``success_tolerance``
    successes in a row, shrink after ``failure_tolerance`` misses; ``best_value`` is the centre's value now."""
    success, failure = (state.success_counter + 1, 0) if improved else (0, state.failure_counter + 1)
    length = state.length
    if success == state.success_tolerance:
        length, success = min(2.0 * length, state.length_max), 0
    elif failure == state.failure_tolerance:
        length, failure = length / 2.0, 0
    return replace(
        state,
        length=length,
        success_counter=success,
        failure_counter=failure,
        best_value=best_value,
        restart_triggered=length < state.length_min,
    )


def decode(space: SearchSpace, x: np.ndarray) -> Config:
    """Round a point of the unit cube to the nearest allowed levels (inverse of ``encode`` on the grid)."""
    nb, nr = len(space.bits) - 1, len(space.ranks) - 1
    bit_idx = np.floor(np.clip(x[0::2], 0, 1) * nb + 0.5).astype(int)
    rank_idx = np.floor(np.clip(x[1::2], 0, 1) * nr + 0.5).astype(int)
    return space.from_indices(bit_idx.tolist(), rank_idx.tolist())


@dataclass
class TurboRun:
    """Stage-2 state: the trust region, its centre, and stage 2's own evaluations."""

    state: TurboState
    center: Config
    history: list[Evaluation] = field(default_factory=list)
    iteration: int = 0
    restarts: int = 0
    used_centers: list[str] = field(default_factory=list)
    seed: int = 0
    done: bool = False

    def to_dict(self) -> dict:
        return {
            "state": self.state.to_dict(),
            "center": self.center.to_dict(),
            "history": [e.to_dict() for e in self.history],
            "iteration": self.iteration,
            "restarts": self.restarts,
            "used_centers": list(self.used_centers),
            "seed": self.seed,
            "done": self.done,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TurboRun":
        return cls(
            TurboState.from_dict(d["state"]),
            Config.from_dict(d["center"]),
            [Evaluation.from_dict(e) for e in d["history"]],
            int(d["iteration"]),
            int(d["restarts"]),
            list(d["used_centers"]),
            int(d["seed"]),
            bool(d["done"]),
        )


def start(space: SearchSpace, warm: Sequence[Evaluation], top: int, settings: TurboSettings, seed: int = 0) -> TurboRun:
    """A run centred at the ok top-rung configuration of ``warm`` (stage 1's history) with the lowest posterior
    mean (the lowest mean over its seeds where the GP cannot be fitted)."""
    data = [e for e in warm if e.rung == top]
    if not any(e.ok for e in data):
        raise ValueError("TuRBO needs at least one ok top-rung evaluation to centre on")
    with _one_thread():
        fit = posterior_means(space, data)
    center = min(fit.means, key=lambda k: (fit.means[k], k))
    state = TurboState.new(2 * len(space), settings, fit.means[center])
    return TurboRun(state, fit.configs[center], used_centers=[center], seed=seed)


@contextmanager
def _one_thread() -> Iterator[None]:
    """The GP has tens of points: thread hand-offs cost far more than the math (seconds vs
    milliseconds per fit on a busy CPU), so run it on one thread and restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


GP_FIT_ITERATIONS = 50


def _fit_gp(X: torch.Tensor, Y: torch.Tensor) -> SingleTaskGP | None:
    if len(X) < 2 or len({tuple(x) for x in X.tolist()}) < 2:
        return None
    model = SingleTaskGP(X, Y)
    try:
        # L-BFGS capped: tens of points, and a converged fit costs several times more for the same proposals.
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model),
                         optimizer_kwargs={"options": {"maxiter": GP_FIT_ITERATIONS}})
    except ModelFittingError:
        return None  # propose without the GP (Sobol order) rather than stop the search
    return model


def gp_data(data: Sequence[Evaluation]) -> list[tuple[Config, float]]:
    """(config, loss) pairs for the GP. A failed evaluation (diverged, out of memory, crashed) is kept, at the
    worst ok loss: dropping it would let the GP keep proposing next to it."""
    ok = [e.eval_loss for e in data if e.ok]
    worst = max(ok, default=math.inf)
    return [(e.config, e.eval_loss if e.ok else worst) for e in data if e.ok or math.isfinite(worst)]


def _xy(space: SearchSpace, data: Sequence[Evaluation]) -> tuple[torch.Tensor, torch.Tensor]:
    """The GP's rows: one per evaluation (replicates are rows at the same point), losses negated (BoTorch maximizes)."""
    points = gp_data(data)
    X = torch.tensor(np.stack([encode(space, c) for c, _ in points]), dtype=torch.double)
    return X, -torch.tensor([[y] for _, y in points], dtype=torch.double)


@dataclass(frozen=True)
class Fit:
    """Posterior means (losses) of the evaluated configurations and the fitted noise sd (0 without a GP)."""

    configs: dict[str, Config]
    means: dict[str, float]
    noise_sd: float


def posterior_means(space: SearchSpace, data: Sequence[Evaluation]) -> Fit:
    """Fit the GP on ``data`` (top-rung evaluations, replicates included) and read its posterior mean at every ok
    evaluated configuration and its noise. Without a GP (too few points, a failed fit): each config's mean over its
    seeds, noise 0."""
    ok = [e for e in data if e.ok]
    if not ok:
        return Fit({}, {}, 0.0)
    configs = {e.config.key(): e.config for e in ok}
    raw: dict[str, list[float]] = {}
    for e in ok:
        raw.setdefault(e.config.key(), []).append(e.eval_loss)
    means = {k: float(np.mean(v)) for k, v in raw.items()}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _fit_gp(*_xy(space, data))
    if model is None:
        return Fit(configs, means, 0.0)
    X = torch.tensor(np.stack([encode(space, c) for c in configs.values()]), dtype=torch.double)
    with torch.no_grad():
        post = model.posterior(X)
        noisy = model.posterior(X, observation_noise=True)
        mu = (-post.mean.squeeze(-1)).tolist()
        noise = float((noisy.variance - post.variance).clamp(min=0).mean().sqrt())
    return Fit(configs, dict(zip(configs, mu)), noise)


def noisy_success(fit: Fit, center: Config, batch: Sequence[Config]) -> tuple[bool, Config, float]:
    """(success, new centre, its posterior mean): the batch succeeds when its best posterior mean is below the
    centre's by more than the fitted noise sd; the centre moves to the lowest posterior mean of the two."""
    here = fit.means.get(center.key(), math.inf)
    best = min((c for c in batch if c.key() in fit.means), key=lambda c: fit.means[c.key()], default=None)
    if best is None or fit.means[best.key()] >= here:
        return False, center, here
    return fit.means[best.key()] < here - fit.noise_sd, best, fit.means[best.key()]


def _seed(run: TurboRun) -> int:
    """This iteration's seed (the GP fit's and Thompson sampling's torch RNG, and the Sobol sequence)."""
    return run.seed * 100_003 + run.iteration


def trust_region(model, x_center: torch.Tensor, length: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) bounds of the region: a box of side ``length`` around the centre, each side scaled by the
    GP's lengthscale over their geometric mean (the tutorial's rule; equal sides without a GP), clipped to [0, 1]."""
    weights = torch.ones(len(x_center), dtype=torch.double)
    if model is not None:
        kernel = getattr(model.covar_module, "base_kernel", model.covar_module)
        ls = kernel.lengthscale.squeeze().detach()
        weights = ls / ls.mean()
        weights = weights / torch.prod(weights.pow(1.0 / len(weights)))
    return (torch.clamp(x_center - weights * length / 2.0, 0.0, 1.0),
            torch.clamp(x_center + weights * length / 2.0, 0.0, 1.0))


def perturbed(x_center: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor], n: int, perturb_dims: float,
              seed: int) -> torch.Tensor:
    """``n`` continuous candidates: Sobol points in the region, each replacing only a few coordinates of the
    centre (about ``perturb_dims``, at least one; TuRBO's trick for higher dimensions). Draws from torch's RNG."""
    dim = len(x_center)
    lb, ub = bounds
    pert = lb + (ub - lb) * SobolEngine(dim, scramble=True, seed=seed).draw(n).to(torch.double)
    mask = torch.rand(n, dim) <= min(perturb_dims / dim, 1.0)
    empty = torch.where(mask.sum(dim=1) == 0)[0]
    mask[empty, torch.randint(0, dim, size=(len(empty),))] = True
    x = x_center.expand(n, dim).clone()
    x[mask] = pert[mask]
    return x


def feasible_new(p: Problem, x: torch.Tensor, seen: set[str]) -> list[Config]:
    """The distinct configurations ``x`` rounds to, each repaired into the budget, none in ``seen``: so Thompson
    sampling picks among real, feasible, never-evaluated candidates."""
    repaired: dict[Config, Config] = {}
    candidates: dict[str, Config] = {}
    for row in x.numpy():
        rounded = decode(p.space, row)
        if rounded not in repaired:
            repaired[rounded] = repair(rounded, p)
        c = repaired[rounded]
        if c.key() not in seen and c.key() not in candidates:
            candidates[c.key()] = c
    return list(candidates.values())


def propose(run: TurboRun, p: Problem, data: Sequence[Evaluation], settings: TurboSettings) -> list[Config]:
    """Up to ``batch_size`` new feasible configs from the trust region (``data``: top-rung evaluations): the GP
    fitted, candidates drawn in the region, rounded and repaired, then chosen by Thompson sampling."""
    space = p.space
    with torch.random.fork_rng(), _one_thread():
        torch.manual_seed(_seed(run))
        model = _fit_gp(*_xy(space, data))
        x_center = torch.tensor(encode(space, run.center), dtype=torch.double)
        x = perturbed(x_center, trust_region(model, x_center, run.state.length), settings.n_candidates,
                      settings.perturb_dims, _seed(run))
        pool = feasible_new(p, x, {e.config.key() for e in data})
        k = min(settings.batch_size, len(pool))
        if model is None or k == 0:
            return pool[:k]
        X_pool = torch.tensor(np.stack([encode(space, c) for c in pool]), dtype=torch.double)
        with torch.no_grad():
            X_next = MaxPosteriorSampling(model=model, replacement=False)(X_pool, num_samples=k)
    index = {tuple(row): i for i, row in enumerate(X_pool.tolist())}
    return [pool[index[tuple(row)]] for row in X_next.tolist()]


def _restart(run: TurboRun, space: SearchSpace, data: Sequence[Evaluation], settings: TurboSettings) -> TurboRun:
    """Re-centre on the top-rung config with the lowest posterior mean not used as a centre yet, or stop."""
    with _one_thread():
        fit = posterior_means(space, data)
    fresh = sorted((k for k in fit.means if k not in run.used_centers), key=lambda k: (fit.means[k], k))
    if run.restarts >= settings.max_restarts or not fresh:
        return replace(run, done=True)
    best = fresh[0]
    state = TurboState.new(run.state.dim, settings, fit.means[best])
    return replace(run, state=state, center=fit.configs[best], restarts=run.restarts + 1,
                   used_centers=run.used_centers + [best])


def step(
    run: TurboRun,
    p: Problem,
    warm: Sequence[Evaluation],
    evaluate_many: EvaluateMany,
    top: int,
    settings: TurboSettings = TurboSettings(),
    race: RaceSettings = RaceSettings(),
) -> TurboRun:
    """One TuRBO iteration: propose a batch, evaluate it at the top rung, race it, update the region from the
    refitted GP (``noisy_success``). A failed evaluation is a miss, not ignored."""
    if run.done:
        return run
    data = [e for e in list(warm) + run.history if e.rung == top]
    if run.state.restart_triggered:
        run = _restart(run, p.space, data, settings)
        if run.done:
            return run
    batch = propose(run, p, data, settings)
    seeds = race_seeds(run.seed, race.max_config_calls)
    known = list(warm) + run.history
    new = evaluate_new([(c, top, seeds[0]) for c in batch], known, evaluate_many)
    new += intensify(known + new, batch, top, seeds, evaluate_many, race)
    with _one_thread():
        fit = posterior_means(p.space, data + [e for e in new if e.rung == top])
    improved, center, value = noisy_success(fit, run.center, batch)
    return replace(
        run,
        state=update_state(run.state, improved, value),
        center=center,
        history=run.history + new,
        iteration=run.iteration + 1,
    )
