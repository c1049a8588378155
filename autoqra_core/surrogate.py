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


def rung_offsets(history: Sequence[Evaluation], top: int) -> dict[int, float]:
    """Estimated (top-rung loss - rung-k loss) for every rung k, from configs seen at adjacent rungs."""
    by_key: dict[str, dict[int, float]] = defaultdict(dict)
    for e in history:
        if e.ok:
            by_key[e.config.key()][e.fidelity] = e.eval_loss
    step = {}
    for k in range(top):
        diffs = [r[k + 1] - r[k] for r in by_key.values() if k in r and k + 1 in r]
        step[k] = median(diffs) if diffs else 0.0
    offsets = {top: 0.0}
    for k in range(top - 1, -1, -1):
        offsets[k] = offsets[k + 1] + step[k]
    return offsets


def corrected_losses(history: Sequence[Evaluation], top: int) -> dict[str, float]:
    """Per config key: loss at the highest rung it reached, shifted to the top rung (inf if that run failed).

    This is what stage-1 selection ranks on: a config seen only at rung 0 competes
    with one finished at the top rung through the rung offset.
    """
    offsets = rung_offsets(history, top)
    highest: dict[str, Evaluation] = {}
    for e in history:
        key = e.config.key()
        if key not in highest or e.fidelity > highest[key].fidelity:
            highest[key] = e
    return {
        key: (e.eval_loss + offsets.get(e.fidelity, 0.0)) if e.ok else math.inf for key, e in highest.items()
    }


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
        y_ok = [e.eval_loss + offsets.get(e.fidelity, 0.0) for e in ok]
        if len(ok) < min_points:
            return cls(space, None, float(np.mean(y_ok)) if y_ok else 0.0, 1.0)
        # Failed runs (diverged, OOM) count as the worst loss seen, so screening steers away from them.
        worst = max(y_ok) + (float(np.std(y_ok)) or 1.0)
        X = np.stack([encode(space, e.config) for e in history])
        y = np.array([e.eval_loss + offsets.get(e.fidelity, 0.0) if e.ok else worst for e in history])
        w = np.array([2.0**e.fidelity for e in history])  # higher rungs: longer fine-tunes, less noise
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
