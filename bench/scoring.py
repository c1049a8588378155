"""Scoring before and after the prompt-sharing cut, on one fine-tuned model: same numbers, how much faster.

Fine-tunes one recipe at the study's top rung (as the search does), then scores its validation rows (the
rung's size, what every search evaluation pays) and the whole test split (the report) three ways, interleaved
so that a slow spell of the shared machine hits each alike:

* ``before``: ``finetune.score`` as of commit f74802e (each row run whole, a fixed number of rows per body
  forward), loaded from git;
* ``rows whole``: today's ``score(share=False)``, the same algorithm (a check that nothing else changed);
* ``shared prompts``: today's ``score``: each question's prompt runs once, its choices packed after it under
  a block-causal mask (``scoring.share_prompts``).

For each: seconds, tokens through the model's body, loss and accuracy; and per-row differences (nats per
scored token) between a row scored packed and the same row run alone (what ``score``'s check bounds), beside
the rounding any change of batch shape brings and the fault the check is for (the mask dropped).

    .venv/bin/python bench/scoring.py [--model smollm2-135m --dataset addition \
        --config bench/smollm2-addition.yaml] [--recipe uniform-4bit-r16] [--repeats 2] \
        [--compute-dtype float32] [--check-16bit 20] [--out bench/results/F.md]

``--compute-dtype`` overrides the config's (a CPU without bf16 matrix units multiplies bf16 ~70x slower than
fp32); ``--check-16bit N`` also measures the differences in bfloat16 on N validation questions.
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BEFORE = "f74802e"


def score_before():
    """``finetune.score`` as it was at ``BEFORE`` (its module imported from git beside today's package)."""
    source = subprocess.run(["git", "show", f"{BEFORE}:autoqra_core/finetune.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("autoqra_core._finetune_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "autoqra_core"
    sys.modules[spec.name] = module  # dataclasses look their module up there
    exec(compile(source, f"{BEFORE}:autoqra_core/finetune.py", "exec"), module.__dict__)
    return module.score


@torch.no_grad()
def differences(model, ev, batch_size: int, body_rows: int, full: bool = False) -> dict[str, tuple[float, float]]:
    """(max, mean) over rows of the |difference| in NLL per scored token between two ways of scoring a row:
    packed vs run alone in batches (what ``score``'s check bounds); with ``full`` also alone in batches vs
    one row per forward (the rounding any change of shape brings) and packed with the mask dropped (the fault
    the check is for: choices that see each other)."""
    from autoqra_core.scoring import _shared_nll, _split_nll, exact_split, share_prompts

    split = exact_split(model, ev.input_ids[:2, : int(ev.lengths[:2].max())])
    shared = share_prompts(ev, ev.max_len)
    if shared is None:
        return {}
    per_token = ev.target_mask.sum(1).clamp(min=1)

    def gap(a, b):
        d = (a - b).abs() / per_token
        return float(d.max()), float(d.mean())

    packed = _shared_nll(split, ev, shared, body_rows, batch_size, tol=float("inf"))
    alone = _split_nll(split, ev, body_rows, batch_size)
    out = {"packed vs alone": gap(packed, alone)}
    if full:
        out["alone in batches vs one row per forward"] = gap(alone, _split_nll(split, ev, 1, batch_size))
        hook = split[0].register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "attention_mask": None}),
                                                  with_kwargs=True)
        try:
            out["packed with the mask dropped vs alone"] = gap(
                _shared_nll(split, ev, shared, body_rows, batch_size, tol=float("inf")), alone)
        finally:
            hook.remove()
    return out


