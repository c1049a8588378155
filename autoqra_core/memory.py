"""Memory model: bytes a configuration needs to fine-tune, without building it.

The search evaluates thousands of candidate configurations for feasibility, so
the cost must be a cheap closed form. Each term mirrors what the training
process really allocates (checked against tensor storage in tests and, on a GPU,
``torch.cuda.max_memory_allocated`` in bench/):

* quantized weights, packed as the backend packs them (HQQ: 2/4/8 bits in uint8,
  3 bits as 10 values per int32 word over groups);
* quantization metadata: one scale and one zero per group (HQQ), absmax per
  block (bitsandbytes NF4), a scale per row (bitsandbytes int8);
* parameters that stay unquantized: embeddings, norms, head, biases and layers
  at 16 bits (stored in the base dtype);
* LoRA A/B weights, their gradients and AdamW's two moments;
* activations saved for backward, for a (batch, seq_len) step, with or without
  gradient checkpointing;
* the logits: in the compute dtype, their fp32 upcast (on a 16-bit dtype), the fp32
  log-softmax autograd keeps and the fp32 gradient of the logits in backward, at every
  position of a step, or only at the trained ones for rows with a loss mask (``loss_tokens``:
  completions, conversations), where the head runs on those alone;
* the transient dequantized weight of a packed layer (one at a time, compute dtype);
* the scoring pass (``scoring.score``, no grad) as a separate peak: the model's body on
  ``score_rows`` rows (``SCORE_TOKENS`` tokens, at least one training batch), its LM head
  on training-sized batches, since with a 128k vocabulary fp32 logits alone are gigabytes.
  So scoring (no gradients, nothing saved) stays below the training step and the budget
  keeps paying for ranks; ``autoqra estimate --score-batch-size`` shows other body sizes.

The total is the peak of the two phases, ``max(training step, scoring)``: on a GPU,
what ``torch.cuda.max_memory_allocated`` reports. Not in it (reported apart by
``autoqra estimate`` and documented): the CUDA context (~0.3-0.6 GiB per process,
outside the allocator) and the caching allocator's slack (reserved minus allocated).
Byte sizes follow the compute dtype (``settings_for``): 2 bytes on CUDA (bf16),
4 on the CPU (fp32); LoRA weights, their gradients and AdamW's moments stay fp32.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

from .device import checkpointing_on, resolve
from .errors import BudgetError
from .fidelity import BATCH_SIZE, SEQ_LEN
from .space import UNQUANTIZED, Config, SearchSpace

GROUP_SIZE = 64  # HQQ's values per scale/zero group: the quantizer's and the memory model's default

SCORE_BATCH_SIZE = 64  # rows per scoring forward of a bare scoring.score call (fit scores in training batches)
SCORE_TOKENS = 4096  # tokens per forward of the model's body when a search scores (64 rows of 64 tokens)


def score_rows(batch_size: int, seq_len: int) -> int:
    """Rows per body forward when scoring: ``SCORE_TOKENS`` tokens' worth, at least one training batch, in whole
    batches (the LM head runs one training batch at a time)."""
    return max(1, SCORE_TOKENS // (seq_len * batch_size)) * batch_size
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PACKED = ("hqq", "bnb")  # backends that dequantize a weight per forward (sim keeps it dequantized)


@dataclass(frozen=True)
class LinearShape:
    name: str
    in_features: int
    out_features: int

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know of a model: its layers' linear modules and the rest."""

    layers: tuple[tuple[str, tuple[LinearShape, ...]], ...]
    other_params: int  # embeddings, norms, lm head, biases: never quantized, frozen
    hidden_size: int
    intermediate_size: int
    num_heads: int
    vocab_size: int
    num_blocks: int

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.layers)

    @property
    def linear_params(self) -> int:
        return sum(m.numel for _, mods in self.layers for m in mods)


@dataclass(frozen=True)
class MemorySettings:
    """Dtypes (bytes per value) and training shape. Defaults match CPU training in fp32 at a rung's default
    shape; ``settings_for`` derives them from a device and compute dtype (what the search and
    ``autoqra estimate`` both use)."""

    backend: str = "hqq"
    group_size: int = GROUP_SIZE
    meta_bytes: int = 4  # per HQQ scale/zero (the compute dtype)
    base_bytes: int = 4  # unquantized weights
    lora_bytes: int = 4  # adapter weights and their gradients
    optimizer_bytes: int = 8  # AdamW: two fp32 moments per trainable parameter
    act_bytes: int = 4
    batch_size: int = BATCH_SIZE
    seq_len: int = SEQ_LEN
    grad_checkpointing: bool = False
    score_batch_size: int | None = None  # rows per body forward when scoring; None: score_rows (as finetune.fit)
    loss_tokens: int | None = None  # positions a training step computes logits for (data.loss_tokens); None: all


