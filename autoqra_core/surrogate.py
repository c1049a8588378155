"""Surrogate performance model: predict a configuration's top-rung loss before fine-tuning it.

Used by stage 1 to screen offspring: many more are generated than evaluated, and
only those with the best optimistic prediction (lower confidence bound) are
fine-tuned.

Choice: a random forest (scikit-learn) on per-layer (bit level, rank level)
features, as in SMAC. Why not a GP here:
* the space is discrete and fairly high-dimensional (2 features per layer) with
  interactions (low bits rescued by high rank) that trees split on directly;
* the data mixes rungs with different noise levels, and a few failed runs; trees
  take per-sample weights and outliers without a kernel to tune;
* fitting is milliseconds and has no optimizer that can fail on 5 points.
The spread of the per-tree predictions is the uncertainty for the LCB.
(Stage 2 uses a GP, where a smooth local model inside a trust region is the point.)

Rungs enter as a per-rung offset: the median change in loss from rung k to k+1 over
configurations evaluated at both (every promoted one), chained up to the top rung.
Each low-rung loss is shifted by its offset so all points estimate the top-rung
loss; higher rungs get more weight because they are less noisy.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from statistics import median
from typing import Sequence

import numpy as np
from sklearn.ensemble import RandomForestRegressor

from .evaluation import Evaluation
from .space import Config, SearchSpace


def encode(space: SearchSpace, config: Config) -> np.ndarray:
    """Per layer (bit level, rank level), each scaled to [0, 1]: the features, and TuRBO's unit cube."""
    bit_idx, rank_idx = space.to_indices(config)
    nb, nr = max(1, len(space.bits) - 1), max(1, len(space.ranks) - 1)
    out = np.empty(2 * len(space), dtype=float)
    out[0::2] = np.asarray(bit_idx) / nb
    out[1::2] = np.asarray(rank_idx) / nr
    return out


def _means(history: Sequence[Evaluation]) -> dict[str, dict[int, float]]:
    """Per config key and rung: the mean loss over its seeds there (inf if any of them failed)."""
    runs: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for e in history:
        runs[e.config.key()][e.rung].append(e.eval_loss if e.ok else math.inf)
    return {k: {r: sum(v) / len(v) for r, v in by_rung.items()} for k, by_rung in runs.items()}


def rung_offsets(history: Sequence[Evaluation], top: int) -> dict[int, float]:
    """Estimated (top-rung loss - rung-k loss) for every rung k, from configs seen at adjacent rungs."""
    by_key = _means(history)
    step = {}
    for k in range(top):
        diffs = [r[k + 1] - r[k] for r in by_key.values() if k in r and k + 1 in r
                 and math.isfinite(r[k]) and math.isfinite(r[k + 1])]
        step[k] = median(diffs) if diffs else 0.0
    offsets = {top: 0.0}
    for k in range(top - 1, -1, -1):
        offsets[k] = offsets[k + 1] + step[k]
    return offsets


def corrected_losses(history: Sequence[Evaluation], top: int) -> dict[str, float]:
    """Per config key: its mean loss at the highest rung it reached (over its seeds there), shifted to the top
    rung (inf if a run there failed).

    This is what stage-1 selection ranks on: a config seen only at rung 0 competes
    with one finished (and raced) at the top rung through the rung offset.
    """
    offsets = rung_offsets(history, top)
    out = {}
    for key, by_rung in _means(history).items():
        rung = max(by_rung)
        out[key] = by_rung[rung] + offsets.get(rung, 0.0)
    return out


@dataclass
class Surrogate:
    """Predicts top-rung eval_loss (mean, std). Unfitted (too few points): constant mean, unit std."""

    space: SearchSpace
    model: RandomForestRegressor | None = None
    mean: float = 0.0
    scale: float = 1.0

    @classmethod
    def fit(
        cls, space: SearchSpace, history: Sequence[Evaluation], top: int, seed: int = 0, min_points: int = 5
    ) -> "Surrogate":
        offsets = rung_offsets(history, top)
        ok = [e for e in history if e.ok]
        y_ok = [e.eval_loss + offsets.get(e.rung, 0.0) for e in ok]
        if len(ok) < min_points:
            return cls(space, None, float(np.mean(y_ok)) if y_ok else 0.0, 1.0)
        # Failed runs (diverged, OOM) count as the worst loss seen, so screening steers away from them.
        worst = max(y_ok) + (float(np.std(y_ok)) or 1.0)
        X = np.stack([encode(space, e.config) for e in history])
        y = np.array([e.eval_loss + offsets.get(e.rung, 0.0) if e.ok else worst for e in history])
        w = np.array([2.0**e.rung for e in history])  # higher rungs: longer fine-tunes, less noise
        model = RandomForestRegressor(
            n_estimators=64, min_samples_leaf=2, max_features=0.5, random_state=seed, n_jobs=1
        )
        model.fit(X, y, sample_weight=w)
        return cls(space, model, float(np.mean(y)), float(np.std(y)) or 1.0)

    @property
    def fitted(self) -> bool:
        return self.model is not None

    def predict(self, configs: Sequence[Config]) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation (spread over trees) of the predicted top-rung loss."""
        if not configs:
            return np.zeros(0), np.zeros(0)
        if self.model is None:
            n = len(configs)
            return np.full(n, self.mean), np.full(n, self.scale)
        X = np.stack([encode(self.space, c) for c in configs])
        per_tree = np.stack([tree.predict(X) for tree in self.model.estimators_])
        return per_tree.mean(axis=0), per_tree.std(axis=0)

    def lcb(self, configs: Sequence[Config], kappa: float = 1.0) -> np.ndarray:
        """Optimistic estimate (lower is better): mean - kappa * std."""
        mean, std = self.predict(configs)
        return mean - kappa * std


def screen(surrogate: Surrogate, candidates: Sequence[Config], keep: int, kappa: float = 1.0) -> list[Config]:
    """The ``keep`` candidates with the lowest LCB (ties: generation order, so unfitted = no screening)."""
    if len(candidates) <= keep:
        return list(candidates)
    order = np.argsort(surrogate.lcb(candidates, kappa), kind="stable")
    return [candidates[i] for i in order[:keep]]
