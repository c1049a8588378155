"""Search efficiency, like the paper's Figure 5: the validation loss of what each method would return (its
incumbent) against cumulative fine-tuning tokens, for AutoQRA, random search, Optuna's TPE and ablations, over
seeds; the compute each needs to reach a target, as a ratio to random search; and, at the end, every method's
returned configuration re-fine-tuned on the same fresh seeds. Validation only: no test row is read here.

Every method gets T, the fine-tuning tokens (steps x batch x sequence, all rungs, replicates included) that
AutoQRA's default search spends with the same seed, and stops at the first step that reaches T:

* ``autoqra``: the default search (it defines T); its incumbent is the lowest mean over the race's seeds;
* ``no-priors``: uninformative priors (``Priors.uniform``: mutation weights, repair and fill order, no
  catastrophic pairs) and a random initial population;
* ``no-surrogate``: no screening (``offspring_multiplier`` 1: every generated child is evaluated);
* ``no-turbo``: stage 1 only, more generations until T;
* ``no-full-start``: generation 0 without the references at the top rung;
* ``no-race``: no intensification (one seed per configuration: the incumbent is the best single draw);
* ``turbo-alone``: TuRBO from a random start: ``population_size`` random configurations at the top rung (a
  one-rung ladder), then TuRBO batches until T;
* ``random``: random configurations (repaired like the search's) at the top rung until T (best single draw);
* ``tpe``: Optuna's ``TPESampler`` (a peer optimizer; benchmark-only dependency) over per-layer categorical
  bits and ranks, each suggestion repaired to the budget, at the top rung until T (best single draw).

Targets: the uniform-4bit-r16 fine-tune's validation loss (same seed), and random search's final incumbent.
Compute to target = tokens spent when the incumbent first reaches it; ratio = that / random's.

Evaluations run through the project's cached Prefect task (``Run.evaluate_many``): a (config, rung, seed)
two methods share is charged to both but fine-tuned once, and a killed bench resumes where it stopped.

    .venv/bin/pip install -e ".[bench]"   # Optuna, for the tpe peer
    .venv/bin/python bench/anytime.py --seeds 0 1 2 [--model embedded] [--config cfg.yaml] [--work DIR]
    .venv/bin/python bench/anytime.py --seeds 0 1 2 --report-only   # tables and plot from --work's JSON
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
METHODS = ("autoqra", "no-priors", "no-surrogate", "no-turbo", "no-full-start", "no-race", "turbo-alone", "random",
           "tpe")
RECHECK_SEEDS = 2  # fresh validation fine-tunes of each method's returned configuration
MANY = 1000  # "until T": the step count a method would never reach before its token budget


def _env(work: Path, seed: int) -> None:
    """One Prefect home per process (bench processes may run side by side), results under ``work``."""
    home = work / f"home-seed{seed}"
    (home / "prefect").mkdir(parents=True, exist_ok=True)  # Prefect makes its home without parents
    os.environ.update(AUTOQRA_HOME=str(home), PREFECT_HOME=str(home / "prefect"),
                      PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(work / "prefect-results"),
                      MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}",
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
                      PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600")


def curve(history, ladder, seeds) -> list[dict]:
    """Per evaluation: cumulative tokens and the incumbent's validation loss so far (its mean over ``seeds``;
    None before the first), and the incumbent's config key."""
    from autoqra_core.racing import incumbent

    from autoqra_core.protocol import charged_tokens

    out, tokens, inc = [], 0, None
    for i, (e, charged) in enumerate(zip(history, charged_tokens(history, ladder))):
        tokens += charged  # a promoted run pays from its checkpoint
        if e.rung == ladder.top:
            inc = incumbent(history[: i + 1], ladder.top, seeds)
        out.append({"tokens": tokens, "best": inc.eval_loss if inc else None, "key": inc.config.key() if inc else None,
                    "rung": e.rung, "seed": e.seed, "loss": e.eval_loss if e.ok else None})
    return out


def tokens_to(points: list[dict], target: float, strict: bool = False) -> int | None:
    """Tokens spent when the incumbent first reaches ``target`` (``strict``: goes below it; None: never). Beating
    uniform-4bit-r16 is strict: a search that evaluates it first would otherwise "reach" it at once."""
    return next((p["tokens"] for p in points if p["best"] is not None
                 and (p["best"] < target if strict else p["best"] <= target + 1e-12)), None)


