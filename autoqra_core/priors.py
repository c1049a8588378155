"""Importance priors: how much each layer matters, from a few calibration batches.

Three signals, all cheap next to a fine-tune (forward passes, one backward per batch):
* sensitivity: the empirical Fisher (mean squared gradient of the loss w.r.t. the
  layer's weights, times the squared weights: a first-order estimate of the loss
  change if the layer were perturbed in proportion to its size);
* quantization error at each bit-width: ||(W - Q_b(W)) X|| / ||W X|| over the
  calibration activations X, i.e. how much the layer's output moves;
* measured damage: the calibration loss increase with only layer l quantized to b bits
  (one forward pass per (layer, bits) and batch). Fisher x error is linear in the error and
  misprices low bits (2-bit loses several times more than it predicts); where it is measured,
  the damage is this number.

They warm-start the search (more bits/rank to sensitive layers), order repair (lower the
least important layers first), and mark (layer, bits) pairs whose damage is catastrophic, so
random draws and mutations rarely waste a fine-tune on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .memory import GROUP_SIZE

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Priors:
    layers: tuple[str, ...]
    sensitivity: tuple[float, ...]  # normalised to sum to 1
    quant_error: dict[int, tuple[float, ...]]  # bits -> per-layer relative output error
    measured: dict[int, tuple[float, ...]] | None = None  # bits -> per-layer calibration loss increase (nats)

    def importance(self) -> tuple[float, ...]:
        """One score per layer (sums to 1): how much the lowest bit-width hurts it (measured where known, else
        sensitivity weighted by the quantization error)."""
        if self.measured:
            low = min(self.measured)
            raw = [max(d, 0.0) + 1e-12 for d in self.measured[low]]
        else:
            low = min(self.quant_error) if self.quant_error else None
            raw = [s * (1.0 + (self.quant_error[low][i] if low is not None else 0.0))
                   for i, s in enumerate(self.sensitivity)]
        total = sum(raw) or 1.0
        return tuple(r / total for r in raw)

    def damage(self, layer: int, bits: int) -> float:
        """Expected harm of putting ``layer`` at ``bits`` (0 if unquantized): the measured loss increase where
        known (floored at 0: a small gain is calibration noise), else sensitivity x quantization error."""
        if self.measured and bits in self.measured:
            return max(self.measured[bits][layer], 0.0)
        err = self.quant_error.get(bits)
        return self.sensitivity[layer] * (err[layer] if err else 0.0)

    def catastrophic(self, ratio: float = 1.0) -> frozenset[tuple[int, int]]:
        """(layer, bits) pairs whose measured damage alone exceeds ``ratio`` x the summed damage of every layer at
        the middle measured bit-width (4 in the default space): one layer hurting more than quantizing the whole
        model there. Empty without measured damage."""
        if not self.measured:
            return frozenset()
        levels = sorted(self.measured)
        ref = sum(max(d, 0.0) for d in self.measured[levels[len(levels) // 2]])
        return frozenset((l, b) for b in levels for l, d in enumerate(self.measured[b]) if d > ratio * ref)

    def to_dict(self) -> dict:
        d = {
            "layers": list(self.layers),
            "sensitivity": list(self.sensitivity),
            "quant_error": {str(b): list(v) for b, v in self.quant_error.items()},
        }
        if self.measured:
            d["measured"] = {str(b): list(v) for b, v in self.measured.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Priors":
        measured = d.get("measured")
        return cls(
            tuple(d["layers"]),
            tuple(float(x) for x in d["sensitivity"]),
            {int(b): tuple(float(x) for x in v) for b, v in d["quant_error"].items()},
            {int(b): tuple(float(x) for x in v) for b, v in measured.items()} if measured else None,
        )

    @classmethod
    def uniform(cls, layers: tuple[str, ...], bits: tuple[int, ...]) -> "Priors":
        """No information: every layer equally important, error halving per extra bit."""
        n = len(layers)
        return cls(tuple(layers), tuple(1.0 / n for _ in layers), {b: tuple(2.0 ** -b for _ in layers) for b in bits})


def _loss(model, x) -> torch.Tensor:
    """The training loss of one calibration batch (on the tokens the task trains on)."""
    from .data import Blocks

    return model(**(x.inputs() if isinstance(x, Blocks) else {"input_ids": x, "labels": x})).loss


CALIBRATION_BATCHES = 4  # training batches the priors read (the first DAMAGE_BATCHES also for the damage)
DAMAGE_BATCHES = 2
CALIBRATION_FRACTION = 0.05  # of the train split the calibration batches are drawn from


def calibration(task, tokenizer, seed: int, n_batches: int = CALIBRATION_BATCHES, seq_len: int | None = None,
                batch_size: int | None = None) -> list:
    """The calibration batches: ``n_batches`` training batches (the fine-tune's shape by default) from the first
    ``CALIBRATION_FRACTION`` of the train split, in ``seed``'s order."""
    from .data import batches, train_blocks
    from .fidelity import BATCH_SIZE, SEQ_LEN

    blocks = train_blocks(task, tokenizer, seq_len or SEQ_LEN, CALIBRATION_FRACTION)
    return batches(blocks, n_batches, batch_size or BATCH_SIZE, seed)


def compute_priors(model, lmap, calibration: list, bits: tuple[int, ...], group_size: int = GROUP_SIZE,
                   max_tokens: int = 1024, damage_batches: int = DAMAGE_BATCHES) -> Priors:
    """Fisher sensitivity, activation-weighted quantization error and measured damage per layer, from calibration
    batches (the first ``damage_batches`` of them for the damage: the calibration loss with only that layer
    quantized, minus the unquantized one; 0: not measured).

    ``model`` is the unquantized base (not modified); ``calibration`` a list of training batches (``data.Blocks``,
    or [batch, seq] token tensors).
    """
    fisher, inputs = fisher_sensitivity(model, lmap, calibration)
    sens = [sum(fisher[m] for m in ms) for _, ms in lmap.layers]
    total = sum(sens) or 1.0
    quantized = tuple(b for b in bits if b < 16)
    damage_calib = calibration[:damage_batches]
    errors, measured = quantization_effects(model, lmap, inputs, quantized, group_size, max_tokens, damage_calib)
    return Priors(lmap.names, tuple(s / total for s in sens), {b: tuple(v) for b, v in errors.items()},
                  {b: tuple(v) for b, v in measured.items()} if damage_calib and errors else None)


def fisher_sensitivity(model, lmap, calibration: list) -> tuple[dict[str, float], dict[str, list]]:
    """Per module: the empirical Fisher of its weight times the weight (sum of (w * grad)^2 over the batches), and
    the inputs it saw (for the quantization error). Leaves every ``requires_grad`` flag as it was, no grads."""
    mods = dict(model.named_modules())
    members = [m for _, ms in lmap.layers for m in ms]
    inputs: dict[str, list] = {m: [] for m in members}
    hooks = [
        mods[m].register_forward_hook(lambda mod, args, out, m=m: inputs[m].append(args[0].detach().flatten(0, -2)))
        for m in members
    ]
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    wanted = {id(mods[m].weight) for m in members}
    for p in params:
        p.requires_grad_(id(p) in wanted)
    fisher = {m: 0.0 for m in members}
    model.eval()
    try:
        for x in calibration:
            model.zero_grad(set_to_none=True)
            _loss(model, x).backward()
            for m in members:
                w = mods[m].weight
                fisher[m] += float(((w.grad * w.detach()) ** 2).sum())
    finally:
        for h in hooks:
            h.remove()
        for p, r in zip(params, was):
            p.requires_grad_(r)
            p.grad = None
    return fisher, inputs


def quantization_effects(model, lmap, inputs: dict[str, list], bits: tuple[int, ...], group_size: int,
                         max_tokens: int, damage_calib: list) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
    """Per layer and bit-width: the relative output error of its quantized weights on the inputs it saw, and the
    damage (calibration loss with only that layer quantized, minus the clean loss; empty without batches)."""
    import torch

    from .quantize import QuantSettings, dequantized_weight

    mods = dict(model.named_modules())
    errors: dict[int, list[float]] = {b: [] for b in bits}
    measured: dict[int, list[float]] = {b: [] for b in bits}
    q = QuantSettings(backend="sim", group_size=group_size, device="cpu")  # the base stays on the CPU

    def calib_loss() -> float:
        return sum(float(_loss(model, x)) for x in damage_calib) / max(len(damage_calib), 1)

    with torch.no_grad():
        clean = calib_loss() if damage_calib else 0.0
        for _, ms in lmap.layers:
            weights = {m: mods[m].weight.data for m in ms}
            xs = {m: torch.cat(inputs[m])[:max_tokens] for m in ms}
            refs = {m: xs[m] @ weights[m].T for m in ms}
            den = sum(float((r**2).sum()) for r in refs.values())
            for b in bits:
                deq = {m: dequantized_weight(w, b, q).to(w.dtype) for m, w in weights.items()}  # once per (module, bits)
                num = sum(float(((xs[m] @ deq[m].T - refs[m]) ** 2).sum()) for m in ms)
                errors[b].append((num / max(den, 1e-30)) ** 0.5)
                if damage_calib:  # only this layer quantized: swap its weights in, measure, restore
                    try:
                        for m in ms:
                            mods[m].weight.data = deq[m]
                        measured[b].append(calib_loss() - clean)
                    finally:
                        for m, w in weights.items():
                            mods[m].weight.data = w
    return errors, measured
