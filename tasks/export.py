"""Prefect tasks of the export: the final fine-tune of the chosen configuration, then publishing it
(object storage + MLflow model registry with alias "champion").

Not cached: their products are files and registry entries, which a cache hit would not recreate.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from autoqra_core.fidelity import Fidelity
from autoqra_core.finetune import TrainSettings, fit, save
from autoqra_core.quantize import QuantSettings
from autoqra_core.space import Config
from infra import tracking
from infra.storage import open_store

from .common import workbench

METRICS_FILE = "autoqra_metrics.json"


@task(cache_policy=NO_CACHE, retries=1, task_run_name="final fine-tune {config_key}")
def final_finetune(
    model: str,
    dataset: str,
    config: dict,
    config_key: str,
    fidelity: dict,
    quant: dict,
    train: dict,
    granularity: str,
    layers: list[str],
    out_dir: str,
) -> dict:
    """Fine-tune ``config`` at ``fidelity`` and save the adapter + quantization config (+ metrics) in ``out_dir``."""
    wb = workbench(model, dataset, granularity, tuple(layers))
    cfg = Config.from_dict(config)
    q = QuantSettings(**quant)
    trained, losses, loss, acc = fit(wb.base, wb.tokenizer, wb.task, wb.lmap, cfg, Fidelity(**fidelity), q,
                                     TrainSettings(**train))
    save(trained, cfg, q, out_dir)
    metrics = {"eval_loss": loss, "accuracy": acc, "final_train_loss": losses[-1] if losses else None,
               "fidelity": fidelity, "config_key": config_key}
    (Path(out_dir) / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return metrics


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, task_run_name="publish {name}")
def publish(adapter_dir: str, store_url: str | None, prefix: str, name: str, mlflow_run_id: str | None,
            tags: dict) -> dict:
    """Upload the exported folder to the object store, log it to the search's MLflow run and register it
    as a new version of ``name`` with alias "champion". Retried: both are network calls."""
    store = open_store(store_url)
    keys = store.put_dir(adapter_dir, prefix)
    uri = tracking.tracking_uri()
    run_id = mlflow_run_id if tracking.run_exists(mlflow_run_id, uri) else tracking.start_search_run(
        tracking.ensure_experiment("autoqra", uri=uri), f"export-{name}", tags={"autoqra.kind": "export"}, uri=uri)
    tracking.log_artifacts(run_id, [adapter_dir], artifact_path="model", uri=uri)
    version = tracking.register_model(run_id, f"model/{Path(adapter_dir).name}", name, alias="champion",
                                      tags={**tags, "store": store.url_for(prefix)}, uri=uri)
    return {"store_url": store.url_for(prefix), "store_keys": keys, "mlflow_run_id": run_id,
            "registered_model": name, "version": str(version.version), "alias": "champion",
            "source": version.source}
