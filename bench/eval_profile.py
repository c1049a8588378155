"""Where one top-rung evaluation's time goes: build (quantize + attach LoRA, cold and from the packed cache),
each training step split into the transformer body's forward, the LM head and loss, backward and the optimizer,
and scoring the held-out rows (validation at the rung's size, and the whole test split as the report does).

The step is timed piece by piece with the same modules and loss as ``finetune.train`` (body, then head on every
position for whole-row training or on the labelled positions for masked rows); the search's own evaluation of
the same configuration is timed whole beside it, so the pieces can be checked against the sum.

    .venv/bin/python bench/eval_profile.py --model smollm2-135m --dataset addition \
        --config bench/smollm2-addition.yaml [--recipe uniform-4bit-r16] [--out bench/results/NAME.md]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def profile(args) -> dict:
    from autoqra_core.data import batches, train_blocks
    from autoqra_core.finetune import IGNORE, build, fit, held_out, make_optimizer
    from autoqra_core.scoring import exact_split
    from autoqra_core.packed import PackedCache
    from autoqra_core.quantize import QuantSettings
    from bench.common import uniform
    from flows.config import load_run_config
    from flows.prepared_run import Run

    rc = load_run_config(args.config)
    run = Run.prepare(args.model, args.dataset, None, rc, 0)
    wb, top = run.wb, run.ladder[run.ladder.top]
    config = uniform(run.space, args.recipe)
    q, t = QuantSettings(**rc.quant.model_dump()), rc.train_settings(0)
    cache = PackedCache(wb.base)
    out: dict = {"recipe": args.recipe, "rung": top.__dict__, "threads": torch.get_num_threads()}
    _, out["build cold s"] = _timed(lambda: build(wb.base, config, wb.lmap, q, t, cache))
    model, out["build warm s"] = _timed(lambda: build(wb.base, config, wb.lmap, q, t, cache))

    data = batches(train_blocks(wb.task, wb.tokenizer, top.seq_len, top.data_fraction, t.answer_only),
                   top.steps, top.batch_size, seed=t.seed)
    split = exact_split(model, data[0].ids[:2])
    assert split is not None, "the model does not split into body and head exactly: profile it whole"
    body, head = split
    opt = make_optimizer(model, t)
    model.train()
    parts = {"body forward": 0.0, "LM head + loss": 0.0, "backward": 0.0, "optimizer": 0.0}
    for x in data:
        ids = x.ids
        labels = ids if x.labels is None else x.labels
        h, s = _timed(lambda: body(input_ids=ids).last_hidden_state[:, :-1])
        parts["body forward"] += s
        target = labels[:, 1:]
        pos = target != IGNORE

        def head_loss():
            return torch.nn.functional.cross_entropy(head(h[pos]).float(), target[pos])

        loss, s = _timed(head_loss)
        parts["LM head + loss"] += s
        opt.zero_grad(set_to_none=True)
        _, s = _timed(loss.backward)
        parts["backward"] += s

        def step():
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], t.max_grad_norm)
            opt.step()

        _, s = _timed(step)
        parts["optimizer"] += s
    out["train"] = parts
    out["train s"] = sum(parts.values())
    _, out["score validation s"] = _timed(lambda: held_out(model, wb.tokenizer, wb.task, top, "validation"))
    test = type(top)(**{**top.__dict__, "eval_examples": len(wb.task.test)})
    _, out["score test s"] = _timed(lambda: held_out(model, wb.tokenizer, wb.task, test, "test"))
    fresh = build(wb.base, config, wb.lmap, q, t, cache)
    _, out["whole evaluation s (validation, warm build)"] = _timed(
        lambda: fit(fresh, wb.tokenizer, wb.task, top, t, split="validation"))
    return out


def report(d: dict, args, wall: float) -> str:
    from bench.common import bench_header

    steps = d["rung"]["steps"]
    fwd = d["train"]["body forward"] + d["train"]["LM head + loss"]
    lines = [
        f"# Where one evaluation's time goes: `{args.model}` on `{args.dataset}`, {d['recipe']}, top rung", "",
        *bench_header("bench/eval_profile.py", args, wall),
        f"Rung: {steps} steps, batch {d['rung']['batch_size']} x {d['rung']['seq_len']} tokens, "
        f"{d['rung']['eval_examples']} validation questions.", "",
        "| part | seconds | per step | share of the step |", "|---|---:|---:|---:|",
        f"| build, cold (quantize every layer) | {d['build cold s']:.2f} | | |",
        f"| build, warm (packed cache) | {d['build warm s']:.2f} | | |",
    ]
    for k, v in d["train"].items():
        lines.append(f"| train: {k} | {v:.2f} | {v / steps:.3f} | {v / d['train s']:.0%} |")
    lines += [
        f"| train, all {steps} steps | {d['train s']:.2f} | {d['train s'] / steps:.3f} | 100% |",
        f"| score validation ({d['rung']['eval_examples']} questions) | {d['score validation s']:.2f} | | |",
        f"| score test (all questions, the report) | {d['score test s']:.2f} | | |",
        f"| the search's whole evaluation (fit: train + score validation) | "
        f"{d['whole evaluation s (validation, warm build)']:.2f} | | |", "",
        f"The LM head and loss are {d['train']['LM head + loss'] / fwd:.0%} of the training forward.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    from bench.common import run_bench

    run_bench(__doc__, profile, report)


if __name__ == "__main__":
    main()
