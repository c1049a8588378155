"""Faults inside one candidate: divergence and out-of-memory become failed evaluations with a reason."""

from __future__ import annotations

import math

import torch

import autoqra_core.finetune as ft
from autoqra_core.fidelity import Fidelity
from autoqra_core.finetune import TrainSettings, evaluate_config
from autoqra_core.quantize import QuantSettings
from autoqra_core.space import SearchSpace

from .helpers import embedded  # noqa: F401

FID = Fidelity(steps=6, data_fraction=0.05, seq_len=32, batch_size=4, eval_examples=10)


def test_diverging_candidate_is_failed_with_reason(embedded):
    base, tok, task, lmap = embedded
    cfg = SearchSpace(lmap.names).uniform(2, 64)
    ev = evaluate_config(base, tok, task, lmap, cfg, FID, 0, 1, QuantSettings("sim"),
                         TrainSettings(lr=1e30, max_grad_norm=1e9, warmup_steps=0))  # fp32 overflows: NaN
    assert ev.status == "failed" and not ev.ok and math.isinf(ev.eval_loss)
    assert "diverged" in ev.reason


def test_out_of_memory_candidate_is_failed_with_reason(embedded, monkeypatch):
    base, tok, task, lmap = embedded
    real_build = ft.build

    def build_then_oom(*args, **kwargs):
        model = real_build(*args, **kwargs)

        def forward(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        model.forward = forward
        return model

    monkeypatch.setattr(ft, "build", build_then_oom)
    cfg = SearchSpace(lmap.names).uniform(4, 16)
    ev = evaluate_config(base, tok, task, lmap, cfg, FID, 1, 123, QuantSettings("sim"))
    assert ev.status == "failed" and ev.reason.startswith("out of memory") and ev.memory_bytes == 123
    assert ev.to_dict()["eval_loss"] is None  # JSON-safe
