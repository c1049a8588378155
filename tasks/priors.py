"""Prefect task: importance priors from a few calibration batches (cached like evaluations)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from autoqra_core.priors import calibration, compute_priors
from infra.workbench import workbench


@task(cache_policy=(INPUTS + TASK_SOURCE) - "model" - "dataset", persist_result=True, retries=1, task_run_name="priors")
def priors(
    model: str,
    dataset: str,
    model_id: str,
    dataset_id: str,
    granularity: str,
    layers: list[str],
    bits: list[int],
    group_size: int,
    seed: int,
    code_version: str,
    columns: str = "",
) -> dict:
    """Priors.to_dict(): Fisher sensitivity and quantization error per layer."""
    wb = workbench(model, dataset, granularity, tuple(layers), columns)
    return compute_priors(wb.base, wb.lmap, calibration(wb.task, wb.tokenizer, seed), tuple(bits), group_size).to_dict()
