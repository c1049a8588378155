"""Fidelities: how far into the user's one fine-tune an evaluation looks.

There is one fine-tune, the user's (``FineTune``: its length and shape, set once). It is
the top rung, what the test report scores and what the export ships. The lower rungs are
checkpoints of that same run at fractions of its length (default 1/9 and 1/3): its
learning-rate schedule spans the whole run, so a rung's model is exactly the first steps
of the final one, and promoting a configuration continues its run from the checkpoint
(successive halving with checkpoints, as ASHA/Hyperband do), never restarts it. Every
token is charged once (``protocol.charged_tokens``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import AutoQRAError

SEQ_LEN = 64  # tokens per training sequence: the fine-tune's default, and the memory model's
BATCH_SIZE = 8  # sequences per optimizer step: likewise


@dataclass(frozen=True)
class FineTune:
    """The user's one fine-tune: ``steps``, or ``epochs`` over ``data_fraction`` of the train split capped by
    ``max_steps``, at ``batch_size`` x ``seq_len`` tokens per step."""

    steps: int | None = None  # None: ``epochs`` over the data
    epochs: float = 1.0
    max_steps: int | None = None
    data_fraction: float = 1.0  # share of the training split the run draws from
    seq_len: int = SEQ_LEN
    batch_size: int = BATCH_SIZE

    def total_steps(self, n_blocks: int) -> int:
        """Optimizer steps of the run, given ``n_blocks`` training sequences in its data."""
        steps = self.steps or max(1, math.ceil(self.epochs * n_blocks / self.batch_size))
        return min(steps, self.max_steps) if self.max_steps else steps


@dataclass(frozen=True)
class Rung:
    """A checkpoint of the fine-tune at ``fraction`` of its length, scored on ``eval_examples`` held-out rows."""

    fraction: float
    eval_examples: int = 200


DEFAULT_RUNGS = (Rung(1 / 9, 100), Rung(1 / 3, 200), Rung(1.0, 300))  # eta = 3


@dataclass(frozen=True)
class Fidelity:
    """A fine-tune seen at ``steps`` optimizer steps of a run that lasts ``total_steps`` (its schedule's length;
    None: the run ends here)."""

    steps: int  # optimizer steps done at this checkpoint
    data_fraction: float  # share of the training split the run draws from
    seq_len: int = SEQ_LEN
    batch_size: int = BATCH_SIZE
    eval_examples: int = 200  # held-out examples scored (loss, and accuracy for labelled tasks)
    total_steps: int | None = None

    @property
    def length(self) -> int:
        """Steps of the whole run: what the learning-rate schedule spans."""
        return self.total_steps or self.steps

    @property
    def train_tokens(self) -> int:
        """Fine-tuning tokens of a run up to this checkpoint (steps x batch x sequence length): the unit in which
        methods are compared at equal compute."""
        return self.steps * self.batch_size * self.seq_len


@dataclass(frozen=True)
class Ladder:
    """Checkpoints of one fine-tune from the earliest (0) to its end (last, the top rung)."""

    rungs: tuple[Fidelity, ...]
    promote_fraction: float = 1 / 3  # share of a rung's candidates promoted to the next one

    @classmethod
    def of(cls, total_steps: int, rungs: tuple[Rung, ...] = DEFAULT_RUNGS, data_fraction: float = 1.0,
           seq_len: int = SEQ_LEN, batch_size: int = BATCH_SIZE, promote_fraction: float = 1 / 3) -> "Ladder":
        """The rungs of a ``total_steps`` fine-tune at ``rungs``' fractions (the last must be 1: the run's end)."""
        fractions = [r.fraction for r in rungs]
        if not fractions or fractions[-1] != 1.0 or any(b <= a for a, b in zip(fractions, fractions[1:])):
            raise AutoQRAError(f"rung fractions {fractions} must increase and end at 1 (the whole fine-tune), "
                               f"e.g. [0.111, 0.333, 1.0]")
        steps = [max(1, round(r.fraction * total_steps)) for r in rungs]
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise AutoQRAError(f"a fine-tune of {total_steps} steps is too short for rungs at {fractions} "
                               f"(checkpoints at steps {steps} coincide): set a longer train.steps or fewer rungs")
        return cls(tuple(Fidelity(s, data_fraction, seq_len, batch_size, r.eval_examples, total_steps)
                         for s, r in zip(steps, rungs)), promote_fraction)

    @property
    def top(self) -> int:
        return len(self.rungs) - 1

    @property
    def full(self) -> Fidelity:
        """The whole fine-tune: the top rung."""
        return self.rungs[-1]

    def __getitem__(self, rung: int) -> Fidelity:
        return self.rungs[rung]

    def fine_tunes(self, tokens: int) -> float:
        """``tokens`` of fine-tuning in the user's unit: whole fine-tunes."""
        return tokens / self.full.train_tokens

    def to_dict(self) -> dict:
        return {"rungs": [asdict(r) for r in self.rungs], "promote_fraction": self.promote_fraction}

    @classmethod
    def from_dict(cls, d: dict) -> "Ladder":
        return cls(tuple(Fidelity(**r) for r in d["rungs"]), float(d.get("promote_fraction", 1 / 3)))
