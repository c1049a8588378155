"""Do the lower rungs predict the top one? Rank correlation (Spearman) of validation loss between each rung of a
ladder and its top rung, over the same configurations, and the seed-to-seed sd of one configuration at the top.

A rung is a checkpoint of the one fine-tune (its schedule spans the whole run). ``--restarted`` also runs, for
each lower rung, the same configurations as a fresh fine-tune of that rung's steps with a schedule of its own (the
ladder before rungs were checkpoints: the same tokens), and a learning-curve prediction of the final loss from the
checkpoints seen so far (``lc_predict``): which of the three ranks the configurations more like the final.

Configurations: the references (the best prior-derived configuration and uniform-4bit-r16, which the search
starts at the top rung, and each bit-width at its largest fitting rank, uniform-best's candidates) and random
ones drawn and repaired as the search draws them, all at the budget; each fine-tuned at every rung with the
search's seed, and the first ``--replicated`` of them at the top rung on the race's further seeds. Validation
only: the test split is not read (choosing the ladder is tuning a default). A rung whose correlation with the top
is below 0.5 should be dropped or lengthened.

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


def lc_predict(steps: list[int], losses: list[float], total: int, power: float = 0.5) -> float:
    """The final loss of a run predicted from its checkpoints' losses: ``a + b * t**-power`` through the last two
    (the last one alone: itself)."""
    if len(losses) < 2:
        return losses[-1]
    (t0, l0), (t1, l1) = (steps[-2], losses[-2]), (steps[-1], losses[-1])
    b = (l0 - l1) / (t0 ** -power - t1 ** -power)
    return l1 + b * (total ** -power - t1 ** -power)


def lc_fits(res: dict, k: int) -> list[float | None]:
    """Each configuration's final loss predicted from its checkpoints up to rung ``k`` (None where one failed)."""
    steps = [r["steps"] for r in res["ladder"]["rungs"]]
    seen = [[res["losses"][str(j)][i] for j in range(k + 1)] for i in range(len(res["losses"]["0"]))]
    return [None if None in ls else lc_predict(steps[:k + 1], ls, steps[-1]) for ls in seen]


def measure(args) -> dict:
    from prefect import flow

    from autoqra_core.baselines import uniform_best_candidates
    from autoqra_core.evolution import random_config, references
    from autoqra_core.protocol import race_seeds
    from autoqra_core.racing import pooled_sd, table
    from autoqra_core.feasibility import repair
    from flows.config import RungSection, load_run_config
    from flows.prepared_run import Run
    from tasks.evaluate import delete_checkpoints

    @flow(name="bench-rungs")
    def bench() -> dict:
        rc = load_run_config(args.config)
        run = Run.prepare(args.model, args.dataset, args.budget, rc, args.seed)
        settings, pri = run.search_settings(), run.priors()
        ladder = run.ladder
        configs = references(run.problem(pri))  # the top rung's starts, uniform-best's
        configs += [c for c in uniform_best_candidates(run.space, run.cost, run.budget_bytes).values()
                    if c not in configs]
        rng = random.Random(f"rungs-{args.seed}")
        avoid = pri.catastrophic(settings.evolution.catastrophic_ratio)
        while len(configs) < args.configs:
            c = repair(random_config(run.space, rng, avoid, settings.evolution.catastrophic_prob), run.problem(pri))
            if c not in configs:
                configs.append(c)
        configs = configs[: args.limit or None]  # a part of the study: the first configurations (cached later)
        restarts = {}  # rung -> the same steps and data as a fine-tune of its own: its schedule ends at the rung
        for rung in range(ladder.top) if args.restarted else ():
            fid = ladder[rung]
            short = rc.model_copy(update={
                "train": rc.train.model_copy(update={"steps": fid.steps}),
                "search": rc.search.model_copy(update={"rungs": [RungSection(fraction=1.0,
                                                                             eval_examples=fid.eval_examples)]})})
            restarts[rung] = Run.prepare(args.model, args.dataset, args.budget, short, args.seed)
        rows = _rows(args)  # configurations measured by an earlier part of the study (any code version)
        for i, c in enumerate(configs):  # config by config: its run's checkpoints are deleted once it is done
            if c.key() in rows:
                continue
            start = time.time()
            row = {"short": c.short(), "losses": [], "seconds": [], "restarted": {}, "code": run.code}
            for rung in range(len(ladder.rungs)):  # each rung continues the run from the previous checkpoint
                (e,) = run.evaluate_many([(c, rung, args.seed)])
                row["losses"].append(e.eval_loss if e.ok else None)
                row["seconds"].append(e.seconds)
            for rung, alone in restarts.items():
                (e,) = alone.evaluate_many([(c, 0, args.seed)])
                row["restarted"][str(rung)] = e.eval_loss if e.ok else None
            delete_checkpoints([r.checkpoint_key(c, k, args.seed) for r in (run, *restarts.values())
                                for k in range(len(r.ladder.rungs))])
            rows[c.key()] = row
            _rows_path(args).write_text(json.dumps(rows, indent=1))  # a stopped study keeps what it finished
            print(f"configuration {i + 1}/{len(configs)} {c.short()}: {time.time() - start:.0f} s, "
                  f"losses {row['losses']}, restarted {row['restarted']}", flush=True)
        done = [rows[c.key()] for c in configs]
        losses = {r: [row["losses"][r] for row in done] for r in range(len(ladder.rungs))}
        seconds = {r: [row["seconds"][r] for row in done] for r in range(len(ladder.rungs))}
        restarted = {r: [row["restarted"].get(str(r)) for row in done] for r in restarts}
        seeds = race_seeds(args.seed, 3)
        reps = run.evaluate_many([(c, ladder.top, s) for c in configs[:args.replicated] for s in seeds])
        tab = table(reps, ladder.top, seeds)
        return {"configs": [c.to_dict() for c in configs], "short": [c.short() for c in configs],
                "losses": losses, "restarted": restarted, "seconds": seconds, "ladder": ladder.to_dict(),
                "warmup_steps": rc.train.warmup_steps, "replicates": {c.short(): [tab[c.key()][s].eval_loss for s in seeds
                                                                                 if tab[c.key()][s].ok]
                                                                     for c in configs[:args.replicated]},
                "seed_sd": pooled_sd(tab), "budget_bytes": run.budget_bytes,
                "code_versions": sorted({row["code"] for row in done})}

    return bench()


