"""``autoqra``: the command line over the flows. Exit 0 on success, 2 on bad input (with the problem named)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from autoqra_core.errors import AutoQRAError
from autoqra_core.space import DEFAULT_BUDGET, Config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
stack_app = typer.Typer(no_args_is_help=True, help="Local Prefect server, MLflow server and S3 server on 127.0.0.1.")
app.add_typer(stack_app, name="stack")

MODEL = typer.Option("embedded", "--model", help="Local checkpoint directory, hub id, 'embedded' or 'smollm2-135m'.")
DATASET = typer.Option("embedded", "--dataset", help="Directory with train/test.jsonl, a .jsonl/.txt file, 'embedded' (WordNet) or 'addition'.")
COLUMNS = typer.Option(None, "--columns", help="Map your columns onto the row fields, e.g. 'prompt=instruction+input,completion=output' (docs/protocol.md).")
CONFIG = typer.Option(None, "--config", help="Search settings (YAML): space, quant, train, search, baselines.")
STORE = typer.Option(None, "--store", help="Object store URL for the export (default: the AUTOQRA_STORE setting).")
SETTINGS = typer.Option(None, "--settings", help="Settings file (YAML) overriding MLFLOW_TRACKING_URI, AUTOQRA_STORE...")


def _setup(settings_file: Optional[Path]) -> None:
    """Export settings before Prefect/MLflow are imported; pick the task runner."""
    from infra.settings import Settings

    settings = Settings.load(settings_file)
    settings.apply()
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(settings.home / "prefect-results"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # slow, busy CPUs
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")


def _with_runner(flow, config_file: Optional[Path]):
    """The configured task runner: Prefect's thread pool, or a local Dask cluster of worker processes."""
    from flows.config import load_run_config

    ex = load_run_config(config_file).execution
    if ex.task_runner == "dask" and ex.address:  # an existing cluster: its workers (one per GPU) run the evaluations
        from prefect_dask import DaskTaskRunner

        runner = DaskTaskRunner(address=ex.address)
    elif ex.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        runner = DaskTaskRunner(cluster_kwargs={"n_workers": ex.workers, "threads_per_worker": 1, "processes": True})
    else:
        from prefect.task_runners import ThreadPoolTaskRunner

        runner = ThreadPoolTaskRunner(max_workers=ex.workers)
    return flow.with_options(task_runner=runner)


def _preflight(model: str, dataset: str, budget: Optional[str], config: Optional[Path], seed: int,
               out: Optional[Path] = None, store: Optional[str] = None, export: bool = False,
               columns: Optional[str] = None):
    """Check every input and server before Prefect starts: bad input fails in seconds, with exit 2.
    Returns the resolved Run (its space validates configurations)."""
    from autoqra_core.device import slow_16bit
    from flows.config import load_run_config
    from flows.prepared_run import Run
    from infra.tracking import check_tracking

    run = Run.prepare(model, dataset, budget, load_run_config(config), seed, columns)
    q = run.rc.quant_settings()
    if why := slow_16bit(q.device, q.compute_dtype):
        typer.secho(f"warning: {why}", err=True, fg=typer.colors.YELLOW)
    if out is not None:
        from flows.search import check_out

        check_out(out.resolve(), run.params(budget))
    check_tracking()
    if export:
        from infra.storage import open_store

        open_store(store, check=True)
    return run


