"""Build one configuration (quantized base + per-layer LoRA), fine-tune it, score it.

This is the expensive ``evaluate(config, fidelity)`` the search calls. LoRA ranks
per layer go through peft's ``rank_pattern``/``alpha_pattern``, keyed by the
*escaped full module name* (peft matches keys as regexes against the end of module
names; a key like ``layers.1.`` would silently match nothing). Rank 0 leaves the
layer's modules out of ``target_modules``.
"""

from __future__ import annotations

import math
import re
import threading
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .data import IGNORE, Blocks, EvalSet, Task, batches, eval_set, train_blocks
from .device import fp32_matmuls, model_device, model_dtype, release
from .errors import CandidateFailed
from .evaluation import Evaluation
from .fidelity import Fidelity
from .memory import SCORE_BATCH_SIZE, format_bytes, score_rows
from .model import LayerMap
from .packed import PackedCache
from .quantize import QuantSettings
from .space import Config


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 5
    alpha_ratio: float = 2.0  # lora_alpha = alpha_ratio * rank, so the update scale is the same at every rank
    dropout: float = 0.0
    max_grad_norm: float = 1.0
    grad_checkpointing: bool = False
    answer_only: bool = False  # multiple-choice rows: loss on the answer only (completions and chats always)
    schedule: str = "cosine"  # "cosine" | "wsd" (warmup-stable-decay), over the whole fine-tune
    decay_fraction: float = 0.2  # wsd: the last share of the run over which the rate falls to 0
    seed: int = 0


def lora_config(config: Config, lmap: LayerMap, t: TrainSettings = TrainSettings()):
    """peft LoraConfig with one rank per layer; None when no layer gets an adapter."""
    from peft import LoraConfig

    ranks = {m: c.rank for c, (_, mods) in zip(config.layers, lmap.layers) for m in mods if c.rank > 0}
    if not ranks:
        return None
    default = max(ranks.values())
    return LoraConfig(
        r=default,
        lora_alpha=t.alpha_ratio * default,
        lora_dropout=t.dropout,
        target_modules=sorted(ranks),
        rank_pattern={re.escape(m): r for m, r in ranks.items()},
        alpha_pattern={re.escape(m): t.alpha_ratio * r for m, r in ranks.items()},
        bias="none",
        task_type="CAUSAL_LM",
    )


# peft asks transformers a deprecated question on every get_peft_model; it is not ours to answer.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

_SEEDED = threading.Lock()  # LoRA init draws from torch's global RNG: one seeded build at a time per process


def build(base: nn.Module, config: Config, lmap: LayerMap, q: QuantSettings, t: TrainSettings,
          cache: PackedCache | None = None) -> nn.Module:
    """``base`` quantized per layer on ``q.device``, with per-layer LoRA adapters attached; ``base`` is untouched.

    Packed modules come from ``cache`` (the worker's, shared by every candidate); without one, a
    cache used once: the same code path, so a cached build is the same model as a fresh one.
    """
    from peft import get_peft_model

    model = (cache or PackedCache(base)).assemble(config, lmap, q)
    lcfg = lora_config(config, lmap, t)
    if lcfg is None:
        return model
    with _SEEDED:
        torch.manual_seed(t.seed)  # same LoRA init for the same config and seed, whatever ran before
        model = get_peft_model(model, lcfg)
    if t.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def make_optimizer(model: nn.Module, t: TrainSettings) -> torch.optim.Optimizer | None:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay) if params else None


