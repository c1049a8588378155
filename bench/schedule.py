"""Cosine or warmup-stable-decay over the one fine-tune: two rung studies (``bench/rungs.py``) of the same
configurations that differ only in ``train.schedule``, side by side.

Two questions, validation only: which schedule's checkpoints rank the configurations more like the end of the run
(Spearman of each rung against the top), and which ends lower (the top rung's loss, paired by configuration).

    .venv/bin/python bench/schedule.py bench/results/rungs-checkpoints-embedded.json \
        bench/results/rungs-checkpoints-embedded-wsd.json --out bench/results/schedule-embedded.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.rungs import lc_fits, spearman  # noqa: E402


def rhos(res: dict) -> list[tuple[float, float]]:
    """Per lower rung: Spearman of the checkpoint's loss, and of the learning-curve prediction, against the top."""
    top = len(res["ladder"]["rungs"]) - 1
    final = res["losses"][str(top)]
    return [(spearman(res["losses"][str(k)], final), spearman(lc_fits(res, k), final)) for k in range(top)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cosine", type=Path)
    ap.add_argument("wsd", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    a, b = (json.loads(p.read_text()) for p in (args.cosine, args.wsd))
    assert a["short"] == b["short"], "the two studies must fine-tune the same configurations"
    top = str(len(a["ladder"]["rungs"]) - 1)
    fa, fb = a["losses"][top], b["losses"][top]
    diff = [y - x for x, y in zip(fa, fb)]
    steps = [r["steps"] for r in a["ladder"]["rungs"]]
    lines = [f"# Cosine or warmup-stable-decay over the one fine-tune ({steps[-1]} steps, checkpoints at "
             f"{', '.join(map(str, steps[:-1]))})", "",
             f"Command: `.venv/bin/python bench/schedule.py {args.cosine.relative_to(ROOT) if args.cosine.is_absolute() else args.cosine} "
             f"{args.wsd.relative_to(ROOT) if args.wsd.is_absolute() else args.wsd}`, from two `bench/rungs.py` "
             f"studies of the same {len(fa)} configurations (validation only).", "",
             "| rung | steps | Spearman vs top: cosine | wsd | learning-curve fit: cosine | wsd |",
             "|---:|---:|---:|---:|---:|---:|"]
    for k, ((ca, fa_), (cb, fb_)) in enumerate(zip(rhos(a), rhos(b))):
        lines.append(f"| {k} | {steps[k]} | {ca:+.2f} | {cb:+.2f} | {fa_:+.2f} | {fb_:+.2f} |")
    lines += ["", f"Top-rung validation loss, mean over the configurations: cosine {statistics.mean(fa):.4f}, "
              f"wsd {statistics.mean(fb):.4f}; wsd - cosine paired by configuration {statistics.mean(diff):+.4f} ± "
              f"{statistics.stdev(diff):.4f} (sd), wsd lower on {sum(d < 0 for d in diff)}/{len(diff)}. "
              f"The best configuration at the top: cosine `{a['short'][fa.index(min(fa))]}`, "
              f"wsd `{b['short'][fb.index(min(fb))]}`.",
              f"Seed-to-seed sd at the top (the race's seeds, pooled): cosine {a['seed_sd'] or float('nan'):.4f}, "
              f"wsd {b['seed_sd'] or float('nan'):.4f}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
