"""Orchestration overhead per evaluation: the same evaluations called directly vs. as cached Prefect task
runs (``evaluate.map`` inside a flow, Prefect's ephemeral server, results persisted), on the embedded default.

Overhead per evaluation = (flow wall time - direct wall time) / evaluations, reported against the mean
evaluation time at each rung. Target: < 5 %. Writes ``bench/results/overhead.md``.

    .venv/bin/python bench/overhead.py [--n 6] [--out bench/results/overhead.md]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=6, help="evaluations per rung")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "overhead.md"))
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="autoqra-overhead-"))
    os.environ.update(AUTOQRA_HOME=str(home), PREFECT_HOME=str(home / "prefect"),
                      PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(home / "results"),
                      MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      PREFECT_TASKS_REFRESH_CACHE="true")  # recompute (and persist) even if cached

    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from autoqra_core.finetune import evaluate_config
    from autoqra_core.space import Config
    from flows.config import RunConfig
    from flows.prepared_run import Run

    run = Run.prepare("embedded", "embedded", None, RunConfig(), seed=0)
    rng = random.Random(0)
    wb, rc = run.wb, run.rc

    def configs(n: int) -> list[Config]:
        return [Config.from_dict({"layers": [{"name": name, "bits": rng.choice((2, 3, 4, 8)),
                                              "rank": rng.choice((4, 8, 16, 32))} for name in run.space.layers]})
                for _ in range(n)]

    @flow(name="overhead-bench", task_runner=ThreadPoolTaskRunner(max_workers=1))  # as `autoqra search`
    def through_prefect(pairs: list) -> float:
        start = time.perf_counter()
        evs = run.evaluate_many(pairs)
        assert all(e.ok for e in evs)
        return time.perf_counter() - start

    rows = []
    evaluate_config(wb.base, wb.tokenizer, wb.task, wb.lmap, configs(1)[0], run.ladder[0], 0, 0,
                    rc.quant_settings(), rc.train_settings(0))  # warm-up: first-call costs out of both sides
    for rung in range(len(run.ladder.rungs)):
        cfgs = configs(args.n)  # the same configurations on both sides; the Prefect side refreshes its cache
        start = time.perf_counter()
        for c in cfgs:
            evaluate_config(wb.base, wb.tokenizer, wb.task, wb.lmap, c, run.ladder[rung], rung, run.cost(c),
                            rc.quant_settings(), rc.train_settings(0))
        direct = time.perf_counter() - start
        via = through_prefect([(c, rung, run.seed) for c in cfgs])
        per_eval = direct / args.n
        overhead = (via - direct) / args.n
        rows.append((rung, run.ladder[rung].steps, per_eval, via / args.n, overhead, 100 * overhead / per_eval))
        print(f"rung {rung}: direct {per_eval:.2f} s/eval, prefect {via / args.n:.2f} s/eval, "
              f"overhead {overhead:+.2f} s ({100 * overhead / per_eval:+.1f} %)", flush=True)

    lines = [
        "# Orchestration overhead per evaluation (embedded default)",
        "",
        f"Command: `.venv/bin/python bench/overhead.py --n {args.n}`  ",
        f"Machine: {os.cpu_count()} CPU cores, no GPU; Prefect ephemeral server, results persisted to a local folder.",
        "",
        "Direct = `autoqra_core.finetune.evaluate_config` in a loop. Prefect = the same configurations through",
        "`Run.evaluate_many`: cached `evaluate` task runs, one at a time in the flow's thread as with the default",
        "single worker, cache refreshed so every one is recomputed, result persisted. Overhead = difference of",
        "wall time per evaluation; differences of a few percent either way are run-to-run noise.",
        "",
        "| rung | steps | direct s/eval | Prefect s/eval | overhead s/eval | overhead % |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r} | {s} | {d:.2f} | {p:.2f} | {o:+.2f} | {pct:+.1f} % |" for r, s, d, p, o, pct in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
