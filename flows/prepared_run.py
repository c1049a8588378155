"""What the flows share: a resolved run (paths, fingerprints, space, budget, cost) and batch evaluation
through the cached Prefect task: fanned out with ``.map`` on a parallel task runner, called in turn in
the flow's thread with a single worker."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

from prefect import unmapped
from prefect.logging import get_run_logger

from autoqra_core.data import check_task, columns_text, loss_tokens, masked, train_blocks
from autoqra_core.evaluation import Evaluation, Request
from autoqra_core.fidelity import Fidelity, Ladder
from autoqra_core.priors import Priors
from autoqra_core.problem import Problem
from autoqra_core.memory import MemorySettings, parse_budget, total_bytes
from autoqra_core.protocol import SeedScores, report_seeds
from autoqra_core.protocol import history_tokens
from autoqra_core.racing import incumbent
from autoqra_core.search import SearchSettings
from autoqra_core.space import UNQUANTIZED, Config, SearchSpace
from infra.fingerprint import code_version, fingerprint
from infra.pretrained import NAMED_MODELS, named_model_path
from infra.settings import EMBEDDED_DATASETS, Settings, embedded_dataset_path, embedded_model_path
from infra.workbench import Workbench, workbench
from tasks.evaluate import checkpoint_key, evaluate
from tasks.priors import priors as priors_task

from .config import RunConfig


def resolve(name: str, kind: str) -> str:
    """'embedded' -> the shipped model/dataset; a shipped task by name ('addition') -> its folder; a named
    pretrained model ('smollm2-135m') -> its converted checkpoint under AUTOQRA_HOME; a path -> its absolute
    form; anything else -> a hub id."""
    if kind == "model" and name == "embedded":
        return str(embedded_model_path())
    if kind == "dataset" and name in EMBEDDED_DATASETS:
        return str(embedded_dataset_path(name))
    if kind == "model" and name in NAMED_MODELS:
        return str(named_model_path(name, Settings.load().home))
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


@dataclass
class Run:
    model: str
    dataset: str
    rc: RunConfig
    seed: int
    wb: Workbench
    space: SearchSpace
    mem: MemorySettings
    budget_bytes: int
    model_id: str
    dataset_id: str
    code: str
    total_steps: int  # the fine-tune's length (train.steps, or its epochs of the data)
    columns: str = ""  # the dataset's column mapping (data.columns_text); part of dataset_id

    @classmethod
    def prepare(cls, model: str, dataset: str, budget: str | int | None, rc: RunConfig, seed: int,
                columns: str | None = None) -> "Run":
        m, d = resolve(model, "model"), resolve(dataset, "dataset")
        cols = columns_text(columns)
        wb = workbench(m, d, rc.space.granularity, tuple(rc.space.layers or ()), cols)
        ft = rc.fine_tune()
        check_task(wb.task, wb.tokenizer, ft.seq_len, rc.train.answer_only)  # before any fine-tune
        blocks = train_blocks(wb.task, wb.tokenizer, ft.seq_len, ft.data_fraction, rc.train.answer_only)
        total_steps = ft.total_steps(len(blocks))
        rc.ladder(total_steps)  # rungs that fit the fine-tune, checked before any work
        space = SearchSpace(wb.lmap.names, tuple(rc.space.bits), tuple(rc.space.ranks))
        from autoqra_core.quantize import check_backend

        check_backend(rc.quant.backend, space.bits)
        mem = rc.memory_settings()
        if masked(wb.task, rc.train.answer_only):  # the LM head runs on the trained positions only
            mem = replace(mem, loss_tokens=loss_tokens(blocks, ft.batch_size))
        budget_bytes = parse_budget(budget, space, wb.shape, mem) if budget is not None else 0
        dataset_id = fingerprint(d, "dataset") + (f" columns {cols}" if cols else "")
        return cls(m, d, rc, seed, wb, space, mem, budget_bytes, fingerprint(m), dataset_id, code_version(),
                   total_steps, cols)

    @property
    def ladder(self) -> Ladder:
        """The rungs: checkpoints of the one fine-tune, the top rung its end."""
        return self.rc.ladder(self.total_steps)

    def search_settings(self) -> SearchSettings:
        return self.rc.search_settings(self.seed, self.total_steps)

    def evaluable(self) -> SearchSpace:
        """What ``autoqra evaluate`` accepts: the search space plus the baselines' levels (fp-lora's 16 bits, the
        baselines' rank), so any configuration of this run's result.json can be evaluated again as is."""
        return SearchSpace(self.space.layers, tuple(set(self.space.bits) | {UNQUANTIZED}),
                           tuple(set(self.space.ranks) | {self.rc.baselines.rank}))

    def cost(self, config: Config) -> int:
        return total_bytes(config, self.wb.shape, self.mem)

    def params(self, budget: str | int | None) -> dict:
        """What makes two runs the same search: the cache key of its steps and the folder's guard. How it runs
        (``execution``: runner, workers, cluster) is not part of it: a search resumes on more workers."""
        return {"model": self.model_id, "dataset": self.dataset_id, "budget_bytes": self.budget_bytes,
                "seed": self.seed, "config": self.rc.model_dump(mode="json", exclude={"execution"}),
                "code_version": self.code}

    def problem(self, priors: Priors) -> Problem:
        """The search's problem on this run: its space, ``priors``, the memory model and the budget."""
        return Problem(self.space, priors, self.cost, self.budget_bytes)

    def priors(self) -> Priors:
        return Priors.from_dict(priors_task(
            self.model, self.dataset, self.model_id, self.dataset_id, self.rc.space.granularity,
            list(self.rc.space.layers or []), [b for b in self.space.bits if b < 16], self.rc.quant.group_size,
            self.seed, self.code, columns=self.columns,
        ))

    def evaluate_many(self, requests: list[Request], progress: "Progress | None" = None, *,
                      split: str = "validation") -> list[Evaluation]:
        """Fan the batch of (config, rung, training seed) out as cached task runs; an evaluation that raises is a
        failed one, with its reason.

        Any error inside one evaluation, an ``AutoQRAError`` included, fails that evaluation only: the run's own inputs were checked before any work
        (``Run.prepare``, the CLI's preflight), so what is left is specific to a (config, rung).
        The search scores ``validation`` with its race seeds; the test report passes ``split="test"`` with its own
        seeds and scores ``report.test_examples`` rows."""
        if not requests:
            return []
        ladder = self.ladder
        fidelities = [[asdict(f) for f in ladder.rungs[: r + 1]] for _, r, _ in requests]  # the run up to rung r
        if split == "test":
            fidelities = [[*f[:-1], asdict(self.test_fidelity(ladder[len(f) - 1]))] for f in fidelities]
        common = dict(model=self.model, dataset=self.dataset, model_id=self.model_id, dataset_id=self.dataset_id,
                      quant=self.rc.quant.model_dump(), granularity=self.rc.space.granularity,
                      layers=list(self.rc.space.layers or []), code_version=self.code, split=split, columns=self.columns)
        per = dict(config=[c.to_dict() for c, _, _ in requests], config_key=[c.key() for c, _, _ in requests],
                   rung=[r for _, r, _ in requests], fidelities=fidelities,
                   memory_bytes=[self.cost(c) for c, _, _ in requests],
                   train=[asdict(self.rc.train_settings(s)) for _, _, s in requests])
        ex = self.rc.execution
        if ex.task_runner == "thread" and ex.workers == 1:
            # One at a time in the flow's own thread: on a CPU, torch's OpenMP pool runs ~15% slower when
            # called from a worker thread (bench/results/overhead.md). Still task runs: cached, retried, tracked.
            calls = [partial(evaluate, **common, **{k: v[i] for k, v in per.items()}) for i in range(len(requests))]
        else:
            calls = [f.result for f in evaluate.map(**{k: unmapped(v) for k, v in common.items()}, **per)]
        out = []
        for (config, rung, seed), call in zip(requests, calls):
            try:
                ev = Evaluation.from_dict(call())
            except Exception as e:  # noqa: BLE001 - any error of one candidate is recorded, the search goes on
                ev = Evaluation(config, rung, math.inf, self.cost(config), status="failed", seed=seed,
                                reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500])
            out.append(ev)
            if progress:
                progress.done(ev)
        return out


    def test_fidelity(self, top: Fidelity | None = None) -> Fidelity:
        """The whole fine-tune, scored on ``report.test_examples`` test rows (all of them when None)."""
        return replace(top or self.ladder.full, eval_examples=self.rc.report.test_examples or len(self.wb.task.test))

    def checkpoint_key(self, config: Config, rung: int, seed: int) -> str:
        """Where the run of ``config`` on ``seed`` keeps its checkpoint at ``rung`` (``tasks.evaluate``)."""
        return checkpoint_key(self.model_id, self.dataset_id, config.key(), asdict(self.ladder[rung]),
                              self.rc.quant.model_dump(), asdict(self.rc.train_settings(seed)),
                              self.rc.space.granularity, list(self.rc.space.layers or []), self.code, self.columns)

    def test_report(self, methods: dict[str, Config], progress: "Progress | None" = None) -> dict[str, SeedScores]:
        """Each method's configuration fine-tuned at the top rung with ``report.seeds`` fresh seeds, scored on
        test. The only place the test split is read; nothing is chosen from what it returns."""
        seeds = report_seeds(self.seed, self.rc.report.seeds)
        unique = list({c.key(): c for c in methods.values()}.values())
        by_seed = {}
        for s in seeds:
            evals = self.evaluate_many([(c, self.ladder.top, s) for c in unique], progress, split="test")
            by_seed[s] = {c.key(): e for c, e in zip(unique, evals)}
        return {name: SeedScores.from_evaluations(seeds, [by_seed[s][c.key()] for s in seeds])
                for name, c in methods.items()}


