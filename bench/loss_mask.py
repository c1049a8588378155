"""Multiple choice trained on the whole row or on the answer only (``train.answer_only``): what it changes in
validation loss and accuracy, and in seconds per evaluation (answer-only rows are packed whole and the LM head
runs only at the answer's positions). Uniform-4bit-r16 and uniform-8bit-r16 at the top rung, the same seeds for
both objectives. Validation only: choosing the default is tuning one, so the test split is not read.

    .venv/bin/python bench/loss_mask.py [--model smollm2-135m] [--dataset addition] [--config bench/smollm2.yaml] \
        [--seeds 0 1] [--threads N] [--out bench/results/loss-mask-smollm2-addition.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPES = ((4, 16), (8, 16))


def measure(args) -> list[dict]:
    from prefect import flow

    from flows.config import load_run_config
    from flows.prepared_run import Run

    @flow(name="bench-loss-mask")
    def bench() -> list[dict]:
        rows = []
        for answer_only in (False, True):
            rc = load_run_config(args.config)
            rc = rc.model_copy(update={"train": rc.train.model_copy(update={"answer_only": answer_only})})
            run = Run.prepare(args.model, args.dataset, None, rc, 0)
            top = run.ladder.top
            requests = [(run.space.uniform(b, r), top, s) for b, r in RECIPES for s in args.seeds]
            for (config, _, seed), e in zip(requests, run.evaluate_many(requests)):
                rows.append({"answer_only": answer_only, "recipe": f"uniform-{config.bits[0]}bit-r{config.ranks[0]}",
                             "seed": seed, "loss": e.eval_loss, "accuracy": e.accuracy, "seconds": e.seconds,
                             "ok": e.ok, "reason": e.reason})
                print(rows[-1], flush=True)
        return rows

    return bench()


def report(rows: list[dict], args, wall: float) -> str:
    lines = [
        "# Multiple choice: loss on the whole row vs on the answer only (validation)",
        "",
        f"Command: `.venv/bin/python bench/loss_mask.py --model {args.model} --dataset {args.dataset} "
        f"--config {args.config} --seeds {' '.join(map(str, args.seeds))}"
        + (f" --threads {args.threads}" if args.threads else "") + "`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; wall time {wall / 60:.0f} min.  ",
        "Top rung of the settings file; the validation loss is the correct choice's mean token loss in both columns "
        "(what the search ranks by), so the objectives are compared on the same number.",
        "",
        "| recipe | seed | loss: whole row | loss: answer only | accuracy: whole row | accuracy: answer only "
        "| s/eval: whole row | s/eval: answer only |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["recipe"], r["seed"], r["answer_only"]): r for r in rows}
    diffs: dict[str, list[float]] = {}
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        for seed in args.seeds:
            a, b = by[(recipe, seed, False)], by[(recipe, seed, True)]
            diffs.setdefault(recipe, []).append(b["loss"] - a["loss"])
            lines.append(f"| {recipe} | {seed} | {a['loss']:.4f} | {b['loss']:.4f} | {a['accuracy']:.3f} | "
                         f"{b['accuracy']:.3f} | {a['seconds']:.0f} | {b['seconds']:.0f} |")
    lines += ["", "Answer only minus whole row (validation loss, paired by seed):", ""]
    for recipe, d in diffs.items():
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        lines.append(f"* {recipe}: {statistics.fmean(d):+.4f} ± {sd:.4f} (n={len(d)})")
    warm = [r for r in rows if r["seed"] == args.seeds[-1]]  # the first seed of a recipe also pays its quantization
    secs = {k: statistics.fmean(r["seconds"] for r in warm if r["answer_only"] is k) for k in (False, True)}
    lines.append(f"* seconds per evaluation (seed {args.seeds[-1]}: the first seed of a recipe also pays its "
                 f"one-time quantization): {secs[False]:.1f} (whole row) vs {secs[True]:.1f} (answer only)")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="addition")
    ap.add_argument("--config", default=str(ROOT / "bench" / "smollm2.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "loss-mask-smollm2-addition.md"))
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = measure(args)
    Path(args.out).write_text(report(rows, args, time.perf_counter() - start))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
