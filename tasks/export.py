"""Prefect tasks of the export: the final fine-tune of the chosen configuration written as an export folder
(``model/``, ``adapter/``, optional ``merged/``, metrics, plots), then publishing it (object storage + an
MLflow pyfunc model registered with alias "champion").

Not cached: their products are files and registry entries, which a cache hit would not recreate.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from autoqra_core import export as ex
from autoqra_core.finetune import TrainSettings
from autoqra_core.quantize import QuantSettings
from autoqra_core.space import Config
from infra import tracking
from infra.storage import open_store

from .common import workbench

METRICS_FILE = "autoqra_metrics.json"
CURVE_FILE = "training_curve.png"


def _bar(total: int, seed: int):
    """A tqdm progress bar as the fine-tune's ``progress(step, steps, loss)`` callback."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"final fine-tune (seed {seed})", unit="step", mininterval=2.0)

    def progress(step: int, steps: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if step == steps:
            bar.close()

    return progress


@task(cache_policy=NO_CACHE, retries=1, task_run_name="final fine-tune {config_key}")
def final_finetune(
    model: str,
    dataset: str,
    config: dict,
    config_key: str,
    export: dict,
    quant: dict,
    train: dict,
    granularity: str,
    layers: list[str],
    out_dir: str,
) -> dict:
    """Fine-tune ``config`` once per export seed, score each on the test split, and write the first seed's
    model as ``out_dir``/{model,adapter[,merged]}; the reloaded ``model/``+``adapter/`` is scored again so
    the reported numbers are those of the files, not of the object in memory."""
    wb = workbench(model, dataset, granularity, tuple(layers))
    cfg = Config.from_dict(config)
    s = ex.ExportSettings(**{**export, "seeds": tuple(export["seeds"])})
    q = ex.training_backend(QuantSettings(**quant))
    fid = ex.final_fidelity(s, wb.task, wb.tokenizer)
    out = Path(out_dir)
    for part in (ex.MODEL_DIR, ex.ADAPTER_DIR, ex.MERGED_DIR):  # a re-export replaces, never mixes
        shutil.rmtree(out / part, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    per_seed, curves, kept = [], {}, None
    for seed in s.seeds:
        trained, losses = ex.finetune(wb.base, wb.tokenizer, wb.task, wb.lmap, cfg, fid, q,
                                      TrainSettings(**{**train, "seed": seed}), progress=_bar(fid.steps, seed))
        loss, acc = ex.score_on_test(trained, wb.tokenizer, wb.task, fid)
        per_seed.append({"seed": seed, "loss": loss, "accuracy": acc,
                         "final_train_loss": losses[-1] if losses else None})
        curves[seed] = losses
        if kept is None:
            kept = trained
    adapter = ex.save_adapter(kept, out / ex.ADAPTER_DIR)
    ex.save_model(ex.pack(wb.base, cfg, wb.lmap, q.group_size), wb.tokenizer, out / ex.MODEL_DIR)
    reloaded = ex.load(out)
    files_loss, files_acc = ex.score_on_test(reloaded, wb.tokenizer, wb.task, fid)
    del reloaded
    merged = None
    if s.merge:
        dtype = getattr(torch, s.merged_dtype)
        m = ex.merge(wb.base, cfg, wb.lmap, q.group_size, adapter, dtype)
        ex.save_merged(m, wb.tokenizer, out / ex.MERGED_DIR)
        m_loss, m_acc = ex.score_on_test(m.float(), wb.tokenizer, wb.task, fid)  # its dtype's weights, fp32 compute
        merged = {"dtype": s.merged_dtype, "loss": m_loss, "accuracy": m_acc}
    loss_mean, loss_sd = ex.summary([r["loss"] for r in per_seed])
    acc_mean, acc_sd = ex.summary([r["accuracy"] for r in per_seed])
    metrics = {
        "test": {"loss_mean": loss_mean, "loss_sd": loss_sd, "accuracy_mean": acc_mean, "accuracy_sd": acc_sd,
                 "seeds": list(s.seeds), "per_seed": per_seed},
        "exported_seed": s.seeds[0],
        "in_memory": {"loss": per_seed[0]["loss"], "accuracy": per_seed[0]["accuracy"]},
        "files": {"loss": files_loss, "accuracy": files_acc},  # model/ + adapter/ reloaded from disk
        "merged": merged,
        "fine_tune": {"steps": fid.steps, "data_fraction": fid.data_fraction, "seq_len": fid.seq_len,
                      "batch_size": fid.batch_size, "seeds": list(s.seeds), "test_examples": fid.eval_examples,
                      "backend": q.backend, "group_size": q.group_size,
                      "train_tokens": fid.steps * fid.batch_size * fid.seq_len},
        "training_curves": {str(k): v for k, v in curves.items()},
        "config_key": config_key,
        "settings": export,  # what an export re-run compares to reuse this fine-tune
        # the search-era keys, kept for readers of export.json: the export's own test numbers
        "eval_loss": loss_mean, "accuracy": acc_mean,
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return metrics


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, task_run_name="publish {name}")
def publish(export_dir: str, store_url: str | None, prefix: str, name: str, mlflow_run_id: str | None,
            tags: dict, description: str | None = None) -> dict:
    """Upload the export folder to the object store, log it to the search's MLflow run as a pyfunc model
    and register that as ``name`` with alias "champion" (the same run again: the same version, updated).
    Retried: both are network calls."""
    store = open_store(store_url)
    keys = store.put_dir(export_dir, prefix)
    uri = tracking.tracking_uri()
    run_id = mlflow_run_id if tracking.run_exists(mlflow_run_id, uri) else tracking.find_or_start_run(
        tracking.ensure_experiment("autoqra", uri=uri), f"export-{name}", key=f"export:{prefix}",
        tags={"autoqra.kind": "export"}, uri=uri)
    curve = Path(export_dir) / CURVE_FILE
    if curve.is_file():
        tracking.log_artifacts(run_id, [curve], artifact_path="export", uri=uri)
    path = tracking.log_pyfunc(run_id, export_dir, artifact_path="champion", uri=uri)
    version = tracking.register_model(run_id, path, name, alias="champion",
                                      tags={**tags, "store": store.url_for(prefix)}, description=description, uri=uri)
    return {"store_url": store.url_for(prefix), "store_keys": keys, "mlflow_run_id": run_id,
            "registered_model": name, "version": str(version.version), "alias": "champion",
            "source": version.source, "model_uri": f"models:/{name}@champion"}
