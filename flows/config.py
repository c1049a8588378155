"""The search's settings file (``--config search.yaml``), validated with a schema.

Every field has a default sized for the embedded model on 2 CPU cores (``make demo``
in well under 15 minutes). Unknown or mistyped fields are errors that name the field.
The search's defaults live in autoqra_core's dataclasses (one place); the sections below
read them from there (``_default``), so a partial override keeps the others' defaults.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from autoqra_core.baselines import BaselineSettings
from autoqra_core.device import checkpointing_on, resolve
from autoqra_core.errors import AutoQRAError
from autoqra_core.evolution import EvolutionSettings
from autoqra_core.export import ExportSettings
from autoqra_core.fidelity import DEFAULT_RUNGS, FineTune, Ladder, Rung
from autoqra_core.finetune import TrainSettings
from autoqra_core.memory import MemorySettings, settings_for
from autoqra_core.quantize import QuantSettings, check_placement
from autoqra_core.racing import RaceSettings
from autoqra_core.search import SearchSettings
from autoqra_core.space import DEFAULT_BITS, DEFAULT_RANKS, SUPPORTED_BITS
from autoqra_core.turbo import TurboSettings
from infra.settings import read_yaml


class ConfigError(AutoQRAError):
    """A settings file that does not match the schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _default(dc: type, name: str) -> Any:
    """The default of field ``name`` of the core dataclass ``dc``: the one place each search default lives."""
    f = {f.name: f for f in dataclasses.fields(dc)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


class SpaceSection(_Strict):
    bits: list[int] = Field(default_factory=lambda: list(DEFAULT_BITS))
    ranks: list[int] = Field(default_factory=lambda: list(DEFAULT_RANKS))
    granularity: Literal["block", "module"] = "block"
    layers: list[str] | None = None  # a subset of layer names to search; others stay unquantized

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if b not in SUPPORTED_BITS]
        if bad or not v:
            raise ValueError(f"bit-widths must be among {list(SUPPORTED_BITS)}; got {bad or v}")
        return sorted(set(v))

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, v: list[int]) -> list[int]:
        if not v or any(r < 0 or r > 1024 for r in v):
            raise ValueError(f"ranks must be between 0 and 1024; got {v}")
        return sorted(set(v))


class QuantSection(_Strict):
    """Resolved when read: ``auto`` becomes what this machine has (so the cache key and the resume check
    name the real device); a device it does not have is an error naming the fix."""

    # auto: sim on the CPU (HQQ numbers, no per-forward dequantization), hqq (really packed) on CUDA
    backend: Literal["auto", "sim", "hqq", "bnb"] = "auto"
    group_size: int = Field(_default(QuantSettings, "group_size"), gt=0)
    device: str = _default(QuantSettings, "device")  # auto | cpu | cuda | cuda:N
    # auto: bf16 on CUDA, fp32 on the CPU
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _default(QuantSettings, "compute_dtype")

    @model_validator(mode="after")
    def _resolve(self) -> "QuantSection":
        self.device, self.compute_dtype, self.backend = resolve(self.device, self.compute_dtype, self.backend)
        check_placement(self.backend, self.device)
        return self


class TrainSection(_Strict):
    """The user's one fine-tune: its length (``steps``, or ``epochs`` of ``data_fraction`` of the train split
    capped by ``max_steps``), shape and hyperparameters. It is the search's top rung, what the report scores and
    what the export ships; the lower rungs are its checkpoints (``search.rungs``)."""

    steps: int | None = Field(_default(FineTune, "steps"), gt=0)  # None: epochs over the data
    epochs: float = Field(_default(FineTune, "epochs"), gt=0)
    max_steps: int | None = Field(_default(FineTune, "max_steps"), gt=0)
    data_fraction: float = Field(_default(FineTune, "data_fraction"), gt=0, le=1)
    seq_len: int = Field(_default(FineTune, "seq_len"), gt=1)
    batch_size: int = Field(_default(FineTune, "batch_size"), gt=0)
    schedule: Literal["cosine", "wsd"] = _default(TrainSettings, "schedule")
    decay_fraction: float = Field(_default(TrainSettings, "decay_fraction"), gt=0, le=1)
    lr: float = Field(_default(TrainSettings, "lr"), gt=0)
    weight_decay: float = Field(_default(TrainSettings, "weight_decay"), ge=0)
    warmup_steps: int = Field(_default(TrainSettings, "warmup_steps"), ge=0)
    alpha_ratio: float = Field(_default(TrainSettings, "alpha_ratio"), gt=0)
    dropout: float = Field(_default(TrainSettings, "dropout"), ge=0, lt=1)
    max_grad_norm: float = Field(_default(TrainSettings, "max_grad_norm"), gt=0)
    grad_checkpointing: bool | None = None  # None: on for CUDA (activations dominate there), off on the CPU
    answer_only: bool = _default(TrainSettings, "answer_only")  # multiple choice: loss on the answer only


