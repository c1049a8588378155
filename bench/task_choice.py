"""Which task, built offline, makes a real model's quality separate methods by accuracy and not only by loss?

Candidates (``infra/embedded/build.py``'s ``TASKS``, from files on this machine): WordNet definitions (the
shipped default, "which definition belongs to this word?"), WordNet hypernyms ("plate is a kind of ..."),
WordNet antonyms ("The opposite of outside is ..."), two-digit addition with near-miss choices. Each has
4-way questions, split so no held-out word (pair, sum) is trained on.

Per task: unquantized LoRA r16 and uniform 8/4/3/2-bit r16, fine-tuned at the top rung of ``--config`` (default
``bench/smollm2.yaml``) with each of ``--seeds`` and scored on the *validation* split at that rung (the test
split is not read: choosing the default task is tuning a default). A task separates methods when accuracy
moves with the bits by several binomial standard errors and sits away from chance and from 1.

    .venv/bin/python bench/task_choice.py [--model smollm2-135m] [--seeds 0] [--tasks ...] [--out bench/results/tasks.md]
    .venv/bin/python bench/task_choice.py --report-only   # the table from --work's results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BITS = (8, 4, 3, 2)


def run_task(name: str, path: Path, args) -> dict:
    """Every method and seed on one task, inside one Prefect flow (evaluations are cached task runs)."""
    from prefect import flow

    from autoqra_core.baselines import fp_lora, uniform_configs
    from flows.config import load_run_config
    from flows.prepared_run import Run

    @flow(name=f"bench-tasks-{name}")
    def bench() -> dict:
        rc = load_run_config(args.config)
        out = {}
        for seed in args.seeds:
            run = Run.prepare(args.model, str(path), None, rc, seed)
            methods = {"fp-lora": fp_lora(run.space, rc.baselines.rank)} | uniform_configs(run.space, BITS, rc.baselines.rank)
            start = time.time()
            evals = run.evaluate_many([(c, run.ladder.top, run.seed) for c in methods.values()])
            for m, e in zip(methods, evals):
                out.setdefault(m, []).append({"seed": seed, "loss": e.eval_loss if e.ok else None,
                                              "accuracy": e.accuracy, "reason": e.reason})
            print(f"{name} seed {seed}: {len(evals)} fine-tunes in {time.time() - start:.0f} s", flush=True)
        task = run.wb.task
        return {"methods": out, "questions": run.ladder[run.ladder.top].eval_examples,
                "rows": {"train": len(task.train), **{s: len(task.held_out(s)) for s in ("validation", "test")}}}

    return bench()


def _mean(vals: list) -> float | None:
    ok = [v for v in vals if v is not None]
    return statistics.fmean(ok) if ok else None


def table(results: dict) -> list[str]:
    """Per task: accuracy (loss) of each method, mean over seeds; fp-lora minus uniform-2/4-bit and 8-bit minus
    4-bit accuracy gaps in standard errors of a difference of two binomial proportions at that many questions."""
    methods = ["fp-lora"] + [f"uniform-{b}bit-r16" for b in BITS]
    head = ["task", "rows (train/val)", "seeds"] + methods + ["fp − 2-bit (SE)", "fp − 4-bit (SE)", "8 − 4-bit (SE)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---|" + "---:|" * (len(head) - 3)]
    for task, r in results.items():
        acc = {m: _mean([x["accuracy"] for x in r["methods"][m]]) for m in methods}
        loss = {m: _mean([x["loss"] for x in r["methods"][m]]) for m in methods}
        n = r["questions"] * len(r["methods"]["fp-lora"])

        def gap(other: str, ref: str = "fp-lora") -> str:
            p, q = acc[ref], acc[other]
            if p is None or q is None:
                return "-"
            se = math.sqrt(max(p * (1 - p) + q * (1 - q), 1e-12) / n)
            return f"{p - q:+.3f} ({(p - q) / se:+.1f})"

        cells = [task, f"{r['rows']['train']:,}/{r['rows']['validation']:,}",
                 ", ".join(str(x["seed"]) for x in r["methods"]["fp-lora"])]
        cells += ["-" if acc[m] is None else f"{acc[m]:.3f} ({loss[m]:.3f})" for m in methods]
        cells += [gap("uniform-2bit-r16"), gap("uniform-4bit-r16"), gap("uniform-4bit-r16", "uniform-8bit-r16")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["wordnet", "hypernym", "antonym", "addition"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--config", default=str(ROOT / "bench" / "smollm2.yaml"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-tasks"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tasks.md"))
    ap.add_argument("--report-only", action="store_true", help="write the table from --work's results.json")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    (work / "prefect").mkdir(parents=True, exist_ok=True)  # Prefect makes its home without parents
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")  # a busy machine starts it slowly

    from infra.embedded.build import SIZES, TASKS, write_task
    from infra.settings import EMBEDDED_DATASETS, embedded_dataset_path

    rel = os.path.relpath(args.config, ROOT)
    store = work / "results.json"  # tasks run by earlier commands stay in the table (each with its command)
    results = json.loads(store.read_text()) if store.exists() else {}
    for name in [] if args.report_only else args.tasks:
        path = embedded_dataset_path(name) if name in EMBEDDED_DATASETS else work / name
        if name not in EMBEDDED_DATASETS:
            write_task(TASKS[name](SIZES), path)
        start = time.time()
        results[name] = run_task(name, path, args) | {
            "minutes": round((time.time() - start) / 60, 1),
            "command": f".venv/bin/python bench/task_choice.py --model {args.model} --config {rel} --seeds "
                       f"{' '.join(map(str, args.seeds))} --tasks {' '.join(args.tasks)}"}
        store.write_text(json.dumps(results, indent=1))
    commands = sorted({r["command"] for r in results.values()})
    lines = [f"# Which offline task separates methods on {args.model}", "",
             "Commands: " + "; ".join(f"`{c}`" for c in commands) + " (a cached fine-tune is not run again)  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; minutes per task (last command): "
             + ", ".join(f"{t} {r['minutes']}" for t, r in results.items()) + ".",
             "", f"Validation accuracy (loss) at the top rung of `{rel}`, mean over the seeds listed; chance is "
                 "0.25. Gaps in brackets are in binomial standard errors of the difference over questions x seeds "
                 "(seed-to-seed variance not included).", ""] + table(results)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
