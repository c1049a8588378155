"""Prefect tasks: one configuration's run trained up to a checkpoint, and scored there.

``train_run`` trains a configuration's fine-tune (training seed in ``train``) up to one rung's checkpoint and
returns the ``Checkpoint``: a persisted task result in the result storage, keyed by what determines it
(``checkpoint_key``). Up the ladder it continues the run from the previous rung's checkpoint, asked of itself
(a cache hit when that rung ran, wherever it ran), so a promotion never restarts a run, a killed search continues
a half-finished run from its last checkpoint, and any worker that sees the result storage can continue a run
another one started.

``evaluate`` scores a run at one rung on a held-out split: it asks ``train_run`` for the checkpoint and scores
it. Cached across runs and processes: the key is every input (model and data fingerprints, configuration, rung
and its fidelity, quantization and training settings, seed, split) plus the source hash of autoqra_core, and the
result is persisted, so a re-run with the same parameters reuses every finished evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.logging import get_run_logger
from prefect.transactions import CommitMode, transaction

from autoqra_core.errors import AutoQRAError, CandidateFailed
from autoqra_core.evaluation import Evaluation
from autoqra_core.fidelity import Fidelity
from autoqra_core.finetune import Checkpoint, TrainSettings, run_config, score_checkpoint
from autoqra_core.quantize import QuantSettings
from autoqra_core.space import Config
from infra.workbench import workbench

COUNTER_ENV = "AUTOQRA_COUNT_EVALUATIONS"  # a file to append one line per evaluation actually run (tests)
SEGMENTS_ENV = "AUTOQRA_COUNT_SEGMENTS"  # a file to append a line when a run's segment starts and ends (tests)
CHECKPOINT_FORMAT = 1  # bumped when a Checkpoint's contents change
RUN_FIELDS = ("steps", "total_steps", "data_fraction", "seq_len", "batch_size")  # what a checkpoint depends on


def _count(line: str, env: str = COUNTER_ENV) -> None:
    if path := os.environ.get(env):
        with open(path, "a") as f:
            f.write(line + "\n")


def _count_evaluation(task, task_run, state) -> None:
    """Completion hook: runs after the result is persisted, so a counted evaluation is one a re-run reuses."""
    if state.name != "Cached":
        _count(task_run.name)


def _name() -> str:
    """'eval r1 seed 0 4/16 2/8 ...' (rung, training seed, then bits/rank per layer); the test report's runs add
    the split."""
    from prefect.runtime import task_run

    p = task_run.parameters
    short = Config.from_dict(p["config"]).short()
    split = f" {p['split']}" if p.get("split", "validation") != "validation" else ""
    return f"eval r{p['rung']}{split} seed {p['train']['seed']} {short}"


def _train_name() -> str:
    from prefect.runtime import task_run

    p = task_run.parameters
    f = p["fidelities"][-1]
    return f"train to step {f['steps']}/{f.get('total_steps') or f['steps']} seed {p['train']['seed']} " \
           f"{Config.from_dict(p['config']).short()}"


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry a crash once (it may be transient); an ``AutoQRAError`` (bad input of this evaluation's own) would
    fail the same way again, and so would a run that diverged or ran out of memory (``CandidateFailed``)."""
    try:
        state.result()
    except (AutoQRAError, CandidateFailed):
        return False
    except Exception:  # noqa: BLE001 - any other error is worth one more try
        return True
    return True


def continues(earlier: dict, later: dict) -> bool:
    """Whether the run seen at fidelity ``later`` passes through the checkpoint ``earlier``: the same fine-tune
    (length, data, shape), stopped sooner."""
    same = all(earlier.get(k) == later.get(k) for k in RUN_FIELDS if k != "steps")
    return same and earlier.get("total_steps") is not None and earlier["steps"] < later["steps"]