def measure(args) -> dict:
    from autoqra_core.data import eval_set
    from autoqra_core.finetune import build, fit
    from autoqra_core.scoring import score
    from autoqra_core.memory import score_rows
    from autoqra_core.quantize import QuantSettings
    from bench.common import uniform
    from flows.config import load_run_config
    from flows.prepared_run import Run

    rc = load_run_config(args.config)
    run = Run.prepare(args.model, args.dataset, None, rc, 0)
    wb, top = run.wb, run.ladder[run.ladder.top]
    quant = rc.quant.model_dump() | ({} if args.compute_dtype == "config" else {"compute_dtype": args.compute_dtype})
    q, t = QuantSettings(**quant), rc.train_settings(0)
    config = uniform(run.space, args.recipe)
    kw = dict(batch_size=top.batch_size, body_rows=score_rows(top.batch_size, top.seq_len))
    out: dict = {"rung": top.__dict__, "compute dtype": quant["compute_dtype"]}
    if args.check_16bit:  # the check's tolerance, in 16-bit: the built model (LoRA still zero), a few questions
        half = build(wb.base, config, wb.lmap, QuantSettings(**quant | {"compute_dtype": "bfloat16"}), t)
        ev = eval_set(wb.task, wb.tokenizer, args.check_16bit, top.seq_len)
        out["bfloat16"] = {"questions": args.check_16bit, "differences": differences(half, ev, **kw, full=True),
                           "scores": {"shared prompts": score(half, ev, **kw), "rows whole":
                                      score(half, ev, **kw, share=False), "one row per forward": score(half, ev, 1)}}
        print(out["bfloat16"], flush=True)
        del half
    if not args.repeats:
        return out
    model = build(wb.base, config, wb.lmap, q, t)
    start = time.perf_counter()
    fit(model, wb.tokenizer, wb.task, top, t)
    out["fit s"] = time.perf_counter() - start
    body = model.get_base_model().model
    seen: list[int] = []
    body.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].numel()), with_kwargs=True)
    before = score_before()
    modes = {
        "before": lambda ev: before(model, ev, **kw),
        "rows whole": lambda ev: score(model, ev, **kw, share=False),
        "shared prompts": lambda ev: score(model, ev, **kw),
    }
    for split, n in (("validation", top.eval_examples), ("test", None)):
        ev = eval_set(wb.task, wb.tokenizer, n or len(wb.task.test), top.seq_len, split)
        rows = out[split] = {"questions": int(ev.example.max()) + 1, "rows": len(ev.example),
                             "differences": differences(model, ev, **kw, full=split == "validation")}
        for r in range(args.repeats):
            for name, fn in modes.items():
                seen.clear()
                t0 = time.perf_counter()
                loss, acc = fn(ev)
                s = time.perf_counter() - t0
                m = rows.setdefault(name, {"seconds": [], "loss": loss, "accuracy": acc, "body tokens": sum(seen)})
                m["seconds"].append(s)
                print(f"{split} repeat {r} {name}: {s:.2f} s, loss {loss:.5f}, accuracy {acc:.4f}", flush=True)
    return out


def report(d: dict, args, wall: float) -> str:
    from bench.common import bench_header

    lines = [
        f"# Scoring before and after sharing each question's prompt: `{args.model}` on `{args.dataset}`, "
        f"{args.recipe}", "",
        *bench_header("bench/scoring.py", args, wall),
    ]
    if "bfloat16" in d:
        b = d["bfloat16"]
        lines += ["", f"In bfloat16, the model as built (LoRA zero), {b['questions']} validation questions: loss "
                  f"(accuracy) " + ", ".join(f"{k} {loss:.5f} ({acc:.4f})" for k, (loss, acc) in b["scores"].items())
                  + "."]
    if "fit s" not in d:  # --repeats 0: the 16-bit check alone
        return "\n".join(lines + _differences_table(d)) + "\n"
    lines += [
        "", f"Model fine-tuned at the top rung first ({d['rung']['steps']} steps, batch {d['rung']['batch_size']} x "
        f"{d['rung']['seq_len']}, {d['fit s']:.0f} s with its validation score). `before` is `finetune.score` at "
        f"commit {BEFORE}; seconds are the mean (min-max) of {args.repeats} interleaved repeats.", "",
        "| split | questions (rows) | scoring | seconds | speed-up vs before | tokens through the body | loss | "
        "accuracy |", "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for split in ("validation", "test"):
        s = d[split]
        ref = statistics.mean(s["before"]["seconds"])
        for name in ("before", "rows whole", "shared prompts"):
            m = s[name]
            mean = statistics.mean(m["seconds"])
            lines.append(f"| {split} | {s['questions']} ({s['rows']}) | {name} | {mean:.2f} "
                         f"({min(m['seconds']):.2f}-{max(m['seconds']):.2f}) | {ref / mean:.2f}x | "
                         f"{m['body tokens']:,} | {m['loss']:.5f} | {m['accuracy']:.4f} |")
    return "\n".join(lines + _differences_table(d)) + "\n"


def _differences_table(d: dict) -> list[str]:
    lines = ["", "Rows scored two ways, |difference| in NLL per scored token, max (mean) over rows:", "",
             "| compute | rows | packed vs alone | alone in batches vs one row per forward | packed with the mask "
             "dropped vs alone |", "|---|---|---:|---:|---:|"]
    cases = [(d["compute dtype"], f"{split}, fine-tuned", d[split]["differences"])
             for split in ("validation", "test") if split in d]
    if "bfloat16" in d:
        cases.append(("bfloat16", f"{d['bfloat16']['questions']} validation questions, as built (LoRA zero)",
                      d["bfloat16"]["differences"]))
    for dtype, rows, diff in cases:
        ways = ("packed vs alone", "alone in batches vs one row per forward", "packed with the mask dropped vs alone")
        cells = [f"{diff[k][0]:.2e} ({diff[k][1]:.1e})" if k in diff else "-" for k in ways]
        lines.append(f"| {dtype} | {rows} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    from bench.common import run_bench

    run_bench(__doc__, measure, report, repeats=2, compute_dtype="config", check_16bit=0)


if __name__ == "__main__":
    main()
