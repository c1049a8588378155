"""The documentation is checked against the code: the settings page against the schema's defaults, every
relative link of the README and docs/ against the tree, and the README's library example by running it."""

from __future__ import annotations

import importlib
import re

import pytest
import yaml

from tests.helpers import ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))


def _blocks(path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, prefix + k + ".")
    return out


def test_the_settings_page_lists_every_field_with_its_default():
    from flows.config import RunConfig

    documented = yaml.safe_load(_blocks(ROOT / "docs" / "settings.md", "yaml")[0])
    defaults = RunConfig().model_dump(mode="json")
    assert _keys(documented) == _keys(defaults), "docs/settings.md and the schema name different fields"
    # Read through the same schema, the documented values must be the defaults (auto resolves alike).
    assert RunConfig.model_validate(documented).model_dump(mode="json") == defaults


def test_every_relative_link_in_the_docs_exists():
    missing = []
    for page in [ROOT / "README.md", *DOCS, ROOT / "bench" / "results" / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing


def test_the_readme_stays_a_first_screen():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 220


@pytest.mark.slow
def test_the_readmes_library_example_runs(monkeypatch):
    """The README's Python example, as written (a whole tiny search on the embedded model), from the repository root."""
    example = next(b for b in _blocks(ROOT / "README.md", "python") if "import autoqra_core" in b
                   or "from autoqra_core import" in b)
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    result = scope["result"]
    assert result.best.ok and result.best.memory_bytes <= scope["budget"]
    assert len(result.history) >= 4
    _assert_exports_resolve(scope["aq"])  # after the README's calls have imported the submodules they use


def _assert_exports_resolve(aq) -> None:
    """Every name ``autoqra_core`` exports is the object its module defines, never a submodule that shadows it."""
    import importlib
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(aq.__path__)}
    assert not submodules & set(aq.__all__), "an exported name equals a submodule's: importing it shadows the export"
    for name in aq.__all__:
        value = getattr(aq, name)
        assert value is getattr(importlib.import_module(f"autoqra_core.{aq._WHERE[name]}"), name), name


def test_the_public_api_is_not_shadowed_by_its_submodules():
    """``import autoqra_core.model`` (what ``aq.load_model`` does) imports ``.memory``; ``aq.memory_breakdown``
    and every other export must still be the function, not a module."""
    import autoqra_core as aq
    import autoqra_core.model  # noqa: F401  (the submodules load_model imports)

    for module in set(aq._WHERE.values()):
        importlib.import_module(f"autoqra_core.{module}")
    _assert_exports_resolve(aq)
