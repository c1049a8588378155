"""The export's ``gguf/`` scored on the test split by llama.cpp itself (``llama-cpp-python``), beside transformers'
GGUF loader: the same rows, the same tokens and the same loss (``scoring.score``), only the runtime differs.

    pip install llama-cpp-python    # a source build (cmake + a C++ compiler); its time is in bench/results/
    .venv/bin/python bench/export.py --model smollm2-135m --dataset addition --config bench/smollm2-addition.yaml \
        --keep /tmp/export
    .venv/bin/python bench/gguf_llamacpp.py /tmp/export/champion --model smollm2-135m --dataset addition \
        --config bench/smollm2-addition.yaml [--out bench/results/NAME.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class LlamaCpp(nn.Module):
    """A llama.cpp model behind the one call ``scoring.score`` makes: ``model(input_ids=...).logits``."""

    def __init__(self, path: Path, n_ctx: int):
        super().__init__()
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=os.cpu_count(),
                         verbose=False)
        self.embed = nn.Embedding(1, 1)  # only tells score() the device: the CPU

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        rows = []
        for row in input_ids.tolist():  # right-padded: causal attention keeps the real tokens' logits exact
            self.llm.reset()
            self.llm.eval(row)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(row)], dtype=np.float32)))
        return SimpleNamespace(logits=torch.stack(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path, help="an export folder (with gguf/)")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dataset", default="embedded")
    ap.add_argument("--config", default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from importlib.metadata import version

    from autoqra_core.data import eval_set
    from autoqra_core.export import GGUF_FILE, load_gguf
    from autoqra_core.scoring import score
    from flows.config import load_run_config
    from flows.prepared_run import Run

    rc = load_run_config(args.config)
    wb = Run.prepare(args.model, args.dataset, None, rc, 0).wb
    s = rc.fine_tune()
    ev = eval_set(wb.task, wb.tokenizer, len(wb.task.test), s.seq_len, "test")
    rows = []
    for name, load in (("transformers' GGUF loader", lambda: load_gguf(args.export / "gguf")),
                       (f"llama.cpp (llama-cpp-python {version('llama_cpp_python')})",
                        lambda: LlamaCpp(args.export / "gguf" / GGUF_FILE, ev.input_ids.shape[1]))):
        start = time.perf_counter()
        loss, acc = score(load(), ev, batch_size=s.batch_size)
        rows.append((name, loss, acc, time.perf_counter() - start))
        print(rows[-1], flush=True)
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [
        f"# `gguf/` scored by llama.cpp and by transformers ({args.model}, {args.dataset}, test)", "",
        f"Command: `.venv/bin/python bench/gguf_llamacpp.py EXPORT --model {args.model} --dataset {args.dataset}"
        + (f" --config {args.config}" if args.config else "") + "`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU. Test split: {len(wb.task.test)} rows, "
        "the same token ids and the same loss code for both runtimes.", "",
        "| runtime | test loss | test accuracy | seconds (load + score) |", "|---|---:|---:|---:|",
        *(f"| {n} | {fmt(loss)} | {fmt(acc)} | {sec:.0f} |" for n, loss, acc, sec in rows), "",
        f"llama.cpp minus transformers: {rows[1][1] - rows[0][1]:+.2e} nats.", "",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