class Progress:
    """Stage, rung and fine-tuning done/planned in whole fine-tunes (the user's unit: tokens over one fine-tune's,
    every token charged once) with an ETA, on the flow's log."""

    def __init__(self, run: Run, planned_tokens: int, label: str = "search"):
        self.run, self.planned, self.label = run, max(1, planned_tokens), label
        self.seen: list[Evaluation] = []  # every evaluation so far, in order
        self.start = time.time()
        self.top: list[Evaluation] = []  # validation evaluations at the top rung: the incumbent's
        self.where = ""

    def at(self, where: str) -> None:
        self.where = where

    def plan(self, fine_tunes: int) -> None:
        """From here on, ``fine_tunes`` whole fine-tunes remain (at most)."""
        self.planned = self.tokens + fine_tunes * self.run.ladder.full.train_tokens

    @property
    def tokens(self) -> int:
        """Fine-tuning tokens so far, each charged once (``protocol.history_tokens``)."""
        return history_tokens(self.seen, self.run.ladder)

    def done(self, ev: Evaluation) -> None:
        ladder = self.run.ladder
        self.seen.append(ev)
        tokens = self.tokens
        self.planned = max(self.planned, tokens)  # the plan is an estimate: never show more done than planned
        if ev.rung == ladder.top and self.where not in ("report", "baselines"):
            self.top.append(ev)
        elapsed = time.time() - self.start
        eta = max(0.0, (self.planned - tokens) * elapsed / max(1, tokens))
        inc = incumbent(self.top, ladder.top, sorted({e.seed for e in self.top}))
        best = f"{inc.eval_loss:.4f} ({inc.replicates} seeds)" if inc else "-"
        status = "ok" if ev.ok else f"FAILED ({ev.reason})"
        get_run_logger().info(
            f"[{self.label} {self.where}] {ladder.fine_tunes(tokens):.2f}/{ladder.fine_tunes(self.planned):.1f} "
            f"fine-tunes, {len(self.seen)} evaluations | rung {ev.rung} (step {ladder[ev.rung].steps}/"
            f"{ladder.full.steps}) seed {ev.seed} {ev.config.short()} -> {ev.eval_loss:.4f} {status} | "
            f"incumbent {best} | {elapsed / 60:.1f} min elapsed, ETA {eta / 60:.1f} min"
        )


def write_json(path: Path, data: dict) -> None:
    """Atomic write: a killed process leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
