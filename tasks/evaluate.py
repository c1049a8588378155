"""Prefect task: one configuration fine-tuned and scored at one fidelity.

Cached across runs and processes: the key is every input (model and data
fingerprints, configuration, rung and its fidelity, quantization and training
settings, seed) plus the source hash of autoqra_core, and the result is persisted,
so a re-run with the same parameters reuses every finished evaluation.
"""

from __future__ import annotations

import os

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from autoqra_core.errors import AutoQRAError
from autoqra_core.fidelity import Fidelity
from autoqra_core.finetune import TrainSettings, evaluate_config
from autoqra_core.quantize import QuantSettings
from autoqra_core.space import Config
from infra.workbench import workbench

COUNTER_ENV = "AUTOQRA_COUNT_EVALUATIONS"  # a file to append one line per evaluation actually run (tests)


def _count(task, task_run, state) -> None:
    """Completion hook: runs after the result is persisted, so a counted evaluation is one a re-run reuses."""
    if (path := os.environ.get(COUNTER_ENV)) and state.name != "Cached":
        with open(path, "a") as f:
            f.write(task_run.name + "\n")


def _name() -> str:
    """'eval r1 seed 0 4/16 2/8 ...' (rung, training seed, then bits/rank per layer); the test report's runs add
    the split."""
    from prefect.runtime import task_run

    p = task_run.parameters
    short = Config.from_dict(p["config"]).short()
    split = f" {p['split']}" if p.get("split", "validation") != "validation" else ""
    return f"eval r{p['rung']}{split} seed {p['train']['seed']} {short}"


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry a crash once (it may be transient); an ``AutoQRAError`` (e.g. too little data at this rung) would
    fail the same way again."""
    try:
        state.result()
    except AutoQRAError:
        return False
    except Exception:  # noqa: BLE001 - any other error is worth one more try
        return True
    return True


@task(
    retry_condition_fn=_retry_unless_bad_input,
    cache_policy=(INPUTS + TASK_SOURCE) - "model" - "dataset",
    persist_result=True,
    retries=1,
    task_run_name=_name,
    on_completion=[_count] if os.environ.get(COUNTER_ENV) else [],  # Prefect logs every hook run: only when asked
)
def evaluate(
    model: str,
    dataset: str,
    model_id: str,
    dataset_id: str,
    config: dict,
    config_key: str,
    rung: int,
    fidelity: dict,
    memory_bytes: int,
    quant: dict,
    train: dict,
    granularity: str,
    layers: list[str],
    code_version: str,
    split: str = "validation",
    columns: str = "",
) -> dict:
    """Evaluation.to_dict() of ``config`` at ``rung``. ``model``/``dataset`` are paths (not in the cache key:
    ``model_id``/``dataset_id`` are their content fingerprints); ``memory_bytes`` is the memory model's cost,
    computed by the caller for the reporting fidelity's training shape. ``split``: the held-out rows scored
    (``validation`` for every search decision, ``test`` only for the final report)."""
    wb = workbench(model, dataset, granularity, tuple(layers), columns)
    cfg = Config.from_dict(config)
    fid = Fidelity(**fidelity)
    result = evaluate_config(wb.base, wb.tokenizer, wb.task, wb.lmap, cfg, fid, rung, memory_bytes,
                             QuantSettings(**quant), TrainSettings(**train), split=split, cache=wb.packed)
    return result.to_dict()
