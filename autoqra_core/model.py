"""Loading a causal LM and discovering what can be quantized in it.

Decoder blocks are found from the model's structure, not from architecture
names: the longest ``nn.ModuleList`` whose entries hold linear modules. That
covers Llama, Qwen2, Mistral, GPT-2 (whose ``Conv1D`` is turned into
``nn.Linear`` so every backend sees one module type) and most causal LMs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError, SpaceError
from .memory import LinearShape, ModelShape

GRANULARITIES = ("block", "module")


@dataclass(frozen=True)
class LayerMap:
    """Layer name -> full names of the linear modules that share its (bits, rank)."""

    layers: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.layers)

    def modules(self) -> dict[str, str]:
        """Module name -> layer name."""
        return {m: layer for layer, mods in self.layers for m in mods}


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local directory or a Hugging Face hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = str(name_or_path)
    local = Path(src).expanduser()
    looks_local = local.exists() or src.startswith((".", "/", "~")) or src.count("/") > 1
    if looks_local and not (local / "config.json").is_file():
        raise ModelLoadError(
            f"model {src!r} not found: expected a directory with config.json (a Hugging Face checkpoint); "
            f"pass --model PATH to such a directory, a hub id, or 'embedded' for the built-in model"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if looks_local else src)
        model = AutoModelForCausalLM.from_pretrained(str(local) if looks_local else src, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(
            f"could not load model {src!r}: {str(e).splitlines()[0]}. Give a local checkpoint directory "
            f"(config.json + weights + tokenizer) or a hub id reachable from this machine"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    conv1d_to_linear(model)
    find_blocks(model)  # fail early on models without decoder blocks
    return model, tokenizer


def load_skeleton(name_or_path: str | Path) -> nn.Module:
    """The model's structure from its config alone (a folder, a config.json file or a hub id), on the meta
    device: shapes without weights, so an 8B-70B model's memory is planned in seconds with nothing downloaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = str(name_or_path)
    local = Path(src).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise ModelLoadError(f"{src!r} has no config.json: pass a Hugging Face checkpoint folder, its config.json or a hub id")
    if src.startswith((".", "/", "~")) and not local.exists():
        raise ModelLoadError(f"model {src!r} not found: pass a checkpoint folder, a config.json file or a hub id")
    try:
        cfg = AutoConfig.from_pretrained(str(local) if local.exists() else src)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
            conv1d_to_linear(model)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not read the config of {src!r}: {str(e).splitlines()[0]}. Give a folder with "
                             f"config.json, the file itself, or a hub id reachable from this machine") from None
    find_blocks(model)
    return model


def conv1d_to_linear(model: nn.Module) -> None:
    """Replace transformers' GPT-2 ``Conv1D`` (weight stored transposed) by an equivalent ``nn.Linear``."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                lin = nn.Linear(child.weight.shape[0], child.weight.shape[1], bias=child.bias is not None)
                lin = lin.to(child.weight.dtype)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(parent, child_name, lin)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ModuleList whose entries contain nn.Linear modules."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if all(any(isinstance(m, nn.Linear) for m in blk.modules()) for blk in mod):
                if best is None or len(mod) > len(best[1]):
                    best = (name, mod)
    if best is None:
        raise ModelLoadError(
            f"{type(model).__name__} has no list of decoder blocks with linear layers; "
            f"AutoQRA needs a transformer causal LM (Llama, Qwen2, Mistral, GPT-2, ...)"
        )
    return best


def layer_map(model: nn.Module, granularity: str = "block") -> LayerMap:
    """Group the blocks' linear modules into search-space layers."""
    if granularity not in GRANULARITIES:
        raise SpaceError(f"granularity {granularity!r} is not one of {GRANULARITIES}")
    prefix, blocks = find_blocks(model)
    layers = []
    for i, blk in enumerate(blocks):
        mods = tuple(f"{prefix}.{i}.{n}" for n, m in blk.named_modules() if isinstance(m, nn.Linear))
        if granularity == "block":
            layers.append((f"{prefix}.{i}", mods))
        else:
            layers.extend((m, (m,)) for m in mods)
    return LayerMap(tuple(layers))


def select_layers(lmap: LayerMap, names: list[str] | None) -> LayerMap:
    """Restrict the search to ``names`` (others stay unquantized, no adapter); unknown names are an error."""
    if not names:
        return lmap
    known = dict(lmap.layers)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SpaceError(f"layers {unknown} are not in the model; it has {len(known)} layers: {list(known)[:4]} ...")
    return LayerMap(tuple((n, known[n]) for n in names))


def model_shape(model: nn.Module, lmap: LayerMap) -> ModelShape:
    """The numbers the memory model needs, read off the unquantized model."""
    mods = dict(model.named_modules())
    layers = []
    quantizable = 0
    for name, members in lmap.layers:
        shapes = tuple(LinearShape(m, mods[m].in_features, mods[m].out_features) for m in members)
        quantizable += sum(s.numel for s in shapes)
        layers.append((name, shapes))
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    return ModelShape(
        layers=tuple(layers),
        other_params=sum(p.numel() for p in model.parameters()) - quantizable,
        hidden_size=hidden,
        intermediate_size=getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden,
        num_heads=getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head"),
        vocab_size=cfg.vocab_size,
        num_blocks=len(find_blocks(model)[1]),
    )