def _read_config_json(path: Path) -> dict:
    """A CONFIG.json (a configuration, or a result entry holding one under "config"); errors name the file."""
    if not path.is_file():
        raise AutoQRAError(f"configuration file {path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AutoQRAError(f"{path} is not valid JSON: {e}") from None


def _run(fn):
    """Bad input -> message on stderr and exit 2; the flow's own failures keep their traceback."""
    try:
        return fn()
    except AutoQRAError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None


def _summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from autoqra_core.memory import format_bytes
    from autoqra_core.protocol import fmt_mean_sd, fmt_paired_diff

    ref, seeds = DEFAULT_BUDGET, result.get("protocol", {}).get("report_seeds")
    table = Table(title=f"budget {format_bytes(result['budget_bytes'])}; test on seeds {seeds}, "
                        f"{result.get('protocol', {}).get('test_examples')} rows")
    for col in ("method", "validation loss", "test loss", "test accuracy", f"Δ test loss vs {ref}", "memory"):
        table.add_column(col)
    rows = ([("AutoQRA best", result["best"])] if result.get("best") else []) + list(result["baselines"].items())
    for name, e in rows:
        loss, t = e.get("eval_loss"), e.get("test") or {}
        table.add_row(name, "-" if loss is None else f"{loss:.4f}", fmt_mean_sd(t.get("loss_mean"), t.get("loss_sd")),
                      fmt_mean_sd(t.get("accuracy_mean"), t.get("accuracy_sd"), 3), fmt_paired_diff(t, ref, "loss"),
                      format_bytes(e["memory_bytes"]))
    Console().print(table)
    if result.get("best"):
        Console().print(f"AutoQRA's configuration (bits/rank per layer): {Config.from_dict(result['best']['config']).short()}")
    if cost := result.get("search_cost"):
        ft = result["fine_tune"]
        cap = cost.get("budget_fine_tunes")
        budget = f" of a budget of {cap:g}" if cap else ""
        Console().print(f"search cost: {cost['fine_tunes']:.2f} full fine-tunes{budget} ({cost['train_tokens']:,} "
                        f"tokens, {cost['evaluations']} evaluations, replicates included; one fine-tune = "
                        f"{ft['steps']} steps, {ft['train_tokens']:,} tokens)")


@app.command()
def search(
    model: str = MODEL,
    dataset: str = DATASET,
    budget: str = typer.Option(DEFAULT_BUDGET, help="Bytes ('6GiB', '800MB') or a reference 'uniform-4bit-r16'."),
    out: Path = typer.Option(Path("runs/search"), help="Output directory (result.json, plots, search-state.json)."),
    seed: int = 0,
    config: Optional[Path] = CONFIG,
    baselines: bool = typer.Option(False, "--baselines/--no-baselines", help="Also run the baselines."),
    export: bool = typer.Option(True, "--export/--no-export", help="Fine-tune, store and register the winner."),
    store: Optional[str] = STORE,
    columns: Optional[str] = COLUMNS,
    settings: Optional[Path] = SETTINGS,
):
    """Search per-layer bits and LoRA ranks under a memory budget. Re-run with the same arguments to resume."""
    _setup(settings)

    def go():
        from flows.search import search_flow

        _preflight(model, dataset, budget, config, seed, out, store, export, columns)
        return _with_runner(search_flow, config)(model=model, dataset=dataset, budget=budget, out=str(out),
                                                 seed=seed, config_file=str(config) if config else None,
                                                 baselines=baselines, export=export, store=store, columns=columns)

    result = _run(go)
    _summary(result)
    typer.echo(f"wrote {out / 'result.json'}")
    if result.get("export"):
        _exported(result["export"])
    if result.get("export_error"):
        typer.secho(f"export failed: {result['export_error']}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)


def _exported(ex: dict) -> None:
    t = ex.get("test") or {}
    if t.get("loss_mean") is not None:
        sd = f" ± {t['loss_sd']:.4f}" if t.get("loss_sd") is not None else ""
        loss = f"test loss {t['loss_mean']:.4f}{sd} over seeds {t.get('seeds')}"
    else:
        loss = f"test loss {ex['in_memory']['loss']:.4f}, the exported run's"
    typer.echo(f"exported {ex['config_key'][:8]} ({loss}) to {ex['store_url']}; "
               f"registered {ex['registered_model']} v{ex['version']} @{ex['alias']}")
    if ex.get("export_dir"):
        parts = ["model/", "adapter/", *(f"{p}/" for p in ex.get("bytes", {}) if p not in ("model", "adapter"))]
        typer.echo(f"export folder: {ex['export_dir']} ({', '.join(parts)}, README.md)")
        typer.echo(f"from MLflow: MLFLOW_TRACKING_URI={ex.get('tracking_uri')} python -c \"import mlflow; "
                   f"m = mlflow.pyfunc.load_model('{ex.get('model_uri')}')\"")


@app.command("export")
def export_cmd(
    run: Path = typer.Option(..., "--run", help="The --out folder of a finished search (holds result.json)."),
    store: Optional[str] = STORE,
    name: Optional[str] = typer.Option(None, help="Registered model name (default autoqra-<model>)."),
    merge: Optional[bool] = typer.Option(None, "--merge/--no-merge",
                                         help="Also write merged/ (adapter merged into the dequantized base, "
                                              "bf16); default: the export.merge setting."),
    formats: Optional[str] = typer.Option(None, "--formats",
                                          help="Parts besides model/, comma-separated: 'ct' (model-ct/, "
                                               "compressed-tensors), 'gguf' (gguf/), 'none'; default: the "
                                               "export.formats setting (both)."),
    settings: Optional[Path] = SETTINGS,
):
    """Final fine-tune of a search's best configuration; upload it and register it in MLflow as 'champion'."""
    _setup(settings)

    def go():
        from autoqra_core.formats import FORMATS
        from flows.export import export_flow, read_result
        from infra.storage import open_store
        from infra.tracking import check_tracking

        parts = None if formats is None else [p for p in formats.replace(" ", "").split(",") if p and p != "none"]
        if parts is not None and not set(parts) <= set(FORMATS):
            raise AutoQRAError(f"--formats {formats!r}: name {', '.join(FORMATS)} (comma-separated) or 'none'")

        read_result(run.resolve())
        check_tracking()
        open_store(store, check=True)
        try:
            return export_flow(run=str(run), store=store, name=name, merge=merge, formats=parts)
        except AutoQRAError as e:  # a server that went away after the checks: not bad input (exit 1)
            return {"error": f"{e}; the export is kept in {run / 'export'}: run `autoqra export --run {run}` "
                             f"again once the server answers"}

    out = _run(go)
    if "error" in out:
        typer.secho(f"export failed: {out['error']}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)
    _exported(out)


@app.command()
def baselines(
    model: str = MODEL,
    dataset: str = DATASET,
    budget: str = typer.Option(DEFAULT_BUDGET),
    out: Path = typer.Option(Path("runs/baselines")),
    seed: int = 0,
    config: Optional[Path] = CONFIG,
    columns: Optional[str] = COLUMNS,
    settings: Optional[Path] = SETTINGS,
):
    """Uniform 2/3/4/8-bit r16, sequential, random and fp-lora, by the same evaluation as the search."""
    _setup(settings)

    def go():
        from flows.search import baselines_flow

        _preflight(model, dataset, budget, config, seed, columns=columns)
        return _with_runner(baselines_flow, config)(model=model, dataset=dataset, budget=budget, out=str(out),
                                                    seed=seed, config_file=str(config) if config else None,
                                                    columns=columns)

    result = _run(go)
    _summary(result)
    typer.echo(f"wrote {out / 'result.json'}")


@app.command()
def evaluate(
    config_json: Path = typer.Option(..., "--config", help="Configuration JSON: {'layers': [{name, bits, rank}]}"),
    model: str = MODEL,
    dataset: str = DATASET,
    fidelity: int = typer.Option(-1, help="Rung index (0 = the earliest checkpoint); -1 = the top rung, the whole "
                                          "fine-tune."),
    seed: int = 0,
    search_config: Optional[Path] = typer.Option(None, "--search-config", help="Search settings (YAML)."),
    columns: Optional[str] = COLUMNS,
    settings: Optional[Path] = SETTINGS,
):
    """Fine-tune one configuration up to a rung (its run continues from the previous rung's checkpoint when one is
    cached) and score it on validation."""
    _setup(settings)

    def go():
        from flows.search import evaluate_flow

        cfg = _read_config_json(config_json)
        from autoqra_core.space import Config

        _preflight(model, dataset, None, search_config, seed, columns=columns).evaluable().validate(
            Config.from_dict(cfg.get("config", cfg)))
        return evaluate_flow(config=cfg.get("config", cfg), model=model, dataset=dataset, fidelity=fidelity,
                             seed=seed, config_file=str(search_config) if search_config else None, columns=columns)

    typer.echo(json.dumps(_run(go), indent=2))


@app.command()
def estimate(
    model: str = MODEL,
    config_json: Optional[Path] = typer.Option(None, "--config", help="Configuration JSON {'layers': [{name, bits, rank}]} to break down."),
    bits: Optional[int] = typer.Option(None, help="Uniform bit-width on every layer (with --rank), instead of --config."),
    rank: Optional[int] = typer.Option(None, help="Uniform LoRA rank on every layer (with --bits)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Training sequence length (default: the fine-tune's, train.seq_len)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training batch (default: the fine-tune's, train.batch_size)."),
    grad_checkpointing: Optional[bool] = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing",
                                                      help="Default: on for cuda, off for cpu (as the search)."),
    device: str = typer.Option("auto", help="cpu | cuda (plan for a GPU from any machine) | auto (this one's)."),
    backend: str = typer.Option("auto", help="sim | hqq | bnb | auto (hqq on cuda, sim on cpu, as the search)."),
    group_size: Optional[int] = typer.Option(None, "--group-size",
                                             help="HQQ group size (default: the search's, quant.group_size)."),
    score_batch_size: Optional[int] = typer.Option(None, "--score-batch-size",
                                                   help="Rows per forward of the model body when scoring (default: 4096 tokens' worth, as the search scores)."),
    budget: Optional[str] = typer.Option(None, help="'24GiB' or 'uniform-4bit-r16': say what fits."),
    as_json: bool = typer.Option(False, "--json", help="The breakdown as JSON, with the memory model's term names."),
):
    """Memory of a configuration for any causal LM, from its config.json alone (no weights read or downloaded)."""
    p, shape = _run(lambda: _estimate(model, config_json, bits, rank, seq_len, batch_size, grad_checkpointing, device,
                                      backend, group_size, score_batch_size, budget))
    if as_json:
        typer.echo(json.dumps({"model": model, **p.to_dict()}, indent=2))
        return
    _plan_table(model, p, shape)


def _estimate(model, config_json, bits, rank, seq_len, batch_size, grad_checkpointing, device, backend, group_size,
              score_batch_size, budget):
    """``estimate``'s plan and the model's shape (the options as given)."""
    import dataclasses

    from autoqra_core.device import resolve as resolve_auto
    from autoqra_core.errors import SpaceError
    from autoqra_core.estimate import plan, planning_space
    from autoqra_core.memory import settings_for
    from autoqra_core.model import layer_map, load_skeleton, model_shape
    from autoqra_core.quantize import BACKENDS
    from autoqra_core.space import Config, SearchSpace
    from flows.config import QuantSection, TrainSection
    from flows.prepared_run import resolve

    if config_json is not None and (bits is not None or rank is not None):
        raise SpaceError("give either --config CONFIG.json or --bits B --rank R, not both")
    if (bits is None) != (rank is None):
        raise SpaceError("--bits and --rank go together: e.g. --bits 4 --rank 16")
    dev, _, back = resolve_auto(device, "auto", backend, present=False)  # planning for a GPU needs none
    if back not in BACKENDS:
        raise SpaceError(f"unknown backend {back!r}: choose sim, hqq, bnb or auto")
    skeleton = load_skeleton(resolve(model, "model"))
    lmap = layer_map(skeleton)
    shape = model_shape(skeleton, lmap)
    if bits is not None and rank < 0:
        raise SpaceError(f"--rank {rank} must be >= 0")
    cfg = None
    if bits is not None:
        cfg = SearchSpace(lmap.names, (bits,), (rank,)).uniform(bits, rank)
    elif config_json is not None:
        data = _read_config_json(config_json)
        cfg = Config.from_dict(data.get("config", data))
    space = planning_space(lmap.names, back, cfg)
    ft = TrainSection()  # the default fine-tune: the shape the search's cost charges
    group = QuantSection.model_fields["group_size"].default if group_size is None else group_size
    mem = settings_for(dev, back, group, batch_size or ft.batch_size, seq_len or ft.seq_len, grad_checkpointing)
    if score_batch_size is not None:
        mem = dataclasses.replace(mem, score_batch_size=score_batch_size)
    return plan(shape, space, mem, cfg, budget), shape


def _plan_table(model: str, p, shape) -> None:
    from rich.console import Console
    from rich.table import Table

    from autoqra_core.memory import format_bytes

    s = p.settings
    terms = ("weights", "metadata", "unquantized", "lora", "gradients", "optimizer", "activations", "logits",
             "dequantized", "scoring", "training_peak", "scoring_peak", "total")
    rows = ([("this config", p.breakdown)] if p.breakdown else []) + list(p.baselines.items()) + [
        (f"smallest ({p.smallest[0]})", p.smallest[1])]
    title = (f"{model}: {len(shape.layers)} layers, {shape.linear_params + shape.other_params:,} params; backend "
             f"{s.backend}, {s.act_bytes}-byte compute dtype, batch {s.batch_size} x seq {s.seq_len}, "
             f"grad checkpointing {'on' if s.grad_checkpointing else 'off'}")
    table = Table(title=title)
    table.add_column("term")
    for name, _ in rows:
        table.add_column(name, justify="right")
    for t in terms:
        table.add_row(t, *(format_bytes(b.to_dict()[t]) for _, b in rows))
    if p.budget_bytes is not None:
        table.add_row(f"fits {format_bytes(p.budget_bytes)}", *("yes" if p.fits(b) else "NO" for _, b in rows))
    keys = ["this config"] * bool(p.breakdown) + list(p.baselines) + ["smallest"]
    for part in next(iter(p.serving.values())):
        table.add_row(f"serving {part}", *(format_bytes(p.serving[k][part]) for k in keys))
    Console(width=200).print(table)
    typer.echo("total = max(training_peak, scoring_peak), what torch.cuda.max_memory_allocated reports; not in it: "
               "the CUDA context (~0.3-0.6 GiB per process) and allocator slack (reserved - allocated). "
               "serving: the weights a server holds for each export part, 16-bit where not quantized "
               "(the KV cache comes on top).")


@stack_app.command("up")
def stack_up(home: Optional[Path] = typer.Option(None, help="Where servers keep data and logs (default AUTOQRA_HOME).")):
    """Start Prefect, MLflow and an S3-compatible server on 127.0.0.1; print the settings to export."""
    from infra import stack
    from infra.settings import Settings

    st = _run(lambda: stack.up(home or Settings.load().home / "stack-home"))
    typer.echo(st.shell_exports())


@stack_app.command("down")
def stack_down(home: Optional[Path] = typer.Option(None)):
    """Stop the servers started by `autoqra stack up`."""
    from infra import stack
    from infra.settings import Settings

    stopped = stack.down(home or Settings.load().home / "stack-home")
    typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
