"""Mixed per-layer quantization of a model's linear modules, one backend per quantizer.

Backends (peft-style dispatch: each knows which bit-widths it can pack):
* ``hqq``: HQQ's packed 2/3/4/8-bit weights with per-group scale/zero; runs on CPU and GPU.
* ``bnb``: bitsandbytes NF4 (4 bits) and LLM.int8 (8 bits); made for CUDA, also runs on CPU.
* ``sim``: quantize with HQQ once, keep the *dequantized* weight in a plain ``nn.Linear``.
  Same numbers as ``hqq`` (tested), no dequantization per forward: the fast path
  for searching on a CPU. Its memory is accounted as HQQ's packed bytes, which is
  only true of the packed backends: on a GPU (where the budget means real bytes) it
  is refused (``check_placement``).

Every backend makes a *new* module from a linear without touching it, so one
full-precision base serves every candidate (``packed.PackedCache``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .device import resolve, torch_dtype
from .errors import SpaceError
from .memory import GROUP_SIZE
from .model import LayerMap
from .space import QUANTIZED_BITS, UNQUANTIZED, Config


@dataclass(frozen=True)
class QuantSettings:
    """Backend and placement. ``device``/``compute_dtype``/``backend`` 'auto' resolve here, once
    (``device.resolve``)."""

    backend: str = "hqq"
    group_size: int = GROUP_SIZE
    compute_dtype: torch.dtype | str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        device, dtype, backend = resolve(self.device, self.compute_dtype, self.backend)
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "compute_dtype", torch_dtype(dtype))
        object.__setattr__(self, "backend", backend)


def _detached_linear(linear: nn.Linear) -> nn.Linear:
    """A throwaway linear holding a copy of ``linear``'s weight (HQQ deletes the weight it packs)."""
    lin = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    lin.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    if linear.bias is not None:
        lin.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return lin


def _hqq(linear: nn.Linear, bits: int, s: QuantSettings) -> nn.Module:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=bits, group_size=s.group_size)
    return HQQLinear(_detached_linear(linear), cfg, compute_dtype=s.compute_dtype, device=s.device, del_orig=True)


def dequantized_weight(weight: torch.Tensor, bits: int, s: QuantSettings) -> torch.Tensor:
    """HQQ quantize-dequantize of a weight matrix: what the packed layer computes with."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)  # _hqq packs a copy
    return _hqq(lin, bits, s).dequantize().reshape(weight.shape).to(s.compute_dtype)


def _sim(linear: nn.Linear, bits: int, s: QuantSettings) -> nn.Module:
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(dequantized_weight(linear.weight, bits, s), requires_grad=False)
    out.bias = None if linear.bias is None else nn.Parameter(
        linear.bias.detach().to(s.device, s.compute_dtype, copy=True), requires_grad=False)
    return out


def _unquantized(linear: nn.Linear, bits: int, s: QuantSettings) -> nn.Module:
    """A 16-bit layer: the base weight in the compute dtype on the device (shares storage when nothing changes)."""
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(linear.weight.detach().to(s.device, s.compute_dtype), requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach().to(s.device, s.compute_dtype), requires_grad=False)
    return out


def _bnb(linear: nn.Linear, bits: int, s: QuantSettings) -> nn.Module:
    import bitsandbytes as bnb

    w, b = linear.weight.detach(), linear.bias
    if bits == 4:
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=b is not None,
            compute_dtype=s.compute_dtype, quant_type="nf4", device="meta",
        )  # Params4bit double-quantizes its absmax by default (compress_statistics): memory.py counts that
        q.weight = bnb.nn.Params4bit(w.to("cpu", copy=True), requires_grad=False, quant_type="nf4").to(s.device)
    else:
        q = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=b is not None, has_fp16_weights=False, device="meta"
        )
        q.weight = bnb.nn.Int8Params(w.to("cpu", copy=True), requires_grad=False, has_fp16_weights=False).to(s.device)
    if b is not None:
        q.bias = nn.Parameter(b.detach().to(s.device, s.compute_dtype, copy=True), requires_grad=False)
    return q


BACKENDS: dict[str, tuple[tuple[int, ...], Callable[[nn.Linear, int, QuantSettings], nn.Module]]] = {
    "hqq": (QUANTIZED_BITS, _hqq),
    "sim": (QUANTIZED_BITS, _sim),
    "bnb": ((4, 8), _bnb),
}


def check_backend(backend: str, bits: tuple[int, ...]) -> None:
    """Fail before any work if the backend cannot pack one of the bit-widths."""
    if backend not in BACKENDS:
        raise SpaceError(f"unknown quantization backend {backend!r}; choose one of {sorted(BACKENDS)}")
    supported = BACKENDS[backend][0]
    bad = [b for b in bits if b != UNQUANTIZED and b not in supported]
    if bad:
        raise SpaceError(f"backend {backend!r} cannot pack {bad}-bit weights; it supports {list(supported)} (and 16)")


def check_placement(backend: str, device: str) -> None:
    """``sim`` on a GPU would hold dequantized weights (~4x HQQ's 4-bit bytes) the memory model does not count."""
    if backend == "sim" and str(device).startswith("cuda"):
        raise SpaceError(
            f"backend 'sim' keeps dequantized weights, so on {device} its memory is far above the budget the memory "
            f"model enforces; use quant.backend 'hqq' (2/3/4/8 bits) or 'bnb' (4/8 bits) on a GPU, or device 'cpu'"
        )


def quantize_module(linear: nn.Linear, bits: int, s: QuantSettings) -> nn.Module:
    """A new module computing ``linear`` at ``bits`` on ``s.device`` (16: unquantized, in the compute dtype)."""
    if bits >= UNQUANTIZED:
        return _unquantized(linear, bits, s)
    return BACKENDS[s.backend][1](linear, bits, s)


def quantize_model(model: nn.Module, config: Config, lmap: LayerMap, s: QuantSettings = QuantSettings()) -> nn.Module:
    """Replace every linear module of every layer by its quantized version at that layer's bits (in place)."""
    if config.names != lmap.names:
        raise SpaceError(f"configuration has layers {config.names[:2]}..., the model has {lmap.names[:2]}...")
    check_backend(s.backend, config.bits)
    for choice, (_, members) in zip(config.layers, lmap.layers):
        if choice.bits >= UNQUANTIZED:
            continue
        for full in members:
            parent_name, _, child = full.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, quantize_module(getattr(parent, child), choice.bits, s))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _module_tensors(module: nn.Module):
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)
    meta = getattr(module, "meta", None)  # HQQ keeps scale/zero outside parameters()
    if isinstance(meta, dict):
        yield from (v for v in meta.values() if torch.is_tensor(v))
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)  # bitsandbytes NF4 absmax (+ its nested state2: double quant)
    while state is not None:
        yield from (v for v in vars(state).values() if torch.is_tensor(v))
        state = getattr(state, "state2", None)
    scb = getattr(weight, "SCB", None)  # bitsandbytes int8 row scales
    if torch.is_tensor(scb):
        yield scb


def storage_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, grads: bool = True) -> int:
    """Bytes of every tensor the model (and optimizer) holds, each storage counted once: the measured side."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()

    for mod in model.modules():
        for t in _module_tensors(mod):
            add(t)
            if grads and isinstance(t, nn.Parameter) and t.grad is not None:
                add(t.grad)
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.dim() > 0:
                    add(v)
    return sum(seen.values())