def run_seed(seed: int, args) -> dict:
    """Every method for one seed, inside one Prefect flow (its evaluations are cached task runs)."""
    from prefect import flow

    from autoqra_core.baselines import random_search, uniform_configs
    from autoqra_core.fidelity import Ladder
    from autoqra_core.priors import Priors
    from autoqra_core.protocol import history_tokens
    from autoqra_core.search import SearchState, advance, result as search_result
    from flows.config import load_run_config
    from flows.prepared_run import Run

    @flow(name="bench-anytime")
    def bench(seed: int) -> dict:
        import random

        rc = load_run_config(args.config)
        run = Run.prepare(args.model, args.dataset, args.budget, rc, seed)
        base = run.search_settings()
        ladder, top = base.ladder, base.ladder.top
        priors = run.priors()
        evaluate = run.evaluate_many
        out = {"seed": seed, "budget_bytes": run.budget_bytes, "top_rung_tokens": ladder[top].train_tokens,
               "methods": {}}

        def top_only(requests):
            """The one-rung ladder's rung 0 is the run's top rung (``Run.evaluate_many`` reads the run's ladder)."""
            return [replace(e, rung=0) for e in evaluate([(c, top, s) for c, _, s in requests])]

        returned: dict[str, object] = {}

        def search(name: str, settings, pri, limit: float) -> list:
            state, start = SearchState.new(seed), time.time()
            ev = top_only if len(settings.ladder.rungs) == 1 else evaluate
            while state.stage != "done" and history_tokens(state.history, settings.ladder) < limit:
                state = advance(state, run.problem(pri), ev, settings)
            hist = state.history
            returned[name] = search_result(state, settings).best.config
            print(f"seed {seed} {name}: {len(hist)} evaluations, {history_tokens(hist, settings.ladder):,} tokens, "
                  f"{time.time() - start:.0f} s", flush=True)
            return hist

        def single_draws(name: str, configs) -> list:
            start = time.time()
            hist = evaluate([(c, top, seed) for c in configs])
            returned[name] = min((e for e in hist if e.ok), key=lambda e: e.eval_loss).config
            print(f"seed {seed} {name}: {len(hist)} evaluations, {time.time() - start:.0f} s", flush=True)
            return hist

        ref_config = uniform_configs(run.space, (4,), rc.baselines.rank)[f"uniform-4bit-r{rc.baselines.rank}"]
        ref = evaluate([(ref_config, top, seed)])[0]
        out["uniform-4bit-r16"] = ref.eval_loss
        hist = search("autoqra", base, priors, math.inf)
        T = history_tokens(hist, ladder)
        out["T"] = T
        out["methods"]["autoqra"] = curve(hist, ladder, base.seeds)
        uninformed = Priors.uniform(run.space.layers, tuple(b for b in run.space.bits if b < 16))
        random_start = replace(base.evolution, prior_fraction=0.0)
        many_turbo = replace(base.turbo, iterations=MANY)
        variants = {
            "no-priors": (replace(base, evolution=random_start, turbo=many_turbo), uninformed),
            "no-surrogate": (replace(base, evolution=replace(base.evolution, offspring_multiplier=1),
                                     turbo=many_turbo), priors),
            "no-turbo": (replace(base, generations=MANY, turbo=replace(base.turbo, iterations=0)), priors),
            "no-full-start": (replace(base, evolution=replace(base.evolution, full_fidelity_start=False),
                                      turbo=many_turbo), priors),
            "no-race": (replace(base, race=replace(base.race, max_config_calls=1), turbo=many_turbo), priors),
            "turbo-alone": (replace(base, generations=1, ladder=Ladder((ladder[top],), ladder.promote_fraction),
                                    evolution=replace(random_start, full_fidelity_start=False), turbo=many_turbo),
                            priors),
        }
        for name, (settings, pri) in variants.items():
            if name in args.methods:
                out["methods"][name] = curve(search(name, settings, pri, T), settings.ladder, settings.seeds)
        n = math.ceil(T / ladder[top].train_tokens)
        if "random" in args.methods:
            configs = random_search(run.problem(priors), n, random.Random(f"anytime-{seed}"))
            out["methods"]["random"] = curve(single_draws("random", configs), ladder, [seed])
        if "tpe" in args.methods:
            out["methods"]["tpe"] = curve(tpe(run, priors, n, seed, top, evaluate, returned), ladder, [seed])
        # What each method returns, re-fine-tuned on the same fresh seeds (validation; never the report's test).
        fresh = [seed + (k + 1) * 1000 for k in range(RECHECK_SEEDS)]
        unique = list({c.key(): c for c in returned.values()}.values())
        rechecked = evaluate([(c, top, s) for c in unique for s in fresh])
        by = {(e.config.key(), e.seed): e.eval_loss if e.ok else None for e in rechecked}
        out["returned"] = {name: {"config": c.short(), "fresh_seeds": fresh,
                                  "losses": [by[(c.key(), s)] for s in fresh]} for name, c in returned.items()}
        out["returned"]["uniform-4bit-r16"] = {"config": ref_config.short(), "fresh_seeds": fresh,
                                               "losses": [v.eval_loss if v.ok else None for v in
                                                          evaluate([(ref_config, top, s) for s in fresh])]}
        return out

    return bench(seed)


