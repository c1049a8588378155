"""Per-step cost of a finished search, read from its Prefect flow run: for each step task run (generation g,
turbo t, baselines, report) its wall time, the wall time of the evaluations nested in it, and the rest, which
is orchestration (the step's own task run, its cached result, the artifact, renaming) plus the method's own
compute (surrogate fit and screening, the GP, repair). Reported per evaluation and as a share of evaluation
time: an upper bound on what making every step a Prefect task costs. Target: < 5 %.

    .venv/bin/python bench/steps.py [--flow-run ID] [--out bench/results/steps.md]

Without ``--flow-run``: the newest completed ``autoqra-search`` flow run of the Prefect API in the environment
(``make demo`` uses Prefect's ephemeral server with its database in PREFECT_HOME, so run this right after it).
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flow-run", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "steps.md"))
    args = ap.parse_args()

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as c:
        if args.flow_run:
            run = c.read_flow_run(args.flow_run)
        else:
            flows = {f.id: f.name for f in c.read_flows()}
            runs = [r for r in c.read_flow_runs(sort=FlowRunSort.START_TIME_DESC)
                    if flows[r.flow_id] == "autoqra-search" and r.state and r.state.is_completed()]
            if not runs:
                raise SystemExit("no completed autoqra-search flow run in this Prefect API; run `make demo` first")
            run = runs[0]
        tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    by_id = {t.id: t for t in tasks}
    wall = {t.id: (t.end_time - t.start_time).total_seconds() for t in tasks if t.start_time and t.end_time}
    nested: dict = {}
    for t in tasks:
        for p in t.task_inputs.get("__parents__", []):
            if p.id in by_id:
                nested.setdefault(p.id, []).append(t)
    steps = sorted((t for t in tasks if t.id in nested), key=lambda t: t.start_time)
    rows, tot_rest, tot_eval, tot_n = [], 0.0, 0.0, 0
    for s in steps:
        evals = nested[s.id]
        ev = sum(wall.get(e.id, 0.0) for e in evals)
        rest = wall[s.id] - ev
        tot_rest, tot_eval, tot_n = tot_rest + rest, tot_eval + ev, tot_n + len(evals)
        rows.append(f"| {s.name} | {len(evals)} | {wall[s.id]:.1f} | {ev:.1f} | {rest:.2f} | {rest / len(evals):.2f} | "
                    f"{100 * rest / ev:.1f} % |")
    lines = [
        "# Per-step cost of a search as Prefect tasks (orchestration + the method's own compute)", "",
        "Command: `.venv/bin/python bench/steps.py` right after `make demo`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU. Flow run `{run.name}` ({run.id}).", "",
        "Rest = step wall time minus the wall time of its nested evaluation task runs: the step's task run, its "
        "persisted result, its table artifact, plus the surrogate/GP/repair work of the method itself.", "",
        "| step | evaluations | step s | evaluations s | rest s | rest s/eval | rest / evaluation time |",
        "|---|---:|---:|---:|---:|---:|---:|", *rows,
        f"| **all steps** | {tot_n} | | {tot_eval:.1f} | {tot_rest:.1f} | {tot_rest / max(tot_n, 1):.2f} | "
        f"**{100 * tot_rest / max(tot_eval, 1e-9):.1f} %** |",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
