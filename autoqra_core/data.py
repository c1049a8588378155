"""The fine-tuning task: rows from local files (or the hub), turned into token tensors.

Two row kinds, one format (JSON lines):
* language modelling: ``{"text": "..."}``;
* labelled multiple choice: ``{"prompt": "...", "choices": ["...", ...], "label": i}``.
  Training reads ``prompt + choices[label]``; evaluation scores every choice by
  its mean token log-likelihood (accuracy) and reports the loss of the correct
  continuation (eval_loss).

A dataset is a directory with ``train.jsonl`` and ``test.jsonl`` (or
``validation.jsonl``), a single ``.jsonl``/``.txt`` file split 90/10 by a hash of
each row (so the split never changes), or a hub name loaded with ``datasets``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DatasetError

MIN_TRAIN_ROWS = 16
MIN_TEST_ROWS = 4


@dataclass(frozen=True)
class Task:
    name: str
    train: tuple[dict, ...]
    test: tuple[dict, ...]

    @property
    def labelled(self) -> bool:
        return "choices" in self.test[0]


def _check_row(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise DatasetError(f"{where}: field 'text' must be a non-empty string")
        return {"text": row["text"]}
    missing = [k for k in ("prompt", "choices", "label") if k not in row]
    if missing:
        raise DatasetError(f"{where}: row has neither 'text' nor {missing}; see the dataset format in the README")
    choices, label = row["choices"], row["label"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DatasetError(f"{where}: 'choices' must be a list of at least 2 strings")
    if not isinstance(label, int) or not 0 <= label < len(choices):
        raise DatasetError(f"{where}: 'label' must be an index into 'choices' (0..{len(choices) - 1}), got {label!r}")
    return {"prompt": str(row["prompt"]), "choices": choices, "label": label}


def _read_rows(path: Path) -> list[dict]:
    rows = []
    if path.suffix == ".txt":
        paragraphs = [p.strip() for p in path.read_text(errors="replace").split("\n\n")]
        return [{"text": p} for p in paragraphs if p]
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        rows.append(_check_row(obj, f"{path}:{i}"))
    return rows


def _hash_split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    def is_test(row: dict) -> bool:
        return int(hashlib.sha1(json.dumps(row, sort_keys=True).encode()).hexdigest()[:8], 16) % 10 == 0

    return [r for r in rows if not is_test(r)], [r for r in rows if is_test(r)]


def load_task(source: str | Path) -> Task:
    """Load a dataset from a directory, a file, or a hub name; errors name the problem and the fix."""
    path = Path(source).expanduser()
    if path.is_dir():
        test_file = next((path / n for n in ("test.jsonl", "validation.jsonl") if (path / n).is_file()), None)
        if not (path / "train.jsonl").is_file() or test_file is None:
            raise DatasetError(f"dataset directory {path} needs train.jsonl and test.jsonl (or validation.jsonl)")
        train, test = _read_rows(path / "train.jsonl"), _read_rows(test_file)
    elif path.is_file():
        if path.suffix not in (".jsonl", ".txt"):
            raise DatasetError(f"dataset file {path} must be .jsonl (rows as JSON objects) or .txt (paragraphs)")
        train, test = _hash_split(_read_rows(path))
    elif str(source).startswith((".", "/", "~")) or path.suffix:
        raise DatasetError(f"dataset {source!r} not found: give a directory, a .jsonl/.txt file, or 'embedded'")
    else:
        train, test = _from_hub(str(source))
    if len(train) < MIN_TRAIN_ROWS or len(test) < MIN_TEST_ROWS:
        raise DatasetError(
            f"dataset {source!r} is too small: {len(train)} train / {len(test)} test rows; "
            f"need at least {MIN_TRAIN_ROWS} / {MIN_TEST_ROWS}"
        )
    kinds = {("choices" in r) for r in train + test}
    if len(kinds) > 1:
        raise DatasetError(f"dataset {source!r} mixes 'text' rows and multiple-choice rows; use one kind")
    return Task(str(source), tuple(train), tuple(test))


def _from_hub(name: str) -> tuple[list[dict], list[dict]]:
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"dataset {name!r} is not a local path, and loading hub datasets needs the 'datasets' package "
            f"(pip install datasets); or pass a directory with train.jsonl/test.jsonl"
        ) from None
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # the hub raises many kinds; all mean "cannot get it"
        raise DatasetError(f"could not load dataset {name!r} from the hub: {str(e).splitlines()[0]}") from None
    test_split = next((s for s in ("test", "validation") if s in ds), None)
    if "train" not in ds or test_split is None:
        raise DatasetError(f"hub dataset {name!r} needs a 'train' and a 'test' or 'validation' split")
    conv = [[_check_row(dict(r), f"{name}[{split}]") for r in ds[split]] for split in ("train", test_split)]
    return conv[0], conv[1]


# ---- tokens -------------------------------------------------------------------------------------


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def row_ids(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(context ids, target ids): for text rows the context is empty and the target the whole text."""
    if "text" in row:
        return [], _ids(tokenizer, row["text"])
    return _ids(tokenizer, row["prompt"]), _ids(tokenizer, row["choices"][row["label"]])


def train_blocks(task: Task, tokenizer, seq_len: int, fraction: float) -> torch.Tensor:
    """The first ``fraction`` of the training rows, concatenated (EOS between rows) into [n, seq_len] blocks."""
    n_rows = max(1, int(len(task.train) * fraction))
    stream: list[int] = []
    for row in task.train[:n_rows]:
        ctx, tgt = row_ids(tokenizer, row)
        stream += ctx + tgt + [tokenizer.eos_token_id]
    n = len(stream) // seq_len
    if n == 0:
        raise DatasetError(f"{n_rows} training rows give fewer than {seq_len} tokens; use more data or a shorter seq_len")
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def batches(blocks: torch.Tensor, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches drawn by a seeded shuffle (epochs repeat when the data runs out)."""
    rng = random.Random(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        idx = []
        while len(idx) < batch_size:
            if not order:
                order = list(range(len(blocks)))
                rng.shuffle(order)
            idx.append(order.pop())
        out.append(blocks[idx])
    return out


@dataclass(frozen=True)
class EvalSet:
    """Padded sequences to score: for each example, one row per choice (one row for text tasks)."""

    input_ids: torch.Tensor  # [n_rows, T]
    target_mask: torch.Tensor  # [n_rows, T] True where a token is scored (predicted from the previous one)
    example: torch.Tensor  # [n_rows] which example a row belongs to
    correct: torch.Tensor  # [n_rows] True for the row whose loss counts (the labelled choice / the text)
    labelled: bool


def eval_set(task: Task, tokenizer, n_examples: int, max_len: int) -> EvalSet:
    """The first ``n_examples`` held-out rows, tokenized for scoring (truncated to ``max_len``)."""
    seqs, masks, example, correct = [], [], [], []
    for i, row in enumerate(task.test[:n_examples]):
        options = row["choices"] if "choices" in row else [row["text"]]
        ctx = [tokenizer.eos_token_id] + (_ids(tokenizer, row["prompt"]) if "choices" in row else [])
        for j, option in enumerate(options):
            ids = (ctx + _ids(tokenizer, option))[:max_len]
            seqs.append(ids)
            masks.append([False] * len(ctx) + [True] * (len(ids) - len(ctx)))
            example.append(i)
            correct.append("choices" not in row or j == row["label"])
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    return EvalSet(
        input_ids=torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
        target_mask=torch.tensor([m + [False] * (width - len(m)) for m in masks]),
        example=torch.tensor(example),
        correct=torch.tensor(correct),
        labelled=task.labelled,
    )
