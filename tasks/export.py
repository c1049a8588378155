"""Prefect tasks of the export: the winner's run on the first report seed written as an export folder
(``autoqra_core.export.write_export``), then publishing it (object storage + an MLflow pyfunc model registered
with alias "champion").

Nothing is fine-tuned for the export: its run is the checkpoint the test report's run left at the top rung
(``tasks.evaluate.checkpoint``, a cache hit; trained again only if that checkpoint was never made here). The
writing is a cached, persisted task (keyed by content fingerprints, settings, folder and code version): an
export re-run after a failed upload reuses it. Its product is files, which a cache hit does not recreate, so the
caller refreshes the cache when the folder no longer holds them (``autoqra_core.export.holds``). Publishing is
not cached: its products are registry entries and uploads.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from autoqra_core import export as ex
from autoqra_core.fidelity import Fidelity
from autoqra_core.finetune import TrainSettings
from autoqra_core.quantize import QuantSettings
from autoqra_core.space import Config
from infra import tracking
from infra.storage import open_store
from infra.workbench import workbench
from tasks.evaluate import checkpoint


@task(cache_policy=(INPUTS + TASK_SOURCE) - "model" - "dataset", persist_result=True, retries=1,
      task_run_name="export {config_key} seed {train[seed]}")
def export_run(
    model: str,
    dataset: str,
    config: dict,
    config_key: str,
    fidelities: list[dict],
    test_fidelity: dict,
    export: dict,
    quant: dict,
    train: dict,
    granularity: str,
    layers: list[str],
    out_dir: str,
    model_id: str,
    dataset_id: str,
    code_version: str,
    report: dict | None = None,
    columns: str = "",
) -> dict:
    """``write_export`` of ``config``'s run (seed in ``train``) at the end of its fine-tune (``fidelities``: the
    ladder) into ``out_dir``, scored on ``test_fidelity``'s test rows: its metrics. ``model``/``dataset`` are paths
    (not in the cache key: ``model_id``/``dataset_id`` are their content fingerprints)."""
    ckpt = checkpoint(model, dataset, model_id, dataset_id, config, config_key, fidelities, quant, train, granularity,
                      layers, code_version, columns)
    wb = workbench(model, dataset, granularity, tuple(layers), columns)
    return ex.write_export(wb.base, wb.tokenizer, wb.task, wb.lmap, Config.from_dict(config), ckpt,
                           Fidelity(**test_fidelity), ex.ExportSettings.from_dict(export), QuantSettings(**quant),
                           TrainSettings(**train), out_dir, report)


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
    curve = Path(export_dir) / ex.CURVE_FILE
    if curve.is_file():
        tracking.log_artifacts(run_id, [curve], artifact_path="export", uri=uri)
    path = tracking.log_pyfunc(run_id, export_dir, artifact_path="champion", uri=uri)
    version = tracking.register_model(run_id, path, name, alias="champion",
                                      tags={**tags, "store": store.url_for(prefix)}, description=description, uri=uri)
    return {"store_url": store.url_for(prefix), "store_keys": keys, "mlflow_run_id": run_id,
            "registered_model": name, "version": str(version.version), "alias": "champion",
            "source": version.source, "model_uri": f"models:/{name}@champion", "tracking_uri": uri}
