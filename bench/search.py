"""AutoQRA vs the baselines on the embedded default, several seeds, at a budget = uniform-4bit-r16.

Runs ``autoqra search --baselines`` once per seed (each in its own output folder, the
evaluation cache shared), then tabulates held-out loss, accuracy, memory, evaluations and
wall time of the search and of every baseline, and writes ``bench/results/search.md``.

    .venv/bin/python bench/search.py --seeds 0 1 2 [--config search.yaml] [--out bench/results/search.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["AutoQRA", "uniform-2bit-r16", "uniform-3bit-r16", "uniform-4bit-r16", "uniform-8bit-r16", "sequential",
         "random", "fp-lora"]


def run(seed: int, work: Path, config: str | None) -> tuple[dict, float]:
    out = work / f"seed{seed}"
    cmd = [str(ROOT / ".venv" / "bin" / "autoqra"), "search", "--budget", "uniform-4bit-r16", "--out", str(out),
           "--seed", str(seed), "--baselines"] + (["--config", config] if config else [])
    start = time.time()
    subprocess.run(cmd, check=True, env={**os.environ, "AUTOQRA_HOME": str(work / "home")},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "result.json").read_text()), time.time() - start


def rows(result: dict) -> dict[str, dict]:
    out = {"AutoQRA": result["best"]} | result["baselines"]
    return {k: v for k, v in out.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", default=None)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-search"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "search.md"))
    args = ap.parse_args()
    work = Path(args.work)
    results = []
    for seed in args.seeds:
        res, secs = run(seed, work, args.config)
        results.append((seed, res, secs))
        print(f"seed {seed}: {secs / 60:.1f} min, best {res['best']['eval_loss']:.4f}", flush=True)

    lines = [
        "# AutoQRA vs baselines on the embedded default (budget = uniform-4bit-r16)",
        "",
        f"Command: `.venv/bin/python bench/search.py --seeds {' '.join(map(str, args.seeds))}"
        + (f" --config {args.config}`" if args.config else "`"),
        f"Machine: {os.cpu_count()} CPU cores, no GPU. Held-out loss = mean token NLL of the correct definition on "
        "the WordNet test split after fine-tuning at the top rung (lower is better); accuracy = 4-way multiple choice.",
        "",
        "| seed | method | eval loss | accuracy | memory (MiB) | within budget | bits/rank per layer |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed, res, _ in results:
        for name, e in rows(res).items():
            fits = "yes" if e["memory_bytes"] <= res["budget_bytes"] else "no"
            acc = "-" if e.get("accuracy") is None else f"{e['accuracy']:.3f}"
            lines.append(f"| {seed} | {name} | {e['eval_loss']:.4f} | {acc} | {e['memory_bytes'] / 2**20:.2f} | {fits} | "
                         + " ".join(f"{l['bits']}/{l['rank']}" for l in e["config"]["layers"]) + " |")
    lines += ["", "## Mean over seeds", "", "| method | eval loss (mean ± sd) | accuracy (mean) |", "|---|---|---|"]
    for name in NAMES:
        losses = [rows(r)[name]["eval_loss"] for _, r, _ in results if name in rows(r)]
        accs = [rows(r)[name].get("accuracy") or 0.0 for _, r, _ in results if name in rows(r)]
        if losses:
            sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
            lines.append(f"| {name} | {statistics.mean(losses):.4f} ± {sd:.4f} | {statistics.mean(accs):.3f} |")
    lines += ["", "## Cost of each search", "", "| seed | evaluations (all rungs) | top-rung evaluations | wall time (min, incl. baselines) |",
              "|---|---|---|---|"]
    for seed, res, secs in results:
        top = max(e["fidelity"] for e in res["evaluations"])
        n_top = sum(e["fidelity"] == top for e in res["evaluations"])
        lines.append(f"| {seed} | {len(res['evaluations'])} | {n_top} | {secs / 60:.1f} |")
    lines += ["", "## Evaluations and fine-tuning time of each method (mean over seeds)", "",
              "Time = sum of the evaluations' fine-tune + scoring seconds (orchestration excluded). Random search",
              "gets as many top-rung evaluations as the search made; its time is that count x the mean top-rung time.",
              "", "| method | evaluations | fine-tune time (s) |", "|---|---|---|"]
    for name in NAMES:
        evals, secs = [], []
        for _, res, _ in results:
            top = max(e["fidelity"] for e in res["evaluations"])
            top_secs = [e["seconds"] for e in res["evaluations"] if e["fidelity"] == top and e.get("seconds")]
            if name == "AutoQRA":
                hist = res["evaluations"][: res["search_evaluations"]]
                evals.append(len(hist))
                secs.append(sum(e.get("seconds") or 0 for e in hist))
            elif name == "random":
                n = sum(e["fidelity"] == top for e in res["evaluations"][: res["search_evaluations"]])
                evals.append(n)
                secs.append(n * statistics.mean(top_secs))
            elif name in res["baselines"]:
                evals.append(1)
                secs.append(res["baselines"][name].get("seconds") or 0)
        if evals:
            lines.append(f"| {name} | {statistics.mean(evals):.1f} | {statistics.mean(secs):.0f} |")
    plots = Path(args.out).parent / "search"
    plots.mkdir(parents=True, exist_ok=True)
    lines += ["", "## Plots (seed by seed)", ""]
    for seed, _, _ in results:
        for kind in ("allocation", "progress", "pareto"):
            src = work / f"seed{seed}" / f"{kind}.png"
            if src.exists():
                shutil.copy(src, plots / f"seed{seed}-{kind}.png")
        lines.append(f"- seed {seed}: [allocation](search/seed{seed}-allocation.png), "
                     f"[progress](search/seed{seed}-progress.png), [Pareto front](search/seed{seed}-pareto.png)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
