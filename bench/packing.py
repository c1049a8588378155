"""Short masked rows (prompt/completion, conversations, multiple choice with ``answer_only``): packing whole rows
into ``seq_len`` blocks (what training does) vs padding each batch to its longest row, at the same rows per
optimizer step; and the LM head run only at the trained positions vs at every position (the loss is the same).

Seconds per step and per 1000 training rows, positions the body computes per step (padding included), on the
first rows of the train split, one uniform recipe, after one warm-up step. Timing only: both layouts train the
same rows with the same loss, except that a packed row also attends to the rows before it in its block.

    .venv/bin/python bench/packing.py [--model smollm2-135m] [--dataset addition] \
        [--config bench/smollm2-addition.yaml] [--steps 6] [--out bench/results/NAME.md]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def padded(rows: list[tuple[list[int], list[bool]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of rows right-padded to its longest row (causal attention: padding after a row never reaches it)."""
    from autoqra_core.finetune import IGNORE

    width = max(len(ids) for ids, _ in rows)
    ids = [r + [pad] * (width - len(r)) for r, _ in rows]
    labels = [[t if m else IGNORE for t, m in zip(r, mask)] + [IGNORE] * (width - len(r)) for r, mask in rows]
    return torch.tensor(ids), torch.tensor(labels)


def measure(args) -> dict:
    from autoqra_core.data import _examples, masked, pad_id, train_blocks
    from autoqra_core.finetune import IGNORE, build, make_optimizer, masked_loss
    from autoqra_core.scoring import exact_split
    from autoqra_core.packed import PackedCache
    from autoqra_core.quantize import QuantSettings
    from bench.common import uniform
    from flows.config import load_run_config
    from flows.prepared_run import Run

    rc = load_run_config(args.config)
    rc = rc.model_copy(update={"train": rc.train.model_copy(update={"answer_only": True})})
    run = Run.prepare(args.model, args.dataset, None, rc, 0)
    wb, top = run.wb, run.ladder[run.ladder.top]
    t = rc.train_settings(0)
    if not masked(wb.task, t.answer_only):
        raise SystemExit(f"{args.dataset!r} rows are trained on every token: nothing to pack or pad per row")
    rows = list(_examples(wb.task, wb.tokenizer, "train", t.answer_only))
    blocks = train_blocks(wb.task, wb.tokenizer, top.seq_len, 1.0, t.answer_only)
    per_block = len(rows) / len(blocks)
    rows_per_step = round(per_block * top.batch_size)
    n = args.steps + 1
    pad = pad_id(wb.tokenizer)
    packed = [(blocks.ids[i * top.batch_size:(i + 1) * top.batch_size],
               blocks.labels[i * top.batch_size:(i + 1) * top.batch_size]) for i in range(n)]
    pads = [padded(rows[i * rows_per_step:(i + 1) * rows_per_step], pad) for i in range(n)]
    config = uniform(run.space, args.recipe)
    model = build(wb.base, config, wb.lmap, QuantSettings(**rc.quant.model_dump()), t, PackedCache(wb.base))
    opt = make_optimizer(model, t)
    model.train()
    split = exact_split(model, blocks.ids[:2])
    out = {"rows per block": per_block, "rows per step": rows_per_step, "rung": top.__dict__, "results": {}}
    runs = (("packed (today)", packed, split), ("padded per batch", pads, split),
            ("packed, LM head at every position", packed, None))
    seconds = dict.fromkeys((r[0] for r in runs), 0.0)
    for i in range(n):  # the layouts take turns step by step, so drift in the machine's speed hits all alike
        for name, data, head in runs:
            ids, labels = data[i]
            start = time.perf_counter()
            loss = masked_loss(model, ids, labels, head)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i:  # the first step warms up
                seconds[name] += time.perf_counter() - start
    for name, data, _ in runs:
        trained = sum(int((lab[:, 1:] != IGNORE).sum()) for _, lab in data[1:])
        out["results"][name] = {"s/step": seconds[name] / args.steps,
                                "positions/step": sum(x.numel() for x, _ in data[1:]) / args.steps,
                                "trained tokens/step": trained / args.steps,
                                "rows/step": rows_per_step if data is pads else top.batch_size * per_block}
        print(name, out["results"][name], flush=True)
    return out


def report(d: dict, args, wall: float) -> str:
    from bench.common import bench_header

    lines = [
        f"# Packing short masked rows vs padding per batch; the LM head at the trained positions only "
        f"(`{args.model}`, `{args.dataset}`, {args.recipe})", "",
        *bench_header("bench/packing.py", args, wall),
        f"Multiple choice trained on the answer only (masked rows); blocks of {d['rung']['seq_len']} tokens hold "
        f"{d['rows per block']:.1f} rows on average, so a packed batch of {d['rung']['batch_size']} blocks trains "
        f"{d['rows per step']} rows; the padded batches take the same {d['rows per step']} rows. "
        f"{args.steps} timed steps each, the layouts taking turns step by step, after one warm-up round.", "",
        "| layout | s/step | s per 1000 rows | positions the body computes per step | trained tokens per step |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in d["results"].items():
        lines.append(f"| {name} | {r['s/step']:.2f} | {1000 * r['s/step'] / r['rows/step']:.1f} | "
                     f"{r['positions/step']:.0f} | {r['trained tokens/step']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from bench.common import run_bench

    run_bench(__doc__, measure, report, steps=6)


if __name__ == "__main__":
    main()
