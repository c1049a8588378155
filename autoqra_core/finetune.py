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

from .data import IGNORE, Blocks, Task, batches, eval_set, train_blocks
from .device import fp32_matmuls, model_device, model_dtype, release
from .errors import CandidateFailed
from .evaluation import Evaluation
from .fidelity import Fidelity
from .memory import format_bytes, score_rows
from .model import LayerMap
from .packed import PackedCache
from .quantize import QuantSettings
from .scoring import exact_split, score
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
