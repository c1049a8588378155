"""Where a cold evaluation's time goes, before its first step and per step, for a uniform and a mixed allocation.

Each recipe is timed twice, each time in a fresh process with an empty AUTOQRA_HOME (nothing cached):
* ``autoqra evaluate`` whole, as a user runs it (wall time, and when its first step's log line appears), in a home
  where the model is already converted (the ``--space`` child that writes the configuration converts it first);
* the same work as phases, in-process with the core and flows API: imports, loading the model and task, file
  fingerprints, tokenizing the train split, quantizing every layer (the packed cache), attaching LoRA (peft's
  ``rank_pattern``), the first training step, the later ones, scoring. Then, in that same process, the same
  recipe built again from the packed cache and trained (a warm worker's evaluation).

The mixed allocation is the one a search evaluates most: the first 2/15 of the blocks at 8-bit r16, the last
1/5 at 4-bit r8, the rest at 4-bit r16 (on smollm2-135m: blocks 0-3, 24-29).

    .venv/bin/python bench/cold.py --model smollm2-135m --dataset embedded --steps 10 --eval-examples 20 \
        [--recipes uniform-4bit-r16,mixed,uniform-8bit-r16] [--out bench/results/cold-smollm2-embedded.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = """quant:
  compute_dtype: bfloat16
train:
  steps: {steps}
  warmup_steps: 2
search:
  rungs:
    - {{fraction: 1.0, eval_examples: {eval_examples}}}
