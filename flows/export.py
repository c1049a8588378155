"""The export flow: a finished search's best configuration fine-tuned at the top rung, saved (adapter +
quantization config), uploaded to the object store and registered in MLflow with alias "champion"."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger

from autoqra_core.errors import AutoQRAError
from autoqra_core.space import Config
from infra.settings import embedded_model_path
from tasks.export import METRICS_FILE, final_finetune, publish

from .config import RunConfig
from .run import Run, write_json

EXPORT_FILE = "export.json"


def model_name(model: str) -> str:
    """Registry name for a model path or hub id: 'autoqra-embedded', 'autoqra-Qwen--Qwen2-0.5B'."""
    if Path(model) == embedded_model_path():
        base = "embedded"
    elif Path(model).exists():
        base = Path(model).name
    else:
        base = model.strip("/").replace("/", "--")
    return "autoqra-" + re.sub(r"[^A-Za-z0-9._-]+", "-", base)


def read_result(run_dir: Path) -> dict:
    path = run_dir / "result.json"
    if not path.is_file():
        raise AutoQRAError(f"{path} not found: --run must be the --out folder of a finished search or baselines run")
    result = json.loads(path.read_text())
    if not result.get("best"):
        raise AutoQRAError(f"{path} has no successful configuration within the budget to export")
    return result


@flow(name="autoqra-export", log_prints=True, persist_result=True)
def export_flow(run: str, store: str | None = None, name: str | None = None) -> dict:
    """Final fine-tune of ``run``/result.json's best configuration, then publish it; writes ``run``/export.json."""
    log = get_run_logger()
    run_dir = Path(run).resolve()
    result = read_result(run_dir)
    rc = RunConfig.model_validate(result["settings"])
    r = Run.prepare(result["model"], result["dataset"], result["budget_bytes"], rc, result["seed"])
    config = Config.from_dict(result["best"]["config"])
    r.space.validate(config)
    name = name or model_name(result["model"])
    adapter_dir = run_dir / "export" / name
    log.info(f"final fine-tune of {config.short()} at rung {r.ladder.top} -> {adapter_dir}")
    done = adapter_dir / METRICS_FILE
    kept = json.loads(done.read_text()) if done.is_file() else {}
    if kept.get("config_key") == config.key() and kept.get("fidelity") == r.ladder[r.ladder.top].__dict__:
        log.info(f"{adapter_dir} already holds this fine-tune (an earlier export that could not publish): reused")
        metrics = kept
    else:
        metrics = final_finetune(
            r.model, r.dataset, config.to_dict(), config.key(), r.ladder[r.ladder.top].__dict__,
            rc.quant.model_dump(),
            rc.train_settings(r.seed).__dict__, rc.space.granularity, list(rc.space.layers or []), str(adapter_dir),
        )
    tags = {"eval_loss": metrics["eval_loss"], "accuracy": metrics["accuracy"], "memory_bytes": r.cost(config),
            "budget_bytes": r.budget_bytes, "config_key": config.key(), "model": result["model"],
            "dataset": result["dataset"], "seed": r.seed}
    published = publish(str(adapter_dir), store, f"{name}/{run_dir.name}-{config.key()[:8]}", name,
                        result.get("mlflow_run_id"), tags)
    out = {"config": config.to_dict(), "memory_bytes": r.cost(config), "adapter_dir": str(adapter_dir),
           **metrics, **published}
    write_json(run_dir / EXPORT_FILE, out)
    log.info(f"registered {name} v{published['version']} (alias champion); files at {published['store_url']}")
    return out
