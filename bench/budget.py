"""What the search's answer is worth at each budget in whole fine-tunes, on the suite's noisy synthetic objective.

The objective of ``tests/test_search.py`` (8 layers, known exact optimum under the uniform-4bit-r16 budget) with
seed noise (sd ``--top-sd`` at the top rung), its ladder at 1/9, 1/3 and 1 of a fine-tune, every token charged
once (``protocol.charged_tokens``). For each budget (``search.fine_tunes``; "none": every planned step) the
search at the library's defaults otherwise, over search seeds: the fine-tunes it spent, the winner's true regret to
the optimum, how many seeds are worse than uniform-4bit-r16, and the share of uniform's regret it removes (the gain
an allocation can bring, captured). ``--root`` runs another checkout's code (e.g. the search before the budget
existed) on the same objective, read from that checkout's ``tests/test_search.py``; each output names the optimum
and uniform's regret, so the two can be checked to be one problem.

    .venv/bin/python bench/budget.py --seeds 0-29 [--root PATH --label NAME] [--out bench/results/budget.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def measure(budgets: list[str], seeds: list[int], top_sd: float) -> list[dict]:
    from autoqra_core.protocol import charged_tokens
    from autoqra_core.search import SearchSettings, run_search

    T = importlib.import_module("tests.test_search")
    uniform, opt = T.true_loss(T.SPACE.uniform(4, 16)), T.optimum()
    rows = []
    for b in budgets:
        settings = dataclasses.replace(SearchSettings(), ladder=T.LADDER)
        if hasattr(settings, "fine_tunes"):
            settings = dataclasses.replace(settings, fine_tunes=None if b == "none" else float(b))
        elif b != "none":
            raise SystemExit(f"{b}: this checkout's search has no budget in fine-tunes (use --budgets none)")
        spent, regret, worse, top = [], [], 0, []
        for seed in seeds:
            res = run_search(T.PROBLEM, T.Recorder(T.noisy(top_sd)),
                             dataclasses.replace(settings, seed=seed))
            spent.append(sum(charged_tokens(res.history, T.LADDER)) / T.LADDER.full.train_tokens)
            truth = T.true_loss(res.best.config)
            regret.append(truth - opt)
            worse += truth > uniform
            top.append(sum(e.rung == T.LADDER.top for e in res.history))
        rows.append({"budget": b, "fine_tunes": statistics.fmean(spent), "max_fine_tunes": max(spent),
                     "regret": statistics.fmean(regret), "regret_sd": statistics.stdev(regret) if len(regret) > 1 else 0.0,
                     "worst": max(regret), "worse_than_uniform": worse, "captured": 1 - statistics.fmean(regret) / (uniform - opt),
                     "top_rung_runs": statistics.fmean(top), "uniform_regret": uniform - opt, "optimum": opt,
                     "regrets": dict(zip(seeds, regret)), "spent": dict(zip(seeds, spent))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0-29", help="search seeds, LO-HI")
    ap.add_argument("--budgets", nargs="+", default=["4", "6", "8", "12", "16", "none"])
    ap.add_argument("--top-sd", type=float, default=0.015)
    ap.add_argument("--root", default=None, help="run this checkout's autoqra_core (default: this one)")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--json", default=None, help="write the rows here (and print them)")
    args = ap.parse_args()
    code = Path(args.root).resolve() if args.root else ROOT
    sys.path.insert(0, str(code))  # its search and its tests/ (the objective: the same in every checkout since 8630bf4)
    start = time.time()
    rows = measure(args.budgets, _seeds(args.seeds), args.top_sd)
    out = {"label": args.label, "root": str(code), "seeds": args.seeds, "top_sd": args.top_sd, "rows": rows,
           "seconds": round(time.time() - start, 1), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    text = json.dumps(out, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
