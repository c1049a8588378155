"""Where an evaluation runs, in which dtype and with which backend: the one resolution of the ``device`` /
``compute_dtype`` / ``backend`` settings (``resolve``).

``auto`` means CUDA when this process sees a GPU, else the CPU; the compute dtype ``auto`` means bf16 on
CUDA (what QLoRA trains in) and fp32 on the CPU (bf16 matmuls are slow there); the backend ``auto`` means
hqq on CUDA (the budget means real packed bytes there) and sim on the CPU. A device string this machine
cannot honour is refused before any work, with the fix in the message.
"""

from __future__ import annotations

import contextlib
import gc
import re

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import DeviceError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a device this process can use, or DeviceError naming the fix."""
    text = str(name).strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if m := re.fullmatch(r"cuda(?::(\d+))?", text):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {name!r}: this machine has no usable CUDA GPU (torch {torch.__version__}); "
                f"set quant.device to 'auto' or 'cpu', or run on a GPU machine with a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        if m[1] is not None and int(m[1]) >= count:
            raise DeviceError(
                f"device {name!r}: this process sees {count} CUDA device(s) (cuda:0..cuda:{count - 1}); pick one of "
                f"them, or pin each worker to its GPU with CUDA_VISIBLE_DEVICES and use 'cuda'"
            )
        return text
    raise DeviceError(f"device {name!r} is not supported: use 'auto' (CUDA when present, else CPU), 'cpu', "
                      f"'cuda' or 'cuda:N'")


def checkpointing_on(device: str, setting: bool | None = None) -> bool:
    """Gradient checkpointing ``None`` (auto): on for CUDA, where activations dominate the memory, off on the CPU."""
    return str(device).startswith("cuda") if setting is None else setting


def resolve(device: str = "auto", dtype: str | torch.dtype = "auto", backend: str = "auto", *,
            present: bool = True) -> tuple[str, str | torch.dtype, str]:
    """The one resolution of the ``auto`` settings: (device, compute dtype, backend).

    Device ``auto``: CUDA when this process sees a GPU, else the CPU (``resolve_device``); dtype ``auto``: bf16
    on CUDA, fp32 on the CPU; backend ``auto``: hqq (really packed) on CUDA, sim on the CPU. Other values pass
    as they are. ``present=False`` plans for a CUDA device this machine need not have (``autoqra estimate``).
    """
    if present or not str(device).startswith("cuda"):
        device = resolve_device(device)
    cuda = device.startswith("cuda")
    if isinstance(dtype, str) and dtype == "auto":
        dtype = "bfloat16" if cuda else "float32"
    if backend == "auto":
        backend = "hqq" if cuda else "sim"
    return device, dtype, backend


def slow_16bit(device: str, dtype: str | torch.dtype) -> str | None:
    """Why this compute dtype is a poor choice here, or None: a 16-bit dtype on a CPU without bf16 matrix units
    (AVX512-BF16 or AMX) runs its matmuls tens of times slower than float32."""
    if not str(device).startswith("cpu") or torch_dtype(dtype) == torch.float32:
        return None
    units = [getattr(torch.cpu, f"_is_{u}_supported", lambda: True)() for u in ("avx512_bf16", "amx_tile")]
    if any(units):
        return None
    return (f"compute dtype {dtype_name(torch_dtype(dtype))} on a CPU without bf16 matrix units (AVX512-BF16 or "
            f"AMX): its matrix products run in float32 and are rounded back (fp32_matmuls), as bf16 units do, but "
            f"every other op stays 16-bit and slower than float32; set quant.compute_dtype to 'auto' or "
            f"'float32' unless you need 16-bit numbers")


class Fp32Matmuls(TorchDispatchMode):
    """16-bit CPU matrix products computed in float32 and rounded back to their dtype: what bf16 matrix units
    (AVX512-BF16, AMX, tensor cores) do, 16-bit inputs with float32 accumulation, at float32 speed on a CPU
    whose own 16-bit kernels are scalar loops. Forward and backward alike (the mode sees autograd's products)."""

    OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            dtype = tensors[0].dtype
            if dtype in (torch.bfloat16, torch.float16) and all(t.device.type == "cpu" for t in tensors):
                up = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
                return func(*up, **kwargs).to(dtype)
        return func(*args, **kwargs)


def fp32_matmuls(device: str | torch.device, dtype: str | torch.dtype) -> contextlib.AbstractContextManager:
    """``Fp32Matmuls`` where the CPU lacks bf16 matrix units (``slow_16bit``), else nothing: same numbers up to
    the order of float32 sums, tens of times faster there."""
    return Fp32Matmuls() if slow_16bit(str(device), dtype) else contextlib.nullcontext()


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """A resolved compute dtype ('float32' | 'bfloat16' | 'float16', or a torch dtype) as torch's dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise DeviceError(f"compute dtype {name!r} is not supported: use 'auto', {', '.join(map(repr, DTYPES))}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def model_device(model: nn.Module) -> torch.device:
    """The device batches must go to: the input embeddings' (every quantized base keeps them unquantized)."""
    return model.get_input_embeddings().weight.device


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a built model computes in: its input embeddings' (the compute dtype; never quantized)."""
    return model.get_input_embeddings().weight.dtype


def release(device: str) -> None:
    """Hand a finished candidate's GPU memory back, so the next one starts from the resident weights alone.

    On a GPU the caching allocator keeps freed blocks until ``empty_cache``, and a tensor held by a reference
    cycle is not free until a collection: so collect, then empty. On the CPU a freed tensor goes back at once and
    Python's own collector finds cycles; a forced full collection there freed nothing measurable and, in a process
    that holds Prefect and transformers, took longer than a suite-sized fine-tune."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