def settings_for(device: str, backend: str, group_size: int, batch_size: int, seq_len: int,
                 grad_checkpointing: bool | None = None, dtype: str = "auto") -> MemorySettings:
    """The settings of a run on ``device`` ('cpu', 'cuda', 'cuda:N'): the one place dtypes become bytes.

    ``dtype`` 'auto' is resolved by ``device.resolve`` (for ``device``, present here or not); gradient
    checkpointing ``None`` is resolved by ``device.checkpointing_on`` (as the run's train settings).
    """
    device, dtype, backend = resolve(device, dtype, backend, present=False)
    if dtype not in DTYPE_BYTES:
        raise BudgetError(f"compute dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)} (or 'auto')")
    size = DTYPE_BYTES[dtype]
    return MemorySettings(backend=backend, group_size=group_size, meta_bytes=size, base_bytes=size, act_bytes=size,
                          batch_size=batch_size, seq_len=seq_len,
                          grad_checkpointing=checkpointing_on(device, grad_checkpointing))


@dataclass(frozen=True)
class MemoryBreakdown:
    weights: int
    metadata: int
    unquantized: int
    lora: int
    gradients: int
    optimizer: int
    activations: int
    logits: int = 0  # training step's logits, fp32 upcast, log-softmax and its gradient
    dequantized: int = 0  # one packed layer's weight, dequantized for its matmul
    scoring: int = 0  # the scoring pass's logits and one block's activations (no grad)

    @property
    def static(self) -> int:
        """What sits in memory before the first step: weights, metadata, LoRA, gradients, optimizer state."""
        return self.resident + self.optimizer

    @property
    def resident(self) -> int:
        """What the scoring pass sees besides its own tensors (the optimizer is gone, LoRA grads are not)."""
        return self.weights + self.metadata + self.unquantized + self.lora + self.gradients

    @property
    def training_peak(self) -> int:
        return self.static + self.activations + self.logits + self.dequantized

    @property
    def scoring_peak(self) -> int:
        return self.resident + self.scoring + self.dequantized

    @property
    def total(self) -> int:
        """The budget's meaning: the peak of a training step and of the scoring pass."""
        return max(self.training_peak, self.scoring_peak)

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {
            "static": self.static, "training_peak": self.training_peak, "scoring_peak": self.scoring_peak,
            "total": self.total}


def packed_bytes(numel: int, bits: int, s: MemorySettings, rows: int = 0) -> tuple[int, int]:
    """(packed weight bytes, metadata bytes) of one weight matrix of ``numel`` values at ``bits``."""
    if bits >= UNQUANTIZED:
        return 0, 0
    if s.backend in ("hqq", "sim"):
        groups = math.ceil(numel / s.group_size)
        if bits == 3:  # 10 three-bit values per int32, packed along the group axis
            weight = math.ceil(groups / 10) * s.group_size * 4
        else:
            weight = math.ceil(numel * bits / 8)
        return weight, 2 * groups * s.meta_bytes
    if s.backend == "bnb":
        if bits == 4:  # NF4: two values per byte; double quant (Params4bit's default): a uint8 absmax per
            blocks = math.ceil(numel / 64)  # 64-value block, a nested fp32 absmax per 256 blocks, an fp32 offset
            return math.ceil(numel / 2), blocks + 4 * math.ceil(blocks / 256) + 4
        if bits == 8:  # LLM.int8: one byte per value, one fp32 scale per output row
            return numel, rows * 4
    raise BudgetError(f"backend {s.backend!r} cannot store {bits}-bit weights")


def activation_bytes(shape: ModelShape, config: Config, s: MemorySettings) -> int:
    """Tensors autograd keeps for backward in one training step.

    Only the weights of adapters train, so backward runs from the loss down to the
    first adapted layer and stops: blocks before it keep nothing. Per token, each
    block from there on keeps ~5h + 4f elements (norm inputs, attention q/k/v/out,
    the MLP's gate/up/act), each adapted module its rank-r intermediate (its input
    is the block's, already kept), and the head its logits and log-softmax
    final norm's output (h; the logits are ``logits_bytes``). Calibrated against the
    storage autograd really saves (``bench/evaluation.py``, bench/results/evaluation.md;
    an overestimate when only late blocks are adapted). Gradient checkpointing
    keeps each block's input and one block's activations at a time. No adapter: no backward.
    """
    ranked = [i for i, layer in enumerate(config.layers) if layer.rank > 0]
    if not ranked:
        return 0
    tokens = s.batch_size * s.seq_len
    h, f = shape.hidden_size, shape.intermediate_size
    per_block = 5 * h + 4 * f
    active = shape.num_blocks - (ranked[0] * shape.num_blocks) // len(config.layers)  # blocks backward runs through
    lora = sum(layer.rank * len(mods) for layer, (_, mods) in zip(config.layers, shape.layers))
    head = h
    blocks = active * h + per_block if s.grad_checkpointing else active * per_block
    return int(tokens * (blocks + lora + head) * s.act_bytes)


