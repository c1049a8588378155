"""Time one evaluation at each fidelity rung and measure memory, on the embedded default.

For each backend (sim, hqq) and rung of the default ladder: wall time of one whole
evaluation (build + fine-tune + score) of a mixed configuration, split into parts.
Memory, per configuration: the memory model's static part vs the bytes of every
tensor held (weights, metadata, LoRA, grads, AdamW state), its activation estimate
vs the bytes autograd actually saved for backward in one step (counted with
``torch.autograd.graph.saved_tensors_hooks``), and the process's peak RSS.
On a GPU (``--device cuda``) the measured side is ``torch.cuda.max_memory_allocated``.

    .venv/bin/python bench/evaluation.py [--out bench/results/evaluation.md] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoqra_core.data import batches, eval_set, load_task, train_blocks  # noqa: E402
from autoqra_core.finetune import TrainSettings, build, make_optimizer, train  # noqa: E402
from autoqra_core.scoring import score  # noqa: E402
from autoqra_core.memory import format_bytes, memory_breakdown, settings_for  # noqa: E402
from autoqra_core.model import layer_map, load_model, model_shape  # noqa: E402
from autoqra_core.quantize import QuantSettings, storage_bytes  # noqa: E402
from autoqra_core.space import SearchSpace  # noqa: E402
from autoqra_core.search import default_ladder  # noqa: E402

CONFIGS = {
    "uniform 4-bit r16": ([4] * 6, [16] * 6),
    "mixed A": ([2, 3, 4, 8, 2, 3], [0, 4, 8, 16, 32, 64]),
    "mixed B": ([8, 8, 2, 2, 4, 4], [64, 0, 64, 0, 16, 16]),
    "mixed C": ([4, 2, 8, 3, 16, 4], [16, 64, 4, 32, 0, 8]),
    "uniform 2-bit r64": ([2] * 6, [64] * 6),
}


def saved_activation_bytes(model, x) -> int:
    """Bytes autograd keeps for backward in one forward (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return sum(n for ptr, n in seen.items() if ptr not in params)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "evaluation.md"))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    base, tok = load_model(ROOT / "infra" / "embedded" / "model")
    task = load_task(ROOT / "infra" / "embedded" / "wordnet")
    lmap = layer_map(base)
    shape = model_shape(base, lmap)
    space = SearchSpace(lmap.names, bits=(2, 3, 4, 8, 16))
    ladder = default_ladder()
    top = ladder[ladder.top]
    lines = [
        "# One evaluation at each fidelity, and memory: model vs measured",
        "",
        f"Command: `.venv/bin/python bench/evaluation.py --device {args.device}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; model: embedded 6-block Llama ({sum(p.numel() for p in base.parameters()):,} params).",
        "",
        "## Time per evaluation (config 'mixed A', default ladder)",
        "",
        "| backend | rung | steps | seq x batch | eval examples | build s | train s | s/step | score s | total s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cfg = space.config(*CONFIGS["mixed A"])
    t = TrainSettings()
    for backend in ("sim", "hqq"):
        q = QuantSettings(backend, device=args.device)
        for rung, fid in enumerate(ladder.rungs):
            t0 = time.perf_counter()
            model = build(base, cfg, lmap, q, t)
            t1 = time.perf_counter()
            train(model, batches(train_blocks(task, tok, fid.seq_len, fid.data_fraction), fid.steps, fid.batch_size, 0), t)
            t2 = time.perf_counter()
            score(model, eval_set(task, tok, fid.eval_examples, fid.seq_len))
            t3 = time.perf_counter()
            lines.append(f"| {backend} | {rung} | {fid.steps} | {fid.seq_len} x {fid.batch_size} | {fid.eval_examples} | "
                         f"{t1 - t0:.2f} | {t2 - t1:.2f} | {(t2 - t1) / fid.steps:.3f} | {t3 - t2:.2f} | {t3 - t0:.2f} |")
            print(lines[-1], flush=True)

    lines += [
        "",
        f"## Memory (hqq backend, training shape of the top rung: batch {top.batch_size} x seq {top.seq_len})",
        "",
        "Static = packed weights + metadata + unquantized params + LoRA + grads + AdamW state, measured as the "
        "storage of every tensor the model and optimizer hold after one step. Activations measured as the "
        "storage autograd saved for backward in that step.",
        "",
        "| config | bits | ranks | static model | static measured | err | activations model | activations measured | err | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ms = settings_for("cpu", "hqq", 64, top.batch_size, top.seq_len, grad_checkpointing=False)
    x = batches(train_blocks(task, tok, top.seq_len, 0.05), 1, top.batch_size, 0)[0].ids
    for name, (bits, ranks) in CONFIGS.items():
        c = space.config(bits, ranks)
        model = build(base, c, lmap, QuantSettings("hqq", device=args.device), t)
        opt = make_optimizer(model, t)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        act = saved_activation_bytes(model, x.to(args.device))
        if opt:
            opt.step()
        static = storage_bytes(model, opt)
        pred = memory_breakdown(c, shape, ms)
        peak = (torch.cuda.max_memory_allocated() if args.device.startswith("cuda")
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        lines.append(
            f"| {name} | {' '.join(map(str, bits))} | {' '.join(map(str, ranks))} | {format_bytes(pred.static)} | "
            f"{format_bytes(static)} | {100 * (pred.static - static) / static:+.2f}% | {format_bytes(pred.activations)} | "
            f"{format_bytes(act)} | {100 * (pred.activations - act) / max(act, 1):+.1f}% | {format_bytes(peak)} |"
        )
        print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
