"""Plots of a search from plain data (result.json pieces), saved as PNG for MLflow and the README.

Built on ``matplotlib.figure.Figure`` rather than pyplot: no global figure state and no
GUI backend, so it is safe in Prefect task threads and on headless machines. Each
function returns the path written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure

MIB = 2**20
_STAGE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return path


def _layers(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(config.get("layers", config.get("config", {}).get("layers", [])))


def plot_allocation(config: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Bits (top) and LoRA rank (bottom) per layer, sharing the layer axis.

    Low-bit layers are drawn darker so the compensating pattern (low bits <-> high rank)
    reads across the two panels. ``config`` is ``{"layers": [{"name","bits","rank"}, ...]}``
    (a ``{"config": ...}`` wrapper such as ``result["best"]`` works too).
    """
    layers = _layers(config)
    names = [str(layer.get("name", i)) for i, layer in enumerate(layers)]
    bits = [int(layer["bits"]) for layer in layers]
    ranks = [int(layer["rank"]) for layer in layers]
    x = list(range(len(layers)))
    fig = Figure(figsize=(max(6.0, 0.35 * len(layers) + 2), 5))
    ax_bits, ax_rank = fig.subplots(2, 1, sharex=True)
    cmap = colormaps["viridis"]
    colours = [cmap(min(b, 8) / 8 * 0.85) for b in bits]
    ax_bits.bar(x, bits, color=colours)
    ax_bits.set_ylabel("bits")
    ax_bits.set_yticks(sorted(set(bits) | {2, 4, 8}))
    ax_rank.bar(x, ranks, color=colours)
    ax_rank.set_ylabel("LoRA rank")
    ax_rank.set_xticks(x)
    ax_rank.set_xticklabels(names if len(names) <= 40 else [str(i) for i in x], rotation=60, ha="right", fontsize=7)
    ax_rank.set_xlabel("layer (colour = bits)")
    ax_bits.set_title(title or "Per-layer allocation: bits and LoRA rank")
    return _save(fig, path)


