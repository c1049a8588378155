"""Fidelities: how much fine-tuning one evaluation gets.

The search spends little on many candidates and much on few: rung 0 is a short
fine-tune on a fraction of the data, the top rung is the full fidelity at which
results are reported. Lower rungs are noisy but rank candidates well enough to
decide which ones to promote (successive halving).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SEQ_LEN = 64  # tokens per training sequence: a rung's default, and the memory model's
BATCH_SIZE = 8  # sequences per optimizer step: likewise


@dataclass(frozen=True)
class Fidelity:
    steps: int  # optimizer steps of LoRA fine-tuning
    data_fraction: float  # share of the training split the steps draw from
    seq_len: int = SEQ_LEN
    batch_size: int = BATCH_SIZE
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
