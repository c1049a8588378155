"""The fine-tuning task: rows from local files (or the hub), turned into token tensors with a loss mask.

Four row kinds, one per dataset (JSON lines; TRL's dataset formats where one exists):

* language modelling ``{"text": "..."}``: loss on every token;
* prompt/completion ``{"prompt": "...", "completion": "..."}``: loss on the completion (and its EOS) only,
  as TRL's ``completion_only_loss``; scored by the completion's mean token loss;
* conversational ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's own chat
  template, loss on the assistant turns only, as TRL's ``assistant_only_loss``;
* labelled multiple choice ``{"prompt": "...", "choices": ["...", ...], "label": i}``: trained as
  ``prompt + choices[label]`` (loss on the whole row, or on the answer only with ``answer_only``); scored
  by every choice's mean token log-likelihood (accuracy) and the loss of the correct one (eval_loss).

Files whose columns have other names are read through a column mapping (``parse_columns``:
``prompt=instruction+input,completion=output`` reads Alpaca rows; ``+`` joins columns with a blank line).

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
from typing import Mapping

import torch

from .errors import DatasetError

MIN_TRAIN_ROWS = 16
MIN_TEST_ROWS = 4
SPLITS = ("validation", "test")  # the held-out splits a model can be scored on
KINDS = ("text", "completion", "messages", "choice")  # row kinds, by the field that names them
FIELDS = ("text", "prompt", "completion", "messages", "choices", "label")  # what a column mapping may fill
ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100  # the label of a position that is not trained on (the loss ignores it, as transformers' does)


@dataclass(frozen=True, eq=False)  # compared by identity: a loaded task is one object, memoised per process
class Task:
    name: str
    train: tuple[dict, ...]
    validation: tuple[dict, ...]
    test: tuple[dict, ...]

    @property
    def kind(self) -> str:
        """One of ``KINDS``: every row of a task has the same kind (``load_task`` checks it)."""
        return row_kind(self.test[0])

    @property
    def labelled(self) -> bool:
        return self.kind == "choice"

    def held_out(self, split: str) -> tuple[dict, ...]:
        """The rows of a held-out split: ``validation`` for search decisions, ``test`` for the final report."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}: choose one of {SPLITS}")
        return getattr(self, split)


def row_kind(row: Mapping) -> str:
    """The kind of a (checked) row: the first of messages / completion / choices / text it has."""
    for key, kind in (("messages", "messages"), ("completion", "completion"), ("choices", "choice"), ("text", "text")):
        if key in row:
            return kind
    raise DatasetError(f"row with fields {sorted(row)} is none of the row kinds {KINDS}")


