"""The test report of one search (its ``result.json``) as a markdown table: every method's memory, the
fine-tuning tokens it spent choosing its configuration, its validation loss (what the search decided on) and
its test loss and accuracy over the report seeds, with the paired differences to the references
(``protocol.REFERENCES``: uniform-4bit-r16, uniform-best, random), recomputed from the per-seed scores, so a
result written before a reference was added gets it too; "*" marks a difference beyond 2 standard errors.

    .venv/bin/python bench/quality.py RUN_DIR [--out bench/results/NAME.md] [--command "how RUN_DIR was made"]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoqra_core.memory import format_bytes  # noqa: E402
from autoqra_core.protocol import REFERENCES, SeedScores, compare, fmt_mean_sd, fmt_paired_diff  # noqa: E402
from autoqra_core.space import Config  # noqa: E402


def compared(result: dict) -> dict[str, dict]:
    """Every method's test summary with its paired differences to the references, from the per-seed scores."""
    rows = {"autoqra": result["best"], **result["baselines"]}
    scores = {name: SeedScores(tuple(t["seeds"]), tuple(t["losses"]), tuple(t["accuracies"]))
              for name, e in rows.items() if e and (t := e.get("test"))}
    return compare(scores, REFERENCES)


def table(result: dict) -> list[str]:
    budget = result["budget_bytes"]
    tests = compared(result)
    rows = [("autoqra", result["best"])] + list(result["baselines"].items())
    head = ["method", "memory", "within budget", "tokens to choose", "validation loss", "test loss",
            "test accuracy"] + [f"Δ loss vs {r}" for r in REFERENCES] + [f"Δ accuracy vs {r}" for r in REFERENCES]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in rows:
        if not e:
            continue
        t = tests.get(name, {})
        val = e.get("eval_loss")
        cells = [f"**{name}**" if name == "autoqra" else name, format_bytes(e["memory_bytes"]),
                 "yes" if e["memory_bytes"] <= budget else "**no**", f"{e.get('train_tokens') or 0:,}",
                 "-" if val is None else f"{val:.4f}",
                 fmt_mean_sd(t.get("loss_mean"), t.get("loss_sd")), fmt_mean_sd(t.get("accuracy_mean"), t.get("accuracy_sd"), 3)]
        cells += [fmt_paired_diff(t, r, "loss") for r in REFERENCES] + [fmt_paired_diff(t, r, "accuracy") for r in REFERENCES]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path, help="a search's --out folder (with result.json)")
    ap.add_argument("--out", type=Path, help="markdown file to write (default: print)")
    ap.add_argument("--command", help="the command that made RUN_DIR, recorded with the table")
    args = ap.parse_args()
    r = json.loads((args.run / "result.json").read_text())
    p = r["protocol"]
    best = r["best"]
    model = Path(r["model"])
    lines = [
        f"# Test report: `{model.parent.name if model.name == 'model' else model.name}` on `{Path(r['dataset']).name}`, search seed {r['seed']}",
        "",
        *([f"Run: `{args.command}`  "] if args.command else []),
        f"Table: `.venv/bin/python bench/quality.py {args.run}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores. Budget {format_bytes(r['budget_bytes'])} "
        f"(memory in the top rung's training shape). {r['search_evaluations']} search evaluations. "
        f"Selection on `{p['selection_split']}` ({p['validation_examples']} rows at the top rung), report on "
        f"`{p['report_split']}` ({p['test_examples']} rows), training seeds {p['report_seeds']} (never used by "
        "the search). Δ: paired by seed, mean ± sd of the per-seed differences (negative loss / positive "
        "accuracy favour the row's method); * beyond 2 standard errors of the paired difference.",
        "",
        *table(r),
        "",
        "AutoQRA's configuration (bits/rank per layer): "
        + Config.from_dict(best["config"]).short(),
    ]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
