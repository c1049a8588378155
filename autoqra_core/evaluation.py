"""What an evaluation returns, and how the search asks for evaluations.

An ``Evaluation`` is one configuration fine-tuned with one training seed and scored at one
rung. The search never fine-tunes anything itself: it hands batches of ``Request``s
(config, rung, seed) to an ``EvaluateMany`` (a cached Prefect task in the flows, a synthetic
function in tests) and records what comes back, never asking for the same request twice.
The seed sets the data order and the LoRA initialisation: the same (config, rung) with
another seed is a replicate, a second measurement of the same noisy quantity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import CandidateFailed
from .space import Config


@dataclass(frozen=True)
class Evaluation:
    """One configuration fine-tuned (training seed ``seed``) and scored at one rung. Failed ones keep their reason.

    ``replicates`` > 1 marks a summary: ``eval_loss`` and ``accuracy`` are then means over that many seeds
    (``racing.summary``), as the search's winner is reported."""

    config: Config
    rung: int  # the index of the ladder's rung it was scored at
    eval_loss: float  # held-out loss after fine-tuning; +inf when failed
    memory_bytes: int
    status: str = "ok"  # "ok" | "failed"
    reason: str | None = None
    accuracy: float | None = None
    train_loss: float | None = None
    seconds: float = 0.0
    seed: int = 0
    replicates: int = 1

    @property
    def request(self) -> "Request":
        return (self.config, self.rung, self.seed)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and math.isfinite(self.eval_loss)

    def to_dict(self) -> dict:
        d = {
            "config": self.config.to_dict(),
            "rung": self.rung,
            "eval_loss": self.eval_loss if math.isfinite(self.eval_loss) else None,
            "memory_bytes": self.memory_bytes,
            "status": self.status,
            "accuracy": self.accuracy,
            "train_loss": self.train_loss,
            "seconds": round(self.seconds, 3),
            "seed": self.seed,
        }
        if self.replicates != 1:
            d["replicates"] = self.replicates
        if self.reason:
            d["reason"] = self.reason
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Evaluation":
        loss = d.get("eval_loss")
        return cls(
            config=Config.from_dict(d["config"]),
            rung=int(d["rung"] if "rung" in d else d["fidelity"]),  # "fidelity": written before the rename
            eval_loss=math.inf if loss is None else float(loss),
            memory_bytes=int(d["memory_bytes"]),
            status=d.get("status", "ok"),
            reason=d.get("reason"),
            accuracy=d.get("accuracy"),
            train_loss=d.get("train_loss"),
            seconds=float(d.get("seconds", 0.0)),
            seed=int(d.get("seed", 0)),
            replicates=int(d.get("replicates", 1)),
        )


Request = tuple[Config, int, int]  # (config, rung, training seed)
EvaluateMany = Callable[[list[Request]], list[Evaluation]]
Evaluate = Callable[[Config, int, int], Evaluation]


def batched(evaluate: Evaluate, cost: Callable[[Config], int] | None = None) -> EvaluateMany:
    """Adapt a one-at-a-time ``evaluate(config, rung, seed)`` to the batch interface, in order.

    A ``CandidateFailed`` raised by ``evaluate`` becomes a failed Evaluation, so the search goes on.
    """

    def evaluate_many(requests: list[Request]) -> list[Evaluation]:
        out = []
        for config, rung, seed in requests:
            try:
                out.append(evaluate(config, rung, seed))
            except CandidateFailed as e:
                mem = cost(config) if cost else 0
                out.append(Evaluation(config, rung, math.inf, mem, status="failed", reason=e.reason, seed=seed))
        return out

    return evaluate_many


def request_key(config: Config, rung: int, seed: int) -> tuple[str, int, int]:
    return config.key(), rung, seed


def evaluate_new(
    requests: Sequence[Request], history: Sequence[Evaluation], evaluate_many: EvaluateMany
) -> list[Evaluation]:
    """Evaluate, as one batch, the requests not already in ``history`` (nor repeated in ``requests``). A metered
    ``evaluate_many`` (``protocol.metered``) may run only a prefix of them: the rest were not run."""
    seen = {request_key(*e.request) for e in history}
    todo = []
    for req in requests:
        if request_key(*req) not in seen:
            seen.add(request_key(*req))
            todo.append(req)
    if not todo:
        return []
    results = list(evaluate_many(todo))
    if len(results) > len(todo) or any(request_key(*r.request) != request_key(*q) for r, q in zip(results, todo)):
        raise ValueError("evaluate_many must return one Evaluation per (config, rung, seed), in the order given "
                         "(or, on a budget, those of a prefix)")
    return results