def plot_progress(records: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """The incumbent's ``eval_loss`` (its mean over the race's seeds) against evaluations spent, one colour per
    stage.

    ``records``: ``{"evaluations": int, "best_loss": float, "stage": str}``, in order.
    """
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    stages: list[str] = []
    for rec in records:
        if rec.get("stage", "") not in stages:
            stages.append(str(rec.get("stage", "")))
    ordered = sorted(records, key=lambda r: r["evaluations"])
    xs = [r["evaluations"] for r in ordered if _finite(r.get("best_loss"))]
    ys = [r["best_loss"] for r in ordered if _finite(r.get("best_loss"))]
    if xs:
        ax.step(xs, ys, where="post", color="lightgrey", zorder=1)
    for i, stage in enumerate(stages):
        pts = [r for r in ordered if str(r.get("stage", "")) == stage and _finite(r.get("best_loss"))]
        ax.scatter(
            [r["evaluations"] for r in pts],
            [r["best_loss"] for r in pts],
            color=_STAGE_COLOURS[i % len(_STAGE_COLOURS)],
            label=stage or "search",
            zorder=2,
            s=18,
        )
    ax.set_xlabel("evaluations\n(the incumbent's loss is a mean over the race's seeds: it can rise when a replicate "
                  "of it lands)", fontsize=9)
    ax.set_ylabel("incumbent's eval_loss (mean over its seeds)")
    ax.set_title(title or "Search progress")
    if stages:
        ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_anytime(seeds: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Anytime curves, one panel per seed: the validation loss of each method's incumbent (what it would return)
    against cumulative fine-tuning tokens, one line per method, the uniform-4bit-r16 loss dashed.

    ``seeds``: ``{"seed", "target", "methods": {name: [{"tokens", "best"}, ...]}}``.
    """
    fig = Figure(figsize=(4.5 * len(seeds), 4))
    axes = fig.subplots(1, len(seeds), squeeze=False)[0]
    for ax, s in zip(axes, seeds):
        for i, (name, points) in enumerate(s["methods"].items()):
            pts = [p for p in points if _finite(p.get("best"))]
            if pts:
                ax.step([p["tokens"] / 1e3 for p in pts], [p["best"] for p in pts], where="post",
                        color=_STAGE_COLOURS[i % len(_STAGE_COLOURS)], label=name, lw=2 if name == "autoqra" else 1)
        if _finite(s.get("target")):
            ax.axhline(s["target"], color="black", ls="--", lw=0.8, label="uniform-4bit-r16")
        ax.set_xlabel("fine-tuning tokens (k)")
        ax.set_title(f"seed {s['seed']}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("incumbent's validation loss (top rung)")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_pareto(
    evaluations: Sequence[Mapping[str, Any]],
    pareto: Sequence[Mapping[str, Any]],
    path: str | Path,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
    budget_bytes: int | None = None,
    title: str | None = None,
) -> Path:
    """Memory (MiB) against ``eval_loss``: every evaluation grey, the Pareto front highlighted.

    Failed or non-finite evaluations are left out; ``baselines`` (``result["baselines"]``)
    are drawn as labelled markers and ``budget_bytes`` as a vertical line.
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ok = [e for e in evaluations if e.get("status", "ok") == "ok" and _finite(e.get("eval_loss"))]
    ax.scatter([e["memory_bytes"] / MIB for e in ok], [e["eval_loss"] for e in ok], color="lightgrey", s=14, label="evaluated")
    front = sorted((p for p in pareto if _finite(p.get("eval_loss"))), key=lambda p: p["memory_bytes"])
    if front:
        ax.plot(
            [p["memory_bytes"] / MIB for p in front],
            [p["eval_loss"] for p in front],
            "o-",
            color="tab:red",
            markersize=5,
            label="Pareto front",
        )
    at: dict[tuple[float, float], list[str]] = {}  # baselines on the same point (the same recipe): one label
    for name, base in (baselines or {}).items():
        if _finite(base.get("eval_loss")) and base.get("memory_bytes") is not None:
            at.setdefault((base["memory_bytes"] / MIB, round(base["eval_loss"], 6)), []).append(name)
    for k, ((x, y), names) in enumerate(sorted(at.items())):
        ax.scatter([x], [y], marker="s", color="tab:blue", s=28, zorder=3)
        ax.annotate(" = ".join(names), (x, y), textcoords="offset points", xytext=(4, 4 + 9 * (k % 3)), fontsize=7)
    if budget_bytes:
        ax.axvline(budget_bytes / MIB, color="black", linestyle="--", linewidth=1, label="budget")
    ax.set_xlabel("memory (MiB)")
    ax.set_ylabel("eval_loss")
    ax.set_title(title or "Memory vs. quality")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_test_comparison(
    rows: Sequence[Mapping[str, Any]], path: str | Path, budget_bytes: int | None = None, title: str | None = None
) -> Path:
    """Test loss and accuracy per method (mean ± sd over the report's seeds), one bar each.

    ``rows``: ``{"name", "memory_bytes", "loss_mean", "loss_sd", "accuracy_mean", "accuracy_sd"}``. Methods over
    ``budget_bytes`` (e.g. unquantized LoRA, the ceiling) are hatched: they are not admissible answers.
    """
    rows = [r for r in rows if _finite(r.get("loss_mean"))]
    labelled = any(_finite(r.get("accuracy_mean")) for r in rows)
    fig = Figure(figsize=(max(6.0, 1.1 * len(rows) + 2), 6.5 if labelled else 3.8))
    axes = fig.subplots(2 if labelled else 1, 1, squeeze=False)[:, 0]
    x = list(range(len(rows)))
    over = [bool(budget_bytes) and r["memory_bytes"] > budget_bytes for r in rows]
    colors = ["tab:red" if r["name"] == "autoqra" else "tab:blue" for r in rows]
    panels = [("loss", "test loss (lower is better)")] + ([("accuracy", "test accuracy")] if labelled else [])
    for ax, (key, label) in zip(axes, panels):
        means = [r.get(f"{key}_mean") if _finite(r.get(f"{key}_mean")) else 0.0 for r in rows]
        sds = [r.get(f"{key}_sd") or 0.0 for r in rows]
        bars = ax.bar(x, means, yerr=sds, color=colors, capsize=4, alpha=0.85)
        for bar, hatch in zip(bars, over):
            if hatch:
                bar.set_hatch("//")
        finite = [m for m in means if m]
        if finite and key == "loss":
            lo, hi = min(finite), max(finite)
            ax.set_ylim(lo - 0.2 * (hi - lo + 1e-3) - max(sds, default=0), hi + 0.2 * (hi - lo + 1e-3) + max(sds, default=0))
        ax.set_ylabel(label)
        ax.set_xticks(x, [r["name"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    n_seeds = max((len(r.get("seeds") or []) for r in rows), default=0)
    axes[0].set_title(title or f"Test split, mean ± sd over {n_seeds} seeds (hatched: over the memory budget)")
    fig.tight_layout()
    return _save(fig, path)


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def plot_training_curve(curves: Mapping[str, Sequence[float]], path: str | Path, title: str | None = None) -> Path:
    """Training loss per step of the final fine-tune, one line per seed (raw, and a moving average)."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for seed, losses in curves.items():
        xs = list(range(1, len(losses) + 1))
        line = ax.plot(xs, losses, alpha=0.25)[0]
        w = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - w + 1): i + 1]) / len(losses[max(0, i - w + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(xs, smooth, color=line.get_color(), label=f"seed {seed}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.set_title(title or "Final fine-tune: training loss")
    return _save(fig, path)