def logits_bytes(tokens: int, vocab: int, act_bytes: int, backward: bool) -> int:
    """The head's output at its peak: logits in the compute dtype, their fp32 copy when that dtype is 16-bit
    (``.float()`` in the loss / in ``score``), the fp32 log-softmax cross-entropy computes (autograd keeps
    it) and, training, the fp32 gradient of the logits that backward makes while it is still held."""
    upcast = 4 if act_bytes != 4 else 0
    return tokens * vocab * (act_bytes + upcast + 4 + (4 if backward else 0))


def dequantized_bytes(config: Config, shape: ModelShape, s: MemorySettings) -> int:
    """A packed layer dequantizes its weight for each matmul (compute dtype): the largest one is the transient."""
    if s.backend not in PACKED:
        return 0
    sizes = [m.numel for layer, (_, mods) in zip(config.layers, shape.layers) if layer.bits < UNQUANTIZED for m in mods]
    return max(sizes, default=0) * s.act_bytes


def memory_breakdown(config: Config, shape: ModelShape, s: MemorySettings = MemorySettings()) -> MemoryBreakdown:
    """Bytes to fine-tune ``config`` on ``shape`` under settings ``s``."""
    weights = meta = unq = lora = 0
    for layer, (_, mods) in zip(config.layers, shape.layers):
        for m in mods:
            w, md = packed_bytes(m.numel, layer.bits, s, rows=m.out_features)
            weights, meta = weights + w, meta + md
            if layer.bits >= UNQUANTIZED:
                unq += m.numel * s.base_bytes
            lora += layer.rank * (m.in_features + m.out_features)
    body_rows = s.score_batch_size or score_rows(s.batch_size, s.seq_len)
    return MemoryBreakdown(
        weights=weights,
        metadata=meta,
        unquantized=unq + shape.other_params * s.base_bytes,
        lora=lora * s.lora_bytes,
        gradients=lora * s.lora_bytes,
        optimizer=lora * s.optimizer_bytes,
        activations=activation_bytes(shape, config, s),
        logits=logits_bytes(s.loss_tokens or s.batch_size * s.seq_len, shape.vocab_size, s.act_bytes, backward=True)
        if any(layer.rank > 0 for layer in config.layers) else 0,
        dequantized=dequantized_bytes(config, shape, s),
        scoring=logits_bytes(s.batch_size * s.seq_len, shape.vocab_size, s.act_bytes, backward=False)
        + body_rows * s.seq_len * (2 * shape.hidden_size + 3 * shape.intermediate_size) * s.act_bytes,
    )


def total_bytes(config: Config, shape: ModelShape, s: MemorySettings = MemorySettings()) -> int:
    return memory_breakdown(config, shape, s).total


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_REFERENCE = re.compile(r"uniform-(\d+)bit-r(\d+)")
_SIZE = re.compile(r"([0-9]*\.?[0-9]+)\s*([a-z]*)")


def parse_budget(text: str | int, space: SearchSpace, shape: ModelShape, s: MemorySettings = MemorySettings()) -> int:
    """Budget in bytes from '6GiB', '1500MB', '123456' or a reference config 'uniform-4bit-r16'.

    Raises BudgetError if unparseable, or if even the smallest configuration of the
    space (fewest bits, smallest rank everywhere) does not fit.
    """
    budget = budget_bytes(text, space, shape, s)
    smallest = total_bytes(space.uniform(space.bits[0], space.ranks[0]), shape, s)
    if budget < smallest:
        raise BudgetError(
            f"budget {format_bytes(budget)} is below the smallest feasible configuration "
            f"({space.bits[0]}-bit, rank {space.ranks[0]} on every layer: {format_bytes(smallest)} = {smallest} bytes); "
            f"raise --budget to at least {smallest}, shorten seq_len/batch or enable gradient checkpointing"
        )
    return budget


def reference_recipe(text: str | int) -> tuple[int, int] | None:
    """(bits, rank) of a uniform recipe's name ('uniform-4bit-r16'), or None if ``text`` is not one."""
    m = _REFERENCE.fullmatch(str(text).strip().lower())
    return (int(m[1]), int(m[2])) if m else None


def budget_bytes(text: str | int, space: SearchSpace, shape: ModelShape, s: MemorySettings = MemorySettings()) -> int:
    """The bytes a budget text means ('6GiB', '1500MB', '123456', 'uniform-4bit-r16'), feasible or not."""
    raw = str(text).strip().lower()
    if recipe := reference_recipe(raw):
        return total_bytes(space.uniform(*recipe), shape, s)
    if (m := _SIZE.fullmatch(raw)) and m[2] in _UNITS:
        return int(float(m[1]) * _UNITS[m[2]])
    raise BudgetError(
        f"cannot read the budget {text!r}: give bytes with a unit ('6GiB', '800MB', '123456') "
        f"or a reference configuration ('uniform-4bit-r16')"
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
