"""The fine-tuning task: rows from local files (or the hub), turned into token tensors.

Two row kinds, one format (JSON lines):
* language modelling: ``{"text": "..."}``;
* labelled multiple choice: ``{"prompt": "...", "choices": ["...", ...], "label": i}``.
  Training reads ``prompt + choices[label]``; evaluation scores every choice by
  its mean token log-likelihood (accuracy) and reports the loss of the correct
  continuation (eval_loss).

Three splits, because selecting and reporting on the same rows biases the winner:
``train`` (fine-tuning), ``validation`` (every search decision) and ``test`` (only the
final report). A dataset is a directory with ``train.jsonl`` and ``test.jsonl`` and,
optionally, ``validation.jsonl`` (carved from train by a hash of each row when
missing), a single ``.jsonl``/``.txt`` file split 80/10/10 by row hash (so the splits
never change), or a hub name loaded with ``datasets``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .errors import DatasetError

MIN_TRAIN_ROWS = 16
MIN_TEST_ROWS = 4
SPLITS = ("validation", "test")  # the held-out splits a model can be scored on


@dataclass(frozen=True, eq=False)  # compared by identity: a loaded task is one object, memoised per process
class Task:
    name: str
    train: tuple[dict, ...]
    validation: tuple[dict, ...]
    test: tuple[dict, ...]

    @property
    def labelled(self) -> bool:
        return "choices" in self.test[0]

    def held_out(self, split: str) -> tuple[dict, ...]:
        """The rows of a held-out split: ``validation`` for search decisions, ``test`` for the final report."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}: choose one of {SPLITS}")
        return getattr(self, split)


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


def _bucket(row: dict) -> int:
    """0-9 from a hash of the row: a row's split never depends on order or on the other rows."""
    return int(hashlib.sha1(json.dumps(row, sort_keys=True).encode()).hexdigest()[:8], 16) % 10


def _carve(rows: list[dict], bucket: int) -> tuple[list[dict], list[dict]]:
    """(rows outside ``bucket``, rows in it): a stable 10% held out of ``rows``."""
    return [r for r in rows if _bucket(r) != bucket], [r for r in rows if _bucket(r) == bucket]


def load_task(source: str | Path) -> Task:
    """Load a dataset from a directory, a file, or a hub name; errors name the problem and the fix."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = {n: path / f"{n}.jsonl" for n in ("train", "validation", "test")}
        if not files["train"].is_file() or not files["test"].is_file():
            raise DatasetError(
                f"dataset directory {path} needs train.jsonl and test.jsonl (validation.jsonl is optional: "
                f"without it 10% of train is held out for validation)"
            )
        split = {n: _read_rows(f) if f.is_file() else None for n, f in files.items()}
    elif path.is_file():
        if path.suffix not in (".jsonl", ".txt"):
            raise DatasetError(f"dataset file {path} must be .jsonl (rows as JSON objects) or .txt (paragraphs)")
        rest, test = _carve(_read_rows(path), bucket=0)
        split = {"train": rest, "validation": None, "test": test}
    elif str(source).startswith((".", "/", "~")) or path.suffix:
        raise DatasetError(f"dataset {source!r} not found: give a directory, a .jsonl/.txt file, or 'embedded'")
    else:
        split = _from_hub(str(source))
    train, validation, test = split["train"], split["validation"], split["test"]
    if validation is None:
        train, validation = _carve(train, bucket=1)
    sizes = f"{len(train)} train / {len(validation)} validation / {len(test)} test rows"
    if len(train) < MIN_TRAIN_ROWS or min(len(validation), len(test)) < MIN_TEST_ROWS:
        raise DatasetError(
            f"dataset {source!r} is too small: {sizes}; need at least {MIN_TRAIN_ROWS} train and "
            f"{MIN_TEST_ROWS} validation and test rows"
        )
    kinds = {("choices" in r) for r in train + validation + test}
    if len(kinds) > 1:
        raise DatasetError(f"dataset {source!r} mixes 'text' rows and multiple-choice rows; use one kind")
    return Task(str(source), tuple(train), tuple(validation), tuple(test))


def _from_hub(name: str) -> dict[str, list[dict] | None]:
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
    if "train" not in ds or not ({"test", "validation"} & set(ds)):
        raise DatasetError(f"hub dataset {name!r} needs a 'train' and a 'test' or 'validation' split")
    rows = {s: [_check_row(dict(r), f"{name}[{s}]") for r in ds[s]] if s in ds else None
            for s in ("train", "validation", "test")}
    if rows["test"] is None:  # only train + validation: the test split is carved from train
        rows["train"], rows["test"] = _carve(rows["train"], bucket=0)
    return rows


# ---- tokens -------------------------------------------------------------------------------------


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def row_ids(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(context ids, target ids): for text rows the context is empty and the target the whole text."""
    if "text" in row:
        return [], _ids(tokenizer, row["text"])
    return _ids(tokenizer, row["prompt"]), _ids(tokenizer, row["choices"][row["label"]])


@lru_cache(maxsize=4)
def _train_stream(task: Task, tokenizer) -> tuple[list[int], list[int]]:
    """(token stream of every training row with EOS after each, end offset of each row).

    Tokenized once per (task, tokenizer) in a process: every evaluation takes a prefix of it.
    """
    stream: list[int] = []
    ends: list[int] = []
    for row in task.train:
        ctx, tgt = row_ids(tokenizer, row)
        stream += ctx + tgt + [tokenizer.eos_token_id]
        ends.append(len(stream))
    return stream, ends


def train_blocks(task: Task, tokenizer, seq_len: int, fraction: float) -> torch.Tensor:
    """The first ``fraction`` of the training rows, concatenated (EOS between rows) into [n, seq_len] blocks."""
    n_rows = max(1, int(len(task.train) * fraction))
    all_ids, ends = _train_stream(task, tokenizer)
    stream = all_ids[: ends[n_rows - 1]]
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


def fit_window(ctx: list[int], target: list[int], max_len: int) -> tuple[list[int], int]:
    """(ids, number of context tokens kept) of ``ctx + target`` in at most ``max_len`` tokens.

    The context is cut from the left, so the target (the choice being scored) is always
    there, preceded by at least one context token that predicts its first token; a
    target longer than ``max_len - 1`` keeps its beginning.
    """
    target = target[: max_len - 1]
    keep = min(len(ctx), max_len - len(target))
    return ctx[len(ctx) - keep :] + target, keep


def eval_set(task: Task, tokenizer, n_examples: int, max_len: int, split: str = "validation") -> EvalSet:
    """The first ``n_examples`` rows of a held-out split, tokenized for scoring (at most ``max_len`` tokens each)."""
    if max_len < 2:
        raise DatasetError(f"cannot score sequences of {max_len} token(s): seq_len must be at least 2")
    seqs, masks, example, correct = [], [], [], []
    for i, row in enumerate(task.held_out(split)[:n_examples]):
        options = row["choices"] if "choices" in row else [row["text"]]
        ctx = [tokenizer.eos_token_id] + (_ids(tokenizer, row["prompt"]) if "choices" in row else [])
        for j, option in enumerate(options):
            ids, n_ctx = fit_window(ctx, _ids(tokenizer, option), max_len)
            seqs.append(ids)
            masks.append([False] * n_ctx + [True] * (len(ids) - n_ctx))
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
