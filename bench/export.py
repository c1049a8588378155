"""Every part of the export folder for one mixed 2/3/4/8-bit configuration: bytes on disk and the test loss
of each part reloaded from its files (model/ + adapter/ through hqq, model-ct/ + adapter/ and merged/ through
transformers, gguf/ through transformers' GGUF loader), beside the fine-tuned model in memory.

    .venv/bin/python bench/export.py [--model embedded] [--dataset embedded] [--config FILE] \
        [--bits 2 3 4 8 4 3] [--rank 16] [--out bench/results/export.md]

The configuration cycles ``--bits`` over the layers at rank ``--rank``; the fine-tune is the settings file's
``export:`` section (default: one epoch over 20% of the train split, the whole test split scored).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dataset", default="embedded")
    ap.add_argument("--config", default=None)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8, 4, 3])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="override train.steps (a shorter fine-tune)")
    ap.add_argument("--keep", default=None, help="write the export folder here instead of a temporary one")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "export.md"))
    args = ap.parse_args()

    from autoqra_core import export as ex
    from autoqra_core.finetune import run_config
    from autoqra_core.space import Config, LayerChoice
    from flows.config import load_run_config
    from flows.prepared_run import Run

    rc = load_run_config(args.config)
    if args.steps:
        rc = rc.model_copy(update={"train": rc.train.model_copy(update={"steps": args.steps})})
    run = Run.prepare(args.model, args.dataset, None, rc, 0)
    names = run.space.layers
    config = Config(tuple(LayerChoice(n, args.bits[i % len(args.bits)], args.rank) for i, n in enumerate(names)))
    s = dataclasses.replace(rc.export_settings(), merge=True, formats=ex.FORMATS)
    wb, q, t = run.wb, rc.quant_settings(), rc.train_settings(1)
    start = time.perf_counter()
    _, ckpt = run_config(wb.base, wb.tokenizer, wb.task, wb.lmap, config, run.ladder.full, run.ladder.top, 0, q, t,
                         split=None, cache=wb.packed)  # the fine-tune the export ships
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or tmp) / "champion"
        m = ex.write_export(wb.base, wb.tokenizer, wb.task, wb.lmap, config, ckpt,
                            dataclasses.replace(run.ladder.full, eval_examples=len(wb.task.test)), s, q, t, out)
    wall = time.perf_counter() - start
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    rows = [("in memory (fine-tuned, `sim`)", None, m["in_memory"]),
            ("`model/` + `adapter/` (hqq's loader + peft)", m["bytes"]["model"] + m["bytes"].get("adapter", 0), m["files"]),
            ("`model-ct/` + `adapter/` (transformers + peft)", m["bytes"]["model-ct"] + m["bytes"].get("adapter", 0),
             m["formats"]["ct"]),
            (f"`merged/` ({s.merged_dtype})", m["bytes"]["merged"], m["merged"]),
            ("`gguf/` (transformers' GGUF loader)", m["bytes"].get("gguf"), m["formats"]["gguf"])]
    counts = Counter(m["formats"]["gguf"].get("tensor_types", {}).values())
    lines = [
        f"# The export's parts: bytes on disk and test loss ({args.model}, {args.dataset})", "",
        f"Command: `.venv/bin/python bench/export.py --model {args.model} --dataset {args.dataset}"
        + (f" --config {args.config}" if args.config else "") + f" --bits {' '.join(map(str, args.bits))} "
        f"--rank {args.rank}" + (f" --steps {args.steps}" if args.steps else "") + "`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; wall time {wall / 60:.1f} min "
        "(fine-tune, writing and scoring every part).  ",
        f"Configuration (bits/rank per layer): {' '.join(f'{l.bits}/{l.rank}' for l in config.layers)}. "
        f"Fine-tune: {m['fine_tune']['steps']} steps, seed {m['exported_seed']}; test split: "
        f"{m['fine_tune']['test_examples']} rows, every part scored by the same code on its reloaded weights (fp32).",
        "",
        "| part | bytes on disk | test loss | test accuracy | loss minus in memory |",
        "|---|---:|---:|---:|---:|",
    ]
    base = m["in_memory"]["loss"]
    for label, nbytes, r in rows:
        size, delta = ("-", "-") if nbytes is None else (f"{nbytes:,}", f"{r['loss'] - base:+.2e}")
        lines.append(f"| {label} | {size} | {fmt(r['loss'])} | {fmt(r.get('accuracy'))} | {delta} |")
    lines += [
        "",
        f"GGUF tensor types: {', '.join(f'{k} {n}' for k, n in sorted(counts.items()))} (8 -> Q8_0; 4, 3, 2 -> "
        "Q4_1: the gguf package writes no K-quants, so 2- and 3-bit layers carry more bits than searched; "
        "embeddings F16, norms F32).",
        "",
        "Reading: `model-ct/` holds HQQ's packed weights exactly (same loss as `model/` to float rounding) but "
        "stores each weight as a byte (`naive-quantized`: the only compressed-tensors format that keeps HQQ's "
        "float zero points), so it is larger on disk than `model/`'s packed bits; transformers dequantizes it to "
        "dense weights on load. `gguf/` re-quantizes the merged weights with GGML's round-to-nearest, so its "
        "loss differs from the others by that rounding.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
