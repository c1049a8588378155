"""Identities for cache keys: the content of model and dataset files, hub commits, and the code's version.

A file's sha256 is memoised by (path, size, mtime_ns) in this process and in a memo file under AUTOQRA_HOME,
so a large checkpoint is read once while it is unchanged. The memo is bounded: it forgets files that no
longer exist and keeps at most ``MEMO_ENTRIES`` (the most recently used), and it is written once per
fingerprint, not once per file hashed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import autoqra_core
from infra.settings import DEFAULT_HOME

#: Libraries whose versions change the numbers an evaluation gives: part of every evaluation's cache key.
NUMERIC_LIBRARIES = ("torch", "transformers", "peft", "hqq", "bitsandbytes")
MEMO_FILE = "file-hashes.json"  # under AUTOQRA_HOME: other processes reuse the hashes of unchanged files
MEMO_ENTRIES = 4096  # files remembered; a worker that fingerprints many checkpoints forgets the oldest

_HASHES: dict[str, tuple[int, int, str]] = {}  # absolute path -> (size, mtime_ns, sha256), least recent first
_HASHES_LOCK = threading.Lock()


def library_versions(names: Sequence[str] = NUMERIC_LIBRARIES) -> dict[str, str]:
    """Installed versions of ``names`` ("absent" for one that is not installed)."""
    out = {}
    for name in names:
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


def _memo_path() -> Path:
    return Path(os.environ.get("AUTOQRA_HOME") or DEFAULT_HOME).expanduser() / MEMO_FILE


def _load_memo() -> None:
    """The memo file into ``_HASHES``, once per process (caller holds the lock)."""
    if _HASHES:
        return
    try:
        _HASHES.update({k: tuple(v) for k, v in json.loads(_memo_path().read_text()).items()})
    except (OSError, ValueError):
        pass


def _save_memo() -> None:
    """Forget files that are gone or beyond ``MEMO_ENTRIES``, then write the memo (caller holds the lock)."""
    for key in [k for k in _HASHES if not os.path.exists(k)]:
        del _HASHES[key]
    for key in list(_HASHES)[: max(0, len(_HASHES) - MEMO_ENTRIES)]:
        del _HASHES[key]
    try:
        memo = _memo_path()
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(_HASHES))
        os.replace(tmp, memo)  # another process's concurrent write may win: it only costs a re-hash
    except OSError:
        pass  # the memo is an optimisation; a read-only home re-hashes next time


def _hash(path: Path) -> tuple[str, bool]:
    """(sha256 of the file's content, whether it had to be read): the memo's answer while size and mtime hold."""
    key, st = str(path.resolve()), path.stat()
    with _HASHES_LOCK:
        _load_memo()
        hit = _HASHES.pop(key, None)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            _HASHES[key] = hit  # most recently used last
            return hit[2], False
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    with _HASHES_LOCK:
        _HASHES[key] = (st.st_size, st.st_mtime_ns, digest)
    return digest, True


def file_hash(path: Path) -> str:
    """sha256 of a file's content, memoised by (path, size, mtime_ns): read once while it is unchanged."""
    digest, new = _hash(path)
    if new:
        with _HASHES_LOCK:
            _save_memo()
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
    h, new = hashlib.sha256(), False
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    for f in files:
        if f.is_file():
            digest, read = _hash(f)
            new |= read
            h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{digest}\n".encode())
    if new:  # one write for the whole folder
        with _HASHES_LOCK:
            _save_memo()
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