"""


def allocation(space, recipe: str):
    """``uniform-<b>bit-r<r>``, or ``mixed`` (see the module's docstring), over ``space``'s layers."""
    from autoqra_core.space import Config, LayerChoice
    from bench.common import uniform

    if recipe != "mixed":
        return uniform(space, recipe)
    n = len(space.layers)
    head, tail = round(n * 2 / 15), round(n / 5)
    choice = [(8, 16) if i < head else (4, 8) if i >= n - tail else (4, 16) for i in range(n)]
    return Config(tuple(LayerChoice(name, b, r) for name, (b, r) in zip(space.layers, choice)))


def phases(args) -> dict:
    """One recipe, cold then warm, in this (fresh) process."""
    out: dict[str, float] = {"python start": T0}

    def mark(name: str, since: float) -> float:
        now = time.perf_counter()
        out[name] = now - since
        return now

    t = time.perf_counter()
    import torch  # noqa: F401

    import autoqra_core.finetune as ft
    from autoqra_core.data import load_task, train_blocks
    from autoqra_core.device import fp32_matmuls, model_device, model_dtype
    from autoqra_core.model import layer_map, load_model
    from autoqra_core.quantize import QuantSettings
    from flows.config import load_run_config
    from flows.prepared_run import resolve as resolve_source  # the CLI's own imports (prefect, tasks)
    from infra.fingerprint import code_version, fingerprint
    t = mark("imports (torch, transformers, peft, prefect, flows)", t)

    rc = load_run_config(args.settings)
    m, d = resolve_source(args.model, "model"), resolve_source(args.dataset, "dataset")
    base, tok = load_model(m)
    t = mark("load the model (a named GGUF model: converted on a home's first use)", t)
    task = load_task(d)
    t = mark("load the task", t)
    fingerprint(m), fingerprint(d), code_version()
    t = mark("fingerprints (model, dataset, code)", t)
    lmap = layer_map(base, rc.space.granularity)
    ftune = rc.fine_tune()
    blocks = train_blocks(task, tok, ftune.seq_len, ftune.data_fraction, rc.train.answer_only)
    t = mark("tokenize the train split", t)

    from autoqra_core.packed import PackedCache
    from autoqra_core.space import SearchSpace

    space = SearchSpace(lmap.names, tuple(rc.space.bits), tuple(rc.space.ranks))
    config = allocation(space, args.recipe)
    q, ts = QuantSettings(**rc.quant.model_dump()), rc.train_settings(0)
    cache = PackedCache(base)
    quantized = cache.assemble(config, lmap, q)
    t = mark("quantize every layer (cold packed cache)", t)
    lcfg = ft.lora_config(config, lmap, ts)
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(quantized, lcfg)
    t = mark("attach LoRA (peft, rank_pattern)", t)
    total = ftune.total_steps(len(blocks))
    fid = rc.ladder(total)[-1]
    data = ft.run_batches(task, tok, fid, ts)
    t = mark("the run's batches (tokenized again)", t)
    steps: list[float] = []

    def fast():  # as ``finetune.fit`` trains and scores
        return fp32_matmuls(model_device(model), model_dtype(model))

    with fast():
        ck = ft.train(model, data[:1], ts, total=total)
    t = mark("first training step", t)
    out["before the first step (from python start)"] = t - T0 - out["first training step"]
    with fast():
        ck = ft.train(model, data, ts, total=total, start=ck,
                      progress=lambda *a: steps.append(time.perf_counter()))
    out["a later step (mean)"] = (steps[-1] - steps[0]) / max(1, len(steps) - 1)
    t = time.perf_counter()
    with fast():
        ft.held_out(model, tok, task, fid, "validation")
    t = mark(f"score {fid.eval_examples} validation questions", t)
    del model, quantized, ck
    model = ft.build(base, config, lmap, q, ts, cache)  # a warm worker: the packed modules are kept
    t = mark("warm: build from the packed cache", t)
    steps.clear()
    with fast():
        ft.train(model, data, ts, total=total, progress=lambda *a: steps.append(time.perf_counter()))
    out["warm: a step (mean)"] = (steps[-1] - steps[0]) / max(1, len(steps) - 1)
    out["threads"] = torch.get_num_threads()
    out["steps"] = total
    return out


def cli(args, recipe: str, home: Path, settings: Path) -> dict:
    """``autoqra evaluate`` of ``recipe`` in a fresh process and home: wall time, and the first step's line."""
    home.mkdir(parents=True)
    env = {**os.environ, "AUTOQRA_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
    space = json.loads(subprocess.run([sys.executable, __file__, "--space", "--model", args.model, "--dataset",
                                       args.dataset, "--settings", str(settings)],
                                      capture_output=True, text=True, check=True, env=env).stdout.splitlines()[-1])
    (home / "c.json").write_text(json.dumps(space[recipe]))
    start = time.perf_counter()
    proc = subprocess.Popen([str(ROOT / ".venv/bin/autoqra"), "evaluate", "--model", args.model, "--dataset",
                             args.dataset, "--config", str(home / "c.json"), "--search-config",
                             str(settings)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first = None
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-20:]
        if first is None and re.search(r"step 1/\d+", line):
            first = time.perf_counter() - start
    proc.wait()
    if proc.returncode:
        raise SystemExit("".join(tail))
    return {"wall": time.perf_counter() - start, "first step": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dataset", default="embedded")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eval-examples", type=int, default=20)
    ap.add_argument("--recipes", default="uniform-4bit-r16,mixed,uniform-8bit-r16")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--phases", dest="recipe", help=argparse.SUPPRESS)  # child: one recipe's phases as JSON
    ap.add_argument("--space", action="store_true", help=argparse.SUPPRESS)  # child: the recipes' configurations
    ap.add_argument("--settings", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.recipe:
        print(json.dumps(phases(args)))
        return
    if args.space:
        from autoqra_core.model import layer_map, load_model
        from autoqra_core.space import SearchSpace
        from flows.config import load_run_config
        from flows.prepared_run import resolve as resolve_source

        rc = load_run_config(args.settings)
        base, _ = load_model(resolve_source(args.model, "model"))
        space = SearchSpace(layer_map(base, rc.space.granularity).names, tuple(rc.space.bits), tuple(rc.space.ranks))
        print(json.dumps({r: allocation(space, r).to_dict() for r in RECIPES}))
        return
    wall = time.perf_counter()
    rows = {}
    for recipe in args.recipes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            home = Path(tmp)
            (home / "s.yaml").write_text(SETTINGS.format(steps=args.steps, eval_examples=args.eval_examples))
            env = {**os.environ, "AUTOQRA_HOME": str(home / "phases")}
            r = subprocess.run([sys.executable, __file__, "--phases", recipe, "--model", args.model, "--dataset",
                                args.dataset, "--settings", str(home / "s.yaml")], cwd=ROOT, env=env,
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(r.stderr[-3000:])
            rows[recipe] = json.loads(r.stdout.splitlines()[-1])
            rows[recipe]["cli"] = cli(args, recipe, home / "cli", home / "s.yaml")
        print(recipe, json.dumps(rows[recipe]), flush=True)
    text = report(rows, args, time.perf_counter() - wall)
    print(text)
    if args.out:
        args.out.write_text(text)


RECIPES = ("uniform-4bit-r16", "mixed", "uniform-8bit-r16")


def report(rows: dict, args, wall: float) -> str:
    names = list(rows)
    keys = [k for k in rows[names[0]] if k not in ("python start", "threads", "steps", "cli")]
    lines = [f"# Where a cold evaluation's time goes: `{args.model}` on `{args.dataset}`", "",
             f"Command: `.venv/bin/python bench/cold.py --model {args.model} --dataset {args.dataset} --steps "
             f"{args.steps} --eval-examples {args.eval_examples} --recipes {args.recipes}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({rows[names[0]]['threads']} torch "
             f"threads), no GPU; bf16 compute; wall time {wall / 60:.1f} min. Each column: fresh processes, empty "
             "AUTOQRA_HOME.", "",
             "| seconds | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---:|" * len(names)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{rows[n][k]:.2f}" for n in names) + " |")
    lines.append("| `autoqra evaluate` (model already converted): first step's log line | "
                 + " | ".join(f"{rows[n]['cli']['first step'] or float('nan'):.1f}" for n in names) + " |")
    lines.append(f"| `autoqra evaluate` (model already converted): whole ({args.steps} steps, {args.eval_examples} questions) | "
                 + " | ".join(f"{rows[n]['cli']['wall']:.1f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
