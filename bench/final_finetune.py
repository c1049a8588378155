"""A longer fine-tune than the search's: the search's winner, uniform-4bit-r16 and uniform-best fine-tuned for one
epoch of the train split, scored on the test split over the report's fresh seeds, beside their top-rung test
report. Does the ordering at the search's top rung survive a longer fine-tune? (Written for the addition study,
when the export trained a run of its own; today the search's top rung is the user's fine-tune, and this asks
what a search at a shorter fine-tune than the user's would have missed.)

``--runner-up`` adds the search's closest raced challenger (lowest mean top-rung validation loss over 2+ seeds,
within budget, not the winner) and ``--uniform uniform-8bit-r4 ...`` more uniform recipes: when the winner is a
uniform recipe itself, they say whether a per-layer allocation or another recipe overtakes it at a longer fine-tune.

Each length is a one-rung ladder handed to the same cached evaluation as the search (``Run.test_report``), so a
rerun reuses every finished fine-tune. Nothing here is chosen: the configurations are those ``result.json``
already names.

    .venv/bin/python bench/final_finetune.py RUN_DIR --model smollm2-135m --dataset addition \
        --config bench/smollm2-addition.yaml [--seeds 2] [--runner-up] [--uniform uniform-8bit-r4] \
        [--out bench/results/NAME.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import shown, study_arguments, uniform  # noqa: E402

METHODS = ("autoqra", "uniform-4bit-r16", "uniform-best")


def lengths(run, rc) -> dict[str, dict]:
    """One epoch of the whole train split, as the fine-tune's settings (``train.steps``, ``train.data_fraction``)."""
    from autoqra_core.data import train_blocks

    ft = rc.fine_tune()
    blocks = len(train_blocks(run.wb.task, run.wb.tokenizer, ft.seq_len, 1.0, rc.train.answer_only))
    return {"one epoch": dict(steps=math.ceil(blocks / ft.batch_size), data_fraction=1.0)}


def runner_up(result: dict) -> dict | None:
    """The raced challenger closest to the winner: lowest mean validation loss at the top rung over 2+ seeds,
    within budget, other than the winner (validation only: chosen by what the search itself saw)."""
    from autoqra_core.space import Config

    top = max(e.get("rung", e.get("fidelity")) for e in result["evaluations"])  # "fidelity": older results
    runs: dict[str, list[dict]] = {}
    for e in result["evaluations"]:
        if e.get("rung", e.get("fidelity")) == top and e["status"] == "ok" and e["memory_bytes"] <= result["budget_bytes"]:
            runs.setdefault(e["config_key"], []).append(e)
    winner = Config.from_dict(result["best"]["config"]).key()
    raced = {k: sum(e["eval_loss"] for e in v) / len(v) for k, v in runs.items() if len(v) >= 2 and k != winner}
    return runs[min(raced, key=raced.get)][0]["config"] if raced else None


def measure(args) -> dict:
    from prefect import flow

    from autoqra_core.protocol import compare
    from autoqra_core.space import Config, SearchSpace
    from bench.quality import compared
    from flows.config import RungSection, load_run_config
    from flows.prepared_run import Run

    result = json.loads((args.run / "result.json").read_text())
    entries = {"autoqra": result["best"], **result["baselines"]}
    methods = {m: Config.from_dict(entries[m]["config"]) for m in METHODS if entries.get(m)}
    if args.runner_up and (c := runner_up(result)):
        methods["runner-up (raced)"] = Config.from_dict(c)
    for recipe in args.uniform:
        methods[recipe] = uniform(SearchSpace(methods["autoqra"].names), recipe)

    @flow(name="bench-final-finetune")
    def bench() -> dict:
        rc = load_run_config(args.config)
        rc = rc.model_copy(update={"report": rc.report.model_copy(update={"seeds": args.seeds})})
        out = {}
        todo = lengths(Run.prepare(args.model, args.dataset, None, rc, result["seed"]), rc)
        for name, rung in ((k, v) for k, v in todo.items() if k in args.lengths):
            top = RungSection(fraction=1.0, eval_examples=rc.search.rungs[-1].eval_examples)
            one = rc.model_copy(update={"search": rc.search.model_copy(update={"rungs": [top]}),
                                        "train": rc.train.model_copy(update=rung)})
            start = time.perf_counter()
            scores = Run.prepare(args.model, args.dataset, None, one, result["seed"]).test_report(methods)
            out[name] = {"rung": rung, "seconds": time.perf_counter() - start,
                         "test": compare(scores, ("uniform-4bit-r16", "uniform-best"))}
            print(name, json.dumps(out[name]["test"], default=str)[:400], flush=True)
        return out

    return {"methods": {m: c.to_dict() for m, c in methods.items()},
            "top_rung": {m: top[m] for m in methods if m in (top := compared(result))}, "final": bench()}


def report(data: dict, args, wall: float) -> str:
    from autoqra_core.protocol import fmt_mean_sd

    from autoqra_core.protocol import fmt_paired_diff

    cols = [("top rung (the search's)", data["top_rung"])] + [
        (f"{name}: {d['rung']['steps']} steps", d["test"]) for name, d in data["final"].items()]
    lines = [
        "# The fine-tune a user runs: the search's top rung vs the export's length and one epoch (test)", "",
        f"Command: `.venv/bin/python bench/final_finetune.py {args.run} --model {args.model} --dataset "
        f"{args.dataset} --config {shown(args.config)} --seeds {args.seeds}"
        + (" --runner-up" if args.runner_up else "") + "".join(f" --uniform {u}" for u in args.uniform)
        + (f" --lengths {' '.join(repr(x) for x in args.lengths)}" if len(args.lengths) < 2 else "") + "`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; wall time {wall / 60:.0f} min.  ",
        "Test loss and accuracy, mean ± sd over the report's fresh seeds; Δ paired by seed (* beyond 2 standard "
        "errors).", "",
        "| method | " + " | ".join(f"{c}: loss | {c}: accuracy" for c, _ in cols) + " |",
        "|---|" + "---:|---:|" * len(cols),
    ]
    for m in data["methods"]:
        cells = []
        for _, t in cols:
            r = t.get(m) or {}
            cells += [fmt_mean_sd(r.get("loss_mean"), r.get("loss_sd")),
                      fmt_mean_sd(r.get("accuracy_mean"), r.get("accuracy_sd"), 3)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Each method minus each reference (loss; accuracy):", ""]
    for c, t in cols:
        for m in (m for m in data["methods"] if m not in ("uniform-4bit-r16", "uniform-best") and m in t):
            refs = "; ".join(f"vs {ref}: {fmt_paired_diff(t[m], ref, 'loss')}, accuracy {fmt_paired_diff(t[m], ref, 'accuracy')}"
                             for ref in ("uniform-4bit-r16", "uniform-best"))
            lines.append(f"* {c}, {m}: {refs}")
    for name, d in data["final"].items():
        lines.append(f"* {name}: {d['seconds'] / 60:.0f} min for {len(data['methods'])} methods x {args.seeds} seeds")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a search's --out folder (with result.json and its baselines)")
    study_arguments(ap)
    ap.add_argument("--seeds", type=int, default=2, help="fresh report seeds per method and length")
    ap.add_argument("--runner-up", action="store_true", help="add the search's closest raced challenger")
    ap.add_argument("--uniform", nargs="*", default=[], help="more uniform recipes, e.g. uniform-8bit-r4")
    ap.add_argument("--lengths", nargs="+", default=["one epoch"], choices=["one epoch"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    start = time.perf_counter()
    data = measure(args)
    text = report(data, args, time.perf_counter() - start)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
