"""What every task needs in its process: the loaded model/task (once per process) and cache-key parts."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import autoqra_core
from autoqra_core.data import Task, load_task
from autoqra_core.memory import MemorySettings, ModelShape
from autoqra_core.model import LayerMap, layer_map, load_model, model_shape, select_layers
from autoqra_core.space import SearchSpace


@dataclass(frozen=True)
class Workbench:
    """A loaded base model and task. Built once per worker process and reused by every evaluation in it."""

    base: object
    tokenizer: object
    task: Task
    lmap: LayerMap
    shape: ModelShape

    def space(self, bits: tuple[int, ...], ranks: tuple[int, ...]) -> SearchSpace:
        return SearchSpace(self.lmap.names, bits, ranks)


@lru_cache(maxsize=2)
def workbench(model: str, dataset: str, granularity: str = "block", layers: tuple[str, ...] = ()) -> Workbench:
    base, tok = load_model(model)
    lmap = select_layers(layer_map(base, granularity), list(layers))
    return Workbench(base, tok, load_task(dataset), lmap, model_shape(base, lmap))


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


def memory_settings(batch_size: int, seq_len: int, backend: str, grad_checkpointing: bool = False,
                    device: str = "cpu") -> MemorySettings:
    """fp32 everything on the CPU; on a GPU the base/metadata/activations are 16-bit."""
    half = 2 if device.startswith("cuda") else 4
    return MemorySettings(backend=backend, meta_bytes=half, base_bytes=half, act_bytes=half,
                          batch_size=batch_size, seq_len=seq_len, grad_checkpointing=grad_checkpointing)
