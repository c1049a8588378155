"""Helpers shared by the tests: embedded paths, a session fixture, tiny checkpoints on disk."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_MODEL = ROOT / "infra" / "embedded" / "model"
EMBEDDED_DATA = ROOT / "infra" / "embedded" / "wordnet"


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer, task, layer map) of the embedded default, loaded once."""
    from autoqra_core.data import load_task
    from autoqra_core.model import layer_map, load_model

    model, tok = load_model(EMBEDDED_MODEL)
    return model, tok, load_task(EMBEDDED_DATA), layer_map(model)


def tiny_checkpoint(tmp: Path, arch: str) -> Path:
    """A randomly initialised 2-block model of ``arch`` saved like a hub checkpoint (with a tokenizer)."""
    from transformers import (AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    common = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**common)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**common)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_embd=64, n_layer=2, n_head=4,
                                                   n_positions=64)),
    }[arch]()
    out = tmp / arch
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# The suite's search settings: infra/quick.yaml (the README's quick search).
TINY_SEARCH = (ROOT / "infra" / "quick.yaml").read_text()

# For tests that need every step of a search once, not its length: one rung, one TuRBO candidate, no
# race, one report seed.
MINI_SEARCH = """
train: {steps: 3, data_fraction: 0.05, seq_len: 32, batch_size: 4}
search:
  generations: 1
  rungs:
    - {fraction: 1.0, eval_examples: 8}
  evolution: {population_size: 3, offspring: 2}
  turbo: {iterations: 1, batch_size: 1}
  race: {max_config_calls: 1}
report: {seeds: 1, test_examples: 8}
"""

AUTOQRA = [sys.executable, "-m", "flows.cli"]
SERVER_ENV = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AUTOQRA_STORE", "AWS_ENDPOINT_URL",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AUTOQRA_SETTINGS")


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment of an ``autoqra`` subprocess confined to ``home``: its own caches, MLflow file, store and
    Prefect home (so ephemeral servers of concurrent runs do not share a database); ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if k not in SERVER_ENV}
    env.update(AUTOQRA_HOME=str(home), PREFECT_HOME=str(home / "prefect-home"), PYTHONWARNINGS="ignore", **extra)
    return env