def checkpoint_key(model_id: str, dataset_id: str, config_key: str, fidelity: dict, quant: dict, train: dict,
                   granularity: str, layers: list[str], code_version: str, columns: str = "") -> str:
    """The result-storage key of a run's checkpoint at ``fidelity``: what determines the run up to there (not how
    many held-out rows a rung scores). The flows use it to delete checkpoints no longer needed."""
    what = {"model": model_id, "dataset": dataset_id, "config": config_key,
            "run": {k: fidelity.get(k) for k in RUN_FIELDS}, "quant": quant, "train": train,
            "granularity": granularity, "layers": list(layers), "code": code_version, "columns": columns,
            "format": CHECKPOINT_FORMAT}
    return "checkpoint-" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:40]


def _checkpoint_cache_key(context, p: dict) -> str:
    return checkpoint_key(p["model_id"], p["dataset_id"], p["config_key"], p["fidelities"][-1], p["quant"],
                          p["train"], p["granularity"], p["layers"], p["code_version"], p.get("columns", ""))


def step_log(label: str, every_s: float = 15.0):
    """A ``progress(step, steps, loss)`` callback that logs the run's step, loss and ETA at its first step, then at
    most every ``every_s`` seconds and at its last: a long fine-tune is never silent."""
    log, start = get_run_logger(), time.time()
    seen: dict[str, float] = {"last": 0.0}

    def progress(step: int, steps: int, loss: float) -> None:
        seen.setdefault("first", step - 1)
        now = time.time()
        if now - seen["last"] < every_s and step != steps:
            return
        seen["last"] = now
        eta = (steps - step) * (now - start) / max(1, step - seen["first"])
        log.info(f"{label}: step {step}/{steps} loss {loss:.4f} | {(now - start) / 60:.1f} min, "
                 f"{eta / 60:.1f} min to the run's end")

    return progress


@task(cache_key_fn=_checkpoint_cache_key, persist_result=True, task_run_name=_train_name)  # its caller retries
def train_run(
    model: str,
    dataset: str,
    model_id: str,
    dataset_id: str,
    config: dict,
    config_key: str,
    fidelities: list[dict],
    quant: dict,
    train: dict,
    granularity: str,
    layers: list[str],
    code_version: str,
    columns: str = "",
    memory_bytes: int = 0,
) -> Checkpoint:
    """The run of ``config`` (seed in ``train``) trained up to ``fidelities[-1]``'s checkpoint, continued from the
    checkpoint at an earlier rung of ``fidelities`` where one is stored (the latest; a run never stopped there, e.g.
    one started at the top rung, trains in one segment and stores only its end). Raises CandidateFailed when the run
    diverges or runs out of memory (``memory_bytes``: the memory model's prediction, said beside an out-of-memory
    error; not part of the key)."""
    start = None
    for k in range(len(fidelities) - 1, 0, -1):  # the latest stored checkpoint the run passes through
        if continues(fidelities[k - 1], fidelities[-1]) and stored(checkpoint_key(
                model_id, dataset_id, config_key, fidelities[k - 1], quant, train, granularity, layers, code_version,
                columns)):
            start = checkpoint(model, dataset, model_id, dataset_id, config, config_key, fidelities[:k], quant, train,
                               granularity, layers, code_version, columns, memory_bytes)
            break
    wb = workbench(model, dataset, granularity, tuple(layers), columns)
    cfg, fid = Config.from_dict(config), Fidelity(**fidelities[-1])
    first = start.step if start else 0
    _count(f"segment {config_key} seed {train['seed']} steps {first}-{fid.steps} started", SEGMENTS_ENV)
    ev, ckpt = run_config(wb.base, wb.tokenizer, wb.task, wb.lmap, cfg, fid, len(fidelities) - 1, memory_bytes,
                          QuantSettings(**quant), TrainSettings(**train), split=None, cache=wb.packed, start=start,
                          progress=step_log(f"seed {train['seed']} {cfg.short()}"))
    if ckpt is None:
        raise CandidateFailed(ev.reason or "failed")
    _count(f"segment {config_key} seed {train['seed']} steps {first}-{fid.steps} done", SEGMENTS_ENV)
    return ckpt


