"""The champion in the formats deployers load: compressed-tensors (transformers, vLLM) and GGUF (llama.cpp).

* ``model-ct/``: the packed HQQ base transcoded, without re-quantizing, to compressed-tensors' asymmetric group
  quantization (``strategy: group``), one ``config_groups`` entry per bit-width naming its modules. HQQ stores
  ``W = (q - zero) * scale`` with ``q`` unsigned in [0, 2^b) and a *float* zero (its optimizer moves it);
  compressed-tensors stores a signed ``q' = q - 2^(b-1)`` and ``zero' = zero - 2^(b-1)``: the same weights.
  Only the ``naive-quantized`` format keeps a float zero point (``zp_dtype: float32``): ``pack-quantized``
  packs it as a b-bit integer, which rounds HQQ's zero away. So each weight is stored as int8 (8 bits on
  disk whatever b), and transformers dequantizes to dense weights on load. The LoRA adapter stays the
  standard peft ``adapter/``, which attaches to this base as to ``model/``.
* ``merged-ct/`` (with ``merge``): the adapter merged into the dequantized base, then quantized again by HQQ at
  each layer's searched bits and written as ``model-ct/`` is: for servers that cannot apply a LoRA adapter to a
  quantized base, at the searched memory (the re-quantization costs some accuracy; the card says how much).
* ``gguf/``: the adapter merged into the dequantized base, then each linear weight written in the GGML type
  of its layer's bits (``GGUF_TYPES``; llama.cpp applies no adapter to an HQQ base). The ``gguf`` package
  writes Q8_0/Q5_x/Q4_x but no K-quants, so 2 and 3 bits round up to Q4_1 (asymmetric, like HQQ). Llama
  architecture and byte-level BPE tokenizers only (what the converter in llama.cpp names ``llama``/``gpt2``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from .errors import AutoQRAError
from .memory import GROUP_SIZE, MemorySettings, ModelShape, packed_bytes
from .model import LayerMap
from .space import UNQUANTIZED, Config

CT_DIR, MERGED_CT_DIR, GGUF_DIR, GGUF_FILE = "model-ct", "merged-ct", "gguf", "model.gguf"
FORMATS = ("ct", "gguf")  # what ``--formats`` may name, besides the always-written hqq ``model/``
GGUF_TYPES = {2: "Q4_1", 3: "Q4_1", 4: "Q4_1", 8: "Q8_0"}  # searched bits -> the GGML type written
GGUF_UNQUANTIZED = "F16"  # 16-bit layers, embeddings and the head (never searched); norms stay F32


class FormatError(AutoQRAError):
    """A model or tokenizer a format cannot hold (the message says which and what to do)."""


def serving_bytes(config: Config, shape: ModelShape, group_size: int = GROUP_SIZE,
                  dtype_bytes: int = 2) -> dict[str, int]:
    """Weight bytes a server holds for each export part of ``config``, 16-bit where a part is not quantized
    (the KV cache and activations come on top, and depend on the server's context length and batch):

    * ``model/+adapter/``: HQQ's packed weights (scale and zero in the serving dtype) plus the adapter;
    * ``model-ct/+adapter/``: in transformers, which decompresses to dense weights on load (vLLM's packed
      kernels would hold about ``model/``'s bytes; not measured here);
    * ``merged/``: dense; ``gguf/``: the bytes of each tensor's GGML type (``gguf_type``)."""
    import gguf

    s = MemorySettings(backend="hqq", group_size=group_size, meta_bytes=dtype_bytes, base_bytes=dtype_bytes)
    packed = ggml = lora = 0
    for layer, (_, mods) in zip(config.layers, shape.layers):
        for m in mods:
            w, meta = packed_bytes(m.numel, layer.bits, s, rows=m.out_features)
            packed += w + meta + (m.numel * dtype_bytes if layer.bits >= UNQUANTIZED else 0)
            block, size = gguf.GGML_QUANT_SIZES[gguf_type(layer.bits, m.in_features)]
            ggml += m.numel // block * size
            lora += layer.rank * (m.in_features + m.out_features) * dtype_bytes
    other = shape.other_params * dtype_bytes  # embeddings, norms, head: 16-bit in every part
    dense = shape.linear_params * dtype_bytes + other
    return {"model/+adapter/": packed + other + lora, "model-ct/+adapter/": dense + lora, "merged/": dense,
            "gguf/": ggml + other}


def hqq_groups(layer: nn.Module) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bits, group size, q [out, in] in [0, 2^b), scale [out, in/g], zero [out, in/g]) of an ``HQQLinear``."""
    from hqq.core.quantize import Quantizer

    meta = layer.meta
    bits, group = int(meta["nbits"]), int(meta["group_size"])
    out_f, in_f = meta["shape"]
    if meta["axis"] != 1 or in_f % group or meta.get("quant_scale") or meta.get("quant_zero"):
        raise FormatError(f"compressed-tensors needs HQQ groups along input features (axis 1, in_features % "
                          f"{group} == 0, unquantized scale/zero); got axis {meta['axis']}, shape {meta['shape']}")
    q = Quantizer.unpack[meta["packing"]](layer.W_q, dtype=torch.int32)[: out_f * in_f // group]  # 3-bit pads rows
    shape = (out_f, in_f // group)
    return bits, group, q.reshape(out_f, in_f), meta["scale"].float().reshape(shape), meta["zero"].float().reshape(shape)


def save_compressed_tensors(packed: nn.Module, tokenizer, out: str | Path) -> dict:
    """``packed`` (HQQLinear modules where quantized, ordinary ones elsewhere) as a compressed-tensors folder;
    returns its ``quantization_config`` (validated with compressed-tensors' own config classes)."""
    from compressed_tensors.quantization import QuantizationConfig
    from hqq.core.quantize import HQQLinear
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hqq = {n: m for n, m in packed.named_modules() if isinstance(m, HQQLinear)}
    tensors, groups = {}, defaultdict(list)
    for name, t in packed.state_dict().items():  # every tensor outside the packed modules, as it is
        if not any(name.startswith(h + ".") for h in hqq):
            tensors[name] = t.detach().contiguous()
    for name, layer in hqq.items():
        bits, group, q, scale, zero = hqq_groups(layer)
        half = 1 << (bits - 1)
        tensors[f"{name}.weight"] = (q - half).to(torch.int8)
        tensors[f"{name}.weight_scale"] = scale.contiguous()
        tensors[f"{name}.weight_zero_point"] = (zero - half).contiguous()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().float().contiguous()
        groups[(bits, group)].append(name)
    if "lm_head.weight" in tensors and packed.config.tie_word_embeddings:
        del tensors["lm_head.weight"]  # tied: safetensors refuses shared storage, transformers re-ties it
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    qcfg = {
        "quant_method": "compressed-tensors",
        "format": "naive-quantized",
        "quantization_status": "compressed",  # else the int8 weight is read as a dense weight
        "config_groups": {
            f"group_{b}bit": {
                "targets": names,  # exact module names
                "weights": {"num_bits": b, "type": "int", "symmetric": False, "strategy": "group",
                            "group_size": g, "zp_dtype": "torch.float32"},  # HQQ's zero is a float
                "format": "naive-quantized",  # per group: on load a group without one is taken as pack-quantized
            } for (b, g), names in sorted(groups.items())},
        "ignore": [],
    }
    QuantizationConfig.model_validate(qcfg)
    cfg = packed.config.to_dict()
    cfg["quantization_config"] = qcfg
    cfg.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer.save_pretrained(out)
    return qcfg


def gguf_type(bits: int, row: int):
    """The GGML type a linear weight of a ``bits`` layer is written in (rows of ``row`` inputs): F16 where the
    type's block (32 values) does not divide a row or the layer is unquantized."""
    import gguf

    name = GGUF_TYPES.get(bits, GGUF_UNQUANTIZED)
    kind = gguf.GGMLQuantizationType[name]
    if row % gguf.GGML_QUANT_SIZES[kind][0]:
        kind = gguf.GGMLQuantizationType[GGUF_UNQUANTIZED]
    return kind


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (interleaved rotary pairs); transformers' GGUF loader undoes it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_fields(tokenizer) -> dict:
    """Tokens, token types, merges and special ids of a byte-level BPE tokenizer (tokenizer.json's model)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise FormatError("GGUF export needs a byte-level BPE tokenizer (GPT-2, Llama 3, SmolLM style); this one is "
                          f"{model.get('type', type(tokenizer).__name__)}: export without 'gguf' in --formats")
    vocab = dict(model["vocab"]) | {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    tokens = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    return {
        "tokens": tokens,
        "types": [int(gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL) for t in tokens],
        "merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
    }


def save_gguf(merged: nn.Module, tokenizer, config: Config, lmap: LayerMap, out: str | Path,
              name: str = "autoqra") -> dict[str, str]:
    """``merged`` (a Llama with the adapter merged, fp32) as ``out/GGUF_FILE``, each linear weight in its
    layer's ``gguf_type``; returns GGUF tensor name -> type written."""
    import gguf

    cfg = merged.config
    if cfg.model_type != "llama":
        raise FormatError(f"GGUF export writes Llama-architecture models; this one is {cfg.model_type!r}: "
                          "export without 'gguf' in --formats")
    tok = _tokenizer_fields(tokenizer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out / GGUF_FILE), "llama")
    _gguf_metadata(w, cfg, tokenizer, tok, name)
    layer_bits = dict(zip(config.names, config.bits))
    bits = {m: layer_bits[layer] for m, layer in lmap.modules().items()}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    written = {}
    state = merged.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # no output.weight: readers tie the head to the embeddings
    for hf_name, t in state.items():
        module, _, suffix = hf_name.rpartition(".")
        gname = names.get_name(module)
        if gname is None:
            raise FormatError(f"no GGUF name for {hf_name!r}: GGUF export writes Llama-architecture models only")
        t = t.detach().float()
        if module.endswith("q_proj"):
            t = _permute(t, cfg.num_attention_heads)
        elif module.endswith("k_proj"):
            t = _permute(t, cfg.num_key_value_heads)
        kind = gguf.GGMLQuantizationType.F32 if t.ndim == 1 else gguf_type(bits.get(module, 16), t.shape[-1])
        data = gguf.quantize(t.numpy(), kind)
        w.add_tensor(f"{gname}.{suffix}", data, raw_dtype=kind if kind.name.startswith("Q") else None)
        written[f"{gname}.{suffix}"] = kind.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def _gguf_metadata(w, cfg, tokenizer, tok: dict, name: str) -> None:
    """The Llama architecture's and the tokenizer's key-value metadata, as llama.cpp and transformers read it."""
    import gguf

    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)  # transformers un-permutes q/k only when it is there
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(len(tok["tokens"]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    w.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)
