"""What every task needs in its process: the loaded model/task (once per process) and cache-key parts."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import threading
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


_WORKBENCH_LOCK = threading.Lock()


def workbench(model: str, dataset: str, granularity: str = "block", layers: tuple[str, ...] = ()) -> Workbench:
    """The loaded model and task, once per process and per content (a checkpoint rewritten in place is
    reloaded). Thread-safe: thread workers wait for the first load instead of loading the model twice."""
    with _WORKBENCH_LOCK:
        local = [fingerprint(p) if Path(p).exists() else p for p in (model, dataset)]  # hub ids: no lookup here
        return _workbench(model, dataset, granularity, tuple(layers), *local)


@lru_cache(maxsize=2)
def _workbench(model: str, dataset: str, granularity: str, layers: tuple[str, ...], model_id: str,
               dataset_id: str) -> Workbench:
    base, tok = load_model(model)
    lmap = select_layers(layer_map(base, granularity), list(layers))
    return Workbench(base, tok, load_task(dataset), lmap, model_shape(base, lmap), PackedCache(base, cache_capacity()))


def cache_capacity() -> int | None:
    """Packed modules kept beyond the current candidate's: all of them in host memory; on a GPU (they sit in
    the memory the budget measures) none, unless AUTOQRA_PACKED_CACHE_BYTES allows some headroom."""
    if (env := os.environ.get("AUTOQRA_PACKED_CACHE_BYTES")) is not None:
        return int(env)
    return 0 if torch.cuda.is_available() else None


#: Libraries whose versions change the numbers an evaluation gives: part of every evaluation's cache key.
NUMERIC_LIBRARIES = ("torch", "transformers", "peft", "hqq", "bitsandbytes")


def library_versions() -> dict[str, str]:
    """Installed versions of ``NUMERIC_LIBRARIES`` ("absent" for one that is not installed)."""
    out = {}
    for name in NUMERIC_LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the method's source and of the numeric libraries' versions: a change in autoqra_core or a new
    torch/transformers/peft/hqq/bitsandbytes invalidates cached evaluations."""
    h = hashlib.sha256()
    for path in sorted(Path(autoqra_core.__file__).parent.glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    h.update(json.dumps(library_versions(), sort_keys=True).encode())
    return h.hexdigest()[:12]


_HASHES: dict[str, tuple[int, int, str]] = {}  # absolute path -> (size, mtime_ns, sha256 of the content)
_HASHES_LOCK = threading.Lock()
MEMO_FILE = "file-hashes.json"  # under AUTOQRA_HOME: other processes reuse the hashes of unchanged files


def _memo_path() -> Path:
    return Path(os.environ.get("AUTOQRA_HOME") or ".autoqra").expanduser() / MEMO_FILE


def file_hash(path: Path) -> str:
    """sha256 of a file's content, memoised by (path, size, mtime_ns): a 16 GB checkpoint is read once per
    process, and once at all while it is unchanged (the memo file under AUTOQRA_HOME)."""
    key, st = str(path.resolve()), path.stat()
    with _HASHES_LOCK:
        if not _HASHES:
            try:
                _HASHES.update({k: tuple(v) for k, v in json.loads(_memo_path().read_text()).items()})
            except (OSError, ValueError):
                pass
        hit = _HASHES.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    with _HASHES_LOCK:
        _HASHES[key] = (st.st_size, st.st_mtime_ns, digest)
        try:
            memo = _memo_path()
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f"{memo.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(_HASHES))
            os.replace(tmp, memo)  # another process's concurrent write may win: it only costs a re-hash
        except OSError:
            pass  # the memo is an optimisation; a read-only home re-hashes next time
    return digest


def fingerprint(path: str, repo_type: str = "model") -> str:
    """Identity of a model or dataset for cache keys: the content of every file (names included); a hub id
    with the commit it resolves to (from the local hub cache, else the hub); offline, the id alone (logged)."""
    p = Path(path)
    if not p.exists():
        commit = hub_commit(path, repo_type)
        if commit is None:
            logging.getLogger("autoqra").warning(
                f"{repo_type} {path!r}: could not resolve its hub commit (offline?); cached evaluations are keyed "
                f"by the id alone, so a new revision of it would reuse them (pass a local path to be exact)")
            return path
        return f"{path}@{commit}"
    h = hashlib.sha256()
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    for f in files:
        if f.is_file():
            h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{file_hash(f)}\n".encode())
    return h.hexdigest()[:12]


@lru_cache(maxsize=32)
def hub_commit(repo_id: str, repo_type: str = "model") -> str | None:
    """The commit a hub id resolves to now: the local cache's snapshot, else the hub (5 s); None if neither."""
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not cached (or not a valid id): ask the hub
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None
    try:
        info = HfApi().repo_info(repo_id, repo_type=repo_type, timeout=5)
        return info.sha
    except Exception:  # noqa: BLE001 - offline, unknown id, private repo: keep the id
        return None


def memory_settings(batch_size: int, seq_len: int, backend: str, grad_checkpointing: bool | None = False,
                    device: str = "cpu", group_size: int = 64, dtype: str = "auto") -> MemorySettings:
    """fp32 everything on the CPU; on a GPU the base/metadata/activations are bf16 (``memory.settings_for``)."""
    return settings_for(device, backend, group_size, batch_size, seq_len, grad_checkpointing, dtype)