def checkpoint(*args) -> Checkpoint:
    """``train_run(*args)``, its result committed as soon as it is made (not with the task that asked for it): a run
    killed later keeps every checkpoint it reached. Not retried itself: its caller's retry asks again."""
    with transaction(commit_mode=CommitMode.EAGER):
        return train_run(*args)


@task(
    retry_condition_fn=_retry_unless_bad_input,
    cache_policy=(INPUTS + TASK_SOURCE) - "model" - "dataset",
    persist_result=True,
    retries=1,
    task_run_name=_name,
    on_completion=[_count_evaluation] if os.environ.get(COUNTER_ENV) else [],  # Prefect logs every hook run
)
def evaluate(
    model: str,
    dataset: str,
    model_id: str,
    dataset_id: str,
    config: dict,
    config_key: str,
    rung: int,
    fidelities: list[dict],
    memory_bytes: int,
    quant: dict,
    train: dict,
    granularity: str,
    layers: list[str],
    code_version: str,
    split: str = "validation",
    columns: str = "",
) -> dict:
    """Evaluation.to_dict() of ``config``'s run at ``rung`` (``fidelities``: the ladder's rungs up to it; the last
    says how many ``split`` rows are scored). ``model``/``dataset`` are paths (not in the cache key:
    ``model_id``/``dataset_id`` are their content fingerprints); ``memory_bytes`` is the memory model's cost,
    computed by the caller for the fine-tune's training shape. ``split``: the held-out rows scored (``validation``
    for every search decision, ``test`` only for the final report)."""
    begin = time.perf_counter()
    cfg = Config.from_dict(config)
    ts = TrainSettings(**train)
    try:
        ckpt = checkpoint(model, dataset, model_id, dataset_id, config, config_key, fidelities, quant, train,
                          granularity, layers, code_version, columns, memory_bytes)
    except CandidateFailed as e:
        return Evaluation(cfg, rung, float("inf"), memory_bytes, status="failed", reason=e.reason, seed=ts.seed,
                          seconds=time.perf_counter() - begin).to_dict()
    # the run went on: its earlier checkpoints are spent
    delete_checkpoints([checkpoint_key(model_id, dataset_id, config_key, f, quant, train, granularity, layers,
                                       code_version, columns) for f in fidelities[:-1] if continues(f, fidelities[-1])])
    wb = workbench(model, dataset, granularity, tuple(layers), columns)
    ev = score_checkpoint(wb.base, wb.tokenizer, wb.task, wb.lmap, cfg, Fidelity(**fidelities[-1]), rung,
                          memory_bytes, ckpt, QuantSettings(**quant), ts, split=split, cache=wb.packed)
    return {**ev.to_dict(), "seconds": round(time.perf_counter() - begin, 3)}


def _local_storage() -> Path | None:
    """The folder of this run's result storage, where it is a local one."""
    from prefect.results import get_result_store

    base = getattr(get_result_store().result_storage, "basepath", None)
    return None if base is None else Path(base).expanduser()


def stored(key: str) -> bool:
    """Whether the result ``key`` is in this run's result storage."""
    from prefect.results import get_result_store

    base = _local_storage()
    return (base / key).is_file() if base is not None else get_result_store().exists(key)


def delete_checkpoints(keys: list[str], since: float | None = None) -> int:
    """Remove the persisted checkpoints ``keys`` (those written at or after the time ``since``, when given) from this
    run's result storage (local folders; other storages keep them); returns how many were removed. A later request
    for one of them trains its run again."""
    base = _local_storage()
    if base is None:
        get_run_logger().info("checkpoints kept: this result storage has no delete here")
        return 0
    removed = 0
    for key in keys:
        path = base / key
        try:
            if since is None or path.stat().st_mtime >= since:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # never written, or removed by another search
            pass
    return removed
