"""What the bench scripts share: the study's command line and report header (``run_bench``, ``bench_header``) and a
uniform recipe by name."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def study_arguments(ap: argparse.ArgumentParser) -> None:
    """--model, --dataset and --config, defaulting to the smollm2-135m addition study's."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="addition")
    ap.add_argument("--config", default=str(ROOT / "bench" / "smollm2-addition.yaml"))


def run_bench(doc: str, measure, report, **options) -> None:
    """The command line of a one-recipe bench on the study's model: ``study_arguments``, ``--recipe``, each of
    ``options`` (``name=default``, its type the default's) and ``--out``; prints the report, writes it to --out."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    study_arguments(ap)
    ap.add_argument("--recipe", default="uniform-4bit-r16")
    for name, default in options.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    start = time.perf_counter()
    text = report(measure(args), args, time.perf_counter() - start)
    print(text)
    if args.out:
        args.out.write_text(text)


def shown(value):
    """An option as a command line in the README would write it: a path inside the checkout made relative."""
    return os.path.relpath(value, ROOT) if str(value).startswith(str(ROOT)) else value


def bench_header(script: str, args, wall: float) -> list[str]:
    """The Command and Machine lines of a ``run_bench`` report: every option as given, this machine, wall time."""
    import torch

    flags = " ".join(f"--{k.replace('_', '-')} {shown(v)}" for k, v in vars(args).items() if k != "out")
    return [f"Command: `.venv/bin/python {script} {flags}`  ",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads), "
            f"no GPU; wall time {wall / 60:.1f} min.  "]


def uniform(space, recipe: str):
    """The configuration ``uniform-8bit-r4`` names, over ``space``'s layers."""
    from autoqra_core.memory import reference_recipe

    if (choice := reference_recipe(recipe)) is None:
        raise SystemExit(f"cannot read {recipe!r}: write a uniform recipe as uniform-<bits>bit-r<rank>")
    return space.uniform(*choice)
