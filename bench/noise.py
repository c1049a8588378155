"""The search under noise, on the suite's synthetic objective (no model): what racing buys.

The objective of ``tests/test_search.py`` (known exact optimum under the budget), with noise drawn per
(config, rung, seed): sd ``--top-sd`` at the top rung (0.015: the seed-to-seed sd measured on smollm2-135m),
the lower rungs' bias and noise as in the suite. For each search seed and each variant (raced: the default
intensification, up to 3 seeds per top-rung configuration; single draw: ``max_config_calls=1``; and both
without noise), the winner's *true* loss, its regret to the optimum, its optimism (selected mean minus true
loss) and the evaluations spent. The suite asserts on the same numbers
(``test_search_under_noise_*``, ``test_racing_halves_the_winners_optimism``).

    .venv/bin/python bench/noise.py [--seeds 10] [--out bench/results/noise.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--top-sd", type=float, default=0.015)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "noise.md"))
    args = ap.parse_args()

    from autoqra_core.search import DEFAULT_FINE_TUNES, run_search
    from tests import test_search as T

    uniform, opt = T.true_loss(T.SPACE.uniform(4, 16)), T.optimum()
    no_race = dataclasses.replace(T.SETTINGS.race, max_config_calls=1)
    variants = (("raced", args.top_sd, T.SETTINGS.race), ("single draw", args.top_sd, no_race),
                ("raced, no noise", 0.0, T.SETTINGS.race), ("single draw, no noise", 0.0, no_race))
    start = time.time()
    lines = [f"# The search under noise (synthetic objective, {args.seeds} search seeds)", "",
             f"Command: `.venv/bin/python bench/noise.py --seeds {args.seeds} --top-sd {args.top_sd}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores. The suite's objective and search settings "
             f"(`tests/test_search.py`: 8 layers, budget uniform-4bit-r16, at most 5 generations and 4 TuRBO batches, "
             f"within the default budget of {DEFAULT_FINE_TUNES:g} whole fine-tunes); noise "
             f"per (config, rung, seed), sd {args.top_sd} at the top rung. Uniform-4bit-r16's regret to the exact "
             f"optimum: {uniform - opt:.4f}.", "",
             "| variant | mean regret (true) | worst true loss - uniform-4bit-r16 | never worse than uniform-4bit-r16 "
             "| optimism: selected - true (mean) | evaluations (mean) | winner's seeds (mean) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, sd, race in variants:
        bests, calls = [], []
        for seed in range(args.seeds):
            rec = T.Recorder(T.noisy(sd))
            bests.append(run_search(T.PROBLEM, rec,
                                    dataclasses.replace(T.SETTINGS, seed=seed, race=race,
                                                        fine_tunes=DEFAULT_FINE_TUNES)).best)
            calls.append(len(rec.calls))
        truth = [T.true_loss(b.config) for b in bests]
        optimism = [b.eval_loss - T.BIAS[T.LADDER.top] - t for b, t in zip(bests, truth)]
        lines.append(f"| {name} | {statistics.fmean(t - opt for t in truth):.4f} | {max(truth) - uniform:+.4f} | "
                     f"{sum(t <= uniform for t in truth)}/{len(truth)} | {statistics.fmean(optimism):+.4f} | "
                     f"{statistics.fmean(calls):.1f} | {statistics.fmean(b.replicates for b in bests):.1f} |")
    lines += ["", f"{time.time() - start:.0f} s in all."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
