"""Do the lower rungs predict the top one? Rank correlation (Spearman) of validation loss between each rung of a
ladder and its top rung, over the same configurations, and the seed-to-seed sd of one configuration at the top.

Configurations: the full-fidelity start's references (uniform-4bit-r16, the best prior-derived configuration,
each bit-width at its largest fitting rank) and random ones drawn and repaired as the search draws them, all at
the budget; each fine-tuned at every rung with the search's seed, and the first ``--replicated`` of them at the
top rung on the race's further seeds. Validation only: the test split is not read (choosing the ladder is tuning
a default). A rung whose correlation with the top is below 0.5 should be dropped or lengthened.

    .venv/bin/python bench/rungs.py [--model embedded] [--dataset embedded] [--config CFG] [--configs 12] \
        [--out bench/results/rungs-embedded.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def measure(args) -> dict:
    from prefect import flow

    from autoqra_core.evolution import random_config, references
    from autoqra_core.protocol import race_seeds
    from autoqra_core.racing import pooled_sd, table
    from autoqra_core.repair import repair
    from flows.config import load_run_config
    from flows.prepared_run import Run

    @flow(name="bench-rungs")
    def bench() -> dict:
        rc = load_run_config(args.config)
        run = Run.prepare(args.model, args.dataset, args.budget, rc, args.seed)
        settings, pri = rc.search_settings(args.seed), run.priors()
        ladder = run.ladder
        configs = references(run.space, pri, run.cost, run.budget_bytes)
        rng = random.Random(f"rungs-{args.seed}")
        avoid = pri.catastrophic(settings.evolution.catastrophic_ratio)
        while len(configs) < args.configs:
            c = repair(random_config(run.space, rng, avoid, settings.evolution.catastrophic_prob), run.space, pri,
                       run.cost, run.budget_bytes)
            if c not in configs:
                configs.append(c)
        seconds: dict[int, list[float]] = {}
        losses: dict[int, list[float | None]] = {}
        for rung in range(len(ladder.rungs)):
            start = time.time()
            evals = run.evaluate_many([(c, rung, args.seed) for c in configs])
            losses[rung] = [e.eval_loss if e.ok else None for e in evals]
            seconds[rung] = [e.seconds for e in evals]
            print(f"rung {rung}: {len(evals)} evaluations in {time.time() - start:.0f} s", flush=True)
        seeds = race_seeds(args.seed, 3)
        reps = run.evaluate_many([(c, ladder.top, s) for c in configs[:args.replicated] for s in seeds])
        tab = table(reps, ladder.top, seeds)
        return {"configs": [c.to_dict() for c in configs], "short": [c.short() for c in configs],
                "losses": losses, "seconds": seconds, "ladder": ladder.to_dict(),
                "warmup_steps": rc.train.warmup_steps, "replicates": {c.short(): [tab[c.key()][s].eval_loss for s in seeds
                                                                                 if tab[c.key()][s].ok]
                                                                     for c in configs[:args.replicated]},
                "seed_sd": pooled_sd(tab), "budget_bytes": run.budget_bytes}

    return bench()


def report(res: dict, args, wall: float) -> list[str]:
    rungs = res["ladder"]["rungs"]
    top = len(rungs) - 1
    lines = [f"# Rung correlations: `{args.model}` on `{args.dataset}`", "",
             f"Command: `.venv/bin/python bench/rungs.py --model {args.model} --dataset {args.dataset}"
             + (f" --config {args.config}" if args.config else "") + f" --configs {args.configs} --seed {args.seed}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; {wall / 60:.0f} min.  ",
             f"{len(res['configs'])} configurations at the budget (the references first, then random repaired ones), "
             f"each fine-tuned at every rung with seed {args.seed}; validation loss; warm-up {res['warmup_steps']} "
             "steps. Spearman's rho of each rung's losses against the top rung's over the configurations both finished.",
             "", "| rung | steps | data fraction | held-out rows | tokens | s / evaluation (median) | Spearman vs top | n |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, r in enumerate(rungs):
        pairs = [(a, b) for a, b in zip(res["losses"][str(k)], res["losses"][str(top)]) if a is not None and b is not None]
        rho = spearman([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) > 2 else float("nan")
        lines.append(f"| {k} | {r['steps']} | {r['data_fraction']} | {r['eval_examples']} | "
                     f"{r['steps'] * r['batch_size'] * r['seq_len']:,} | {statistics.median(res['seconds'][str(k)]):.1f} | "
                     f"{rho:+.2f} | {len(pairs)} |")
    lines += ["", "Per configuration (bits/rank per layer), validation loss by rung:", "",
              "| configuration | " + " | ".join(f"rung {k}" for k in range(len(rungs))) + " |",
              "|---|" + "---:|" * len(rungs)]
    for i, short in enumerate(res["short"]):
        cells = [res["losses"][str(k)][i] for k in range(len(rungs))]
        lines.append(f"| `{short}` | " + " | ".join("failed" if v is None else f"{v:.4f}" for v in cells) + " |")
    sd = res["seed_sd"]
    lines += ["", "Seed-to-seed noise at the top rung (the race's seeds): "
              + "; ".join(f"`{k}`: " + ", ".join(f"{v:.4f}" for v in vs) for k, vs in res["replicates"].items())
              + (f". Pooled sd {sd:.4f}." if sd is not None else ".")]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dataset", default="embedded")
    ap.add_argument("--budget", default="uniform-4bit-r16")
    ap.add_argument("--config", default=None)
    ap.add_argument("--configs", type=int, default=12)
    ap.add_argument("--replicated", type=int, default=3, help="configurations also run on the race's other seeds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="where the raw results go (default: beside --out)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rungs-embedded.md"))
    args = ap.parse_args()
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_suffix(".json")
    start = time.time()
    res = measure(args)
    work.write_text(json.dumps(res, indent=1))
    lines = report(json.loads(work.read_text()), args, time.time() - start)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
