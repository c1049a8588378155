"""Where a small search's wall time goes: one in-process search (Prefect's ephemeral server, a fresh home) under
cProfile, with the functions that take the most time of their own.

The suite and the README's quick search run many searches of a few steps per evaluation, where a fixed cost per
evaluation or per process outweighs the fine-tunes; this finds such costs.

    .venv/bin/python bench/search_profile.py [--config infra/quick.yaml] [--root CHECKOUT] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(config: str, seed: int, top: int) -> None:
    """The profiled search, run in a process of its own (started by ``main`` with the checkout on the path)."""
    import torch

    torch.set_num_threads(1)  # as the suite's workers
    from flows.search import search_flow

    out = Path(os.environ["AUTOQRA_HOME"]) / "out"
    prof = cProfile.Profile()
    start = time.time()
    prof.enable()
    res = search_flow(out=str(out), config_file=config, seed=seed, baselines=True, export=False)
    prof.disable()
    wall = time.time() - start
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    print(f"WALL {wall:.1f} EVALUATIONS {len(res['evaluations'])}")
    print(s.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "infra" / "quick.yaml"))
    ap.add_argument("--root", default=str(ROOT), help="the checkout to profile (another commit's worktree)")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        return child(args.config, args.seed, args.top)
    home = Path(tempfile.mkdtemp(prefix="search-profile-"))
    (home / "prefect").mkdir()
    env = {**os.environ, "AUTOQRA_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": args.root, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    cmd = [sys.executable, __file__, "--child", "--config", str(Path(args.config).resolve()), "--seed",
           str(args.seed), "--top", str(args.top)]
    start = time.time()
    r = subprocess.run(cmd, cwd=args.root, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    report = r.stdout[r.stdout.index("WALL"):]
    rev = subprocess.run(["git", "-C", args.root, "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    text = (f"Checkout {args.root} at {rev} (uncommitted changes included), config {args.config}, seed {args.seed}; "
            f"process wall {time.time() - start:.1f} s\n\n```\n{report.strip()}\n```\n")
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
