"""Where an evaluation runs and in which dtype: the one resolution of the ``device`` / ``compute_dtype`` settings.

``auto`` means CUDA when this process sees a GPU, else the CPU; the compute dtype ``auto`` means bf16 on
CUDA (what QLoRA trains in) and fp32 on the CPU (bf16 matmuls are slow there). A device string this
machine cannot honour is refused before any work, with the fix in the message.
"""

from __future__ import annotations

import gc
import re

import torch
from torch import nn

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


def resolve_dtype(name: str | torch.dtype, device: str) -> torch.dtype:
    """'auto' -> bf16 on CUDA, fp32 on the CPU; 'float32' | 'bfloat16' | 'float16' as named."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise DeviceError(f"compute dtype {name!r} is not supported: use 'auto', {', '.join(map(repr, DTYPES))}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def model_device(model: nn.Module) -> torch.device:
    """The device batches must go to: the input embeddings' (every quantized base keeps them unquantized)."""
    return model.get_input_embeddings().weight.device


def release(device: str) -> None:
    """Hand a finished candidate's memory back, so the next one starts from the resident weights alone."""
    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
