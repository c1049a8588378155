"""The worker process's loaded model and task: loaded once, reused by every evaluation in the process.

A long-lived worker (Prefect or Dask) serves many searches, so it keeps only the ``MAX_WORKBENCHES`` most
recently used workbenches; an older one is dropped before the next model loads, its packed weights
cleared and its memory handed back, and ``clear()`` drops them all.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path


from autoqra_core.data import Task, load_task
from autoqra_core.device import release, resolve_device
from autoqra_core.memory import ModelShape
from autoqra_core.model import LayerMap, layer_map, load_model, model_shape, select_layers
from autoqra_core.packed import PackedCache
from autoqra_core.space import SearchSpace

from .fingerprint import fingerprint

MAX_WORKBENCHES = 1  # loaded models a worker keeps: the one it last used


@dataclass(frozen=True)
class Workbench:
    """A loaded base model and task, and the packed weights made from it (each (module, bits) quantized once)."""

    base: object
    tokenizer: object
    task: Task
    lmap: LayerMap
    shape: ModelShape
    packed: PackedCache

    def space(self, bits: tuple[int, ...], ranks: tuple[int, ...]) -> SearchSpace:
        return SearchSpace(self.lmap.names, bits, ranks)


_LOADED: OrderedDict[tuple, Workbench] = OrderedDict()  # least recently used first
_LOCK = threading.Lock()


def workbench(model: str, dataset: str, granularity: str = "block", layers: tuple[str, ...] = (),
              columns: str = "") -> Workbench:
    """The loaded model and task (its columns renamed by ``columns``, ``data.parse_columns``), once per process
    and per content (a checkpoint rewritten in place is reloaded). Thread-safe: thread workers wait for the
    first load instead of loading the model twice."""
    with _LOCK:
        local = [fingerprint(p) if Path(p).exists() else p for p in (model, dataset)]  # hub ids: no lookup here
        key = (model, dataset, granularity, tuple(layers), columns, *local)
        if (wb := _LOADED.get(key)) is not None:
            _LOADED.move_to_end(key)
            return wb
        while len(_LOADED) >= MAX_WORKBENCHES:  # before loading: never one model more than the bound
            _drop(_LOADED.popitem(last=False)[1])
        base, tok = load_model(model)
        lmap = select_layers(layer_map(base, granularity), list(layers))
        wb = Workbench(base, tok, load_task(dataset, columns), lmap, model_shape(base, lmap), PackedCache(base, cache_capacity()))
        _LOADED[key] = wb
        return wb


def loaded() -> int:
    """How many workbenches this process holds."""
    return len(_LOADED)


def clear() -> None:
    """Drop every loaded workbench (its packed weights and device copies) and hand the memory back."""
    with _LOCK:
        while _LOADED:
            _drop(_LOADED.popitem(last=False)[1])


def _drop(wb: Workbench) -> None:
    wb.packed.clear()  # a caller still holding the workbench keeps a working (empty) cache
    release(resolve_device())


def cache_capacity() -> int | None:
    """Packed modules kept beyond the current candidate's: all of them in host memory; on a GPU (they sit in
    the memory the budget measures) none, unless AUTOQRA_PACKED_CACHE_BYTES allows some headroom."""
    if (env := os.environ.get("AUTOQRA_PACKED_CACHE_BYTES")) is not None:
        return int(env)
    return 0 if resolve_device().startswith("cuda") else None
