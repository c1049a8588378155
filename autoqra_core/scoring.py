"""Scoring a held-out set: the loss of the correct continuations and multiple-choice accuracy, fast.

The LM head (the vocabulary-sized matmul) runs only where a token is scored, the model's body runs on many rows
at a time while the head's logits stay training-sized, and the choices of a question run their common prompt
once (``share_prompts``). Each speed-up is used only where it reproduces the plain forward, checked on the
first batch (``exact_split``, ``_shared_nll``); ``score`` falls back to whole rows otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .data import EvalSet
from .device import model_device, model_dtype
from .errors import CandidateFailed
from .memory import SCORE_BATCH_SIZE


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder body, LM head) of a causal LM (a peft model's base included), or None where that split is not
    at hand. Whether logits are exactly ``head(body(x))`` (no softcapping or scaling) is checked by ``score``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, getattr(base, "base_model_prefix", "") or "_", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return (body, head) if isinstance(body, nn.Module) and isinstance(head, nn.Module) else None


@torch.no_grad()
def exact_split(model: nn.Module, ids: torch.Tensor) -> tuple[nn.Module, nn.Module] | None:
    """(body, head) where ``head(body(ids))`` reproduces the model's own logits on ``ids`` (no softcapping or
    scaling on top), else None: what lets the head run only at the positions that count."""
    split = _body_and_head(model)
    if split is None:
        return None
    whole = model(input_ids=ids).logits.float()
    parts = split[1](split[0](input_ids=ids).last_hidden_state).float()
    return split if torch.allclose(whole, parts, rtol=1e-4, atol=1e-4) else None


def _scored_nll(hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, head: nn.Module,
                chunk: int) -> torch.Tensor:
    """Per-row summed NLL of the scored tokens, the LM head run only where a token is scored.

    Prompt and padding positions are never scored, so the head (the vocabulary-sized matmul and softmax)
    skips them. ``chunk`` positions at a time: no more logits than a training batch's."""
    pos = mask.to(hidden.device)  # [rows, width-1]: position t predicts token t+1
    h, target = hidden[:, :-1][pos], ids[:, 1:][pos]
    row = pos.nonzero()[:, 0].cpu()
    nll = torch.empty(len(target))
    for k in range(0, len(target), chunk):
        logits = head(h[k : k + chunk]).float()
        nll[k : k + chunk] = torch.nn.functional.cross_entropy(logits, target[k : k + chunk], reduction="none").cpu()
    return torch.zeros(len(ids)).index_add_(0, row, nll)


# Nats per scored token a packed row may differ from the row alone in bf16/fp16: above the rounding of any change
# of batch shape, far below what choices that see each other give (bench/results/scoring-smollm2-addition.md).
SHARED_TOL_16BIT = 0.25


@dataclass(frozen=True)
class SharedPrompts:
    """Scoring rows packed so that each prompt runs once: a packed row holds a question's prompt, then each of
    its choices, every choice attending to the prompt and to itself only (block-causal) at positions that restart
    after the prompt, so each choice sees what its own row shows it (prefix sharing, as in DPO trainers)."""

    ids: torch.Tensor  # [packed, L] right-padded
    positions: torch.Tensor  # [packed, L] position ids
    segment: torch.Tensor  # [packed, L] 0: the prompt, r + 1: scoring row r's tokens, -1: padding
    group: torch.Tensor  # [rows] the packed row holding each scoring row
    source: torch.Tensor  # [rows, T] where each position of a scoring row sits in its packed row


