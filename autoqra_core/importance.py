"""Importance priors: how much each layer matters, from a few calibration batches.

Two signals, both cheap next to a fine-tune:
* sensitivity: the empirical Fisher (mean squared gradient of the loss w.r.t. the
  layer's weights, times the squared weights: a first-order estimate of the loss
  change if the layer were perturbed in proportion to its size);
* quantization error at each bit-width: ||(W - Q_b(W)) X|| / ||W X|| over the
  calibration activations X, i.e. how much the layer's output moves.

They warm-start the search (more bits/rank to sensitive layers) and order repair
(lower the least important layers first).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Priors:
    layers: tuple[str, ...]
    sensitivity: tuple[float, ...]  # normalised to sum to 1
    quant_error: dict[int, tuple[float, ...]]  # bits -> per-layer relative output error

    def importance(self) -> tuple[float, ...]:
        """One score per layer (sums to 1): sensitivity, weighted by how much low bits hurt that layer."""
        low = min(self.quant_error) if self.quant_error else None
        raw = [
            s * (1.0 + (self.quant_error[low][i] if low is not None else 0.0)) for i, s in enumerate(self.sensitivity)
        ]
        total = sum(raw) or 1.0
        return tuple(r / total for r in raw)

    def damage(self, layer: int, bits: int) -> float:
        """Expected harm of putting ``layer`` at ``bits``: sensitivity x quantization error (0 if unquantized)."""
        err = self.quant_error.get(bits)
        return self.sensitivity[layer] * (err[layer] if err else 0.0)

    def to_dict(self) -> dict:
        return {
            "layers": list(self.layers),
            "sensitivity": list(self.sensitivity),
            "quant_error": {str(b): list(v) for b, v in self.quant_error.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Priors":
        return cls(
            tuple(d["layers"]),
            tuple(float(x) for x in d["sensitivity"]),
            {int(b): tuple(float(x) for x in v) for b, v in d["quant_error"].items()},
        )

    @classmethod
    def uniform(cls, layers: tuple[str, ...], bits: tuple[int, ...]) -> "Priors":
        """No information: every layer equally important, error halving per extra bit."""
        n = len(layers)
        return cls(tuple(layers), tuple(1.0 / n for _ in layers), {b: tuple(2.0 ** -b for _ in layers) for b in bits})


def compute_priors(model, lmap, calibration: list, bits: tuple[int, ...], group_size: int = 64,
                   max_tokens: int = 1024) -> Priors:
    """Fisher sensitivity and activation-weighted quantization error per layer, from calibration batches.

    ``model`` is the unquantized base (not modified); ``calibration`` a list of [batch, seq] token tensors.
    """
    import torch

    from .quantize import QuantSettings, dequantized_weight

    mods = dict(model.named_modules())
    members = {m: i for i, (_, ms) in enumerate(lmap.layers) for m in ms}
    inputs: dict[str, list] = {m: [] for m in members}
    hooks = [
        mods[m].register_forward_hook(lambda mod, args, out, m=m: inputs[m].append(args[0].detach().flatten(0, -2)))
        for m in members
    ]
    # Only the layers' weights need gradients; restore every flag and drop every grad afterwards.
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
            model(input_ids=x, labels=x).loss.backward()
            for m in members:
                w = mods[m].weight
                fisher[m] += float(((w.grad * w.detach()) ** 2).sum())
    finally:
        for h in hooks:
            h.remove()
        for p, r in zip(params, was):
            p.requires_grad_(r)
            p.grad = None
    sens = [sum(fisher[m] for m in ms) for _, ms in lmap.layers]
    total = sum(sens) or 1.0

    errors: dict[int, list[float]] = {b: [] for b in bits if b < 16}
    q = QuantSettings(backend="sim", group_size=group_size, device="cpu")  # the base stays on the CPU
    with torch.no_grad():
        for _, ms in lmap.layers:
            num = {b: 0.0 for b in errors}
            den = 0.0
            for m in ms:
                lin = mods[m]
                x = torch.cat(inputs[m])[:max_tokens]
                ref = x @ lin.weight.T
                den += float((ref**2).sum())
                for b in errors:
                    num[b] += float(((x @ dequantized_weight(lin.weight, b, q).T - ref) ** 2).sum())
            for b in errors:
                errors[b].append((num[b] / max(den, 1e-30)) ** 0.5)
    return Priors(lmap.names, tuple(s / total for s in sens), {b: tuple(v) for b, v in errors.items()})
