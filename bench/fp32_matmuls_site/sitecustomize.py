"""Run an older checkout's fine-tunes with this checkout's ``autoqra_core.device.fp32_matmuls``.

A study resumed at an older commit (to keep its cached evaluations, whose key hashes ``autoqra_core``) on a CPU
without bf16 matrix units: put this folder on PYTHONPATH after the older checkout and its ``finetune.fit`` runs
inside ``fp32_matmuls``, as this checkout's does; nothing in the older ``autoqra_core`` changes.

    PYTHONPATH=$OLD:/path/to/this/bench/fp32_matmuls_site autoqra search ...
"""

import functools
import importlib.abc
import importlib.util
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parents[2] / "autoqra_core"


def _this_device():
    """This checkout's autoqra_core.device, imported as ``_autoqra_here.device`` beside the older package."""
    spec = importlib.util.spec_from_file_location("_autoqra_here", _HERE / "__init__.py",
                                                  submodule_search_locations=[str(_HERE)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["_autoqra_here"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("_autoqra_here.device")


def _wrap(old) -> None:
    """Replace the older ``finetune.fit`` (module ``old``) by one that runs inside this checkout's fp32_matmuls."""
    if Path(old.__file__).resolve().parent == _HERE:
        return
    device = _this_device()
    fit = old.fit

    @functools.wraps(fit)
    def fit_fp32_matmuls(model, *args, **kwargs):
        with device.fp32_matmuls(device.model_device(model), device.model_dtype(model)):
            return fit(model, *args, **kwargs)

    fit_fp32_matmuls.fp32_matmuls = True
    old.fit = fit_fp32_matmuls


class _AfterFinetune(importlib.abc.MetaPathFinder):
    """Wrap ``autoqra_core.finetune`` when a process imports it (servers and tools never do: they stay light)."""

    def find_spec(self, name, path, target=None):
        if name != "autoqra_core.finetune":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            _wrap(module)

        spec.loader.exec_module = exec_and_wrap
        return spec


sys.meta_path.insert(0, _AfterFinetune())
