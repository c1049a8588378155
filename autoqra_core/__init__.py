"""AutoQRA core: the method as a plain library (no orchestration, no I/O services).

    import autoqra_core as aq
    model, tokenizer = aq.load_model("infra/embedded/model")
    space = aq.SearchSpace(aq.layer_map(model).names)          # per-layer bits x ranks
    result = aq.run_search(aq.Problem(space, priors, cost, budget), evaluate_many, aq.SearchSettings())

Modules, in the order the method uses them: ``space`` (configurations) -> ``memory`` (the memory model) ->
``priors`` (importance) -> ``problem`` (space, priors, cost and budget as one value) -> ``feasibility``
(repair) -> ``evolution`` / ``surrogate`` / ``fidelity`` (stage 1) -> ``turbo`` (stage 2) -> ``racing``
(intensification) -> ``search`` (one step at a time: ``advance``), with ``model``, ``data``, ``quantize``,
``finetune`` and ``scoring`` building and scoring one configuration, ``baselines`` and ``protocol`` for the
comparison, ``estimate`` and ``export`` for planning and publishing, ``settings`` for declaring a settings field once.

The names below are imported on first use, so ``import autoqra_core.space`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "space": ("SearchSpace", "Config", "LayerChoice"),
    "model": ("load_model", "layer_map", "model_shape", "LayerMap"),
    "data": ("load_task", "Task", "check_task", "train_blocks", "batches", "Blocks", "loss_tokens"),
    "memory": ("MemorySettings", "settings_for", "memory_breakdown", "total_bytes", "budget_bytes", "format_bytes"),
    "estimate": ("plan", "Plan"),
    "priors": ("Priors", "compute_priors", "calibration"),
    "problem": ("Problem",),
    "feasibility": ("repair",),
    "fidelity": ("Fidelity", "Ladder", "Rung", "FineTune"),
    "quantize": ("QuantSettings",),
    "finetune": ("TrainSettings", "Checkpoint", "evaluate_config", "run_config"),
    "evaluation": ("Evaluation", "batched"),
    "evolution": ("EvolutionSettings",),
    "turbo": ("TurboSettings",),
    "racing": ("RaceSettings",),
    "search": ("SearchSettings", "SearchState", "SearchResult", "advance", "run_search"),
    "baselines": ("BaselineSettings", "baseline_configs", "run_baselines", "uniform_configs", "uniform_best_candidates"),
    "errors": ("AutoQRAError", "BudgetError", "DatasetError", "SpaceError", "CandidateFailed"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'autoqra_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
