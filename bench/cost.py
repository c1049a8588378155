"""A search's cost in the user's unit, whole fine-tunes, from its result.json: in all (racing included), by rung,
and until the configuration it returned first became its incumbent (the anytime cost of its answer).

    .venv/bin/python bench/cost.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cost(result: dict) -> dict:
    """Whole fine-tunes the search spent (each token charged once), per rung, and until its answer led."""
    from autoqra_core.evaluation import Evaluation
    from autoqra_core.fidelity import Ladder
    from autoqra_core.protocol import charged_tokens, race_seeds
    from autoqra_core.racing import incumbent

    history = [Evaluation.from_dict(e) for e in result["evaluations"][: result["search_evaluations"]]]
    ladder = Ladder.from_dict(result["fine_tune"]["ladder"])
    charged = charged_tokens(history, ladder)
    full = ladder.full.train_tokens
    seeds = race_seeds(result["seed"], result["settings"]["search"]["race"]["max_config_calls"])
    answer = result["best"]["config"] if result.get("best") else None
    spent, first = 0, None
    for i, (e, t) in enumerate(zip(history, charged)):
        spent += t
        inc = incumbent(history[: i + 1], ladder.top, seeds)
        if first is None and inc is not None and answer is not None and inc.config.to_dict() == answer:
            first = spent
    by_rung: dict[int, float] = {}
    for e, t in zip(history, charged):
        by_rung[e.rung] = by_rung.get(e.rung, 0) + t / full
    return {"fine_tunes": sum(charged) / full, "evaluations": len(history),
            "by_rung": {r: round(v, 3) for r, v in sorted(by_rung.items())},
            "evaluations_by_rung": {r: sum(e.rung == r for e in history) for r in sorted(by_rung)},
            "to_answer": None if first is None else first / full, "fine_tune_steps": ladder.full.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    for run in args.runs:
        print(run, json.dumps(cost(json.loads((run / "result.json").read_text())), indent=1))


if __name__ == "__main__":
    main()
