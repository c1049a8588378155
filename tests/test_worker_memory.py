"""A long-lived worker (Prefect, Dask) runs search after search in one process: what it caches stays bounded.

Its caches: the loaded workbench (base model, task, packed weights), the packed weights of the candidate it
just evaluated, and the file-hash memo behind every fingerprint.
"""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest

import infra.fingerprint as fp
import infra.workbench as iw
from autoqra_core.fidelity import Fidelity
from autoqra_core.finetune import TrainSettings, evaluate_config
from autoqra_core.packed import PackedCache
from autoqra_core.quantize import QuantSettings
from autoqra_core.space import SearchSpace

from .helpers import EMBEDDED_DATA, embedded, tiny_checkpoint  # noqa: F401 - fixture

TINY = Fidelity(steps=2, data_fraction=0.02, seq_len=32, batch_size=4, eval_examples=8)
SIM = QuantSettings("sim", device="cpu")


def _import_bitsandbytes() -> None:
    """peft imports bitsandbytes with the first model it wraps, which logs a warning on a CPU; pytest keeps that
    record, and the frames it points at (holding that model), until the test ends: import it before counting."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass


@pytest.mark.slow
def test_a_worker_serving_many_searches_does_not_grow(tmp_path, monkeypatch):
    """Four searches on four checkpoints, one after another: one model and one packed cache held at any time,
    the memo knows only files that exist and is written once per fingerprint, not once per file."""
    _import_bitsandbytes()
    monkeypatch.setenv("AUTOQRA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(fp, "_HASHES", {})
    writes = []
    save = fp._save_memo
    monkeypatch.setattr(fp, "_save_memo", lambda: writes.append(1) or save())
    iw.clear()
    held: list[weakref.ref] = []  # every base model and packed cache the worker made
    data_files = sum(f.is_file() for f in EMBEDDED_DATA.rglob("*"))
    try:
        for i, (arch, bits, rank) in enumerate([("llama", 4, 8), ("qwen2", 2, 16), ("mistral", 8, 4), ("llama", 3, 8)]):
            ckpt = tiny_checkpoint(tmp_path / f"search{i}", arch)
            files = sum(f.is_file() for f in ckpt.rglob("*"))
            wb = iw.workbench(str(ckpt), str(EMBEDDED_DATA))
            held += [weakref.ref(wb.base), weakref.ref(wb.packed)]
            config = wb.space((2, 3, 4, 8), (4, 8, 16)).uniform(bits, rank)
            ev = evaluate_config(wb.base, wb.tokenizer, wb.task, wb.lmap, config, TINY, 0, 0, SIM,
                                 TrainSettings(seed=i), cache=wb.packed)
            assert ev.ok, ev.reason
            memo = json.loads((tmp_path / "home" / fp.MEMO_FILE).read_text())
            assert all(Path(k).exists() for k in memo) and len(memo) <= files + data_files, i
            assert len(writes) <= 2 * (i + 1), (i, len(writes))  # model + dataset fingerprint per search at most
            del wb
            shutil.rmtree(ckpt)  # a finished search's checkpoint goes away
            gc.collect()
            alive = [type(r()).__name__ for r in held if r() is not None]
            assert iw.loaded() == 1 and len(alive) == 2, (i, alive)  # the last model and its cache
    finally:
        iw.clear()
    gc.collect()
    assert iw.loaded() == 0 and not any(r() for r in held)


def test_memo_keeps_the_most_recent_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOQRA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(fp, "_HASHES", {})
    monkeypatch.setattr(fp, "MEMO_ENTRIES", 3)
    paths = [tmp_path / f"f{i}" for i in range(6)]
    for i, p in enumerate(paths):
        p.write_text(str(i))
    for p in paths[:5]:
        fp.file_hash(p)
    fp.file_hash(paths[2])  # used again: the most recent
    fp.file_hash(paths[5])
    memo = json.loads((tmp_path / "home" / fp.MEMO_FILE).read_text())
    assert sorted(Path(k).name for k in memo) == ["f2", "f4", "f5"]


def test_packed_cache_is_bounded_in_bytes_and_empties_after_an_evaluation(embedded):
    base, tok, task, lmap = embedded
    space = SearchSpace(lmap.names)
    gpu_like = PackedCache(base, capacity_bytes=0)  # what a GPU worker gets: nothing beyond the candidate
    for bits in (2, 4, 8):
        ev = evaluate_config(base, tok, task, lmap, space.uniform(bits, 8), TINY, 0, 0, SIM, TrainSettings(),
                             cache=gpu_like)
        assert ev.ok and gpu_like.count() == 0 and gpu_like.nbytes() == 0, bits  # handed back after each

    one = PackedCache(base)
    one.assemble(space.uniform(4, 0), lmap, SIM)
    cache = PackedCache(base, capacity_bytes=one.nbytes())  # room for one candidate beyond the current one
    for bits in (4, 2, 8):
        cache.assemble(space.uniform(bits, 0), lmap, SIM)
    assert {k[1] for k in cache._entries} == {2, 8}  # the least recently used (4 bits) went first
    cache.trim()
    assert {k[1] for k in cache._entries} == {8}
    cache.clear()
    assert cache.count() == 0 and cache.nbytes() == 0 and not cache._resident
    model = cache.assemble(space.uniform(4, 0), lmap, SIM)  # still usable after a clear
    assert cache.count() == sum(len(mods) for _, mods in lmap.layers) and model is not None


def test_a_finished_candidate_is_freed_without_a_garbage_collection(embedded, monkeypatch):
    """A candidate's model, adapter and optimizer state go when its evaluation returns, by reference counting
    alone: nothing of it sits in a reference cycle. (So on a CPU `device.release` can skip the full collection
    it does on a GPU, which cost more than a small fine-tune.) Trained, then scored from the checkpoint."""
    import autoqra_core.finetune as ft

    base, tok, task, lmap = embedded
    made: list[weakref.ref] = []
    real = ft.build

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        made.extend(weakref.ref(x) for x in (model, *[p for p in model.parameters() if p.requires_grad][:2]))
        return model

    monkeypatch.setattr(ft, "build", build)
    config = SearchSpace(lmap.names).uniform(4, 8)
    gc.collect()
    gc.disable()
    try:
        ev, ckpt = ft.run_config(base, tok, task, lmap, config, TINY, 0, 0, SIM, TrainSettings(), split=None)
        ev2 = ft.score_checkpoint(base, tok, task, lmap, config, TINY, 0, 0, ckpt, SIM, TrainSettings())
        assert ev.train_loss is not None and ev2.ok and len(made) == 6
        alive = [type(r()).__name__ for r in made if r() is not None]
    finally:
        gc.enable()
    assert not alive, alive
