"""What an evaluation returns, and how the search asks for evaluations.

An ``Evaluation`` is one configuration fine-tuned and scored at one rung. The search
never fine-tunes anything itself: it hands batches of (config, rung) pairs to an
``EvaluateMany`` (a cached Prefect task in the flows, a synthetic function in tests) and
records what comes back, never asking for the same pair twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import CandidateFailed
from .space import Config


@dataclass(frozen=True)
class Evaluation:
    """One configuration fine-tuned and scored at one rung. Failed ones keep their reason."""

    config: Config
    fidelity: int
    eval_loss: float  # held-out loss after fine-tuning; +inf when failed
    memory_bytes: int
    status: str = "ok"  # "ok" | "failed"
    reason: str | None = None
    accuracy: float | None = None
    train_loss: float | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok" and math.isfinite(self.eval_loss)

    def to_dict(self) -> dict:
        d = {
            "config": self.config.to_dict(),
            "fidelity": self.fidelity,
            "eval_loss": self.eval_loss if math.isfinite(self.eval_loss) else None,
            "memory_bytes": self.memory_bytes,
            "status": self.status,
            "accuracy": self.accuracy,
            "train_loss": self.train_loss,
            "seconds": round(self.seconds, 3),
        }
        if self.reason:
            d["reason"] = self.reason
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Evaluation":
        loss = d.get("eval_loss")
        return cls(
            config=Config.from_dict(d["config"]),
            fidelity=int(d["fidelity"]),
            eval_loss=math.inf if loss is None else float(loss),
            memory_bytes=int(d["memory_bytes"]),
            status=d.get("status", "ok"),
            reason=d.get("reason"),
            accuracy=d.get("accuracy"),
            train_loss=d.get("train_loss"),
            seconds=float(d.get("seconds", 0.0)),
        )


EvaluateMany = Callable[[list[tuple[Config, int]]], list[Evaluation]]
Evaluate = Callable[[Config, int], Evaluation]


def batched(evaluate: Evaluate, cost: Callable[[Config], int] | None = None) -> EvaluateMany:
    """Adapt a one-at-a-time ``evaluate(config, rung)`` to the batch interface, in order.

    A ``CandidateFailed`` raised by ``evaluate`` becomes a failed Evaluation, so the search goes on.
    """

    def evaluate_many(pairs: list[tuple[Config, int]]) -> list[Evaluation]:
        out = []
        for config, rung in pairs:
            try:
                out.append(evaluate(config, rung))
            except CandidateFailed as e:
                mem = cost(config) if cost else 0
                out.append(Evaluation(config, rung, math.inf, mem, status="failed", reason=e.reason))
        return out

    return evaluate_many


def evaluate_new(
    pairs: Sequence[tuple[Config, int]], history: Sequence[Evaluation], evaluate_many: EvaluateMany
) -> list[Evaluation]:
    """Evaluate, as one batch, the pairs not already in ``history`` (nor repeated in ``pairs``)."""
    seen = {(e.config.key(), e.fidelity) for e in history}
    todo = []
    for config, rung in pairs:
        if (config.key(), rung) not in seen:
            seen.add((config.key(), rung))
            todo.append((config, rung))
    if not todo:
        return []
    results = list(evaluate_many(todo))
    if len(results) != len(todo) or any(
        (r.config.key(), r.fidelity) != (c.key(), k) for r, (c, k) in zip(results, todo)
    ):
        raise ValueError("evaluate_many must return one Evaluation per (config, rung), in the order given")
    return results


def best_evaluation(history: Sequence[Evaluation], rung: int) -> Evaluation | None:
    """Lowest-loss ok evaluation at ``rung`` (first one on ties), or None."""
    ok = [e for e in history if e.ok and e.fidelity == rung]
    return min(ok, key=lambda e: e.eval_loss) if ok else None
