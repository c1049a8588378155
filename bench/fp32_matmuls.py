"""Does ``fp32_matmuls`` give the numbers of a CPU with bf16 matrix units? Re-run evaluations a result.json
recorded there (same code, config, rung, training seed) on this machine and compare loss, accuracy, seconds.

Run from the checkout that produced the result (its cached evaluations' code), with this checkout's
``bench/fp32_matmuls_site`` on PYTHONPATH so its fit runs inside fp32_matmuls:

    cd OLD && PYTHONPATH=$PWD:/work/main/bench/fp32_matmuls_site python /work/main/bench/fp32_matmuls.py \\
        --result bench/results/smollm2-addition/seed0/result.json --config bench/smollm2-addition.yaml \\
        --model smollm2-135m --dataset addition --pick 4:16:0 --pick 8:4:0 --out /work/main/bench/results/X.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch


def uniform(e: dict) -> tuple[int, int] | None:
    bits = {layer["bits"] for layer in e["config"]["layers"]}
    ranks = {layer["rank"] for layer in e["config"]["layers"]}
    return (bits.pop(), ranks.pop()) if len(bits) == len(ranks) == 1 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--result", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="addition")
    ap.add_argument("--pick", action="append", required=True, help="bits:rank:seed of a uniform top-rung evaluation")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import autoqra_core.finetune as ft
    from autoqra_core.space import Config
    from flows.config import load_run_config
    from flows.prepared_run import Run
    from tasks.evaluate import evaluate

    assert getattr(ft.fit, "fp32_matmuls", False), "put bench/fp32_matmuls_site on PYTHONPATH"
    recorded = json.loads(Path(a.result).read_text())
    run = Run.prepare(a.model, a.dataset, None, load_run_config(Path(a.config)), 0)
    assert run.code == recorded["code_version"], (run.code, recorded["code_version"])
    top = run.ladder.top
    rows = []
    for pick in a.pick:
        bits, rank, seed = map(int, pick.split(":"))
        e = next(e for e in recorded["evaluations"]
                 if e["fidelity"] == top and e["seed"] == seed and uniform(e) == (bits, rank))
        cfg = Config.from_dict(e["config"])
        start = time.perf_counter()
        got = evaluate.fn(model=run.model, dataset=run.dataset, model_id=run.model_id, dataset_id=run.dataset_id,
                          config=cfg.to_dict(), config_key=cfg.key(), rung=top, fidelity=run.ladder[top].__dict__,
                          memory_bytes=run.cost(cfg), quant=run.rc.quant.model_dump(),
                          train=run.rc.train_settings(seed).__dict__,
                          granularity=run.rc.space.granularity, layers=list(run.rc.space.layers or []),
                          code_version=run.code, split="validation", columns=run.columns)
        seconds = time.perf_counter() - start
        rows.append((pick, e, got, seconds))
        print(pick, e["eval_loss"], got["eval_loss"], e["accuracy"], got["accuracy"], round(seconds, 1), flush=True)

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    units = {u: getattr(torch.cpu, f"_is_{u}_supported")() for u in ("avx512_bf16", "amx_tile")}
    lines = [
        f"# fp32_matmuls vs bf16 matrix units: {a.model} on {a.dataset}, top rung, validation",
        "",
        f"Command: `{' '.join(sys.argv)}` (in the checkout at code_version {run.code}), "
        f"PYTHONPATH={__import__('os').environ.get('PYTHONPATH', '')}",
        f"Machine: {cpu}, {torch.get_num_threads()} threads, bf16 units {units}; torch {torch.__version__}.",
        f"Recorded: {a.result} (a CPU with bf16 units, native bf16 kernels). Compute dtype "
        f"{run.rc.quant.compute_dtype}.",
        "",
        "| uniform bits:rank:seed | recorded loss | here loss | diff | recorded acc | here acc | recorded s | here s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pick, e, got, seconds in rows:
        lines.append(f"| {pick} | {e['eval_loss']:.4f} | {got['eval_loss']:.4f} | "
                     f"{got['eval_loss'] - e['eval_loss']:+.4f} | {e['accuracy']:.3f} | {got['accuracy']:.3f} | "
                     f"{e['seconds']:.0f} | {seconds:.0f} |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
