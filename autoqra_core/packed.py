"""Packed weights made once per worker and shared by every candidate built from them.

Only (modules x bit-widths) distinct quantized tensors exist, however many candidates a
search evaluates: the cache makes each one the first time a candidate asks for it and hands
the same module to every later candidate. A candidate is assembled without copying the
full-precision model: ``copy.deepcopy`` of the base with a memo that maps each quantizable
linear to its cached (quantized) module and every other tensor (embeddings, norms, head)
to one resident copy on the evaluation device in the compute dtype. Only module objects are
new; no weight is copied. Everything shared is frozen (LoRA trains new tensors beside it),
so candidates built from one cache never see each other's training.

On a GPU the cached packed modules live in GPU memory next to the candidate: ``capacity_bytes``
bounds what is kept beyond the candidate being built (least recently used entries go first;
0 keeps only the current candidate's modules, so the measured peak is the candidate's own).
``trim`` applies that bound once a candidate is done, and ``clear`` empties the cache.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import SpaceError
from .model import LayerMap
from .quantize import QuantSettings, check_backend, quantize_module, storage_bytes
from .space import UNQUANTIZED, Config

Key = tuple[str, int, str, int, str, torch.dtype]  # (module, bits, backend, group size, device, compute dtype)


def _module_bytes(module: nn.Module) -> int:
    return storage_bytes(module, grads=False)


@dataclass
class PackedCache:
    """(module, bits, backend, group_size, device, dtype) -> quantized module, for one full-precision ``base``."""

    base: nn.Module
    capacity_bytes: int | None = None  # beyond the current candidate's modules; None: keep every entry
    quantized: int = 0  # modules quantized so far (a test counts them)
    _entries: OrderedDict = field(default_factory=OrderedDict)
    _sizes: dict = field(default_factory=dict)
    _resident: dict = field(default_factory=dict)  # (device, dtype) -> {id(base tensor): device tensor}
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def module(self, name: str, bits: int, q: QuantSettings) -> nn.Module:
        """The module ``name`` of the base at ``bits``: made on first use, the same object afterwards."""
        key: Key = (name, bits, q.backend, q.group_size, q.device, q.compute_dtype)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            mod = quantize_module(self.base.get_submodule(name), bits, q)
            mod.requires_grad_(False)
            self._entries[key] = mod
            self._sizes[key] = _module_bytes(mod)
            self.quantized += bits < UNQUANTIZED
            return mod

    def nbytes(self) -> int:
        """Bytes the cached modules hold (packed weights + metadata, 16-bit copies)."""
        return sum(self._sizes.values())

    def count(self) -> int:
        """Modules cached now."""
        return len(self._entries)

    def trim(self) -> None:
        """Keep at most ``capacity_bytes`` of modules once no candidate is being built (after an evaluation)."""
        with self._lock:
            self._evict(set())

    def clear(self) -> None:
        """Drop every cached module and device copy; the cache stays usable (it quantizes again on demand)."""
        with self._lock:
            self._entries.clear()
            self._sizes.clear()
            self._resident.clear()

    def _evict(self, keep: set) -> None:
        if self.capacity_bytes is None:
            return
        extra = sum(n for k, n in self._sizes.items() if k not in keep)
        for k in [k for k in self._entries if k not in keep]:  # oldest first
            if extra <= self.capacity_bytes:
                break
            extra -= self._sizes.pop(k)
            del self._entries[k]

    def _resident_tensors(self, q: QuantSettings, skip: set[int]) -> dict[int, torch.Tensor]:
        """Frozen device copies of the base's other tensors (made once per device/dtype; none on CPU fp32)."""
        place = self._resident.setdefault((q.device, q.compute_dtype), {})
        for t in [*self.base.parameters(), *self.base.buffers()]:
            if id(t) in skip or id(t) in place:
                continue
            if isinstance(t, nn.Parameter):
                dtype = q.compute_dtype if t.is_floating_point() else None
                place[id(t)] = nn.Parameter(t.detach().to(device=q.device, dtype=dtype), requires_grad=False)
            else:  # buffers (rotary frequencies...) keep their dtype: only their device changes
                place[id(t)] = t.to(q.device)
        return place

    def assemble(self, config: Config, lmap: LayerMap, q: QuantSettings) -> nn.Module:
        """A model with ``config``'s bits per layer, built from cached modules: no weight is copied."""
        if config.names != lmap.names:
            raise SpaceError(f"configuration has layers {config.names[:2]}..., the model has {lmap.names[:2]}...")
        check_backend(q.backend, config.bits)
        mods = dict(self.base.named_modules())
        members = {m: c.bits for c, (_, ms) in zip(config.layers, lmap.layers) for m in ms}
        keep = {(m, b, q.backend, q.group_size, q.device, q.compute_dtype) for m, b in members.items()}
        with self._lock:
            self._evict(keep)
        memo: dict[int, object] = {id(mods[m]): self.module(m, b, q) for m, b in members.items()}
        inside = {id(t) for m in members for t in [*mods[m].parameters(), *mods[m].buffers()]}
        with self._lock:
            memo.update(self._resident_tensors(q, skip=inside))
        return copy.deepcopy(self.base, memo)
