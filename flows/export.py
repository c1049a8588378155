"""The export flow: a finished search's best configuration, its run on the first report seed (the fine-tune the
test report scores; nothing is trained again), saved as an export folder standard tools load (``model/``,
``adapter/``, optional ``merged/``, a model card), uploaded to the object store and registered in MLflow as a
pyfunc model with alias "champion"."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from prefect import flow
from pydantic import ValidationError
from prefect.logging import get_run_logger

from autoqra_core.errors import AutoQRAError
from autoqra_core.export import ADAPTER_DIR, CARD_FILE, CURVE_FILE, Card, check_exportable, holds
from autoqra_core.memory import memory_breakdown
from autoqra_core.protocol import report_seeds
from autoqra_core.space import Config
from infra.fingerprint import NUMERIC_LIBRARIES, library_versions
from infra.plots import plot_allocation, plot_training_curve
from infra.settings import embedded_model_path
from infra.tracking import compact_config
from tasks.export import export_run, publish

from .config import RunConfig
from .prepared_run import Run, write_json

EXPORT_FILE = "export.json"
CONV1D_MODELS = ("gpt2",)  # transformers' Conv1D (weights transposed): model.conv1d_to_linear changes their layout


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
    missing = [k for k in ("settings", "seed", "model", "dataset", "budget_bytes") if k not in result]
    if missing:
        raise AutoQRAError(f"{path} lacks {missing}: it was written by an older AutoQRA; re-run the search with "
                           f"the same --out (finished evaluations are reused from the cache) and export again")
    return result


def _flow_run_ids() -> tuple[str | None, str | None]:
    """(this export's Prefect flow run id, the search flow run that called it, if any)."""
    from prefect.runtime import flow_run

    me, parent = flow_run.id, flow_run.parent_flow_run_id
    return (str(me) if me else None), (str(parent) if parent else None)


@flow(name="autoqra-export", log_prints=True, persist_result=True)
def export_flow(run: str, store: str | None = None, name: str | None = None, merge: bool | None = None,
                formats: list[str] | None = None) -> dict:
    """``run``/result.json's best configuration, its run on the first report seed, written as an export folder
    with a model card, then published; writes ``run``/export.json. ``merge`` overrides ``export.merge`` (also
    write ``merged/``), ``formats`` ``export.formats`` (model-ct/, gguf/)."""
    log = get_run_logger()
    run_dir = Path(run).resolve()
    result = read_result(run_dir)
    r, config = _prepare(run_dir, result, merge, formats)
    rc = r.rc
    name = name or model_name(result["model"])
    export_dir = run_dir / "export" / name
    seed = report_seeds(r.seed, 1)[0]  # the first report seed: fixed before anything was scored on test
    check_exportable(r.rc.quant_settings())
    if not result["best"].get("test"):
        log.info(f"no test report in {run_dir / 'result.json'} (report.seeds 0): the exported run on seed {seed} is "
                 f"trained now unless its checkpoint exists, and its own test numbers are the card's")
    log.info(f"exporting {config.short()}, its run on seed {seed} ({r.total_steps} steps) -> {export_dir}")
    # Prefect's cache is the resume: a re-run (e.g. after a failed upload) reuses the written export, unless its
    # files are gone from the folder, which a cache hit would not bring back.
    write = export_run.with_options(refresh_cache=not holds(export_dir, config, rc.export_settings(), seed))
    state = write(
        r.model, r.dataset, config.to_dict(), config.key(), [asdict(f) for f in r.ladder.rungs],
        asdict(r.test_fidelity()), rc.export.model_dump(), rc.quant.model_dump(), asdict(rc.train_settings(seed)),
        rc.space.granularity, list(rc.space.layers or []), str(export_dir), r.model_id, r.dataset_id, r.code,
        report=(result["best"].get("test") or None), columns=r.columns, return_state=True,
    )
    metrics = state.result()
    if state.name == "Cached":
        log.info(f"{export_dir} already holds this export (a cached run of an earlier one): reused")
    card, tags = _card_and_tags(name, result, r, config, metrics, export_dir)
    (export_dir / CARD_FILE).write_text(card)
    published = publish(str(export_dir), store, f"{name}/{run_dir.name}-{config.key()[:8]}", name,
                        result.get("mlflow_run_id"), tags, card)
    out = {"config": config.to_dict(), "memory_bytes": r.cost(config), "export_dir": str(export_dir),
           "adapter_dir": str(export_dir / ADAPTER_DIR), "card": str(export_dir / CARD_FILE),
           **{k: v for k, v in metrics.items() if k != "training_curves"}, **published}
    write_json(run_dir / EXPORT_FILE, out)
    log.info(f"registered {name} v{published['version']} (alias champion); files at {published['store_url']}")
    return out


def _prepare(run_dir: Path, result: dict, merge: bool | None, formats: list[str] | None) -> tuple[Run, Config]:
    """The search's run prepared again from its result.json (``merge``/``formats`` overriding its export settings)
    and the configuration to export, checked: its settings match this AutoQRA, its layers the model's."""
    try:
        rc = RunConfig.model_validate(result["settings"])
    except ValidationError as e:
        raise AutoQRAError(f"{run_dir / 'result.json'}'s settings do not match this AutoQRA ({e.errors()[0]['loc']}: "
                           f"{e.errors()[0]['msg']}): it was written before the fine-tune's rungs were checkpoints of "
                           f"one run; re-run the search with this version and export again") from None
    overrides = {k: v for k, v in (("merge", merge), ("formats", formats)) if v is not None}
    if overrides:
        rc = rc.model_copy(update={"export": rc.export.model_validate({**rc.export.model_dump(), **overrides})})
    r = Run.prepare(result["model"], result["dataset"], result["budget_bytes"], rc, result["seed"],
                    result.get("columns"))
    config = Config.from_dict(result["best"]["config"])
    r.space.validate(config)
    if getattr(r.wb.base.config, "model_type", "") in CONV1D_MODELS:
        raise AutoQRAError(f"{result['model']} is a {r.wb.base.config.model_type} model: its Conv1D layers are searched "
                           f"as nn.Linear, so model/ and merged/ would not load into its transformers class; the "
                           f"configuration is in {run_dir / 'result.json'} (best.config), export it by hand")
    return r, config


def _card_and_tags(name: str, result: dict, r: Run, config: Config, metrics: dict, export_dir: Path) -> tuple[str, dict]:
    """The model card (its plots written beside it) and the registry tags of the written export."""
    flow_id, parent_id = _flow_run_ids()
    search_flow = result.get("prefect_flow_run_id") or parent_id
    memory = memory_breakdown(config, r.wb.shape, r.mem).to_dict()
    plot_allocation(config.to_dict(), export_dir / "allocation.png", title=f"{name}: bits and LoRA rank per layer")
    plot_training_curve(metrics["training_curves"], export_dir / CURVE_FILE)
    test = metrics["test"]
    card = Card(
        name=name, base_model=result["model"], dataset=result["dataset"], config=config,
        budget_bytes=r.budget_bytes, memory=memory, test=test,
        fine_tune={k: v for k, v in metrics["fine_tune"].items()},
        exported={"seed": metrics["exported_seed"], **metrics["in_memory"]},
        versions=library_versions((*NUMERIC_LIBRARIES, "mlflow")),
        mlflow_run_id=result.get("mlflow_run_id"), prefect_flow_run_id=search_flow, merged=metrics["merged"],
        formats=metrics.get("formats", {}), bytes=metrics.get("bytes", {}),
        extra={"Prefect flow run (export)": flow_id or "n/a", "config key": config.key(),
               "search validation loss": result["best"].get("eval_loss")},
    ).render()
    cc = compact_config(config.to_dict())
    tags = {"test_loss": test["loss_mean"], "test_loss_sd": test["loss_sd"], "test_accuracy": test["accuracy_mean"],
            "test_accuracy_sd": test["accuracy_sd"], "memory_bytes": r.cost(config), "budget_bytes": r.budget_bytes,
            "mean_bits": cc.get("mean_bits"), "mean_rank": cc.get("mean_rank"), "config_key": config.key(),
            "model": result["model"], "dataset": result["dataset"], "seed": r.seed,
            "prefect_flow_run_id": search_flow or flow_id}
    return card, tags
