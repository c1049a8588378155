"""The flows: search (priors -> generation 0..G-1 -> turbo 1..T -> baselines -> report -> export), baselines
alone, and one configuration's evaluation. Every step is a cached Prefect task (``tasks.search``) whose
evaluations are its nested task runs; a re-run replays finished steps from the cache, so Prefect's cache is
the one resume mechanism. Every search decision reads the validation split; only the report reads test."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from contextlib import AbstractContextManager
from pathlib import Path

from prefect import flow, get_client
from prefect.logging import get_run_logger

from autoqra_core.baselines import baseline_configs, uniform_best_candidates
from autoqra_core.errors import AutoQRAError
from autoqra_core.evaluation import Evaluation
from autoqra_core.export import check_exportable
from autoqra_core.protocol import history_tokens, report_seeds
from autoqra_core.feasibility import check_budget
from autoqra_core.search import SearchState, planned_tokens, result as search_result
from autoqra_core.space import DEFAULT_BUDGET, Config
from tasks.evaluate import delete_checkpoints
from tasks.search import Live, baselines_step, lend, report_step, search_step, step_name, step_summary

from .config import load_run_config
from .export import export_flow
from .outputs import RunOutputs
from .prepared_run import Progress, Run, write_json

STATE_FILE = "search-state.json"  # a readable snapshot after every step; resume never reads it


class ResumeMismatch(AutoQRAError):
    pass


def check_out(out: Path, params: dict) -> None:
    """A folder holds one search: refuse to write another one's results over it (nothing is read to resume)."""
    path = out / STATE_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text()).get("params", {})
    if saved != params:
        diff = sorted(k for k in params if saved.get(k) != params[k])
        raise ResumeMismatch(
            f"{out} holds a search with other parameters (differs in: {', '.join(diff)}); "
            f"resume it with the same parameters, or use another --out (or delete {path}) to start afresh"
        )