def learning_rate(step: int, total: int, t: TrainSettings) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a ``total``-step run: linear warmup, then cosine
    decay to 0 over the whole run, or (``wsd``) constant until the last ``decay_fraction`` and linear to 0 there.
    The schedule spans the whole run, so its first steps are the same whatever rung they are seen at."""
    warm = min(1.0, (step + 1) / max(1, t.warmup_steps))
    if t.schedule == "wsd":
        start = total * (1 - t.decay_fraction)
        return t.lr * warm * (1.0 if step < start else max(0.0, (total - step) / max(1.0, total - start)))
    return t.lr * warm * 0.5 * (1 + math.cos(math.pi * step / total))


def masked_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                split: tuple[nn.Module, nn.Module] | None) -> torch.Tensor:
    """The mean next-token loss over the labelled positions (transformers' causal-LM loss), the LM head run only
    at those positions when the model splits into body and head (``split``)."""
    target = labels[:, 1:]
    pos = target != IGNORE
    if split is None:
        logits = model(input_ids=ids).logits[:, :-1][pos]
    else:
        logits = split[1](split[0](input_ids=ids).last_hidden_state[:, :-1][pos])
    return torch.nn.functional.cross_entropy(logits.float(), target[pos])


@dataclass
class Checkpoint:
    """A run stopped after ``step`` optimizer steps, with everything that continuing it needs: the adapter, AdamW's
    state and the RNG. The data order is the seed's (``data.batches``) and the schedule a function of the step, so
    the step is their position. A checkpoint continued gives the same adapter as the run that never stopped."""

    step: int
    adapter: dict[str, torch.Tensor]  # trainable parameters by name (CPU copies)
    optimizer: dict | None  # AdamW's state_dict (CPU copies); None without trainable parameters
    rng: dict[str, torch.Tensor] | None  # torch's RNG states ("cpu", "cuda") where dropout draws; None without
    losses: list[float]  # the training loss of every step so far

    @property
    def train_loss(self) -> float | None:
        """The mean training loss of the last five steps (None before any step)."""
        return sum(self.losses[-5:]) / len(self.losses[-5:]) if self.losses else None


def _cpu(x):
    """``x`` with every tensor in it copied to the CPU (a checkpoint outlives the model and its device)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's RNG states that dropout on ``device`` draws from (the CPU's, and that GPU's)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    with _SEEDED:  # not between another build's seeding and its LoRA init
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], device)


def restore(model: nn.Module, ckpt: Checkpoint) -> None:
    """Load ``ckpt``'s adapter into ``model`` (built for the same configuration), in place."""
    params = dict(model.named_parameters())
    missing = sorted(set(ckpt.adapter) - set(params))
    if missing:
        raise ValueError(f"checkpoint holds {len(missing)} parameters this model lacks, e.g. {missing[0]}: "
                         f"it belongs to another configuration")
    with torch.no_grad():
        for name, value in ckpt.adapter.items():
            params[name].copy_(value)


