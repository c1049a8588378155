"""The settings file's schema: every field typed, unknown ones named, one place for each default (the core's
dataclasses), and the defaults the README documents are the real ones."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from typing import Any

from pydantic_core import PydanticUndefined

from autoqra_core.baselines import BaselineSettings
from autoqra_core.evolution import EvolutionSettings
from autoqra_core.export import ExportSettings
from autoqra_core.fidelity import FineTune, Rung
from autoqra_core.finetune import TrainSettings
from autoqra_core.quantize import QuantSettings
from autoqra_core.racing import RaceSettings
from autoqra_core.search import DEFAULT_STEPS, SearchSettings, default_ladder, run_search
from autoqra_core.turbo import TurboSettings
from flows.config import (BaselineSection, ConfigError, EvolutionSection, ExportSection, QuantSection, RaceSection,
                          RunConfig, RungSection, SearchSection, TrainSection, TurboSection, load_run_config)

from .helpers import ROOT


def _load(tmp_path, text: str) -> RunConfig:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return load_run_config(path)


def test_partial_override_keeps_the_other_defaults(tmp_path):
    s = _load(tmp_path, "search: {evolution: {offspring: 4}, turbo: {batch_size: 3}}").search_settings(7, DEFAULT_STEPS)
    assert s.evolution == dataclasses.replace(EvolutionSettings(), offspring=4)
    assert s.evolution.population_size == 10  # the documented default, not an older one
    assert s.turbo == dataclasses.replace(TurboSettings(), batch_size=3)
    assert s.generations == SearchSettings().generations and s.ladder == SearchSettings().ladder and s.seed == 7


@pytest.mark.parametrize("text, named", [
    ("search: {evolution: {populaton_size: 4}}", "search.evolution.populaton_size: Extra inputs are not permitted"),
    ("search: {turbo: {iterations: many}}", "search.turbo.iterations: Input should be a valid integer"),
    ("search: {turbo: {failure_tolerance: 0}}", "search.turbo.failure_tolerance: Input should be greater than or equal to 1"),
    ("search: {evolution: {crossover_prob: 1.5}}", "search.evolution.crossover_prob: Input should be less than or equal to 1"),
])
def test_bad_fields_are_named_before_any_work(tmp_path, text, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        _load(tmp_path, text)


# Each section of the settings file and the core dataclass it becomes, with the fields (of either) that are not
# mirrored one for one, and why.
MIRRORS = [
    (EvolutionSection, EvolutionSettings, {}),
    (TurboSection, TurboSettings, {}),
    (RaceSection, RaceSettings, {}),
    (RungSection, Rung, {}),
    (ExportSection, ExportSettings, {}),
    (BaselineSection, BaselineSettings, {}),
    (TrainSection, TrainSettings, {"seed": "the run's --seed", "grad_checkpointing": "None: on for CUDA",
                                   **{f.name: "the fine-tune's length and shape" for f in dataclasses.fields(FineTune)}}),
    (TrainSection, FineTune, {f.name: "a training hyperparameter" for f in dataclasses.fields(TrainSettings)}),
    (QuantSection, QuantSettings, {"backend": "auto: picked for the device (the dataclass takes a resolved one)"}),
    (SearchSection, SearchSettings, {"seed": "the run's --seed", "ladder": "as rungs and promote_fraction",
                                     "rungs": "the ladder's", "promote_fraction": "the ladder's",
                                     "evolution": "its own section", "turbo": "its own section",
                                     "race": "its own section"}),
]


def _core_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else PydanticUndefined


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("section, dc, apart", MIRRORS, ids=[m[0].__name__ for m in MIRRORS])
def test_schema_mirrors_every_core_field_with_the_core_default(section, dc, apart):
    """One place for each default: every field of the core's dataclass is in its section with the same default
    (a required field stays required), and the section has no field the dataclass lacks."""
    core = {f.name: f for f in dataclasses.fields(dc) if f.name not in apart}
    schema = section.model_fields
    assert set(core) <= set(schema), f"{section.__name__} lacks {sorted(set(core) - set(schema))}"
    extra = set(schema) - set(core) - set(apart)
    assert not extra, f"{section.__name__} has {sorted(extra)}, which {dc.__name__} does not"
    for name, f in core.items():
        default = schema[name].get_default(call_default_factory=True)
        assert _plain(default) == _plain(_core_default(f)), f"{section.__name__}.{name}: {default!r}"


def test_the_default_sections_become_the_default_dataclasses():
    """What the mirrored fields do not show: the default ladder, and each conversion of the defaults."""
    cfg = RunConfig()
    assert cfg.search_settings(0, DEFAULT_STEPS) == SearchSettings() and cfg.ladder(DEFAULT_STEPS) == default_ladder()
    assert cfg.fine_tune() == FineTune()  # one epoch of the train split
    assert cfg.baseline_settings() == BaselineSettings()
    assert cfg.export_settings() == ExportSettings()
    assert dataclasses.replace(cfg.train_settings(0), grad_checkpointing=False) == TrainSettings()


@pytest.mark.parametrize("path", ["infra/demo.yaml", "bench/smollm2.yaml", "bench/smollm2-addition.yaml"])
def test_shipped_settings_files_load_and_change_only_what_they_say(path):
    """The settings files that `make demo` and the smollm2 bench pass: valid against the schema, and every
    section they do not name keeps its default (a renamed field would otherwise fail only at the end of a demo)."""
    written = yaml.safe_load((ROOT / path).read_text())
    cfg, default = load_run_config(ROOT / path).model_dump(mode="json"), RunConfig().model_dump(mode="json")
    assert {k for k in cfg if cfg[k] != default[k]} <= set(written)


def test_progress_plan_matches_a_search_at_the_defaults():
    """The progress line's plan (fine-tuning tokens, each charged once), for the default settings, against a real
    search (the synthetic objective, 8 layers) with the baselines: never less than done, and not far above."""
    from types import SimpleNamespace

    from autoqra_core import baselines, protocol
    from flows.search import _planned

    from .test_search import BUDGET, PROBLEM, SPACE, Recorder, cost

    rc = RunConfig()
    settings = rc.search_settings(0, DEFAULT_STEPS)
    recorder, asked = Recorder(), []

    def evaluate_many(requests):
        asked.extend(recorder(requests))
        return asked[-len(requests):]

    res = run_search(PROBLEM, evaluate_many, settings)
    ladder = settings.ladder
    n_random = protocol.equal_compute_count(protocol.history_tokens(res.history, ladder), ladder)
    baselines.run_baselines(PROBLEM, evaluate_many, ladder.top, BaselineSettings(n_random=n_random),
                            seed=0, history=res.history)
    methods = 1 + BaselineSettings().methods
    done = protocol.history_tokens(asked, ladder) + rc.report.seeds * methods * ladder.full.train_tokens
    run = SimpleNamespace(rc=rc, seed=0, ladder=ladder, space=SPACE, cost=cost, budget_bytes=BUDGET,
                          search_settings=lambda: settings)
    planned = _planned(run, baselines=True)
    assert done <= planned <= done + 4 * ladder.full.train_tokens, (done / ladder.full.train_tokens,
                                                                    planned / ladder.full.train_tokens)


def test_evaluate_accepts_the_runs_own_fp_lora_baseline():
    """`autoqra evaluate --config` of result.json's fp-lora baseline (16 bits) needs no settings file adding 16."""
    from autoqra_core.baselines import fp_lora
    from autoqra_core.errors import SpaceError
    from flows.prepared_run import Run

    run = Run.prepare("embedded", "embedded", None, RunConfig(), 0)
    config = fp_lora(run.space, RunConfig().baselines.rank)
    with pytest.raises(SpaceError, match="16 bits is outside the space"):
        run.space.validate(config)  # the search itself never proposes it
    run.evaluable().validate(config)
    bad = run.space.uniform(4, 16).to_dict()
    bad["layers"][0]["bits"] = 5
    from autoqra_core.space import Config

    with pytest.raises(SpaceError, match="5 bits is outside the space"):
        run.evaluable().validate(Config.from_dict(bad))