def _rows_path(args) -> Path:
    """Per-configuration results of this study (model, dataset, settings, seed), written after each one: a later
    part skips what an earlier part measured even where the code changed since (each row names its version)."""
    name = f"{args.model}-{args.dataset}-{Path(args.config).stem if args.config else 'default'}-{args.budget}-seed{args.seed}"
    return ROOT / "bench" / "results" / "rungs-rows" / f"{name}{'-restarted' if args.restarted else ''}.json"


def _rows(args) -> dict:
    path = _rows_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    return json.loads(path.read_text()) if path.exists() else {}


def report(res: dict, args, wall: float) -> list[str]:
    rungs = res["ladder"]["rungs"]
    top = len(rungs) - 1
    lines = [f"# Rung correlations: `{args.model}` on `{args.dataset}`", "",
             f"Command: `.venv/bin/python bench/rungs.py --model {args.model} --dataset {args.dataset}"
             + (f" --config {args.config}" if args.config else "") + f" --configs {args.configs} --seed {args.seed}"
             + (" --restarted" if args.restarted else "") + "`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; {wall / 60:.0f} min (the last part; "
             f"earlier parts' rows in `bench/results/rungs-rows/`), code version(s) "
             f"{', '.join(res.get('code_versions', [])) or '-'}.  ",
             f"{len(res['configs'])} configurations at the budget (the references first, then random repaired ones), "
             f"each fine-tuned at every rung with seed {args.seed}; validation loss; warm-up {res['warmup_steps']} "
             "steps. Spearman's rho of each rung's losses against the top rung's over the configurations both finished.",
             "", "| rung | steps of | held-out rows | tokens | s / evaluation (median) | Spearman vs top: checkpoint "
             "| restarted run | learning-curve fit | n |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    final = res["losses"][str(top)]

    def rho(values) -> str:
        pairs = [(a, b) for a, b in zip(values, final) if a is not None and b is not None]
        return f"{spearman([a for a, _ in pairs], [b for _, b in pairs]):+.2f}" if len(pairs) > 2 else "-"

    for k, r in enumerate(rungs):
        fit = lc_fits(res, k)
        again = res.get("restarted", {}).get(str(k))
        lines.append(f"| {k} | {r['steps']} / {r.get('total_steps') or r['steps']} | {r['eval_examples']} | "
                     f"{r['steps'] * r['batch_size'] * r['seq_len']:,} | {statistics.median(res['seconds'][str(k)]):.1f} | "
                     f"{rho(res['losses'][str(k)])} | {rho(again) if again else '-'} | {rho(fit)} | "
                     f"{sum(v is not None for v in res['losses'][str(k)])} |")
    lines += ["", "Per configuration (bits/rank per layer), validation loss by rung:", "",
              "| configuration | " + " | ".join(f"rung {k}" for k in range(len(rungs))) + " |",
              "|---|" + "---:|" * len(rungs)]
    for i, short in enumerate(res["short"]):
        cells = [res["losses"][str(k)][i] for k in range(len(rungs))]
        lines.append(f"| `{short}` | " + " | ".join("failed" if v is None else f"{v:.4f}" for v in cells) + " |")
    sd = res["seed_sd"]
    lines += ["", "Seed-to-seed noise at the top rung (the race's seeds): "
              + ("; ".join(f"`{k}`: " + ", ".join(f"{v:.4f}" for v in vs) for k, vs in res["replicates"].items())
                 + (f". Pooled sd {sd:.4f}." if sd is not None else ".") if res["replicates"]
                 else "not measured in this study (`--replicated 0`).")]
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
    ap.add_argument("--restarted", action="store_true", help="also each lower rung as a fine-tune of its own")
    ap.add_argument("--limit", type=int, default=0, help="only the first N configurations (a part of the study)")
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
