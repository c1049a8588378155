"""What a run leaves for people: result.json, plots, an MLflow parent run with one child per evaluation,
and Prefect artifacts (a table of the best configurations, a markdown summary with the plots)."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from autoqra_core.evaluation import Evaluation
from autoqra_core.priors import Priors
from autoqra_core.memory import format_bytes
from autoqra_core.protocol import SeedScores, compare, fmt_mean_sd
from autoqra_core.search import SearchResult, pareto_front
from autoqra_core.space import Config
from infra import tracking
from infra.plots import plot_allocation, plot_pareto, plot_progress, plot_test_comparison

from .prepared_run import Run, write_json

EXPERIMENT = "autoqra"


def _eval_entry(e: Evaluation) -> dict:
    d = e.to_dict()
    d["config_key"] = e.config.key()
    return d


@dataclass
class RunOutputs:
    run: Run
    out: Path
    kind: str
    mlflow_run: str
    uri: str
    logged: int = 0
    done: set = field(default_factory=set)  # eval ids already in MLflow (a resumed search's earlier children)
    down: bool = False  # the tracking server failed: reported once, probed at each checkpoint, caught up

    @classmethod
    def start(cls, run: Run, out: Path, kind: str) -> "RunOutputs":
        """Fail fast on an unreachable tracking server, then open the parent run, or continue it when this is
        the same search resumed (found by a tag hashing ``Run.params`` and the folder, not by a local file)."""
        uri = tracking.tracking_uri()
        exp = tracking.ensure_experiment(EXPERIMENT, uri=uri)
        key = hashlib.sha256(json.dumps({"kind": kind, "out": str(out), **run.params(None)},
                                        sort_keys=True).encode()).hexdigest()[:16]
        run_id = tracking.resume_search_run(exp, key, str(out), uri)
        done = tracking.logged_evaluations(run_id, uri) if run_id else set()
        if run_id is None:
            params = {"model": run.model, "dataset": run.dataset, "budget_bytes": run.budget_bytes, "seed": run.seed,
                      "layers": len(run.space), "bits": list(run.space.bits), "ranks": list(run.space.ranks),
                      "backend": run.rc.quant.backend, "rungs": len(run.ladder.rungs)}
            run_id = tracking.start_search_run(exp, f"{kind}-{out.name}", params,
                                               {"autoqra.kind": kind, "out": str(out), tracking.RESUME_TAG: key}, uri)
        out.mkdir(parents=True, exist_ok=True)
        return cls(run, out, kind, run_id, uri, done=done)

    def log_new(self, history: list[Evaluation], stage: str = "search") -> None:
        for e in history[self.logged:]:
            entry = _eval_entry(e) | {"stage": stage, "search_seed": self.run.seed}
            entry["eval_id"] = f"{stage}/r{e.rung}/s{e.seed}/{entry['config_key']}"
            if entry["eval_id"] not in self.done:
                tracking.log_evaluation(self.mlflow_run, entry,
                                        run_name=f"{stage}-r{e.rung}-s{e.seed}-{e.config.key()[:8]}",
                                        uri=self.uri)
                self.done.add(entry["eval_id"])
            self.logged += 1  # one by one: a failure half-way re-logs nothing that is already in

    def _tracked(self, what: str, log) -> bool:
        """Run ``log()`` against the tracking server; on failure warn once and go on (results are safe elsewhere).
        While it is down, a health check of a few seconds at most replaces the calls; when it answers again,
        what was missed is logged."""
        if self.down:
            try:
                tracking.check_tracking(self.uri)
            except Exception:  # noqa: BLE001 - still down: already reported
                return False
            get_run_logger().info(f"MLflow at {self.uri} answers again: logging the evaluations it missed")
            self.down = False
        try:
            log()
            return True
        except Exception as e:  # noqa: BLE001 - any tracking failure; results are kept elsewhere
            self.down = True
            get_run_logger().warning(
                f"MLflow logging failed at {self.uri} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                f" {what}; results are cached, the search goes on. Missed evaluations are logged "
                f"when the server answers again, or by re-running the same command (it continues this MLflow run)")
            return False

    def checkpoint(self, res: SearchResult) -> None:
        """After each generation / TuRBO iteration: new child runs and the progress metrics.

        Tracking is a view of results that are already safe (cached task results, the checkpoint):
        if the server goes away mid-search, warn once and go on; the next checkpoints catch up.
        """
        def log():
            self.log_new(res.history)
            best = res.best.eval_loss if res.best else None
            tracking.log_progress(self.mlflow_run, len(res.history),
                                  {"best_eval_loss": best, "evaluations": len(res.history)}, uri=self.uri)

        self._tracked("at a checkpoint", log)

    def finish(self, res: SearchResult | None, baselines: dict[str, Evaluation], priors: Priors,
               tests: dict[str, SeedScores] | None = None, compute: dict[str, int] | None = None) -> dict:
        """Write result.json (validation numbers of every evaluation; test numbers of the winner and of every
        baseline under ``test``; each method's fine-tuning tokens under ``train_tokens``), plots, artifacts."""
        compared = compare(tests or {})
        result, all_evals, best = self._result(res, baselines, priors, compared, compute or {})
        write_json(self.out / "result.json", result)
        if best:
            write_json(self.out / "best_config.json", best.config.to_dict())
        plots = self._plots(result)
        if compared:
            plots.append(plot_test_comparison(_test_rows(result), self.out / "test.png",
                                              budget_bytes=self.run.budget_bytes))
        self._prefect_artifacts(result, plots)

        def log():
            self.log_new(all_evals)
            tracking.log_artifacts(self.mlflow_run, [self.out / "result.json", *plots], uri=self.uri)
            if best:
                tracking.log_progress(self.mlflow_run, len(all_evals),
                                      {"best_eval_loss": best.eval_loss, "best_memory_bytes": best.memory_bytes,
                                       **({"best_accuracy": best.accuracy} if best.accuracy is not None else {})},
                                      uri=self.uri)
            tracking.log_progress(self.mlflow_run, len(all_evals), _test_metrics(compared), uri=self.uri)
            tracking.end_run(self.mlflow_run, uri=self.uri)

        if not self._tracked(f"at the end ({self.out / 'result.json'} holds every result)", log) and self.down:
            get_run_logger().warning(f"MLflow run {self.mlflow_run} is incomplete: re-run the same command when "
                                     f"{self.uri} answers (every evaluation is cached) to log the rest")
        return result

    def _result(self, res: SearchResult | None, baselines: dict[str, Evaluation], priors: Priors, compared: dict,
                compute: dict[str, int]) -> tuple[dict, list[Evaluation], Evaluation | None]:
        """result.json's content, every evaluation in it (the search's, then the baselines' own) and the best."""
        ladder = self.run.ladder
        full = ladder.full.train_tokens
        history = list(res.history) if res else []
        extra = [e for e in baselines.values() if all(e.config.key() != h.config.key() or e.rung != h.rung
                                                       for h in history)]
        all_evals = history + extra
        best = res.best if res else min((e for e in baselines.values() if e.ok and e.memory_bytes <=
                                         self.run.budget_bytes), key=lambda e: e.eval_loss, default=None)
        pareto = res.pareto if res else pareto_front(all_evals, self.run.ladder.top)
        n_test = len(self.run.wb.task.test)
        result = {
            "model": self.run.model,
            "dataset": self.run.dataset,
            "columns": self.run.columns,
            "budget_bytes": self.run.budget_bytes,
            "best": _with_protocol(_best_entry(best), compared.get("autoqra" if res else _name_of(best, baselines)),
                                   compute.get("autoqra" if res else _name_of(best, baselines)), full),
            "baselines": {name: _with_protocol(_eval_entry(e), compared.get(name), compute.get(name), full)
                          for name, e in baselines.items()},
            # the user's one fine-tune: the top rung, what the test report scores and what the export ships
            "fine_tune": {"steps": ladder.full.steps, "train_tokens": full,
                          "rungs": [{"steps": f.steps, "fraction": round(f.steps / ladder.full.steps, 4),
                                     "eval_examples": f.eval_examples} for f in ladder.rungs],
                          "ladder": ladder.to_dict()},
            "search_cost": ({"train_tokens": compute["autoqra"], "fine_tunes": round(compute["autoqra"] / full, 3),
                             "budget_fine_tunes": self.run.search_settings().fine_tunes,  # null: no cap
                             "evaluations": len(history)} if res and "autoqra" in compute else None),
            "evaluations": [_eval_entry(e) for e in all_evals],
            "search_evaluations": len(history),  # the first ones in "evaluations"; the rest are baselines
            "pareto": [{"memory_bytes": e.memory_bytes, "eval_loss": e.eval_loss, "config": e.config.to_dict()}
                       for e in pareto],
            "progress": res.to_dict()["progress"] if res else [],
            "protocol": {"selection_split": "validation", "report_split": "test",
                         "report_seeds": next((t["seeds"] for t in compared.values()), []),
                         "test_examples": min(self.run.rc.report.test_examples or n_test, n_test),  # rows scored
                         "validation_examples": self.run.ladder[self.run.ladder.top].eval_examples,
                         "train_tokens": compute},
            "priors": priors.to_dict(),
            "settings": self.run.rc.model_dump(mode="json"),
            "seed": self.run.seed,
            "code_version": self.run.code,
            "mlflow_run_id": self.mlflow_run,
        }
        return result, all_evals, best

    def _plots(self, result: dict) -> list[Path]:
        paths = []
        if result["best"]:
            paths.append(plot_allocation(result["best"], self.out / "allocation.png",
                                         title=f"Best configuration (eval loss {result['best']['eval_loss']:.4f})"))
        if result["progress"]:
            paths.append(plot_progress([{"evaluations": p["evaluations"], "best_loss": p["best_loss"],
                                         "stage": p["stage"]} for p in result["progress"]], self.out / "progress.png"))
        top = [e for e in result["evaluations"] if e.get("rung") == self.run.ladder.top]  # the whole fine-tune only
        paths.append(plot_pareto(top, result["pareto"], self.out / "pareto.png", baselines=result["baselines"],
                                 budget_bytes=self.run.budget_bytes,
                                 title="Memory vs. validation loss, at the whole fine-tune (the top rung)"))
        return paths

    def _prefect_artifacts(self, result: dict, plots: list[Path]) -> None:
        rows = []
        named = [("best", result["best"])] + list(result["baselines"].items())
        for name, e in named:
            if e:
                t = e.get("test") or {}
                rows.append({"name": name, "eval_loss": _fmt(e.get("eval_loss")), "accuracy": _fmt(e.get("accuracy")),
                             "test loss": fmt_mean_sd(t.get("loss_mean"), t.get("loss_sd")),
                             "test accuracy": fmt_mean_sd(t.get("accuracy_mean"), t.get("accuracy_sd"), 3),
                             "memory": format_bytes(e["memory_bytes"]),
                             "bits/rank": Config.from_dict(e["config"]).short()})
        create_table_artifact(rows, key=f"autoqra-{self.kind}-table", description="Best configuration vs baselines")
        images = "\n\n".join(
            f"![{p.stem}](data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()})" for p in plots
        )
        best = result["best"]
        summary = (f"# AutoQRA {self.kind}\n\nmodel `{result['model']}`, dataset `{result['dataset']}`, budget "
                   f"{format_bytes(result['budget_bytes'])}, {len(result['evaluations'])} evaluations.\n\n"
                   + (f"Best: eval loss **{best['eval_loss']:.4f}** at {format_bytes(best['memory_bytes'])}.\n\n"
                      if best else "No feasible configuration succeeded.\n\n")
                   + images)
        create_markdown_artifact(summary, key=f"autoqra-{self.kind}-summary", description=f"Output in {self.out}")


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


def _best_entry(e: Evaluation | None) -> dict | None:
    if e is None:
        return None
    return {"config": e.config.to_dict(), "memory_bytes": e.memory_bytes, "eval_loss": e.eval_loss,
            "accuracy": e.accuracy, "rung": e.rung, "replicates": e.replicates}


def _name_of(e: Evaluation | None, baselines: dict[str, Evaluation]) -> str | None:
    return next((name for name, b in baselines.items() if e is not None and b is e), None)


def _with_protocol(entry: dict | None, test: dict | None, tokens: int | None, full: int) -> dict | None:
    """An entry of result.json with its test summary and its fine-tuning compute, in tokens and in whole
    fine-tunes of ``full`` tokens (None where not measured)."""
    if entry is None:
        return None
    return entry | {"test": test, "train_tokens": tokens,
                    "fine_tunes": None if tokens is None else round(tokens / full, 3)}


def _test_rows(result: dict) -> list[dict]:
    """(name, test summary, memory) of the winner and every baseline that has a test report."""
    named = [("autoqra", result["best"])] if result.get("search_evaluations") else []
    named += list(result["baselines"].items())
    return [{"name": n, "memory_bytes": e["memory_bytes"], **e["test"]} for n, e in named if e and e.get("test")]


def _test_metrics(compared: dict[str, dict]) -> dict[str, float | None]:
    """Flat MLflow metrics: test loss/accuracy mean and sd per method, paired differences to the references."""
    out: dict[str, float | None] = {}
    for name, t in compared.items():
        for k in ("loss_mean", "loss_sd", "accuracy_mean", "accuracy_sd"):
            out[f"test_{k}.{name}"] = t[k]
        for ref, d in t["vs"].items():
            out[f"test_loss_diff_vs_{ref}.{name}"] = d["loss_diff_mean"]
            out[f"test_accuracy_diff_vs_{ref}.{name}"] = d["accuracy_diff_mean"]
    return out
