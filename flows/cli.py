"""``autoqra``: the command line over the flows. Exit 0 on success, 2 on bad input (with the problem named)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from autoqra_core.errors import AutoQRAError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
stack_app = typer.Typer(no_args_is_help=True, help="Local Prefect server, MLflow server and S3 server on 127.0.0.1.")
app.add_typer(stack_app, name="stack")

MODEL = typer.Option("embedded", "--model", help="Local checkpoint directory, hub id, 'embedded' or 'smollm2-135m'.")
DATASET = typer.Option("embedded", "--dataset", help="Directory with train/test.jsonl, a .jsonl/.txt file, or 'embedded'.")
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
    if ex.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        runner = DaskTaskRunner(cluster_kwargs={"n_workers": ex.workers, "threads_per_worker": 1, "processes": True})
    else:
        from prefect.task_runners import ThreadPoolTaskRunner

        runner = ThreadPoolTaskRunner(max_workers=ex.workers)
    return flow.with_options(task_runner=runner)


def _preflight(model: str, dataset: str, budget: Optional[str], config: Optional[Path], seed: int,
               out: Optional[Path] = None, store: Optional[str] = None, export: bool = False):
    """Check every input and server before Prefect starts: bad input fails in seconds, with exit 2.
    Returns the resolved Run (its space validates configurations)."""
    from flows.config import load_run_config
    from flows.run import Run
    from infra.tracking import check_tracking

    run = Run.prepare(model, dataset, budget, load_run_config(config), seed)
    if out is not None:
        from flows.search import load_checkpoint

        load_checkpoint(out.resolve(), run.params(budget))
    check_tracking()
    if export:
        from infra.storage import open_store

        open_store(store, check=True)
    return run


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

    table = Table(title=f"budget {format_bytes(result['budget_bytes'])}")
    for col in ("name", "eval loss", "accuracy", "memory", "bits/rank per layer"):
        table.add_column(col)
    rows = ([("AutoQRA best", result["best"])] if result.get("best") else []) + list(result["baselines"].items())
    for name, e in rows:
        acc = e.get("accuracy")
        loss = e.get("eval_loss")
        table.add_row(name, "-" if loss is None else f"{loss:.4f}", "-" if acc is None else f"{acc:.3f}",
                      format_bytes(e["memory_bytes"]), " ".join(f"{l['bits']}/{l['rank']}" for l in e["config"]["layers"]))
    Console().print(table)


@app.command()
def search(
    model: str = MODEL,
    dataset: str = DATASET,
    budget: str = typer.Option("uniform-4bit-r16", help="Bytes ('6GiB', '800MB') or a reference 'uniform-4bit-r16'."),
    out: Path = typer.Option(Path("runs/search"), help="Output directory (result.json, plots, checkpoint)."),
    seed: int = 0,
    config: Optional[Path] = CONFIG,
    baselines: bool = typer.Option(False, "--baselines/--no-baselines", help="Also run the baselines."),
    export: bool = typer.Option(True, "--export/--no-export", help="Fine-tune, store and register the winner."),
    store: Optional[str] = STORE,
    settings: Optional[Path] = SETTINGS,
):
    """Search per-layer bits and LoRA ranks under a memory budget. Re-run with the same arguments to resume."""
    _setup(settings)

    def go():
        from flows.search import search_flow

        _preflight(model, dataset, budget, config, seed, out, store, export)
        return _with_runner(search_flow, config)(model=model, dataset=dataset, budget=budget, out=str(out),
                                                 seed=seed, config_file=str(config) if config else None,
                                                 baselines=baselines, export=export, store=store)

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
        loss = f"eval loss {ex['eval_loss']:.4f}"
    typer.echo(f"exported {ex['config_key'][:8]} ({loss}) to {ex['store_url']}; "
               f"registered {ex['registered_model']} v{ex['version']} @{ex['alias']}")
    if ex.get("export_dir"):
        typer.echo(f"export folder: {ex['export_dir']} (model/, adapter/{', merged/' if ex.get('merged') else ''}, "
                   f"README.md); load it with mlflow.pyfunc.load_model('{ex.get('model_uri')}')")


@app.command("export")
def export_cmd(
    run: Path = typer.Option(..., "--run", help="The --out folder of a finished search (holds result.json)."),
    store: Optional[str] = STORE,
    name: Optional[str] = typer.Option(None, help="Registered model name (default autoqra-<model>)."),
    merge: Optional[bool] = typer.Option(None, "--merge/--no-merge",
                                         help="Also write merged/ (adapter merged into the dequantized base, "
                                              "bf16); default: the export.merge setting."),
    settings: Optional[Path] = SETTINGS,
):
    """Final fine-tune of a search's best configuration; upload it and register it in MLflow as 'champion'."""
    _setup(settings)

    def go():
        from flows.export import export_flow, read_result
        from infra.storage import open_store
        from infra.tracking import check_tracking

        read_result(run.resolve())
        check_tracking()
        open_store(store, check=True)
        try:
            return export_flow(run=str(run), store=store, name=name, merge=merge)
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
    budget: str = typer.Option("uniform-4bit-r16"),
    out: Path = typer.Option(Path("runs/baselines")),
    seed: int = 0,
    config: Optional[Path] = CONFIG,
    settings: Optional[Path] = SETTINGS,
):
    """Uniform 2/3/4/8-bit r16, sequential, random and fp-lora, by the same evaluation as the search."""
    _setup(settings)

    def go():
        from flows.search import baselines_flow

        _preflight(model, dataset, budget, config, seed)
        return _with_runner(baselines_flow, config)(model=model, dataset=dataset, budget=budget, out=str(out),
                                                    seed=seed, config_file=str(config) if config else None)

    result = _run(go)
    _summary(result)
    typer.echo(f"wrote {out / 'result.json'}")


@app.command()
def evaluate(
    config_json: Path = typer.Option(..., "--config", help="Configuration JSON: {'layers': [{name, bits, rank}]}"),
    model: str = MODEL,
    dataset: str = DATASET,
    fidelity: int = typer.Option(-1, help="Rung index (0 = cheapest); -1 = the top rung."),
    seed: int = 0,
    search_config: Optional[Path] = typer.Option(None, "--search-config", help="Search settings (YAML)."),
    settings: Optional[Path] = SETTINGS,
):
    """Fine-tune and score one configuration."""
    _setup(settings)

    def go():
        from flows.search import evaluate_flow

        if not config_json.is_file():
            raise AutoQRAError(f"configuration file {config_json} not found")
        try:
            cfg = json.loads(config_json.read_text())
        except json.JSONDecodeError as e:
            raise AutoQRAError(f"{config_json} is not valid JSON: {e}") from None
        from autoqra_core.space import Config

        _preflight(model, dataset, None, search_config, seed).evaluable().validate(Config.from_dict(cfg.get("config", cfg)))
        return evaluate_flow(config=cfg.get("config", cfg), model=model, dataset=dataset, fidelity=fidelity,
                             seed=seed, config_file=str(search_config) if search_config else None)

    typer.echo(json.dumps(_run(go), indent=2))


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