def block_mask(segment: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask [rows, 1, L, L] of packed ``segment`` ids: causal, a choice sees the prompt
    (segment 0) and itself, padding (-1) sees itself only."""
    width = segment.shape[1]
    key, query = segment[:, None, :], segment[:, :, None]
    sees = torch.ones(width, width, dtype=torch.bool).tril() & (key >= 0) & ((key == 0) | (key == query))
    sees |= torch.eye(width, dtype=torch.bool)
    return torch.zeros(sees.shape, dtype=dtype).masked_fill_(~sees, torch.finfo(dtype).min)[:, None]


def share_prompts(ev: EvalSet, max_tokens: int) -> SharedPrompts | None:
    """``ev``'s rows packed by shared prompt (the tokens before a row's first scored one, within one question), at
    most ``max_tokens`` per packed row; None where that saves under a tenth of the tokens (one row per question:
    completions, chats, texts)."""
    first, lengths = ev.target_mask.long().argmax(1), ev.lengths
    packed: list[tuple[list[int], list[int], list[int]]] = []  # (ids, segment, positions)
    open_rows: dict[tuple, int] = {}
    group = torch.zeros(len(first), dtype=torch.long)
    source = torch.zeros_like(ev.input_ids)
    for r in range(len(first)):
        p, n = int(first[r]), int(lengths[r])
        key = (int(ev.example[r]), tuple(ev.input_ids[r, :p].tolist()))
        g = open_rows.get(key)
        if g is None or len(packed[g][0]) + n - p > max_tokens:
            g = open_rows[key] = len(packed)
            packed.append((list(key[1]), [0] * p, list(range(p))))
        ids, seg, pos = packed[g]
        group[r] = g
        source[r, :p] = torch.arange(p)
        source[r, p:n] = torch.arange(len(ids), len(ids) + n - p)
        ids += ev.input_ids[r, p:n].tolist()
        seg += [r + 1] * (n - p)
        pos += range(p, n)
    if sum(len(ids) for ids, _, _ in packed) > 0.9 * int(lengths.sum()):
        return None
    width = max(len(ids) for ids, _, _ in packed)
    return SharedPrompts(
        ids=torch.tensor([ids + [0] * (width - len(ids)) for ids, _, _ in packed]),  # padding: any token id
        positions=torch.tensor([pos + [0] * (width - len(pos)) for _, _, pos in packed]),
        segment=torch.tensor([seg + [-1] * (width - len(seg)) for _, seg, _ in packed]),
        group=group,
        source=source,
    )


def _by_length(ev: EvalSet, rows_per_batch: int, device) -> Iterator[tuple[torch.Tensor, int, torch.Tensor]]:
    """(rows, width, their token ids cut to that width on ``device``), batches of rows of similar length: little
    compute spent on padding."""
    order = torch.argsort(ev.lengths)
    for i in range(0, len(order), rows_per_batch):
        rows = order[i : i + rows_per_batch]
        width = int(ev.lengths[rows].max())
        yield rows, width, ev.input_ids[rows, :width].to(device)


def _split_nll(split: tuple[nn.Module, nn.Module], ev: EvalSet, body_rows: int, chunk_rows: int) -> torch.Tensor:
    """Per-row summed NLL, each row run whole through the body, ``body_rows`` rows of similar length per forward."""
    body, head = split
    nll_sum = torch.zeros(len(ev.input_ids))
    for rows, width, ids in _by_length(ev, body_rows, model_device(body)):
        nll_sum[rows] = _scored_nll(body(input_ids=ids).last_hidden_state, ids, ev.target_mask[rows, 1:width],
                                    head, chunk_rows * width)
    return nll_sum


def _shared_nll(split: tuple[nn.Module, nn.Module], ev: EvalSet, shared: SharedPrompts, body_rows: int,
                chunk_rows: int, tol: float) -> torch.Tensor | None:
    """Per-row summed NLL with each prompt run once (``shared``), or None when the first batch's first rows differ
    from the same rows run alone by more than ``tol`` nats per token (a model that ignores a custom 4D mask or
    position ids is then scored the plain way)."""
    body, head = split
    device, lengths = model_device(body), ev.lengths
    dtype = model_dtype(body)
    sizes = (shared.segment >= 0).sum(1)
    order = torch.argsort(sizes)
    local = torch.full((len(sizes),), -1)  # packed row -> its index in the current batch
    nll_sum = torch.zeros(len(ev.input_ids))
    for k in range(0, len(order), body_rows):
        idx = order[k : k + body_rows]
        width = int(sizes[idx].max())
        hidden = body(input_ids=shared.ids[idx, :width].to(device),
                      position_ids=shared.positions[idx, :width].to(device),
                      attention_mask=block_mask(shared.segment[idx, :width], dtype).to(device)).last_hidden_state
        local[idx] = torch.arange(len(idx))
        rows = (local[shared.group] >= 0).nonzero()[:, 0]
        w = int(lengths[rows].max())
        ids, mask = ev.input_ids[rows, :w].to(device), ev.target_mask[rows, 1:w]
        gathered = hidden[local[shared.group[rows]][:, None].to(device), shared.source[rows, :w].to(device)]
        local[idx] = -1
        nll_sum[rows] = _scored_nll(gathered, ids, mask, head, chunk_rows * w)
        if k == 0:  # the check: the first ``chunk_rows`` rows, each run alone
            ids, mask, rows = ids[:chunk_rows], mask[:chunk_rows], rows[:chunk_rows]
            alone = _scored_nll(body(input_ids=ids).last_hidden_state, ids, mask, head, chunk_rows * w)
            per_token = mask.sum(1).clamp(min=1)
            if not torch.allclose(nll_sum[rows] / per_token, alone / per_token, rtol=0.0, atol=tol):
                return None
    return nll_sum


@torch.no_grad()
def score(model: nn.Module, ev: EvalSet, batch_size: int = SCORE_BATCH_SIZE,
          body_rows: int | None = None, share: bool = True) -> tuple[float, float | None]:
    """(held-out loss of the correct continuations, accuracy or None for unlabelled tasks).

    With ``body_rows`` the model's body runs on ``body_rows`` rows at a time and the LM head on ``batch_size``
    rows: the vocabulary-sized logits, the part that grows with rows, stay training-sized while the body runs
    in large batches (faster per row on a CPU: bench/results/scoring-smollm2-addition.md), and the head runs only
    on the positions that are scored. The body/head split is used only where it
    reproduces the full forward (checked on the first batch). With ``share``, choices of a question run their
    common prompt once (``share_prompts``), checked the same way; without ``body_rows``, every row runs whole."""
    model.eval()
    device = model_device(model)
    n_tok = ev.target_mask[:, 1:].sum(1).clamp(min=1)
    lengths = ev.lengths
    order = torch.argsort(lengths)  # batches of similar length: little compute spent on padding
    split = None
    if body_rows and body_rows > batch_size:  # the split must give the model's own logits
        split = exact_split(model, ev.input_ids[order[:2], : int(lengths[order[:2]].max())].to(device))
    if split is not None:
        # packed rows no wider than a row may be: the body's shapes stay within what memory.score_rows charges
        shared = share_prompts(ev, ev.max_len) if share else None
        tol = 1e-4 if model_dtype(split[0]) == torch.float32 else SHARED_TOL_16BIT
        try:
            nll = None if shared is None else _shared_nll(split, ev, shared, body_rows, batch_size, tol)
        except TypeError:  # a body that takes no position ids
            nll = None
        nll_sum = nll if nll is not None else _split_nll(split, ev, body_rows, batch_size)
    else:
        nll_sum = _whole_nll(model, ev, batch_size)
    if not torch.isfinite(nll_sum).all():
        raise CandidateFailed("diverged: non-finite held-out loss")
    correct = ev.correct
    loss = (nll_sum[correct].sum() / n_tok[correct].sum()).item()
    return loss, (accuracy(ev, -(nll_sum / n_tok)) if ev.labelled else None)


def _whole_nll(model: nn.Module, ev: EvalSet, batch_size: int) -> torch.Tensor:
    """Per-row summed NLL of the scored tokens, each row run whole, ``batch_size`` rows of similar length at a time."""
    nll_sum = torch.zeros(len(ev.input_ids))
    for rows, width, ids in _by_length(ev, batch_size, model_device(model)):
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").cpu()
        del logits
        nll_sum[rows] = (nll * ev.target_mask[rows, 1:width]).sum(1)
    return nll_sum


def accuracy(ev: EvalSet, mean_ll: torch.Tensor) -> float:
    """Multiple-choice accuracy from each row's mean log-likelihood per scored token: a question is right when its
    correct choice scores highest."""
    n_ex = int(ev.example.max()) + 1
    best = torch.full((n_ex,), -math.inf)
    best = best.scatter_reduce(0, ev.example, mean_ll, reduce="amax")
    top = torch.isclose(mean_ll, best[ev.example], rtol=1e-6, atol=0.0).float()  # equal to float32's rounding
    ties = torch.zeros(n_ex).index_add_(0, ev.example, top)  # choices sharing the best score
    # a k-way tie earns 1/k (the expected accuracy of breaking it at random): in bf16 compute, choices that
    # differ in one token often score exactly alike, and counting every tie as a hit inflates accuracy
    return (top * ev.correct / ties[ev.example]).sum().item() / n_ex