class RungSection(_Strict):
    """A checkpoint of the fine-tune at ``fraction`` of its length (the last rung: 1, the whole run)."""

    fraction: float = Field(gt=0, le=1)
    eval_examples: int = Field(_default(Rung, "eval_examples"), gt=0)


def _default_rungs() -> list[RungSection]:
    return [RungSection(**dataclasses.asdict(r)) for r in DEFAULT_RUNGS]


def _section(dc: type, doc: str) -> type[_Strict]:
    """The settings-file section of the core dataclass ``dc``, generated from it: every field with its type, its
    default and its bounds (``autoqra_core.settings.bounded``), so nothing is declared twice."""
    hints = typing.get_type_hints(dc)
    fields = {f.name: (hints[f.name], Field(_default(dc, f.name), **f.metadata.get("bounds", {})))
              for f in dataclasses.fields(dc)}
    return create_model(dc.__name__.replace("Settings", "Section"), __base__=_Strict, __doc__=doc, **fields)


EvolutionSection = _section(EvolutionSettings, "Stage 1 (``autoqra_core.evolution.EvolutionSettings``).")
TurboSection = _section(TurboSettings, "Stage 2 (``autoqra_core.turbo.TurboSettings``); ``iterations: 0`` skips it.")
RaceSection = _section(RaceSettings, "Intensification at the top rung (``autoqra_core.racing.RaceSettings``); "
                                     "``max_config_calls: 1`` turns it off.")


class SearchSection(_Strict):
    fine_tunes: float | None = Field(_default(SearchSettings, "fine_tunes"), gt=0)
    generations: int = Field(_default(SearchSettings, "generations"), ge=1)
    rungs: list[RungSection] = Field(default_factory=_default_rungs, min_length=1)
    promote_fraction: float = Field(_default(Ladder, "promote_fraction"), gt=0, le=1)

    @field_validator("rungs")
    @classmethod
    def _rungs(cls, v: list[RungSection]) -> list[RungSection]:
        fractions = [r.fraction for r in v]
        if fractions[-1] != 1 or any(b <= a for a, b in zip(fractions, fractions[1:])):
            raise ValueError(f"rung fractions must increase and end at 1 (the whole fine-tune); got {fractions}")
        return v
    evolution: EvolutionSection = EvolutionSection()
    turbo: TurboSection = TurboSection()
    race: RaceSection = RaceSection()


class BaselineSection(_Strict):
    """Which baselines run (``autoqra_core.baselines.BaselineSettings``)."""

    uniform_bits: list[int] = Field(default_factory=lambda: list(_default(BaselineSettings, "uniform_bits")))
    rank: int = Field(_default(BaselineSettings, "rank"), ge=0)
    # None: as many top-rung fine-tunes as the search's compute pays for
    n_random: int | None = Field(_default(BaselineSettings, "n_random"), ge=1)


class ReportSection(_Strict):
    """The final report: the winner and every baseline fine-tuned again (the whole fine-tune) with ``seeds`` fresh
    seeds and scored on the test split (never read by the search); the winner's run on the first is exported."""

    seeds: int = Field(3, ge=0)  # 0: no test report
    test_examples: int | None = Field(500, gt=0)  # the first N test rows (accuracy sd ~0.02); None: all of them


