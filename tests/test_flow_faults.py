"""Faults inside a running search flow: a crashing evaluation is retried once, then recorded as failed,
and the search goes on; a tracking server that dies mid-search loses no result."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from .helpers import MINI_SEARCH, TINY_SEARCH as TINY



@pytest.mark.slow
def test_crashing_evaluation_is_retried_once_then_failed(prefect_env, tmp_path, monkeypatch):
    import tasks.evaluate as te
    from flows.search import search_flow

    calls: Counter = Counter()
    real = te.run_config

    def flaky(base, tok, task, lmap, config, fid, rung, memory, q, t, *args, **kwargs):
        if t.seed == 3:  # the search's runs (the test report's have seeds of their own)
            calls[config.key()] += 1
        if config.layers[0].bits == 2:  # some candidates crash, every time
            raise RuntimeError("injected crash")
        return real(base, tok, task, lmap, config, fid, rung, memory, q, t, *args, **kwargs)

    monkeypatch.setattr(te, "run_config", flaky)
    cfg = tmp_path / "mini.yaml"
    cfg.write_text(MINI_SEARCH)
    result = search_flow(out=str(tmp_path / "out"), config_file=str(cfg), seed=3, baselines=True)

    failed = [e for e in result["evaluations"] if e["status"] == "failed"]
    assert failed, "the injected fault never hit: pick another condition"
    assert all("RuntimeError: injected crash" in e["reason"] for e in failed)
    assert all(calls[e["config_key"]] == 2 for e in failed)  # one retry, then recorded as failed
    assert result["best"] is not None and result["best"]["config"]["layers"][0]["bits"] != 2
    assert result["baselines"]["uniform-2bit-r16"]["status"] == "failed"
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert len(saved["evaluations"]) == len(result["evaluations"])


@pytest.mark.slow
def test_servers_dying_mid_search_lose_nothing(prefect_env, tmp_path, monkeypatch):
    """MLflow goes away during the search and the object store before the export: every result is kept."""
    import tasks.export as tx
    from flows.search import search_flow
    from infra import tracking
    from infra.storage import StoreError

    def mlflow_down(*args, **kwargs):
        raise ConnectionError("MLflow server at http://127.0.0.1:5000 went away")

    def store_down(*args, **kwargs):
        raise StoreError("Cannot reach S3 endpoint for s3://autoqra/store at http://127.0.0.1:9")

    monkeypatch.setattr(tracking, "log_evaluation", mlflow_down)
    monkeypatch.setattr(tx, "open_store", store_down)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    result = search_flow(out=str(out), config_file=str(cfg), seed=4, baselines=False, export=True)
    saved = json.loads((out / "result.json").read_text())
    assert saved["best"] == result["best"] and result["best"] is not None
    assert len(saved["evaluations"]) >= 10
    assert (out / "search-state.json").is_file()
    # The export's fine-tune is done and on disk; only the upload failed, and the error says how to redo it.
    assert "Cannot reach S3 endpoint" in result["export_error"] and "autoqra export --run" in result["export_error"]
    assert (out / "export" / "autoqra-embedded" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "export.json").exists()


@pytest.mark.slow
def test_fine_tune_with_too_little_data_is_refused_before_any_work(prefect_env, tmp_path, monkeypatch):
    """A fine-tune whose data fraction gives fewer tokens than one block: a DatasetError naming the problem, raised
    when the run is prepared, before any evaluation (bad input fails the same way in every evaluation)."""
    import tasks.evaluate as te
    from autoqra_core.errors import DatasetError
    from flows.search import search_flow

    calls = []
    monkeypatch.setattr(te, "run_config", lambda *a, **k: calls.append(1))
    cfg = tmp_path / "small.yaml"
    cfg.write_text(TINY.replace("train: {steps: 6, data_fraction: 0.05, seq_len: 32",
                                "train: {steps: 6, data_fraction: 0.00001, seq_len: 64"))
    with pytest.raises(DatasetError, match="1 training rows give fewer than 64 tokens"):
        search_flow(out=str(tmp_path / "out"), config_file=str(cfg), seed=3, baselines=False, export=False)
    assert not calls and not (tmp_path / "out" / "result.json").exists()


ONE_RUNG = """
train: {steps: 2, data_fraction: 0.05, seq_len: 32, batch_size: 4}
search:
  rungs:
    - {fraction: 1.0, eval_examples: 10}
