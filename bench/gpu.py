"""Memory model vs ``torch.cuda.max_memory_allocated`` on a GPU, and seconds per step / per evaluation.

For each model shape (SmolLM2-135M's and a 1B-class Llama's, built from their configs with random
weights: nothing to download), each backend (hqq 2/3/4/8 bits, bnb 4/8 bits) and at least five mixed
configurations: build the candidate from an empty packed-weight cache on the GPU (so the peak is the
candidate's own), fine-tune ``--steps`` steps at the default top rung's shape and score in batches of the training batch (as the search does)
rows, then compare the peak allocated bytes with ``memory_breakdown(...).total`` (= max(training, scoring)).
The CUDA context and the allocator's slack (reserved - allocated) are printed apart: not in the budget.
Imports only autoqra_core (no Prefect/MLflow), so a lent GPU needs torch, transformers, peft, hqq, bitsandbytes.

    python bench/gpu.py --out bench/results/gpu.md [--steps 10] [--shapes smollm2,llama-1b]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoqra_core.data import batches, eval_set, load_task, train_blocks  # noqa: E402
from autoqra_core.finetune import TrainSettings, build, train  # noqa: E402
from autoqra_core.scoring import score  # noqa: E402
from autoqra_core.memory import format_bytes, memory_breakdown, settings_for  # noqa: E402
from autoqra_core.model import layer_map, load_model, model_shape  # noqa: E402
from autoqra_core.packed import PackedCache  # noqa: E402
from autoqra_core.quantize import QuantSettings  # noqa: E402
from autoqra_core.space import SearchSpace  # noqa: E402

SHAPES = {
    "smollm2": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
}
SEQ, BATCH = 64, 8  # the default top rung's training shape


def configs(space: SearchSpace, bits: tuple[int, ...], n: int = 5) -> dict[str, tuple[list[int], list[int]]]:
    rng = random.Random(0)
    k = len(space.layers)
    out = {f"uniform {bits[-2] if len(bits) > 1 else bits[0]}-bit r16": ([bits[-2] if len(bits) > 1 else bits[0]] * k, [16] * k)}
    while len(out) < n:
        out[f"mixed {len(out)}"] = ([rng.choice(bits) for _ in range(k)], [rng.choice((0, 4, 8, 16, 32, 64)) for _ in range(k)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.md"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--shapes", default="smollm2,llama-1b")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench/gpu.py measures a GPU: run it where torch.cuda.is_available()"
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = load_model(ROOT / "infra" / "embedded" / "model")
    task = load_task(ROOT / "infra" / "embedded" / "wordnet")
    data = batches(train_blocks(task, tok, SEQ, 1.0), args.steps, BATCH, 0)
    ev = eval_set(task, tok, 4 * BATCH, SEQ)
    torch.cuda.init()
    context = torch.cuda.mem_get_info()
    lines = ["# Memory model vs torch.cuda.max_memory_allocated, on a GPU", "",
             f"Command: `python bench/gpu.py --steps {args.steps} --shapes {args.shapes}`  ",
             f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; bf16 compute, gradient checkpointing on "
             f"(the CUDA defaults); batch {BATCH} x seq {SEQ}; scoring {BATCH} rows per forward. Free/total after CUDA "
             f"init: {format_bytes(context[0])} / {format_bytes(context[1])} (the context is outside the budget).", "",
             "| shape | backend | config | predicted | max allocated | err | reserved | s/step | s/eval (build+train+score) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for shape_name in args.shapes.split(","):
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(**SHAPES[shape_name], max_position_embeddings=2048))
        base.config.use_cache = False
        lmap = layer_map(base)
        shape = model_shape(base, lmap)
        for backend, bits in (("hqq", (2, 3, 4, 8)), ("bnb", (4, 8))):
            space = SearchSpace(lmap.names, bits=bits)
            q = QuantSettings(backend, device="cuda")
            mem = settings_for("cuda", backend, 64, BATCH, SEQ)
            t = TrainSettings(grad_checkpointing=mem.grad_checkpointing)
            for name, (b, r) in configs(space, bits).items():
                cfg = space.config(b, r)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                model = build(base, cfg, lmap, q, t, PackedCache(base, capacity_bytes=0))
                t1 = time.perf_counter()
                train(model, data, t)
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                score(model, ev, batch_size=BATCH)
                torch.cuda.synchronize()
                t3 = time.perf_counter()
                peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
                pred = memory_breakdown(cfg, shape, mem).total
                lines.append(f"| {shape_name} | {backend} | {name} | {format_bytes(pred)} | {format_bytes(peak)} | "
                             f"{100 * (pred - peak) / peak:+.1f}% | {format_bytes(reserved)} | "
                             f"{(t2 - t1) / args.steps:.3f} | {t3 - t0:.1f} |")
                print(lines[-1], flush=True)
                del model
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
