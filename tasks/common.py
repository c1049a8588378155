"""What every task needs in its process: the loaded model/task (once per process) and cache-key parts."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

import autoqra_core
from autoqra_core.data import Task, load_task
from autoqra_core.memory import MemorySettings, ModelShape, settings_for
from autoqra_core.model import LayerMap, layer_map, load_model, model_shape, select_layers
from autoqra_core.packed import PackedCache
from autoqra_core.space import SearchSpace


@dataclass(frozen=True)
class Workbench:
    """A loaded base model and task, and the packed weights made from it (each (module, bits) quantized once).
    Built once per worker process and reused by every evaluation in it."""

    base: object
    tokenizer: object
    task: Task
    lmap: LayerMap
    shape: ModelShape
    packed: PackedCache

    def space(self, bits: tuple[int, ...], ranks: tuple[int, ...]) -> SearchSpace:
        return SearchSpace(self.lmap.names, bits, ranks)


@lru_cache(maxsize=2)
def workbench(model: str, dataset: str, granularity: str = "block", layers: tuple[str, ...] = ()) -> Workbench:
    base, tok = load_model(model)
    lmap = select_layers(layer_map(base, granularity), list(layers))
    return Workbench(base, tok, load_task(dataset), lmap, model_shape(base, lmap), PackedCache(base, cache_capacity()))


def cache_capacity() -> int | None:
    """Packed modules kept beyond the current candidate's: all of them in host memory; on a GPU (they sit in
    the memory the budget measures) none, unless AUTOQRA_PACKED_CACHE_BYTES allows some headroom."""
    if (env := os.environ.get("AUTOQRA_PACKED_CACHE_BYTES")) is not None:
        return int(env)
    return 0 if torch.cuda.is_available() else None


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the method's source: a change in autoqra_core invalidates cached evaluations."""
    h = hashlib.sha256()
    for path in sorted(Path(autoqra_core.__file__).parent.glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:12]


def fingerprint(path: str) -> str:
    """Identity of a model or dataset for cache keys: file names, sizes and config text (not mtimes)."""
    p = Path(path)
    if not p.exists():
        return path  # a hub id is its own identity
    h = hashlib.sha256()
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    for f in files:
        if f.is_file():
            h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{f.stat().st_size}".encode())
            if f.suffix in (".json", ".jsonl", ".txt") and f.stat().st_size < 5_000_000:
                h.update(f.read_bytes())
    return h.hexdigest()[:12]


def memory_settings(batch_size: int, seq_len: int, backend: str, grad_checkpointing: bool | None = False,
                    device: str = "cpu", group_size: int = 64, dtype: str = "auto") -> MemorySettings:
    """fp32 everything on the CPU; on a GPU the base/metadata/activations are bf16 (``memory.settings_for``)."""
    return settings_for(device, backend, group_size, batch_size, seq_len, grad_checkpointing, dtype)