def tpe(run, priors, n: int, seed: int, top: int, evaluate, returned: dict) -> list:
    """Optuna's TPE over per-layer bits and ranks (ask/tell), each suggestion repaired to the budget and told the
    repaired configuration's loss; ``n`` top-rung fine-tunes. A repeated configuration is told its known loss
    without a new fine-tune (and not counted)."""
    import optuna

    from autoqra_core.feasibility import repair

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True))
    space = run.space
    dists = {f"{kind}{l}": optuna.distributions.CategoricalDistribution(list(levels))
             for l in range(len(space)) for kind, levels in (("b", space.bits), ("r", space.ranks))}
    hist, known, start = [], {}, time.time()
    for _ in range(50 * n):
        if len(hist) >= n:
            break
        trial = study.ask(dists)
        c = repair(space.config([trial.params[f"b{l}"] for l in range(len(space))],
                                [trial.params[f"r{l}"] for l in range(len(space))]), run.problem(priors))
        if c.key() not in known:
            e = evaluate([(c, top, seed)])[0]
            hist.append(e)
            known[c.key()] = e.eval_loss if e.ok else float("inf")
        if math.isfinite(known[c.key()]):
            study.tell(trial, known[c.key()])
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    returned["tpe"] = min((e for e in hist if e.ok), key=lambda e: e.eval_loss).config
    print(f"seed {seed} tpe: {len(hist)} evaluations, {time.time() - start:.0f} s", flush=True)
    return hist


