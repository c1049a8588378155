"""The exported champion: a folder that standard tools load without AutoQRA.

Layout (names in ``MODEL_DIR`` ...):
* ``model/``: the base with per-layer bits as real packed HQQ weights, in hqq's own
  pre-quantized format (``config.json`` + ``qmodel.pt``, written by
  ``AutoHQQHFModel.save_quantized``): each ``HQQLinear`` state carries its own
  ``nbits``/``group_size``, so per-layer bits survive. transformers 5.23 cannot do this
  (its HQQ quantizer raises "not available yet" and a pre-quantized checkpoint loads
  as randomly initialised ``nn.Linear``), hence hqq's loader.
* ``adapter/``: the peft LoRA adapter (per-layer ``rank_pattern``) for ``model/``.
* ``merged/`` (optional): the adapter merged into the *dequantized* base (merging into
  packed 4-bit weights would round the update away, peft #2321), a plain checkpoint.
* ``autoqra_metrics.json``: the test report's numbers, and those of the exported run as trained, of the
  reloaded files and of ``merged/``.

Nothing is trained here: the exported run is the winner's fine-tune on the first report seed, the same run
the test report scores (its checkpoint at the top rung).

Packing is done here for real even when the search used the ``sim`` backend: ``sim``
holds exactly HQQ's dequantized weights, so an adapter trained on it fits the packed base.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data import Task
from .device import fp32_matmuls, model_device, model_dtype
from .errors import AutoQRAError
from .fidelity import Fidelity
from .finetune import Checkpoint, TrainSettings, build, held_out, restore
from .formats import (CT_DIR, FORMATS, GGUF_DIR, GGUF_FILE, GGUF_TYPES, GGUF_UNQUANTIZED, MERGED_CT_DIR,
                      FormatError, save_compressed_tensors, save_gguf)
from .model import LayerMap
from .quantize import QuantSettings, quantize_model
from .space import Config

MODEL_DIR, ADAPTER_DIR, MERGED_DIR, CARD_FILE = "model", "adapter", "merged", "README.md"
METRICS_FILE, CURVE_FILE = "autoqra_metrics.json", "training_curve.png"
PARTS = (MODEL_DIR, ADAPTER_DIR, MERGED_DIR, CT_DIR, MERGED_CT_DIR, GGUF_DIR)  # the folders an export writes


@dataclass(frozen=True)
class ExportSettings:
    """What is written. Nothing is trained: the export ships the winner's run on the first report seed, the
    fine-tune the test report scores."""

    merge: bool = False  # also merged/ (and merged-ct/ when "ct" is in formats): the adapter merged in
    merged_dtype: str = "bfloat16"
    formats: tuple[str, ...] = FORMATS  # parts written beside model/: "ct" (model-ct/), "gguf" (gguf/)

    @classmethod
    def from_dict(cls, d: dict) -> "ExportSettings":
        """From its JSON (``settings_dict``, the settings file's ``export:``): lists become tuples."""
        return cls(**{**d, **{k: tuple(d[k]) for k in ("formats",) if k in d}})


def check_exportable(q: QuantSettings) -> None:
    """The exported ``model/`` is HQQ-packed: a run trained on another quantizer's weights (bitsandbytes' NF4)
    would ship an adapter that does not fit it."""
    if q.backend not in ("sim", "hqq"):
        raise AutoQRAError(f"quant.backend {q.backend!r}: the export ships the search's own run, whose adapter fits "
                           f"only the weights it was trained on, and model/ is HQQ-packed; search with quant.backend "
                           f"hqq (or sim on a CPU) to export")


def pack(base: nn.Module, config: Config, lmap: LayerMap, group_size: int) -> nn.Module:
    """A copy of ``base`` with every layer's linear modules packed by HQQ at that layer's bits (fp32, CPU)."""
    return quantize_model(copy.deepcopy(base), config, lmap,
                          QuantSettings(backend="hqq", group_size=group_size, device="cpu"))


def dequantized(base: nn.Module, config: Config, lmap: LayerMap, group_size: int) -> nn.Module:
    """A copy of ``base`` holding HQQ's dequantized weights: what the packed layers compute with."""
    return quantize_model(copy.deepcopy(base), config, lmap,
                          QuantSettings(backend="sim", group_size=group_size, device="cpu"))


def save_model(packed: nn.Module, tokenizer, out: str | Path) -> Path:
    """hqq's pre-quantized format (config.json + qmodel.pt) plus the tokenizer."""
    from hqq.models.hf.base import AutoHQQHFModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    AutoHQQHFModel.save_quantized(packed, str(out))
    tokenizer.save_pretrained(out)
    return out


def save_adapter(trained: nn.Module, out: str | Path) -> Path | None:
    """The peft adapter of a trained model (None when no layer has one: rank 0 everywhere)."""
    if not hasattr(trained, "peft_config"):
        return None
    out = Path(out)
    trained.save_pretrained(out)
    return out


def merge(base: nn.Module, config: Config, lmap: LayerMap, group_size: int, adapter_dir: str | Path | None,
          dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The adapter merged into the dequantized base, cast to ``dtype``: a plain transformers model."""
    from peft import PeftModel

    model = dequantized(base, config, lmap, group_size)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return model.to(dtype)


def save_merged(merged: nn.Module, tokenizer, out: str | Path) -> Path:
    out = Path(out)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _with_adapter(model: nn.Module, adapter_dir: str | Path | None) -> nn.Module:
    """``model`` with the peft adapter in ``adapter_dir`` attached (as it is when there is none: rank 0 everywhere)."""
    if adapter_dir is not None and (Path(adapter_dir) / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def load(export_dir: str | Path, device: str = "cpu") -> nn.Module:
    """``model/`` + ``adapter/`` through the standard loaders only (what LOADING_SNIPPET shows a user)."""
    from hqq.models.hf.base import AutoHQQHFModel

    root = Path(export_dir)
    model = AutoHQQHFModel.from_quantized(str(root / MODEL_DIR), compute_dtype=torch.float32, device=device)
    return _with_adapter(model, root / ADAPTER_DIR)


def load_ct(folder: str | Path, adapter_dir: str | Path | None = None) -> nn.Module:
    """``model-ct/`` through transformers (+ the peft adapter): what the card shows a user (fp32, CPU)."""
    from transformers import AutoModelForCausalLM

    return _with_adapter(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32), adapter_dir)


def load_gguf(folder: str | Path) -> nn.Module:
    """``gguf/`` through transformers' GGUF loader (dequantized to fp32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_FILE, dtype=torch.float32).eval()


def folder_bytes(folder: str | Path) -> int:
    """Bytes on disk of every file under ``folder``."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def settings_dict(s: ExportSettings) -> dict:
    """``s`` as the JSON the metrics file records (and a re-export compares)."""
    return {**asdict(s), "formats": list(s.formats)}


def holds(out: str | Path, config: Config, s: ExportSettings, seed: int) -> bool:
    """Whether ``out`` holds what ``write_export`` writes for ``config``'s run on ``seed`` and ``s``."""
    try:
        kept = json.loads((Path(out) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (Path(out) / MODEL_DIR).is_dir() and kept.get("config_key") == config.key() \
        and kept.get("settings") == settings_dict(s) and kept.get("exported_seed") == seed


def write_export(base: nn.Module, tokenizer, task: Task, lmap: LayerMap, config: Config, ckpt: Checkpoint,
                 fidelity: Fidelity, s: ExportSettings, q: QuantSettings, t: TrainSettings, out: str | Path,
                 report: dict | None = None) -> dict:
    """Write ``config``'s run (its ``ckpt``, training seed ``t.seed``, at the end of the fine-tune ``fidelity``) as
    ``out``/{model,adapter[,merged,...]} with the metrics (``METRICS_FILE``); returns the metrics.

    The run is scored on the test split as built in memory and again from the reloaded ``model/`` + ``adapter/``,
    so the reported numbers are those of the files. ``report``: the test report's numbers of this configuration
    (``protocol.SeedScores.to_dict``; the exported run is its first seed), shown as the card's test results.
    """
    check_exportable(q)
    out = Path(out)
    for part in PARTS:  # a re-export replaces, never mixes
        shutil.rmtree(out / part, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    trained = build(base, config, lmap, q, t)
    restore(trained, ckpt)
    with fp32_matmuls(model_device(trained), model_dtype(trained)):  # as the report scored the same run
        loss, acc = held_out(trained, tokenizer, task, fidelity, "test")
    adapter = save_adapter(trained, out / ADAPTER_DIR)
    del trained
    packed = pack(base, config, lmap, q.group_size)
    save_model(packed, tokenizer, out / MODEL_DIR)
    files_loss, files_acc = held_out(load(out), tokenizer, task, fidelity, "test")
    formats: dict[str, dict] = {}
    if "ct" in s.formats:
        save_compressed_tensors(packed, tokenizer, out / CT_DIR)
        formats["ct"] = dict(zip(("loss", "accuracy"), held_out(load_ct(out / CT_DIR, adapter), tokenizer, task,
                                                                fidelity, "test")))
    del packed
    merged = _write_merged(base, tokenizer, task, lmap, config, adapter, fidelity, s, q, out, formats) \
        if s.merge or "gguf" in s.formats else None
    test = report or {"loss_mean": loss, "loss_sd": None, "accuracy_mean": acc, "accuracy_sd": None,
                      "seeds": [t.seed], "losses": [loss], "accuracies": [acc]}
    metrics = {
        "test": test,  # the test report's numbers of this configuration; the exported run is its first seed
        "exported_seed": t.seed,
        "in_memory": {"loss": loss, "accuracy": acc},  # the exported run, scored as trained
        "files": {"loss": files_loss, "accuracy": files_acc},  # model/ + adapter/ reloaded from disk
        "merged": merged,
        "formats": formats,  # model-ct/ (+ adapter/) and gguf/ reloaded through transformers: test loss, accuracy
        "bytes": {part: folder_bytes(out / part) for part in PARTS if (out / part).is_dir()},
        "fine_tune": _fine_tune_record(fidelity, q, t),
        "training_curves": {str(t.seed): ckpt.losses},
        "config_key": config.key(),
        "settings": settings_dict(s),  # with config_key and exported_seed: what ``holds`` checks
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return metrics


def _fine_tune_record(fidelity: Fidelity, q: QuantSettings, t: TrainSettings) -> dict:
    """The exported run's fine-tune as the card shows it."""
    return {"steps": fidelity.steps, "data_fraction": fidelity.data_fraction, "seq_len": fidelity.seq_len,
            "batch_size": fidelity.batch_size, "seed": t.seed, "schedule": t.schedule,
            "test_examples": fidelity.eval_examples, "backend": q.backend, "group_size": q.group_size,
            "train_tokens": fidelity.train_tokens}


def _write_merged(base: nn.Module, tokenizer, task: Task, lmap: LayerMap, config: Config, adapter, fidelity: Fidelity,
                  s: ExportSettings, q: QuantSettings, out: Path, formats: dict) -> dict | None:
    """The parts with the adapter merged into the dequantized base: ``gguf/`` (a GGUF it cannot hold is skipped,
    the reason recorded), ``merged-ct/`` and ``merged/``, each scored on test; their results go into ``formats``.
    Returns ``merged/``'s (None without ``s.merge``)."""
    m = merge(base, config, lmap, q.group_size, adapter, torch.float32)
    if "gguf" in s.formats:
        try:
            types = save_gguf(m, tokenizer, config, lmap, out / GGUF_DIR, name=out.name)
            g_loss, g_acc = held_out(load_gguf(out / GGUF_DIR), tokenizer, task, fidelity, "test")
            formats["gguf"] = {"loss": g_loss, "accuracy": g_acc, "tensor_types": types}
        except FormatError as e:  # a model or tokenizer GGUF cannot hold: said in the card, the rest written
            shutil.rmtree(out / GGUF_DIR, ignore_errors=True)
            formats["gguf"] = {"skipped": str(e)}
    if not s.merge:
        return None
    if "ct" in s.formats:
        save_compressed_tensors(pack(m, config, lmap, q.group_size), tokenizer, out / MERGED_CT_DIR)
        formats["merged-ct"] = dict(zip(("loss", "accuracy"), held_out(load_ct(out / MERGED_CT_DIR), tokenizer,
                                                                       task, fidelity, "test")))
    m = m.to(getattr(torch, s.merged_dtype))
    save_merged(m, tokenizer, out / MERGED_DIR)
    m_loss, m_acc = held_out(m.float(), tokenizer, task, fidelity, "test")  # its dtype's weights, fp32 compute
    return {"dtype": s.merged_dtype, "loss": m_loss, "accuracy": m_acc}


LOADING_SNIPPET = """\
from hqq.models.hf.base import AutoHQQHFModel; from peft import PeftModel; from transformers import AutoTokenizer
model = PeftModel.from_pretrained(AutoHQQHFModel.from_quantized("model", compute_dtype=torch.float32, device="cpu"), "adapter")
tokenizer = AutoTokenizer.from_pretrained("model")"""


@dataclass(frozen=True)
class Card:
    """What the model card says; ``render`` turns it into markdown."""

    name: str
    base_model: str
    dataset: str
    config: Config
    budget_bytes: int
    memory: dict[str, int]  # breakdown, bytes
    test: dict  # the test report's loss_mean, loss_sd, accuracy_mean, accuracy_sd, seeds
    fine_tune: dict  # steps, data_fraction, seq_len, batch_size, seed, ...
    exported: dict  # the exported run: seed, loss, accuracy (test split, as trained)
    versions: dict[str, str]
    mlflow_run_id: str | None = None
    prefect_flow_run_id: str | None = None
    merged: dict | None = None  # loss/accuracy of merged/ when written
    formats: dict = field(default_factory=dict)  # "ct"/"gguf": loss/accuracy (gguf: tensor_types) or skipped
    bytes: dict = field(default_factory=dict)  # part -> bytes on disk
    allocation_plot: str | None = "allocation.png"
    extra: dict = field(default_factory=dict)

    def render(self) -> str:
        def fmt(v, digits=4):
            return "n/a" if v is None else f"{v:.{digits}f}"

        bits = [l.bits for l in self.config.layers]
        ranks = [l.rank for l in self.config.layers]
        t = self.test
        lines = [
            f"# {self.name}", "",
            f"`{self.base_model}` quantized per layer (HQQ) with per-layer LoRA ranks, fine-tuned on "
            f"`{self.dataset}`; chosen by AutoQRA under a memory budget of {self.budget_bytes / 2**20:.2f} MiB "
            f"({self.budget_bytes} bytes).", "",
            "## Loading", "", "```python", "import torch", LOADING_SNIPPET, "```", "",
            "`merged/` (when present) is a plain checkpoint: `AutoModelForCausalLM.from_pretrained(\"merged\")`.", "",
            "## Test results (test split)", "",
            "| | loss | accuracy | seeds |", "|---|---|---|---|",
            f"| model/ + adapter/ | {fmt(t.get('loss_mean'))} ± {fmt(t.get('loss_sd'))} | "
            f"{fmt(t.get('accuracy_mean'))} ± {fmt(t.get('accuracy_sd'))} | {t.get('seeds')} |",
        ]
        seed0 = self.exported.get("seed")
        if self.merged:
            lines.append(f"| merged/ ({self.merged.get('dtype')}, seed {seed0}) | "
                         f"{fmt(self.merged.get('loss'))} | {fmt(self.merged.get('accuracy'))} | |")
        for part, label in (("ct", f"{CT_DIR}/ + adapter/ (transformers)"),
                            ("merged-ct", f"{MERGED_CT_DIR}/ (merged, re-quantized)"), ("gguf", f"{GGUF_DIR}/ (merged)")):
            r = self.formats.get(part)
            if r and "loss" in r:
                lines.append(f"| {label}, seed {seed0} | {fmt(r['loss'])} | {fmt(r.get('accuracy'))} | |")
        lines += ["", f"The exported weights are the run on seed {seed0}, the first of the report's seeds, fixed before "
                      f"anything was scored on test (test loss {fmt(self.exported.get('loss'))}, accuracy "
                      f"{fmt(self.exported.get('accuracy'))}); the search chose the configuration on validation.", "",
                  *self._formats(), "## The fine-tune", "", "| setting | value |", "|---|---|",
                  *[f"| {k} | {v} |" for k, v in self.fine_tune.items()], "",
                  "## Configuration", "",
                  f"Mean bits {sum(bits) / len(bits):.2f}, mean rank {sum(ranks) / len(ranks):.2f}.", ""]
        if self.allocation_plot:
            lines += [f"![allocation]({self.allocation_plot})", ""]
        lines += ["| layer | bits | LoRA rank |", "|---|---|---|",
                  *[f"| {l.name} | {l.bits} | {l.rank} |" for l in self.config.layers], "",
                  "## Memory (estimated, training step)", "", "| part | MiB |", "|---|---|",
                  *[f"| {k} | {v / 2**20:.3f} |" for k, v in self.memory.items()],
                  f"| **budget** | {self.budget_bytes / 2**20:.3f} |", "",
                  "## Provenance", "", "| | |", "|---|---|",
                  f"| MLflow run (search) | {self.mlflow_run_id or 'n/a'} |",
                  f"| Prefect flow run | {self.prefect_flow_run_id or 'n/a'} |",
                  *[f"| {k} | {v} |" for k, v in self.extra.items()],
                  *[f"| {k} | {v} |" for k, v in self.versions.items()], ""]
        return "\n".join(lines)

    def _formats(self) -> list[str]:
        """The deployable parts: how to load each, bytes on disk, GGUF tensor types (and where they round up)."""
        lines = ["## Formats", "", "| part | bytes on disk |", "|---|---|",
                 *[f"| {part}/ | {n:,} |" for part, n in self.bytes.items()], ""]
        if "loss" in self.formats.get("ct", {}):
            lines += [f"`{CT_DIR}/`: the same base as `model/` in compressed-tensors (asymmetric int groups of "
                      "64, one config group per bit-width, float zero points as HQQ has them: `naive-quantized`, "
                      "int8 on disk), loaded by transformers (`pip install compressed-tensors`):", "", "```python",
                      "from peft import PeftModel; from transformers import AutoModelForCausalLM",
                      f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{CT_DIR}"), "adapter")',
                      "```", "",
                      f"Not run here (no GPU): `vllm serve {CT_DIR} --enable-lora --lora-modules champion=adapter`; "
                      "vLLM's kernels for this scheme take 4 and 8 bits, so 2/3-bit layers may not serve there.", ""]
        if "loss" in self.formats.get("merged-ct", {}):
            lines += [f"`{MERGED_CT_DIR}/`: the adapter merged into the base, re-quantized by HQQ at each layer's "
                      "bits and written like `model-ct/`; for a server that applies no LoRA to a quantized base: "
                      f'`AutoModelForCausalLM.from_pretrained("{MERGED_CT_DIR}")`.', ""]
        gguf = self.formats.get("gguf", {})
        if "skipped" in gguf:
            lines += [f"`{GGUF_DIR}/` not written: {gguf['skipped']}", ""]
        elif gguf:
            counts = Counter(gguf["tensor_types"].values())
            lines += [f"`{GGUF_DIR}/{GGUF_FILE}`: the adapter merged, each linear weight in its layer's type "
                      f"({', '.join(f'{b}-bit -> {k}' for b, k in GGUF_TYPES.items())}; the `gguf` package writes "
                      "no K-quants, so 2 and 3 bits are rounded up to Q4_1; rows not a multiple of 32 and "
                      f"unsearched tensors {GGUF_UNQUANTIZED}, norms F32). Tensors per type: "
                      f"{', '.join(f'{k} {n}' for k, n in sorted(counts.items()))}. llama.cpp: "
                      f"`llama-cli -m {GGUF_DIR}/{GGUF_FILE}` (not run here); transformers: "
                      f'`AutoModelForCausalLM.from_pretrained("{GGUF_DIR}", gguf_file="{GGUF_FILE}")`.', ""]
        return lines