"""


@pytest.mark.slow
def test_checkpoint_rewritten_in_place_is_not_served_from_the_cache(prefect_env, tmp_path, monkeypatch):
    """A real cached evaluation; the checkpoint's weights are rewritten in place with the same size (as a
    retrain into the same folder does): the next evaluation runs again, on the new weights."""
    import torch
    from safetensors.torch import load_file, save_file

    import tasks.evaluate as te
    from autoqra_core.space import SearchSpace
    from flows.search import evaluate_flow

    from .helpers import tiny_checkpoint

    ran = []
    real = te.run_config
    monkeypatch.setattr(te, "run_config", lambda *a, **k: ran.append(1) or real(*a, **k))
    ckpt = tiny_checkpoint(tmp_path, "llama")
    cfg = tmp_path / "one-rung.yaml"
    cfg.write_text(ONE_RUNG)
    config = SearchSpace(("model.layers.0", "model.layers.1")).uniform(4, 4).to_dict()

    first = evaluate_flow(config=config, model=str(ckpt), config_file=str(cfg))
    again = evaluate_flow(config=config, model=str(ckpt), config_file=str(cfg))
    assert len(ran) == 1 and again["eval_loss"] == first["eval_loss"]  # the cache serves an unchanged model

    weights = ckpt / "model.safetensors"
    size = weights.stat().st_size
    state = load_file(weights)
    torch.manual_seed(1)
    save_file({k: torch.randn_like(v) * v.std() if v.dim() == 2 else v for k, v in state.items()}, weights,
              metadata={"format": "pt"})
    assert weights.stat().st_size == size
    rewritten = evaluate_flow(config=config, model=str(ckpt), config_file=str(cfg))
    assert len(ran) == 2 and rewritten["eval_loss"] != first["eval_loss"]


@pytest.mark.slow
def test_mlflow_server_killed_mid_search(prefect_env, tmp_path, monkeypatch):
    """A real MLflow server SIGKILLed after the first checkpoint: the search finishes, each later checkpoint
    costs a bounded few seconds, the failure is reported once, nothing is lost; with the server back, the
    same command continues the same MLflow run and logs what was missed, without duplicates."""
    import os
    import signal
    import time

    import flows.outputs as fr
    from flows.search import search_flow
    from infra import stack as local_stack
    from infra import tracking

    server = local_stack.up(tmp_path / "stack", services=("mlflow",), timeout=150)
    uri = server.services["mlflow"].url
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    seconds: list[float] = []
    warnings: list[str] = []
    real_checkpoint, real_logger = fr.RunOutputs.checkpoint, fr.get_run_logger

    def timed_checkpoint(self, res):
        start = time.monotonic()
        real_checkpoint(self, res)
        seconds.append(time.monotonic() - start)
        if len(seconds) == 1:  # the server dies right after the first checkpoint
            os.killpg(server.services["mlflow"].pid, signal.SIGKILL)

    class Recording:
        def __init__(self, log):
            self.log = log

        def warning(self, msg, *a, **k):
            warnings.append(msg)
            self.log.warning(msg, *a, **k)

        def __getattr__(self, name):
            return getattr(self.log, name)

    monkeypatch.setattr(fr.RunOutputs, "checkpoint", timed_checkpoint)
    monkeypatch.setattr(fr, "get_run_logger", lambda: Recording(real_logger()))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    try:
        result = search_flow(out=str(out), config_file=str(cfg), seed=6, baselines=False, export=False)
        n = len(result["evaluations"])
        assert n >= 10 and json.loads((out / "result.json").read_text())["evaluations"] == result["evaluations"]
        after = seconds[1:]
        print(f"checkpoint seconds with MLflow up: {seconds[0]:.2f}; after SIGKILL: {[round(s, 2) for s in after]}")
        assert len(after) >= 2 and max(after) < 5.0
        failed = [w for w in warnings if "MLflow logging failed" in w]
        assert len(failed) == 1, warnings  # reported once, not at every checkpoint

        # The server comes back (same port, same database): the same command continues the run, logs the rest.
        local_stack.up(tmp_path / "stack", services=("mlflow",), ports={"mlflow": server.services["mlflow"].port},
                       timeout=150)
        monkeypatch.setattr(fr.RunOutputs, "checkpoint", real_checkpoint)
        again = search_flow(out=str(out), config_file=str(cfg), seed=6, baselines=False, export=False)
        assert again["mlflow_run_id"] == result["mlflow_run_id"]
        children = tracking.child_runs(result["mlflow_run_id"], uri)
        ids = [r.data.tags[tracking.EVAL_TAG] for r in children]
        assert len(ids) == len(set(ids)) == n
        assert tracking.client(uri).get_run(result["mlflow_run_id"]).info.status == "FINISHED"
    finally:
        local_stack.down(tmp_path / "stack")


def test_a_resumed_search_says_how_far_the_last_attempt_got(tmp_path, monkeypatch):
    """Re-running a search in the same --out says it resumes, from which step and after how many evaluations (the
    snapshot's); a new --out says nothing and starts its clock now."""
    from unittest import mock

    import flows.search as fs

    (tmp_path / fs.STATE_FILE).write_text(json.dumps({"started": 5.0, "step": "turbo 1", "state": {
        "stage": "turbo", "evolution": {"history": [{}, {}, {}]}, "turbo": {"history": [{}]}}}))
    log = mock.Mock()
    monkeypatch.setattr(fs, "get_run_logger", lambda: log)
    assert fs._first_started(tmp_path) == 5.0
    said = log.info.call_args[0][0]
    assert said.startswith("resuming:") and "turbo 1" in said and "4 evaluations" in said
    log.reset_mock()
    assert fs._first_started(tmp_path / "new") is None and not log.info.called
