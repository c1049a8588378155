"""The reporting protocol: select on validation, report on test over seeds, compare at equal compute.

A search that picks its winner by held-out loss and then reports that same number is
biased in the winner's favour, and one fine-tune per method cannot tell a real gap from
seed noise. So every search decision reads the ``validation`` split; afterwards the
winner and each baseline are fine-tuned again, the user's whole fine-tune (the top rung),
with fresh seeds (none used during the search) and scored once on ``test``; the winner's
run on the first of those seeds is what the export ships. Methods are compared by the paired
difference on the same seeds (the same data order and LoRA initialisation), and each
method's fine-tuning compute (tokens) is recorded so that comparisons are at equal compute.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

from .evaluation import EvaluateMany, Evaluation, Request
from .fidelity import Ladder
from .space import DEFAULT_BUDGET

REFERENCES = (DEFAULT_BUDGET, "uniform-best", "random")  # every method is compared, seed by seed, with these


SEED_STRIDE = 10_000  # race seeds are search_seed + k * SEED_STRIDE; report seeds lie strictly between


def race_seeds(search_seed: int, n: int) -> list[int]:
    """The training seeds the search fine-tunes with, in racing order: the first is the search's own seed
    (every rung), the others are the top rung's replicates. Disjoint from ``report_seeds``."""
    return [search_seed + k * SEED_STRIDE for k in range(max(1, n))]


def report_seeds(search_seed: int, n: int) -> list[int]:
    """Fresh training seeds for the test report: never a seed the search fine-tuned with (``race_seeds``). The
    first is the export's, fixed before anything is scored on test."""
    if n >= SEED_STRIDE:
        raise ValueError(f"at most {SEED_STRIDE - 1} report seeds")
    return [search_seed + 1 + k for k in range(n)]


def _increment(reached: dict[tuple[str, int], int], key: str, seed: int, tokens: int) -> int:
    """Tokens a run (config ``key``, ``seed``) spends to reach a checkpoint at ``tokens``, given what ``reached``
    holds: only the steps from its last checkpoint."""
    return max(0, tokens - reached.get((key, seed), 0))


def _charge(reached: dict[tuple[str, int], int], key: str, seed: int, tokens: int) -> int:
    """``_increment``, and ``reached`` updated to the new checkpoint."""
    spent = _increment(reached, key, seed, tokens)
    reached[(key, seed)] = max(tokens, reached.get((key, seed), 0))
    return spent


def charged_tokens(history: Sequence[Evaluation], ladder: Ladder) -> list[int]:
    """Fine-tuning tokens each evaluation of ``history`` spent, in order: a run's checkpoints are charged once, so a
    promotion costs only the steps from the run's last checkpoint to its new one (failed evaluations count: their
    compute was spent)."""
    reached: dict[tuple[str, int], int] = {}  # (config, seed) -> tokens its run has been charged
    return [_charge(reached, e.config.key(), e.seed, ladder[e.rung].train_tokens) for e in history]


def metered(evaluate_many: EvaluateMany, history: Sequence[Evaluation], ladder: Ladder, tokens: int) -> EvaluateMany:
    """``evaluate_many`` on a budget: each batch runs the longest prefix of its requests whose cost (charged as
    ``charged_tokens`` does, after ``history`` and every earlier batch) fits in what is left of ``tokens``, and
    returns that prefix's evaluations. The search's cap in whole fine-tunes (``SearchSettings.fine_tunes``)."""
    reached: dict[tuple[str, int], int] = {}
    for e in history:
        _charge(reached, e.config.key(), e.seed, ladder[e.rung].train_tokens)
    left = [tokens]

    def run(requests: list[Request]) -> list[Evaluation]:
        todo = []
        for config, rung, seed in requests:
            if _increment(reached, config.key(), seed, ladder[rung].train_tokens) > left[0]:
                break
            left[0] -= _charge(reached, config.key(), seed, ladder[rung].train_tokens)
            todo.append((config, rung, seed))
        return list(evaluate_many(todo)) if todo else []

    return run


def history_tokens(history: Sequence[Evaluation], ladder: Ladder) -> int:
    """Fine-tuning tokens spent on ``history``, every token once (``charged_tokens``)."""
    return sum(charged_tokens(history, ladder))