def _first_started(out: Path) -> float | None:
    """When the search in ``out`` first started (its snapshot says), or None for a new one; a resumed search says
    so, with how far the last attempt got (its evaluations are read back from the cache, not run again)."""
    try:
        snap = json.loads((out / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    state = snap.get("state") or {}
    done = len((state.get("evolution") or {}).get("history", [])) + len((state.get("turbo") or {}).get("history", []))
    get_run_logger().info(f"resuming: the last attempt in {out} reached step {snap.get('step', '-')} after {done} "
                          f"evaluations; finished work comes back from the cache, only the rest runs")
    return snap.get("started")


def _planned(run: Run, baselines: bool) -> int:
    """Fine-tuning tokens of the whole run (for the ETA): ``search.planned_tokens``, the baselines (the fixed recipes
    and random search at the search's tokens, whole fine-tunes) and the test report (``report.seeds`` fine-tunes
    per method). Made exact as each stage starts."""
    total, methods, full = planned_tokens(run.search_settings()), 1, run.ladder.full.train_tokens
    if baselines:
        b = run.rc.baseline_settings()
        total += _baseline_fine_tunes(run, b.random_count(planned_tokens(run.search_settings()), run.ladder)) * full
        methods += b.methods
    return total + run.rc.report.seeds * methods * full


def _baseline_fine_tunes(run: Run, n_random: int) -> int:
    """Whole fine-tunes the baselines run at most: the one-configuration recipes, uniform-best's candidates (the
    search's runs of them are reused) and random search's draws."""
    return (run.rc.baseline_settings().fixed + n_random
            + len(uniform_best_candidates(run.space, run.cost, run.budget_bytes)))


@flow(name="autoqra-search", log_prints=True)
def search_flow(
    model: str = "embedded",
    dataset: str = "embedded",
    budget: str = DEFAULT_BUDGET,
    out: str = "runs/search",
    seed: int = 0,
    config_file: str | None = None,
    baselines: bool = False,
    export: bool = True,
    store: str | None = None,
    columns: str | None = None,
) -> dict:
    """Search per-layer bits and LoRA ranks under ``budget``; with ``baselines``, run them too; write
    ``out``/result.json and plots; then (``export``) fine-tune the winner, upload it to ``store`` (default
    AUTOQRA_STORE) and register it. ``columns`` maps the dataset's columns onto the row fields
    (``prompt=instruction+input,completion=output``)."""
    log, started = get_run_logger(), time.time()
    rc = load_run_config(config_file)
    if export:
        check_exportable(rc.quant_settings())  # before the search, not after it
    run = Run.prepare(model, dataset, budget, rc, seed, columns)
    out_dir, params = Path(out).resolve(), run.params(budget)
    check_out(out_dir, params)
    started = _first_started(out_dir) or started  # a resumed search: when its first attempt began
    check_budget(run.space, run.cost, run.budget_bytes)
    outputs = RunOutputs.start(run, out_dir, kind="search")
    log.info(f"{len(run.space)} layers, budget {run.budget_bytes} bytes")
    pri = run.priors()
    progress = Progress(run, _planned(run, baselines))
    with _lend(run, progress) as live:
        state, renames = _steps(run, pri, params, live, progress, outputs, started)
        res = search_result(state, run.search_settings())
        compute = {"autoqra": history_tokens(res.history, run.ladder)}
        # Equal compute: random search gets as many top-rung fine-tunes as the whole search's tokens pay for.
        n_random = rc.baseline_settings().random_count(compute["autoqra"], run.ladder) if baselines else 0
        base = _search_baselines(run, pri, params, live, progress, n_random, res.history) if baselines else {}
        compute |= baseline_compute(base, n_random, run) if baselines else {}
        tests = _test_report(run, params, live, {"autoqra": res.best.config} if res.best else {}, base, progress)
    _rename(renames)
    result = outputs.finish(res, base, pri, tests, compute)
    log.info(f"the search cost {run.ladder.fine_tunes(compute['autoqra']):.2f} full fine-tunes "
             f"({compute['autoqra']:,} tokens; one fine-tune: {run.total_steps} steps, "
             f"{run.ladder.full.train_tokens:,} tokens), replicates included")
    keep = {run.checkpoint_key(res.best.config, run.ladder.top, report_seeds(seed, 1)[0])} if res.best else set()
    ran = [e.config for e in res.history] + (_baseline_runs(run, pri, n_random) if baselines else [])
    _drop_checkpoints(run, ran, keep, started)
    if export and result["best"]:
        progress.at("export")
        result |= _export(out_dir, out, store)
    return result


def _steps(run: Run, pri, params: dict, live: str, progress: Progress, outputs: RunOutputs,
           started: float) -> tuple[SearchState, list[tuple]]:
    """The search, one cached task run per step (a generation or a TuRBO iteration), its state and the partial
    result written after each; returns the last state and the step runs' names (set once the flow ends)."""
    settings, state, renames = run.search_settings(), SearchState.new(run.seed), []
    while (name := step_name(state, settings)) is not None:
        progress.at(name)
        done = search_step(name, state.to_dict(), settings.to_dict(), pri.to_dict(), params, live, return_state=True)
        after = SearchState.from_dict(done.result())
        renames.append((done.state_details.task_run_id, f"{name.split(' (')[0]} ({step_summary(state, after)})"))
        write_json(outputs.out / STATE_FILE, {"params": params, "started": started, "step": name,
                                              "state": after.to_dict()})
        outputs.checkpoint(search_result(after, settings))
        state = after
    return state, renames


def _export(out_dir: Path, out: str, store: str | None) -> dict:
    """``export_flow`` on the written result; a failure is recorded (``export_error``, with the command that
    publishes it later), not raised: the search's results are written, only the export is redone."""
    try:
        return {"export": export_flow(str(out_dir), store)}
    except Exception as e:  # noqa: BLE001
        error = (f"{type(e).__name__}: {e}; every result is in {out_dir / 'result.json'}: "
                 f"publish it with `autoqra export --run {out}`")
        get_run_logger().error(f"export failed: {error}")
        return {"export_error": error}


@flow(name="autoqra-baselines", log_prints=True)
def baselines_flow(
    model: str = "embedded",
    dataset: str = "embedded",
    budget: str = DEFAULT_BUDGET,
    out: str = "runs/baselines",
    seed: int = 0,
    config_file: str | None = None,
    columns: str | None = None,
) -> dict:
    """The baselines alone (uniform b-bit r16, uniform-best, sequential, random, fp-lora) at the top rung; random
    search at ``baselines.n_random`` fine-tunes, by default those a search at these settings would spend."""
    started, rc = time.time(), load_run_config(config_file)
    run = Run.prepare(model, dataset, budget, rc, seed, columns)
    outputs = RunOutputs.start(run, Path(out).resolve(), kind="baselines")
    pri = run.priors()
    b = rc.baseline_settings()
    n_random = b.random_count(planned_tokens(run.search_settings()), run.ladder)
    fine_tunes = _baseline_fine_tunes(run, n_random) + rc.report.seeds * b.methods
    progress = Progress(run, fine_tunes * run.ladder.full.train_tokens,
                        "baselines")
    params = run.params(budget)
    with _lend(run, progress) as live:
        base = _baselines(run, pri, params, live, n_random, [], run.search_settings().seeds)
        tests = _test_report(run, params, live, {}, base, progress)
    result = outputs.finish(None, base, pri, tests, baseline_compute(base, n_random, run))
    best = result["best"] and Config.from_dict(result["best"]["config"])  # what `autoqra export --run` ships
    keep = {run.checkpoint_key(best, run.ladder.top, report_seeds(seed, 1)[0])} if best else set()
    _drop_checkpoints(run, _baseline_runs(run, pri, n_random), keep, started)
    return result


def baseline_compute(base: dict, n_random: int, run: Run) -> dict[str, int]:
    """Fine-tuning tokens each baseline spent choosing its configuration: random search all its fine-tunes,
    uniform-best one fine-tune per candidate and seed it was chosen on, a fixed recipe none."""
    top = run.ladder.full.train_tokens
    spent = {"random": n_random * top}
    if "uniform-best" in base:
        spent["uniform-best"] = (len(uniform_best_candidates(run.space, run.cost, run.budget_bytes))
                                 * base["uniform-best"].replicates * top)
    return {name: spent.get(name, 0) for name in base}


def _lend(run: Run, progress: Progress) -> AbstractContextManager[str]:
    """What this run's steps call (space, cost, evaluation with progress), lent while the steps run."""
    return lend(Live(run.space, run.cost, lambda p: run.evaluate_many(p, progress),
                     lambda m: run.test_report(m, progress)))


def _search_baselines(run: Run, pri, params: dict, live: str, progress: Progress, n_random: int,
                      history: list[Evaluation]) -> dict:
    """The baselines after a search (its evaluations of them reused), the plan of what is left made exact."""
    progress.at("baselines")
    progress.plan(_baseline_fine_tunes(run, n_random) + run.rc.report.seeds * run.rc.baseline_settings().methods)
    return _baselines(run, pri, params, live, n_random, history, run.search_settings().seeds)


def _baselines(run: Run, pri, params: dict, live: str, n_random: int, history: list[Evaluation],
               seeds: list[int]) -> dict:
    """The baselines as one task run (their evaluations nested in it, on the race's first seed; the search's
    replicates of them are reused); name -> Evaluation."""
    rc = run.rc
    out = baselines_step([e.to_dict() for e in history], run.ladder.top, n_random, pri.to_dict(), params, live,
                         list(rc.baselines.uniform_bits), rc.baselines.rank, run.seed, seeds)
    return {name: Evaluation.from_dict(e) for name, e in out.items()}


def _test_report(run: Run, params: dict, live: str, best: dict, base: dict, progress: Progress) -> dict:
    """The winner and every baseline re-fine-tuned with fresh seeds and scored on test (``report.seeds``)."""
    methods = best | {name: e.config for name, e in base.items()}
    if not methods or run.rc.report.seeds == 0:
        return {}
    progress.at("report")
    progress.plan(run.rc.report.seeds * len({c.key() for c in methods.values()}))
    return report_step({name: c.to_dict() for name, c in methods.items()}, run.rc.report.seeds, len(methods), params,
                       live)


def _drop_checkpoints(run: Run, configs: list[Config], keep: set[str], since: float) -> None:
    """Delete the checkpoints of every run the search, the baselines and the test report may have made (``configs``
    on the race's and the report's seeds: none can be promoted once they are done) since this flow started (another
    search on the same home keeps its own), except ``keep`` (the exported run's end). A re-run of the same search
    reads its cached evaluations and needs none of them."""
    seeds = run.search_settings().seeds + report_seeds(run.seed, run.rc.report.seeds)
    unique = {c.key(): c for c in configs}.values()
    keys = {run.checkpoint_key(c, r, s) for c in unique for s in seeds for r in range(len(run.ladder.rungs))}
    removed = delete_checkpoints(sorted(keys - keep), since)
    get_run_logger().info(f"checkpoints: {removed} deleted, {len(keep & keys)} kept for the export")


def _baseline_runs(run: Run, pri, n_random: int) -> list[Config]:
    """Every configuration the baselines fine-tune (random search's draws included, not only its best)."""
    b = replace(run.rc.baseline_settings(), n_random=n_random)
    return [c for cs in baseline_configs(run.problem(pri), b, seed=run.seed).values()
            for c in cs]


def _rename(renames: list) -> None:
    """Each step's task run renamed with what it did ('generation 2 (6 children, 2 promoted)'), at the end: the
    server records a task run's own updates asynchronously, and a rename sent right after the step could be
    overwritten by them."""
    try:
        with get_client(sync_client=True) as client:
            for task_run_id, name in renames:
                client.set_task_run_name(task_run_id, name)
    except Exception as e:  # noqa: BLE001 - a name in the UI is not worth failing a search for
        get_run_logger().debug(f"could not rename task runs: {e}")


@flow(name="autoqra-evaluate", log_prints=True, persist_result=True)
def evaluate_flow(
    config: dict,
    model: str = "embedded",
    dataset: str = "embedded",
    fidelity: int = -1,
    seed: int = 0,
    config_file: str | None = None,
    columns: str | None = None,
) -> dict:
    """One configuration at rung ``fidelity`` (-1: the top rung)."""
    rc = load_run_config(config_file)
    run = Run.prepare(model, dataset, None, rc, seed, columns)
    cfg = Config.from_dict(config)
    run.evaluable().validate(cfg)
    rung = run.ladder.top if fidelity < 0 else fidelity
    if not 0 <= rung <= run.ladder.top:
        raise AutoQRAError(f"--fidelity {fidelity} is not a rung: choose 0..{run.ladder.top} (or -1 for the top)")
    return run.evaluate_many([(cfg, rung, seed)])[0].to_dict()