def train(model: nn.Module, data: list[Blocks | torch.Tensor], t: TrainSettings, progress=None,
          total: int | None = None, start: Checkpoint | None = None) -> Checkpoint:
    """AdamW over ``data[start.step:]`` (``data``: the run's batches from its first step), the learning rate
    scheduled over ``total`` steps (default: ``len(data)``); continues from ``start`` when given (its adapter, optimizer
    state and RNG). Raises CandidateFailed on a non-finite loss or OOM.

    Batches with labels (rows with a loss mask) compute logits only where a token is trained on. With dropout, the
    RNG is torch's global one: exact continuation then needs one training thread per process."""
    total = total or len(data)
    opt = make_optimizer(model, t)
    device = model_device(model)
    first = start.step if start else 0
    losses = list(start.losses) if start else []
    if start is not None:
        restore(model, start)
        if opt is not None and start.optimizer is not None:
            opt.load_state_dict(start.optimizer)
        if start.rng is not None:
            _set_rng_state(start.rng, device)
    if opt is not None:
        model.train()
        split: tuple | None | bool = False  # (body, head), None (no exact split), or False: not checked yet
        for step in range(first, len(data)):
            x = data[step] if isinstance(data[step], Blocks) else Blocks(data[step])
            ids = x.ids.to(device, non_blocking=True)
            labels = None if x.labels is None else x.labels.to(device, non_blocking=True)
            if labels is not None and split is False:
                split = exact_split(model, ids[:2])
            for g in opt.param_groups:
                g["lr"] = learning_rate(step, total, t)
            try:
                loss = (model(input_ids=ids, labels=ids).loss if labels is None
                        else masked_loss(model, ids, labels, split))
                if not torch.isfinite(loss):
                    raise CandidateFailed(f"diverged: loss is {loss.item()} at step {step}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], t.max_grad_norm)
                opt.step()
            except torch.OutOfMemoryError as e:
                raise CandidateFailed(f"out of memory at step {step}: {str(e).splitlines()[0]}") from None
            losses.append(loss.item())
            if progress:
                progress(step + 1, total, losses[-1])
    return Checkpoint(step=max(first, len(data)),
                      adapter={n: _cpu(p) for n, p in model.named_parameters() if p.requires_grad},
                      optimizer=_cpu(opt.state_dict()) if opt is not None else None,
                      rng=_rng_state(device) if t.dropout > 0 else None, losses=losses)


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
    skips them; on the embedded WordNet task that is ~30 % of positions (300 questions: 4.5 -> 4.0 s).
    ``chunk`` positions at a time: no more logits than a training batch's."""
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


def _split_nll(split: tuple[nn.Module, nn.Module], ev: EvalSet, body_rows: int, chunk_rows: int) -> torch.Tensor:
    """Per-row summed NLL, each row run whole through the body, ``body_rows`` rows of similar length per forward."""
    body, head = split
    device, lengths = model_device(body), ev.lengths
    order = torch.argsort(lengths)  # batches of similar length: little compute spent on padding
    nll_sum = torch.zeros(len(ev.input_ids))
    for i in range(0, len(order), body_rows):
        rows = order[i : i + body_rows]
        width = int(lengths[rows].max())
        ids = ev.input_ids[rows, :width].to(device)
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
    in large batches (a forward per 8 rows is ~3x slower than per 64 on a CPU), and the head runs only on the
    positions that are scored. The body/head split is used only where it
    reproduces the full forward (checked on the first batch). With ``share``, choices of a question run their
    common prompt once (``share_prompts``), checked the same way; without ``body_rows``, every row runs whole."""
    model.eval()
    device = model_device(model)
    nll_sum = torch.zeros(len(ev.input_ids))
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
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            width = int(lengths[rows].max())
            ids = ev.input_ids[rows, :width].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").cpu()
            del logits
            nll_sum[rows] = (nll * ev.target_mask[rows, 1:width]).sum(1)
    if not torch.isfinite(nll_sum).all():
        raise CandidateFailed("diverged: non-finite held-out loss")
    correct = ev.correct
    loss = (nll_sum[correct].sum() / n_tok[correct].sum()).item()
    if not ev.labelled:
        return loss, None
    mean_ll = -(nll_sum / n_tok)
    n_ex = int(ev.example.max()) + 1
    best = torch.full((n_ex,), -math.inf)
    best = best.scatter_reduce(0, ev.example, mean_ll, reduce="amax")
    top = torch.isclose(mean_ll, best[ev.example], rtol=1e-6, atol=0.0).float()  # equal to float32's rounding
    ties = torch.zeros(n_ex).index_add_(0, ev.example, top)  # choices sharing the best score
    # a k-way tie earns 1/k (the expected accuracy of breaking it at random): in bf16 compute, choices that
    # differ in one token often score exactly alike, and counting every tie as a hit inflates accuracy
    return loss, (top * correct / ties[ev.example]).sum().item() / n_ex


def held_out(model: nn.Module, tokenizer, task: Task, fidelity: Fidelity,
             split: str = "validation") -> tuple[float, float | None]:
    """(loss, accuracy) of ``model`` on ``fidelity``'s rows of the held-out ``split``."""
    return score(model, eval_set(task, tokenizer, fidelity.eval_examples, fidelity.seq_len, split),
                 batch_size=fidelity.batch_size,  # training-sized logits: scoring never sets the peak
                 body_rows=score_rows(fidelity.batch_size, fidelity.seq_len))


def run_batches(task: Task, tokenizer, fidelity: Fidelity, t: TrainSettings) -> list[Blocks]:
    """The batches of a run up to ``fidelity``'s checkpoint, in the seed's order: a prefix of the whole run's."""
    blocks = train_blocks(task, tokenizer, fidelity.seq_len, fidelity.data_fraction, t.answer_only)
    return batches(blocks, fidelity.steps, fidelity.batch_size, seed=t.seed)


def fit(model: nn.Module, tokenizer, task: Task, fidelity: Fidelity, t: TrainSettings = TrainSettings(),
        progress=None, split: str | None = "validation",
        start: Checkpoint | None = None) -> tuple[Checkpoint, float | None, float | None]:
    """Fine-tune a built ``model`` up to ``fidelity``'s checkpoint (continuing ``start`` when given), then score it
    on the held-out ``split`` (None: not scored).

    The search scores ``validation``; only the test report scores ``test``. Returns (checkpoint, held-out loss,
    accuracy); 16-bit matrix products run in float32 on a CPU without bf16 units (``fp32_matmuls``). Raises
    CandidateFailed when a training step diverges or runs out of memory.
    """
    data = run_batches(task, tokenizer, fidelity, t)
    with fp32_matmuls(model_device(model), model_dtype(model)):
        ckpt = train(model, data, t, progress, total=fidelity.length, start=start)
        if split is None:
            return ckpt, None, None
        return (ckpt, *held_out(model, tokenizer, task, fidelity, split))


def _failed(config: Config, rung: int, memory_bytes: int, e: Exception, seconds: float, seed: int) -> Evaluation:
    """A failed Evaluation from a divergence or an out-of-memory error (with the bytes the memory model predicted,
    so a wrong prediction shows next to the error)."""
    reason = e.reason if isinstance(e, CandidateFailed) else f"out of memory: {str(e).splitlines()[0]}"
    if "out of memory" in reason:
        reason = f"{reason} (predicted {memory_bytes} bytes = {format_bytes(memory_bytes)})"
    return Evaluation(config, rung, math.inf, memory_bytes, status="failed", reason=reason, seconds=seconds, seed=seed)


def evaluate_config(*args, **kwargs) -> Evaluation:
    """``run_config``'s Evaluation alone: ``config`` built, fine-tuned up to ``fidelity``'s checkpoint and scored as
    the search sees it, failures (divergence, out of memory) included: they are results too."""
    return run_config(*args, **kwargs)[0]


def run_config(
    base: nn.Module,
    tokenizer,
    task: Task,
    lmap: LayerMap,
    config: Config,
    fidelity: Fidelity,
    rung: int,
    memory_bytes: int,
    q: QuantSettings = QuantSettings(),
    t: TrainSettings = TrainSettings(),
    progress=None,
    split: str | None = "validation",
    cache: PackedCache | None = None,
    start: Checkpoint | None = None,
) -> tuple[Evaluation, Checkpoint | None]:
    """``config`` built, fine-tuned up to ``fidelity``'s checkpoint (continuing ``start``'s, when given) and scored
    on ``split`` (``build``, ``fit``): the Evaluation, failures included, and the run's checkpoint (None when it
    failed); ``split`` None trains without scoring (the loss is then NaN). The candidate's memory is handed back
    before returning (``cache.trim``, ``device.release``)."""
    begin = time.perf_counter()
    try:
        ckpt, loss, acc = fit(build(base, config, lmap, q, t, cache), tokenizer, task, fidelity, t, progress, split,
                              start)
    except (CandidateFailed, torch.OutOfMemoryError) as e:
        return _failed(config, rung, memory_bytes, e, time.perf_counter() - begin, t.seed), None
    finally:
        if cache is not None:
            cache.trim()
        release(q.device)
    ev = Evaluation(config, rung, math.nan if loss is None else loss, memory_bytes, accuracy=acc,
                    train_loss=ckpt.train_loss, seconds=time.perf_counter() - begin, seed=t.seed)
    return ev, ckpt


def score_checkpoint(
    base: nn.Module,
    tokenizer,
    task: Task,
    lmap: LayerMap,
    config: Config,
    fidelity: Fidelity,
    rung: int,
    memory_bytes: int,
    ckpt: Checkpoint,
    q: QuantSettings = QuantSettings(),
    t: TrainSettings = TrainSettings(),
    split: str = "validation",
    cache: PackedCache | None = None,
) -> Evaluation:
    """``config`` rebuilt with ``ckpt``'s adapter and scored on ``split``: the Evaluation of the run ``ckpt`` is a
    checkpoint of, at ``fidelity`` (a failure of scoring, e.g. a non-finite loss, is a failed Evaluation)."""
    begin = time.perf_counter()
    try:
        model = build(base, config, lmap, q, t, cache)
        restore(model, ckpt)
        with fp32_matmuls(model_device(model), model_dtype(model)):
            loss, acc = held_out(model, tokenizer, task, fidelity, split)
    except (CandidateFailed, torch.OutOfMemoryError) as e:
        return _failed(config, rung, memory_bytes, e, time.perf_counter() - begin, t.seed)
    finally:
        if cache is not None:
            cache.trim()
        release(q.device)
    return Evaluation(config, rung, loss, memory_bytes, accuracy=acc, train_loss=ckpt.train_loss,
                      seconds=time.perf_counter() - begin, seed=t.seed)