def summarise(results: list[dict]) -> tuple[list[str], dict]:
    """Markdown tables: final best per method and seed; tokens to each target as a ratio to random's."""
    methods = [m for m in METHODS if all(m in r["methods"] for r in results)]
    lines = ["Incumbent's validation loss at T (what each method would return; AutoQRA and its ablations: a mean over "
             "the race's seeds, random and TPE: their best single draw):", "",
             "| method | " + " | ".join(f"seed {r['seed']}" for r in results) + " | mean ± sd | tokens (mean) |",
             "|---|" + "---:|" * (len(results) + 2)]
    finals = {}
    for m in methods:
        vals = [r["methods"][m][-1]["best"] for r in results]
        finals[m] = vals
        ok = [v for v in vals if v is not None]
        sd = statistics.stdev(ok) if len(ok) > 1 else 0.0
        toks = statistics.fmean(r["methods"][m][-1]["tokens"] for r in results)
        lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals)
                     + f" | {statistics.fmean(ok):.4f} ± {sd:.4f} | {toks / 1e3:,.0f}k |")
    ref = [r["uniform-4bit-r16"] for r in results]
    lines.append("| *uniform-4bit-r16 (one fine-tune)* | " + " | ".join(f"{v:.4f}" for v in ref)
                 + f" | {statistics.fmean(ref):.4f} ± {statistics.stdev(ref) if len(ref) > 1 else 0:.4f} | - |")
    lines += ["", "AutoQRA minus each method, paired by seed (negative: AutoQRA lower):", "",
              "| method | " + " | ".join(f"seed {r['seed']}" for r in results) + " | mean ± sd | AutoQRA lower |",
              "|---|" + "---:|" * (len(results) + 2)]
    for m in methods[1:]:
        d = [a - b for a, b in zip(finals["autoqra"], finals[m]) if a is not None and b is not None]
        if d:
            lines.append(f"| {m} | " + " | ".join(f"{x:+.4f}" for x in d) + f" | {statistics.fmean(d):+.4f} ± "
                         f"{statistics.stdev(d) if len(d) > 1 else 0:.4f} | {sum(x < 0 for x in d)}/{len(d)} |")
    if all("returned" in r for r in results):
        names = [m for m in methods + ["uniform-4bit-r16"] if all(m in r["returned"] for r in results)]
        fresh = {m: [statistics.fmean(v for v in r["returned"][m]["losses"] if v is not None) for r in results]
                 for m in names}
        lines += ["", f"What each method returned, re-fine-tuned on {RECHECK_SEEDS} fresh seeds (validation; mean "
                      "over those seeds per search seed), and AutoQRA minus it, paired by search seed:", "",
                  "| method | " + " | ".join(f"seed {r['seed']}" for r in results)
                  + " | mean ± sd | AutoQRA minus (mean ± sd) | AutoQRA lower |", "|---|" + "---:|" * (len(results) + 3)]
        for m in names:
            d = [a - b for a, b in zip(fresh["autoqra"], fresh[m])]
            lines.append(f"| {m} | " + " | ".join(f"{v:.4f}" for v in fresh[m])
                         + f" | {statistics.fmean(fresh[m]):.4f} ± {statistics.stdev(fresh[m]) if len(fresh[m]) > 1 else 0:.4f}"
                         + (f" | {statistics.fmean(d):+.4f} ± {statistics.stdev(d) if len(d) > 1 else 0:.4f} | "
                            f"{sum(x < 0 for x in d)}/{len(d)} |" if m != "autoqra" else " | - | - |"))
    ratios = {}
    for target_name in ("uniform-4bit-r16", "random's final best"):
        lines += ["", f"Tokens to reach {target_name} (k tokens; ratio to random search's in brackets; "
                      f"'-': not reached within T; the incumbent's loss, so a lucky single draw counts for the methods "
                      f"that do not race):", "",
                  "| method | " + " | ".join(f"seed {r['seed']}" for r in results) + " | median ratio |",
                  "|---|" + "---:|" * (len(results) + 1)]
        for m in methods:
            cells, rs = [], []
            for r in results:
                target = r["uniform-4bit-r16"] if target_name == "uniform-4bit-r16" else r["methods"]["random"][-1]["best"]
                strict = target_name == "uniform-4bit-r16"
                mine = tokens_to(r["methods"][m], target, strict)
                theirs = tokens_to(r["methods"]["random"], target, strict)
                ratio = mine / theirs if mine is not None and theirs else None
                if ratio is not None:
                    rs.append(ratio)
                cells.append("-" if mine is None else f"{mine / 1e3:,.0f}k" + (f" ({ratio:.2f})" if ratio else ""))
            med = f"{statistics.median(rs):.2f} (n={len(rs)})" if rs else "-"
            ratios[(target_name, m)] = rs
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {med} |")
    return lines, finals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dataset", default="embedded")
    ap.add_argument("--budget", default="uniform-4bit-r16")
    ap.add_argument("--config", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (two processes side by side: 1)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-anytime"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "anytime-noise.md"))
    ap.add_argument("--report-only", action="store_true", help="write the report from --work's seed JSON files")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for seed in args.seeds:
            _env(work, seed)
            if args.threads:
                import torch

                torch.set_num_threads(args.threads)
            start = time.time()
            res = run_seed(seed, args) | {"seconds": round(time.time() - start), "model": args.model,
                                           "config": args.config, "threads": args.threads,
                                           "methods_run": list(args.methods)}
            (work / f"seed{seed}.json").write_text(json.dumps(res, indent=1))
    results = [json.loads((work / f"seed{s}.json").read_text()) for s in args.seeds]
    from infra.plots import plot_anytime

    out = Path(args.out)
    png = plot_anytime([{"seed": r["seed"], "target": r["uniform-4bit-r16"], "methods": r["methods"]} for r in results],
                       out.with_suffix(".png"), title=f"{results[0].get('model', 'embedded')}: incumbent's validation "
                                                      f"loss vs fine-tuning tokens")
    table, _ = summarise(results)
    cmd = "bench/anytime.py --seeds " + " ".join(map(str, args.seeds)) + (
        f" --model {args.model}" if args.model != "embedded" else "") + (f" --config {args.config}" if args.config else "")
    if args.report_only:
        cmd += " --report-only"  # the seeds' own commands and methods: in their JSON files and the README
    lines = [f"# Search efficiency: the incumbent's validation loss vs fine-tuning tokens "
             f"({results[0].get('model', 'embedded')})",
             "", f"Command: `.venv/bin/python {cmd}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; wall time per seed: "
             + ", ".join(f"{r.get('seconds', 0) / 60:.0f} min" for r in results) + ".  ",
             "Per seed (from its JSON): " + "; ".join(
                 f"seed {r['seed']}: {', '.join(r.get('methods_run') or METHODS)}, torch threads "
                 f"{r.get('threads') or 'default'}" + (f", config {r['config']}" if r.get("config") else "")
                 for r in results) + ".", "",
             "Budget: uniform-4bit-r16. T (AutoQRA's tokens) per seed: "
             + ", ".join(f"{r['T'] / 1e3:,.0f}k" for r in results)
             + f" (one top-rung fine-tune = {results[0]['top_rung_tokens'] / 1e3:,.0f}k). Every number is a "
               "validation loss at the top rung; the test split is not read.", "",
             f"![anytime curves]({png.name})", ""] + table
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