class ExportSection(_Strict):
    """What the export writes (autoqra_core.export.ExportSettings). It trains nothing: it ships the winner's run
    on the first report seed, the fine-tune the report scores."""

    merge: bool = _default(ExportSettings, "merge")  # also write merged/: the adapter merged into the dequantized base
    merged_dtype: Literal["bfloat16", "float16", "float32"] = _default(ExportSettings, "merged_dtype")
    # parts beside model/: "ct" (model-ct/, compressed-tensors), "gguf" (gguf/, llama.cpp); [] for neither
    formats: list[Literal["ct", "gguf"]] = Field(default_factory=lambda: list(_default(ExportSettings, "formats")))


class ExecutionSection(_Strict):
    task_runner: Literal["thread", "dask"] = "thread"
    workers: int = Field(1, ge=1)  # threads, or worker processes of a local Dask cluster (no address)
    address: str | None = None  # dask only: an existing scheduler, e.g. tcp://10.0.0.5:8786 (one worker per GPU)

    @model_validator(mode="after")
    def _address(self) -> "ExecutionSection":
        if self.address is not None and self.task_runner != "dask":
            raise ValueError("execution.address names a Dask scheduler: set task_runner: dask with it")
        if self.address is not None and "://" not in self.address:
            raise ValueError(f"execution.address {self.address!r} needs a scheme: tcp://HOST:PORT")
        return self


class RunConfig(_Strict):
    space: SpaceSection = SpaceSection()
    quant: QuantSection = Field(default_factory=QuantSection)
    train: TrainSection = TrainSection()
    search: SearchSection = SearchSection()
    baselines: BaselineSection = BaselineSection()
    report: ReportSection = ReportSection()
    execution: ExecutionSection = ExecutionSection()
    export: ExportSection = ExportSection()

    # ---- conversions to the core's dataclasses ----
    def fine_tune(self) -> FineTune:
        return FineTune(**{f.name: getattr(self.train, f.name) for f in dataclasses.fields(FineTune)})

    def ladder(self, total_steps: int) -> Ladder:
        """The rungs as checkpoints of a ``total_steps``-step fine-tune (``FineTune.total_steps`` of the data)."""
        ft = self.fine_tune()
        return Ladder.of(total_steps, tuple(Rung(**r.model_dump()) for r in self.search.rungs), ft.data_fraction,
                         ft.seq_len, ft.batch_size, self.search.promote_fraction)

    def search_settings(self, seed: int, total_steps: int) -> SearchSettings:
        return SearchSettings(seed=seed, generations=self.search.generations, ladder=self.ladder(total_steps),
                              fine_tunes=self.search.fine_tunes,
                              evolution=EvolutionSettings(**self.search.evolution.model_dump()),
                              turbo=TurboSettings(**self.search.turbo.model_dump()),
                              race=RaceSettings(**self.search.race.model_dump()))

    def quant_settings(self) -> QuantSettings:
        return QuantSettings(**self.quant.model_dump())

    def baseline_settings(self) -> BaselineSettings:
        return BaselineSettings(**{**self.baselines.model_dump(), "uniform_bits": tuple(self.baselines.uniform_bits)})

    def export_settings(self) -> ExportSettings:
        return ExportSettings.from_dict(self.export.model_dump())

    def train_settings(self, seed: int) -> TrainSettings:
        names = {f.name for f in dataclasses.fields(TrainSettings)}
        return TrainSettings(seed=seed, **{**{k: v for k, v in self.train.model_dump().items() if k in names},
                                           "grad_checkpointing": checkpointing_on(self.quant.device,
                                                                                    self.train.grad_checkpointing)})

    def memory_settings(self) -> MemorySettings:
        """What the search's cost charges: the fine-tune's training shape on this run's device and dtype."""
        return settings_for(self.quant.device, self.quant.backend, self.quant.group_size, self.train.batch_size,
                            self.train.seq_len, self.train_settings(0).grad_checkpointing, self.quant.compute_dtype)


def load_run_config(path: str | Path | None) -> RunConfig:
    """Defaults, overridden by a YAML/JSON file; errors name the field and the problem."""
    if path is None:
        return RunConfig()
    p = Path(path)
    data = read_yaml(p, ConfigError, "settings file", "sections (space, quant, train, search, ...)")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"settings file {p}: {problems}") from None
    return cfg
