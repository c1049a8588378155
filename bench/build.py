"""Build time per evaluation (quantize + attach LoRA) and the worker's resident memory, with and without
the per-worker cache of packed weights.

For a sequence of mixed candidates (each layer's bits drawn from 2/3/4/8, ranks from the default set)
it times ``finetune.build`` as the search calls it, and one whole rung-0 evaluation (build + train +
score) for scale. Models: the embedded 6-block Llama, and a SmolLM2-135M-shaped Llama built from its
config with random weights (30 blocks, hidden 576, 9/3 heads, intermediate 1536, vocab 49152, tied).

    .venv/bin/python bench/build.py [--model embedded|smollm2-shape] [--candidates 6] [--backend sim] [--out FILE]
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import random
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoqra_core.data import load_task  # noqa: E402
from autoqra_core.finetune import TrainSettings, build, evaluate_config  # noqa: E402
from autoqra_core.model import layer_map, load_model  # noqa: E402
from autoqra_core.quantize import QuantSettings  # noqa: E402
from autoqra_core.space import SearchSpace  # noqa: E402
from autoqra_core.search import default_ladder  # noqa: E402

SMOLLM2 = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)


def smollm2_shaped(seed: int = 0):
    """SmolLM2-135M's architecture with random weights (no download): what the GPU bench also uses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).float()
    model.config.use_cache = False
    return model


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded", choices=["embedded", "smollm2-shape"])
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--backend", default="sim")
    ap.add_argument("--rung0", action="store_true", help="also time one whole rung-0 evaluation")
    ap.add_argument("--same-bits", action="store_true",
                    help="every candidate uniform 4-bit with its own ranks (the cache's steady state: a large model "
                         "needs hours of CPU to fill every (module, bits) entry)")
    args = ap.parse_args()

    base, tok = load_model(ROOT / "infra" / "embedded" / "model")
    if args.model == "smollm2-shape":
        base = smollm2_shaped()
    task = load_task(ROOT / "infra" / "embedded" / "wordnet")
    lmap = layer_map(base)
    space = SearchSpace(lmap.names)
    rng = random.Random(0)
    q, t = QuantSettings(args.backend), TrainSettings()
    cached = "cache" in inspect.signature(build).parameters
    kw = {}
    if cached:
        from autoqra_core.packed import PackedCache

        kw["cache"] = PackedCache(base)
    print(f"model {args.model} ({sum(p.numel() for p in base.parameters()):,} params), backend {args.backend}, "
          f"{'cached' if cached else 'no cache (deep copy + quantize every module)'}; RSS after load {rss() / 2**20:.0f} MiB",
          flush=True)
    times = []
    for i in range(args.candidates):
        bits = [4] * len(lmap.names) if args.same_bits else [rng.choice(space.bits) for _ in lmap.names]
        cfg = space.config(bits, [rng.choice(space.ranks[1:]) for _ in lmap.names])
        t0 = time.perf_counter()
        model = build(base, cfg, lmap, q, t, **kw)
        times.append(time.perf_counter() - t0)
        del model
        print(f"candidate {i}: build {times[-1]:.3f} s, peak RSS {rss() / 2**20:.0f} MiB", flush=True)
    print(f"RESULT build first {times[0]:.3f} s, mean of the rest {sum(times[1:]) / max(1, len(times) - 1):.3f} s, "
          f"peak RSS {rss() / 2**20:.0f} MiB, {os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}")
    if args.rung0:
        fid = default_ladder()[0]
        cfg = space.uniform(4, 16)
        t0 = time.perf_counter()
        ev = evaluate_config(base, tok, task, lmap, cfg, fid, 0, 0, q, t, **kw)
        print(f"RESULT rung-0 evaluation {time.perf_counter() - t0:.1f} s ({fid.steps} steps, seq {fid.seq_len} x "
              f"batch {fid.batch_size}, {fid.eval_examples} eval examples), status {ev.status}, peak RSS {rss() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
