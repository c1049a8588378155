"""Fidelities: how much fine-tuning one evaluation gets, and what an evaluation returns.

The search spends little on many candidates and much on few: rung 0 is a short
fine-tune on a fraction of the data, the top rung is the full fidelity at which
results are reported. Lower rungs are noisy but rank candidates well enough to
decide which ones to promote (successive halving).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .space import Config


@dataclass(frozen=True)
class Fidelity:
    steps: int  # optimizer steps of LoRA fine-tuning
    data_fraction: float  # share of the training split the steps draw from
    seq_len: int = 64
    batch_size: int = 8
    eval_examples: int = 200  # held-out examples scored (loss, and accuracy for labelled tasks)

    @property
    def train_tokens(self) -> int:
        """Fine-tuning compute of one evaluation at this fidelity (steps x batch x sequence length):
        the unit in which methods are compared at equal compute."""
        return self.steps * self.batch_size * self.seq_len


@dataclass(frozen=True)
class Ladder:
    """Rungs from cheapest (0) to the reporting fidelity (last)."""

    rungs: tuple[Fidelity, ...]
    promote_fraction: float = 1 / 3  # share of a rung's candidates promoted to the next one

    @property
    def top(self) -> int:
        return len(self.rungs) - 1

    def __getitem__(self, rung: int) -> Fidelity:
        return self.rungs[rung]

    def to_dict(self) -> dict:
        return {"rungs": [asdict(r) for r in self.rungs], "promote_fraction": self.promote_fraction}

    @classmethod
    def from_dict(cls, d: dict) -> "Ladder":
        return cls(tuple(Fidelity(**r) for r in d["rungs"]), float(d.get("promote_fraction", 1 / 3)))


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