def parse_columns(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"prompt=instruction+input,completion=output"`` -> {field: source columns}; a mapping is checked as is."""
    if not text:
        return {}
    pairs = text.items() if isinstance(text, Mapping) else [p.partition("=")[::2] for p in text.split(",") if p.strip()]
    out = {}
    for field, source in pairs:
        field, source = field.strip(), source.strip()
        if field not in FIELDS or not source:
            raise DatasetError(f"column mapping {field}={source!r}: write FIELD=COLUMN[+COLUMN...] with FIELD one of "
                               f"{FIELDS}, e.g. --columns prompt=instruction+input,completion=output")
        out[field] = source
    return out


def columns_text(columns: str | Mapping[str, str] | None) -> str:
    """The canonical text of a column mapping (fields sorted): one mapping, one spelling, one cache key."""
    return ",".join(f"{k}={v}" for k, v in sorted(parse_columns(columns).items()))


def _mapped(row: dict, columns: dict[str, str], where: str) -> dict:
    """``row`` with the mapped fields filled from its columns ('+' joins non-empty strings with a blank line)."""
    if not columns:
        return row
    out = {}
    for field, source in columns.items():
        parts = source.split("+")
        missing = [c for c in parts if c not in row]
        if missing:
            raise DatasetError(f"{where}: the column mapping {field}={source} names column(s) {missing} this row does "
                               f"not have; its columns are {sorted(row)}")
        values = [row[c] for c in parts]
        out[field] = values[0] if len(values) == 1 else "\n\n".join(str(v) for v in values if v not in (None, ""))
    return out


def _text(row: dict, key: str, where: str, empty_ok: bool = False) -> str:
    value = row[key]
    if not isinstance(value, str) or (not empty_ok and not value.strip()):
        raise DatasetError(f"{where}: field {key!r} must be a non-empty string, got {value!r:.60}")
    return value


def _check_messages(messages: object, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DatasetError(f"{where}: messages[{j}] must be {{'role': one of {ROLES}, 'content': a string}}, "
                               f"got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[0]["role"] == "assistant":
        raise DatasetError(f"{where}: the conversation starts with an assistant turn; start it with a "
                           f"'system' or 'user' message (the assistant's first turn answers something)")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise DatasetError(f"{where}: the conversation has no assistant turn with content: nothing to train on; "
                           f"add the assistant's reply or drop the row")
    return out


def _check_row(row: object, where: str, columns: dict[str, str] | None = None) -> dict:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    row = _mapped(row, columns or {}, where)
    if "messages" in row:
        return {"messages": _check_messages(row["messages"], where)}
    if "completion" in row:
        if "prompt" not in row:
            raise DatasetError(f"{where}: a 'completion' row needs its 'prompt' (it may be an empty string)")
        return {"prompt": _text(row, "prompt", where, empty_ok=True), "completion": _text(row, "completion", where)}
    if "text" in row:
        return {"text": _text(row, "text", where)}
    if "choices" not in row:
        hint = (" (this looks like Alpaca: --columns prompt=instruction+input,completion=output)"
                if {"instruction", "output"} <= set(row) else " (or name your columns with --columns FIELD=COLUMN)")
        raise DatasetError(f"{where}: a row needs 'text', 'prompt' + 'completion', 'messages', or 'prompt' + "
                           f"'choices' + 'label'; this one has {sorted(row)}{hint}")
    missing = [k for k in ("prompt", "label") if k not in row]
    if missing:
        raise DatasetError(f"{where}: a multiple-choice row needs 'prompt', 'choices' and 'label'; missing {missing}")
    choices, label = row["choices"], row["label"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DatasetError(f"{where}: 'choices' must be a list of at least 2 strings")
    if not isinstance(label, int) or not 0 <= label < len(choices):
        raise DatasetError(f"{where}: 'label' must be an index into 'choices' (0..{len(choices) - 1}), got {label!r}")
    return {"prompt": str(row["prompt"]), "choices": choices, "label": label}


def _read_rows(path: Path, columns: dict[str, str] | None = None) -> list[dict]:
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
        rows.append(_check_row(obj, f"{path}:{i}", columns))
    return rows


def _bucket(row: dict) -> int:
    """0-9 from a hash of the row: a row's split never depends on order or on the other rows."""
    return int(hashlib.sha1(json.dumps(row, sort_keys=True).encode()).hexdigest()[:8], 16) % 10


def _carve(rows: list[dict], bucket: int) -> tuple[list[dict], list[dict]]:
    """(rows outside ``bucket``, rows in it): a stable 10% held out of ``rows``."""
    return [r for r in rows if _bucket(r) != bucket], [r for r in rows if _bucket(r) == bucket]


def load_task(source: str | Path, columns: str | Mapping[str, str] | None = None) -> Task:
    """Load a dataset from a directory, a file, or a hub name (its columns renamed by ``columns``, see
    ``parse_columns``); errors name the problem and the fix."""
    columns = parse_columns(columns)
    path = Path(source).expanduser()
    if path.is_dir():
        files = {n: path / f"{n}.jsonl" for n in ("train", "validation", "test")}
        if not files["train"].is_file() or not files["test"].is_file():
            raise DatasetError(
                f"dataset directory {path} needs train.jsonl and test.jsonl (validation.jsonl is optional: "
                f"without it 10% of train is held out for validation)"
            )
        split = {n: _read_rows(f, columns) if f.is_file() else None for n, f in files.items()}
    elif path.is_file():
        if path.suffix not in (".jsonl", ".txt"):
            raise DatasetError(f"dataset file {path} must be .jsonl (rows as JSON objects) or .txt (paragraphs)")
        rest, test = _carve(_read_rows(path, columns), bucket=0)
        split = {"train": rest, "validation": None, "test": test}
    elif str(source).startswith((".", "/", "~")) or path.suffix:
        raise DatasetError(f"dataset {source!r} not found: give a directory, a .jsonl/.txt file, or 'embedded'")
    else:
        split = _from_hub(str(source), columns)
    train, validation, test = split["train"], split["validation"], split["test"]
    if validation is None:
        train, validation = _carve(train, bucket=1)
    sizes = f"{len(train)} train / {len(validation)} validation / {len(test)} test rows"
    if len(train) < MIN_TRAIN_ROWS or min(len(validation), len(test)) < MIN_TEST_ROWS:
        raise DatasetError(
            f"dataset {source!r} is too small: {sizes}; need at least {MIN_TRAIN_ROWS} train and "
            f"{MIN_TEST_ROWS} validation and test rows"
        )
    first: dict[str, str] = {}
    for name, rows in (("train", train), ("validation", validation), ("test", test)):
        for i, r in enumerate(rows):
            first.setdefault(row_kind(r), f"{name} row {i}")
    if len(first) > 1:
        found = ", ".join(f"{k!r} (first at {w})" for k, w in first.items())
        raise DatasetError(f"dataset {source!r} mixes row kinds: {found}; a dataset has one kind of row: "
                           f"convert or split it")
    return Task(str(source), tuple(train), tuple(validation), tuple(test))


def _from_hub(name: str, columns: dict[str, str]) -> dict[str, list[dict] | None]:
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
    rows = {s: [_check_row(dict(r), f"{name}[{s}][{i}]", columns) for i, r in enumerate(ds[s])] if s in ds else None
            for s in ("train", "validation", "test")}
    if rows["test"] is None:  # only train + validation: the test split is carved from train
        rows["train"], rows["test"] = _carve(rows["train"], bucket=0)
    return rows


# ---- tokens -------------------------------------------------------------------------------------


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def check_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError("this dataset has 'messages' rows, and the model's tokenizer has no chat template to render "
                           "them with: use a model that ships one (e.g. smollm2-135m, an instruct model), add "
                           "'chat_template' to its tokenizer_config.json, or convert the rows to prompt/completion")


def chat_ids(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(ids, mask) of a conversation rendered with the tokenizer's chat template, mask True on the assistant
    turns: each one's content and end-of-turn marker, what the template adds after the generation prompt.

    Each assistant turn's span is found by rendering the conversation up to it with the generation prompt, and
    up to and including it: the difference is what the model must generate. Templates whose prefixes do not
    render as prefixes of the whole are refused."""
    check_chat_template(tokenizer)
    text = _render(tokenizer, messages)
    spans = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = _render(tokenizer, messages[:j], True), _render(tokenizer, messages[: j + 1])
        if not (text.startswith(before) and text.startswith(upto) and upto.startswith(before)):
            raise DatasetError("the model's chat template does not render a conversation's beginning as the "
                               "beginning of the whole (it cannot mask assistant turns): convert the rows to "
                               "prompt/completion")
        spans.append((len(before), len(upto.rstrip())))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [e > s and any(a <= s < b for a, b in spans) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def example(tokenizer, row: dict, answer_only: bool = False) -> tuple[list[int], list[bool]]:
    """(ids, mask) of one training row, EOS-terminated; mask True where a token is trained on.

    Text rows train on every token; prompt/completion rows on the completion; conversations on the assistant
    turns; multiple-choice rows on ``prompt + answer`` (on the answer only with ``answer_only``)."""
    kind = row_kind(row)
    if kind == "messages":
        return chat_ids(tokenizer, row["messages"])
    eos = [tokenizer.eos_token_id]
    if kind == "text":
        ids = _ids(tokenizer, row["text"]) + eos
        return ids, [True] * len(ids)
    prompt = _ids(tokenizer, row["prompt"])
    target = _ids(tokenizer, row["completion"] if kind == "completion" else row["choices"][row["label"]]) + eos
    masked = kind == "completion" or answer_only
    return prompt + target, [not masked] * len(prompt) + [True] * len(target)


def _examples(task: Task, tokenizer, split: str, answer_only: bool,
              n_rows: int | None = None) -> tuple[tuple[list[int], list[bool]], ...]:
    """The first ``n_rows`` rows of ``split`` (all by default), tokenized once per (task, tokenizer, count) in a
    process; all rows, by count or by default, are one entry (``check_task`` and a whole-split fine-tune share it)."""
    total = len(getattr(task, split))
    return _tokenized(task, tokenizer, split, answer_only, total if n_rows is None else min(n_rows, total))


@lru_cache(maxsize=8)
def _tokenized(task: Task, tokenizer, split: str, answer_only: bool,
               n_rows: int) -> tuple[tuple[list[int], list[bool]], ...]:
    return tuple(example(tokenizer, r, answer_only) for r in getattr(task, split)[:n_rows])


def masked(task: Task, answer_only: bool = False) -> bool:
    """Whether training computes the loss on part of each row only (completions, conversations, multiple choice
    with ``answer_only``): such rows are packed whole and the LM head runs at the trained positions alone."""
    return task.kind in ("completion", "messages") or (answer_only and task.kind == "choice")


def _target_len(mask: list[bool]) -> int:
    """Tokens from the first trained token of the last trained span to the end: what a window must keep."""
    last = max((i for i, m in enumerate(mask) if m), default=-1)
    start = last
    while start > 0 and mask[start - 1]:
        start -= 1
    return len(mask) - start if last >= 0 else 0


def check_task(task: Task, tokenizer, seq_len: int, answer_only: bool = False) -> None:
    """Refuse, before any fine-tune, rows whose target cannot be trained or scored in ``seq_len`` tokens.

    A row longer than ``seq_len`` loses its prompt from the left; its completion (a conversation's last assistant
    turn) must fit with one token before it. Text rows are split across blocks, multiple-choice rows keep their
    answer's beginning: neither is refused."""
    if task.kind == "messages":
        check_chat_template(tokenizer)
    if task.kind not in ("completion", "messages"):
        return
    for split in ("train", *SPLITS):
        long = [(i, _target_len(m)) for i, (_, m) in enumerate(_examples(task, tokenizer, split, answer_only))
                if _target_len(m) > seq_len - 1]
        if long:
            i, n = long[0]
            what = "completion" if task.kind == "completion" else "last assistant turn"
            raise DatasetError(
                f"dataset {task.name!r}: {split} row {i}'s {what} is {n} tokens (with EOS), and {len(long)} "
                f"{split} row(s) in all do not fit the training length seq_len={seq_len} with one prompt token "
                f"before them: shorten or drop those rows, or raise seq_len (every rung's and the export's)")


@dataclass(frozen=True)
class Blocks:
    """Training sequences [n, seq_len] and their labels (``IGNORE`` where nothing is trained; None: every
    token is a label, the plain language-modelling loss)."""

    ids: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx) -> "Blocks":
        return Blocks(self.ids[idx], None if self.labels is None else self.labels[idx])

    def inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of a causal LM's forward that return its training loss."""
        return {"input_ids": self.ids, "labels": self.ids if self.labels is None else self.labels}


def pad_id(tokenizer) -> int:
    """The token that fills a row to its batch's width (never trained or scored): pad, else EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def train_blocks(task: Task, tokenizer, seq_len: int, fraction: float, answer_only: bool = False) -> Blocks:
    """The first ``fraction`` of the training rows as [n, seq_len] blocks.

    Rows trained on every token are concatenated (EOS between rows) and cut into blocks, as language
    modelling does. Rows with a loss mask are packed whole, in order, as many as fit per block (the rest of a
    block padded and ignored), so a completion is never split from its prompt; a row longer than ``seq_len``
    keeps its last ``seq_len`` tokens (``check_task`` makes sure its completion is among them)."""
    n_rows = max(1, int(len(task.train) * fraction))
    rows = _examples(task, tokenizer, "train", answer_only, n_rows)
    if all(all(m) for _, m in rows):
        stream = [t for ids, _ in rows for t in ids]
        n = len(stream) // seq_len
        if n == 0:
            raise DatasetError(f"{n_rows} training rows give fewer than {seq_len} tokens; use more data or a shorter "
                               f"seq_len")
        return Blocks(torch.tensor(stream[: n * seq_len]).view(n, seq_len))
    pad = pad_id(tokenizer)
    blocks: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for row_ids, mask in rows:
        row_ids, mask = row_ids[-seq_len:], mask[-seq_len:]
        if len(ids) + len(row_ids) > seq_len:
            blocks.append((ids, labels))
            ids, labels = [], []
        ids += row_ids
        labels += [t if m else IGNORE for t, m in zip(row_ids, mask)]
    blocks.append((ids, labels))
    return Blocks(torch.tensor([b + [pad] * (seq_len - len(b)) for b, _ in blocks]),
                  torch.tensor([lab + [IGNORE] * (seq_len - len(lab)) for _, lab in blocks]))


def batches(blocks: Blocks, steps: int, batch_size: int, seed: int) -> list[Blocks]:
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


def loss_tokens(blocks: Blocks, batch_size: int) -> int:
    """The most positions one training batch computes logits for: every position of plain language modelling,
    else the ``batch_size`` blocks with the most trained tokens (what the memory model charges the head)."""
    if blocks.labels is None:
        return batch_size * blocks.ids.shape[1]
    per = (blocks.labels[:, 1:] != IGNORE).sum(1).sort(descending=True).values
    return int(per[:batch_size].sum())


@dataclass(frozen=True)
class EvalSet:
    """Padded sequences to score: for each example, one row per choice (one row for the other kinds)."""

    input_ids: torch.Tensor  # [n_rows, T]
    target_mask: torch.Tensor  # [n_rows, T] True where a token is scored (predicted from the previous one)
    example: torch.Tensor  # [n_rows] which example a row belongs to
    correct: torch.Tensor  # [n_rows] True for the row whose loss counts (the labelled choice / the only row)
    labelled: bool
    max_len: int  # the longest a row may be (the rung's seq_len): the width the memory model charges scoring

    @property
    def lengths(self) -> torch.Tensor:
        """[n_rows] each row up to its last scored token: what must run through the model (padding never does)."""
        return self.target_mask.long().cumsum(1).argmax(1) + 1


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
    """The first ``n_examples`` rows of a held-out split, tokenized for scoring (at most ``max_len`` tokens each):
    a choice row's every option, a completion with its EOS, a conversation's assistant turns, a text."""
    if max_len < 2:
        raise DatasetError(f"cannot score sequences of {max_len} token(s): seq_len must be at least 2")
    eos = tokenizer.eos_token_id
    seqs, masks, example, correct = [], [], [], []
    for i, row in enumerate(task.held_out(split)[:n_examples]):
        kind = row_kind(row)
        if kind == "messages":
            ids, mask = chat_ids(tokenizer, row["messages"])
            windows = [(ids[-max_len:], [False] + mask[-max_len:][1:])]  # cut from the left, as in training
        else:
            prompt = _ids(tokenizer, row["prompt"]) if kind in ("choice", "completion") else []
            options = row["choices"] if kind == "choice" else [row[kind]]  # a completion's or a text's own field
            tail = [eos] if kind == "completion" else []
            windows = []
            for option in options:
                ids, n_ctx = fit_window([eos] + prompt, _ids(tokenizer, option) + tail, max_len)
                windows.append((ids, [False] * n_ctx + [True] * (len(ids) - n_ctx)))
        for j, (ids, mask) in enumerate(windows):
            seqs.append(ids)
            masks.append(mask)
            example.append(i)
            correct.append(kind != "choice" or j == row["label"])
    width = max(map(len, seqs))
    pad = pad_id(tokenizer)
    return EvalSet(
        input_ids=torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
        target_mask=torch.tensor([m + [False] * (width - len(m)) for m in masks]),
        example=torch.tensor(example),
        correct=torch.tensor(correct),
        labelled=task.labelled,
        max_len=max_len,
    )
