"""MLflow pyfunc of an exported champion ("models from code": MLflow copies this file into the model).

It imports only torch, transformers, peft, pandas and mlflow (with compressed-tensors or hqq), never AutoQRA,
so ``mlflow.pyfunc.load_model("models:/NAME@champion")`` and ``mlflow models serve`` work on any machine with
those libraries. The export folder is the model's artifact ``export``: the base is ``model-ct/``
(compressed-tensors, through transformers alone) when the export wrote it, else ``model/`` (hqq's loader); both
hold the same per-layer quantized weights, with ``adapter/`` (peft LoRA) on top.

``predict`` takes rows (a DataFrame, or records over REST):
* ``{"prompt": str, "choices": [str, ...]}`` -> ``{"scores": [mean log-likelihood per choice], "choice": index}``
  (the same scoring as AutoQRA's accuracy: each choice's tokens after EOS + prompt, averaged);
* ``{"prompt": str}`` -> ``{"text": greedy continuation}`` (``params={"max_new_tokens": N}``, default 32): the
  completion of a prompt/completion model;
* ``{"messages": [{"role", "content"}, ...]}`` -> ``{"text": the assistant's reply}``, the conversation rendered
  with the tokenizer's chat template and its generation prompt, as the model was trained.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
from mlflow.models import set_model


class ChampionModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        root = Path(context.artifacts["export"])
        base = root / "model-ct"
        if (base / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        else:
            from hqq.models.hf.base import AutoHQQHFModel

            base = root / "model"
            model = AutoHQQHFModel.from_quantized(str(base), compute_dtype=torch.float32, device="cpu")
        if (root / "adapter" / "adapter_config.json").is_file():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(root / "adapter"))
        self.model = model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(base))

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _scores(self, prompt: str, choices: list[str]) -> list[float]:
        import torch

        ctx = [self.tokenizer.eos_token_id] + self._ids(prompt)
        out = []
        with torch.no_grad():
            for choice in choices:
                tgt = self._ids(choice)
                ids = torch.tensor([ctx + tgt])
                logp = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1].float(), -1)
                tok = logp[len(ctx) - 1 :].gather(1, ids[0, len(ctx) :, None]).squeeze(1)
                out.append(float(tok.mean()) if len(tgt) else float("-inf"))
        return out

    def _generate(self, context: list[int], max_new_tokens: int) -> str:
        import torch

        ids = torch.tensor([context])
        with torch.no_grad():
            for _ in range(max_new_tokens):  # greedy, without a KV cache: small and version-proof
                nxt = int(self.model(input_ids=ids).logits[0, -1].argmax())
                if nxt == self.tokenizer.eos_token_id:
                    break
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        return self.tokenizer.decode(ids[0, len(context) :].tolist())

    def predict(self, context, model_input, params=None):
        import pandas as pd

        rows = model_input.to_dict("records") if isinstance(model_input, pd.DataFrame) else list(model_input)
        max_new = int((params or {}).get("max_new_tokens", 32))
        out = []
        for row in rows:
            choices, messages = row.get("choices"), row.get("messages")
            if _given(choices):
                scores = self._scores(str(row["prompt"]), [str(c) for c in choices])
                out.append({"scores": scores, "choice": max(range(len(scores)), key=scores.__getitem__)})
            elif _given(messages):
                text = self.tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                                          add_generation_prompt=True)
                out.append({"text": self._generate(self._ids(text), max_new)})
            else:
                out.append({"text": self._generate([self.tokenizer.eos_token_id] + self._ids(str(row["prompt"])),
                                                   max_new)})
        return out


def _given(value) -> bool:
    """A list-valued column present in this row (a DataFrame fills an absent one with NaN)."""
    return value is not None and not isinstance(value, (float, str)) and len(value) > 0


set_model(ChampionModel())
