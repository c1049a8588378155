"""The search space: one (bits, rank) choice per layer.

A *layer* is a named group of linear modules that share one choice: a decoder
block by default, or a single linear module at the finer granularity. Bits 16
means "not quantized"; rank 0 means "no adapter on this layer".
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Sequence

from .errors import SpaceError

QUANTIZED_BITS: tuple[int, ...] = (2, 3, 4, 8)  # what the backends pack (bnb: 4 and 8 only)
UNQUANTIZED = 16
SUPPORTED_BITS: tuple[int, ...] = (*QUANTIZED_BITS, UNQUANTIZED)
DEFAULT_BITS: tuple[int, ...] = QUANTIZED_BITS
DEFAULT_RANKS: tuple[int, ...] = (0, 4, 8, 16, 32, 64)
DEFAULT_BUDGET = "uniform-4bit-r16"  # what users pick by hand (QLoRA's recipe): the default budget and first reference


@dataclass(frozen=True)
class LayerChoice:
    name: str
    bits: int
    rank: int


@dataclass(frozen=True)
class Config:
    """Bits and LoRA rank for every layer, in model order. Hashable, JSON-able."""

    layers: tuple[LayerChoice, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(layer.bits for layer in self.layers)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(layer.rank for layer in self.layers)

    def to_dict(self) -> dict:
        return {"layers": [{"name": l.name, "bits": l.bits, "rank": l.rank} for l in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        try:
            layers = data["layers"]
            return cls(tuple(LayerChoice(str(l["name"]), int(l["bits"]), int(l["rank"])) for l in layers))
        except (KeyError, TypeError, ValueError) as e:
            raise SpaceError(
                f"malformed configuration ({e!r}): expected {{'layers': [{{'name': str, 'bits': int, 'rank': int}}, ...]}}"
            ) from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SpaceError(f"configuration is not valid JSON: {e}") from None

    def key(self) -> str:
        """Stable short hash: the same config always gets the same key (cache keys, file names)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def replace(self, index: int, *, bits: int | None = None, rank: int | None = None) -> "Config":
        layers = list(self.layers)
        old = layers[index]
        layers[index] = LayerChoice(old.name, old.bits if bits is None else bits, old.rank if rank is None else rank)
        return Config(tuple(layers))

    def short(self) -> str:
        """Compact human form, e.g. '4/16 4/16 2/64 8/0' (bits/rank per layer)."""
        return " ".join(f"{l.bits}/{l.rank}" for l in self.layers)


@dataclass(frozen=True)
class SearchSpace:
    """Layer names and the allowed levels of bits and rank (both sorted ascending)."""

    layers: tuple[str, ...]
    bits: tuple[int, ...] = DEFAULT_BITS
    ranks: tuple[int, ...] = DEFAULT_RANKS

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "bits", tuple(sorted(set(self.bits))))
        object.__setattr__(self, "ranks", tuple(sorted(set(self.ranks))))
        if not self.layers:
            raise SpaceError("the search space has no layers")
        bad_bits = [b for b in self.bits if b not in SUPPORTED_BITS]
        if bad_bits or not self.bits:
            raise SpaceError(f"bit-widths {bad_bits or '[]'} are not supported: choose from {list(SUPPORTED_BITS)} "
                             f"({UNQUANTIZED}: unquantized)")
        if not self.ranks or any(r < 0 for r in self.ranks):
            raise SpaceError(f"LoRA ranks must be >= 0 (0 = no adapter), got {list(self.ranks)}")

    def __len__(self) -> int:
        return len(self.layers)

    def config(self, bits: Sequence[int], ranks: Sequence[int]) -> Config:
        """Build a config from per-layer bits and ranks, validated against the space."""
        if len(bits) != len(self.layers) or len(ranks) != len(self.layers):
            raise SpaceError(f"expected {len(self.layers)} bits and ranks, got {len(bits)} and {len(ranks)}")
        cfg = Config(tuple(LayerChoice(n, int(b), int(r)) for n, b, r in zip(self.layers, bits, ranks)))
        self.validate(cfg)
        return cfg

    def uniform(self, bits: int, rank: int) -> Config:
        """The same choice on every layer (baselines, budget references). May lie outside the levels (e.g. 16)."""
        return Config(tuple(LayerChoice(n, bits, rank) for n in self.layers))

    def random(self, rng: random.Random) -> Config:
        return self.config([rng.choice(self.bits) for _ in self.layers], [rng.choice(self.ranks) for _ in self.layers])

    def validate(self, config: Config) -> None:
        """Raise SpaceError naming the first layer or value that does not fit."""
        if config.names != self.layers:
            missing = [n for n in config.names if n not in self.layers]
            raise SpaceError(
                f"configuration layers do not match the model: {missing[:3] or 'order/count differs'}; "
                f"expected {len(self.layers)} layers named like {self.layers[0]!r}"
            )
        for l in config.layers:
            if l.bits not in self.bits:
                raise SpaceError(f"layer {l.name!r}: {l.bits} bits is outside the space; allowed: {list(self.bits)}")
            if l.rank not in self.ranks:
                raise SpaceError(f"layer {l.name!r}: rank {l.rank} is outside the space; allowed: {list(self.ranks)}")

    # Index form used by the search operators: level indices per layer.
    def to_indices(self, config: Config) -> tuple[list[int], list[int]]:
        return [self.bits.index(b) for b in config.bits], [self.ranks.index(r) for r in config.ranks]

    def from_indices(self, bit_idx: Sequence[int], rank_idx: Sequence[int]) -> Config:
        return self.config([self.bits[i] for i in bit_idx], [self.ranks[i] for i in rank_idx])
