"""Cache keys that follow content: file bytes (memoised by size and mtime), hub commits, library versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import infra.fingerprint as fp
import infra.workbench as iw

from .helpers import ROOT


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOQRA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(fp, "_HASHES", {})
    return tmp_path / "home"


def test_same_size_rewrite_changes_the_fingerprint_and_the_memo_is_shared(tmp_path, home):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    weights = ckpt / "model.safetensors"
    weights.write_bytes(b"\x01" * 1_000_000)
    (ckpt / "config.json").write_text("{}")
    before = fp.fingerprint(str(ckpt))
    weights.write_bytes(b"\x02" * 1_000_000)  # retrained in place: same name, same size
    assert fp.fingerprint(str(ckpt)) != before
    memo = json.loads((home / fp.MEMO_FILE).read_text())
    size, mtime_ns, digest = memo[str(weights.resolve())]
    assert (size, mtime_ns) == (1_000_000, weights.stat().st_mtime_ns) and len(digest) == 64
    # Another process trusts the memo for an unchanged file (it does not re-read it): a planted digest shows it.
    memo[str(weights.resolve())] = [size, mtime_ns, "0" * 64]
    (home / fp.MEMO_FILE).write_text(json.dumps(memo))
    code = f"import infra.fingerprint as fp; print(fp.file_hash(__import__('pathlib').Path({str(weights)!r})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip()
    assert out == "0" * 64


def test_a_new_library_version_changes_the_code_version(monkeypatch):
    fp.code_version.cache_clear()
    now = fp.code_version()
    assert set(fp.library_versions()) == {"torch", "transformers", "peft", "hqq", "bitsandbytes"}
    real = fp.importlib.metadata.version
    monkeypatch.setattr(fp.importlib.metadata, "version", lambda n: "99.0" if n == "peft" else real(n))
    fp.code_version.cache_clear()
    try:
        assert fp.code_version() != now
    finally:
        monkeypatch.undo()
        fp.code_version.cache_clear()
    assert fp.code_version() == now


def test_hub_id_is_fingerprinted_with_its_commit(tmp_path):
    """A hub id in the local hub cache resolves to the snapshot's commit; offline and uncached, the id alone,
    with a warning that says so."""
    commit = "a" * 40
    repo = tmp_path / "hub" / "models--someorg--tiny"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("import logging, infra.fingerprint as fp; logging.basicConfig();"
            "print(fp.fingerprint('someorg/tiny')); print(fp.fingerprint('someorg/other'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(tmp_path / "hub"),
                            "HF_HUB_OFFLINE": "1"})
    assert r.stdout.split() == [f"someorg/tiny@{commit}", "someorg/other"]
    assert "'someorg/other': could not resolve its hub commit (offline?)" in r.stderr


def test_thread_workers_load_the_model_once(tmp_path, monkeypatch):
    """Four threads ask for the same workbench at once: one load, one object."""
    import threading

    from .helpers import EMBEDDED_DATA, tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path, "llama")
    loads = []
    real = iw.load_model

    def slow_load(path):
        loads.append(path)
        out = real(path)
        threading.Event().wait(0.5)  # widen the window two unlocked loads would overlap in
        return out

    monkeypatch.setattr(iw, "load_model", slow_load)
    iw.clear()
    got = []
    threads = [threading.Thread(target=lambda: got.append(iw.workbench(str(ckpt), str(EMBEDDED_DATA))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len(got) == 4 and all(g is got[0] for g in got)
    iw.clear()