def equal_compute_count(tokens: int, ladder: Ladder) -> int:
    """How many whole fine-tunes cost ``tokens`` (at least one): random search's share at equal compute."""
    return max(1, round(ladder.fine_tunes(tokens)))


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(mean, sample sd) of the values that are not None (failed runs); sd 0 for one value, (None, None) for none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


@dataclass(frozen=True)
class SeedScores:
    """One method's test-split numbers, one entry per seed (None where that fine-tune failed)."""

    seeds: tuple[int, ...]
    losses: tuple[float | None, ...]
    accuracies: tuple[float | None, ...]

    @classmethod
    def from_evaluations(cls, seeds: Sequence[int], evals: Sequence[Evaluation]) -> "SeedScores":
        return cls(tuple(seeds), tuple(e.eval_loss if e.ok else None for e in evals),
                   tuple(e.accuracy if e.ok else None for e in evals))

    def to_dict(self) -> dict:
        loss_mean, loss_sd = mean_sd(self.losses)
        acc_mean, acc_sd = mean_sd(self.accuracies)
        return {"loss_mean": loss_mean, "loss_sd": loss_sd, "accuracy_mean": acc_mean, "accuracy_sd": acc_sd,
                "seeds": list(self.seeds), "losses": list(self.losses), "accuracies": list(self.accuracies),
                "failed": sum(v is None for v in self.losses)}


def paired_difference(a: SeedScores, b: SeedScores) -> dict:
    """``a`` minus ``b`` on the seeds both finished: mean and sd of the per-seed differences.

    Negative loss / positive accuracy differences favour ``a``; ``loss_wins`` counts the seeds
    where ``a``'s loss is lower.
    """
    b_by_seed = dict(zip(b.seeds, zip(b.losses, b.accuracies)))
    dl, da, seeds = [], [], []
    for seed, loss, acc in zip(a.seeds, a.losses, a.accuracies):
        other = b_by_seed.get(seed)
        if other is None or loss is None or other[0] is None:
            continue
        seeds.append(seed)
        dl.append(loss - other[0])
        if acc is not None and other[1] is not None:
            da.append(acc - other[1])
    loss_mean, loss_sd = mean_sd(dl)
    acc_mean, acc_sd = mean_sd(da)
    return {"seeds": seeds, "loss_diff_mean": loss_mean, "loss_diff_sd": loss_sd,
            "accuracy_diff_mean": acc_mean, "accuracy_diff_sd": acc_sd,
            "loss_wins": sum(d < 0 for d in dl), "n": len(dl)}


def compare(results: dict[str, SeedScores], references: Sequence[str] = REFERENCES) -> dict[str, dict]:
    """Per method: its test summary plus, under ``vs``, the paired difference to each reference present."""
    out = {}
    for name, r in results.items():
        d = r.to_dict()
        d["vs"] = {ref: paired_difference(r, results[ref]) for ref in references if ref in results and ref != name}
        out[name] = d
    return out


def fmt_mean_sd(mean: float | None, sd: float | None, digits: int = 4) -> str:
    """'3.5210 ± 0.0123', or '-' when nothing finished."""
    if mean is None or not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f} ± {sd or 0.0:.{digits}f}"


def fmt_paired_diff(t: dict, ref: str, key: str) -> str:
    """A method's paired difference to ``ref`` in ``key`` (loss or accuracy) from its test summary ``t`` (``compare``'s
    entry): mean ± sd over the shared seeds, * beyond 2 standard errors, with how many seeds the loss was lower."""
    d = (t.get("vs") or {}).get(ref)
    if not d or d.get("n", 0) == 0 or d[f"{key}_diff_mean"] is None:
        return "-"
    mean, sd, n = d[f"{key}_diff_mean"], d[f"{key}_diff_sd"] or 0.0, d["n"]
    beyond = "*" if n > 1 and abs(mean) > 2 * sd / n**0.5 else ""
    wins = f" ({d['loss_wins']}/{n} lower)" if key == "loss" else ""
    return f"{mean:+.4f} ± {sd:.4f}{beyond}{wins}"
