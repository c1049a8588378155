"""Bad input through the command line: exit code 2 and a message naming the problem, before any work starts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .helpers import AUTOQRA, ROOT, cli_env


def autoqra(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*AUTOQRA, *args], cwd=ROOT, env=cli_env(home, **env), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli-home")


@pytest.mark.parametrize(
    "args,message",
    [
        (["search", "--model", "/nonexistent/model"], "model '/nonexistent/model' not found"),
        (["search", "--dataset", "/nonexistent/data.jsonl"], "dataset '/nonexistent/data.jsonl' not found"),
        (["search", "--budget", "1MB"], "below the smallest feasible configuration"),
        (["search", "--budget", "lots"], "cannot read the budget 'lots'"),
    ],
)
def test_bad_search_input_exits_2(home, tmp_path, args, message):
    r = autoqra(*args, "--out", str(tmp_path / "out"), home=home)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in " ".join(r.stderr.split())
    assert not (tmp_path / "out" / "result.json").exists()


def test_a_column_mapping_naming_a_missing_column_exits_2(home, tmp_path):
    rows = [{"instruction": f"Add one to {a}.", "output": str(a + 1)} for a in range(100)]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = autoqra("search", "--dataset", str(data), "--columns", "prompt=instruction,completion=answer",
                "--out", str(tmp_path / "out"), home=home)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "the column mapping completion=answer names column(s) ['answer'] this row does not have" in " ".join(
        r.stderr.split())
    assert not (tmp_path / "out").exists()


def test_malformed_settings_file_names_the_field(home, tmp_path):
    cfg = tmp_path / "search.yaml"
    cfg.write_text("space:\n  bits: [2, 5]\nsearch:\n  generatons: 3\n")
    r = autoqra("search", "--config", str(cfg), "--out", str(tmp_path / "o"), home=home)
    assert r.returncode == 2
    err = " ".join(r.stderr.split())
    assert "space.bits" in err and "search.generatons" in err


def test_evaluate_config_outside_the_space(home, tmp_path):
    layers = [{"name": f"model.layers.{i}", "bits": 4, "rank": 16} for i in range(6)]
    layers[2]["rank"] = 7
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"layers": layers}))
    r = autoqra("evaluate", "--config", str(path), home=home)
    assert r.returncode == 2
    assert "layer 'model.layers.2': rank 7 is outside the space" in " ".join(r.stderr.split())


def test_resume_with_other_parameters_is_refused(home, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "search-state.json").write_text(json.dumps({"params": {"seed": 99}, "state": {}}))
    r = autoqra("search", "--out", str(out), home=home)
    assert r.returncode == 2
    err = " ".join(r.stderr.split())
    assert "holds a search with other parameters" in err and "seed" in err
    assert json.loads((out / "search-state.json").read_text())["params"] == {"seed": 99}  # nothing lost


def test_unreachable_tracking_server_fails_fast(home, tmp_path):
    r = autoqra("search", "--out", str(tmp_path / "o"), home=home, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert r.returncode == 2
    err = " ".join(r.stderr.split())
    assert "http://127.0.0.1:9" in err and "MLFLOW_TRACKING_URI" in err
    assert not (tmp_path / "o").exists()


def test_unreachable_object_store_fails_fast(home, tmp_path):
    r = autoqra("search", "--out", str(tmp_path / "o"), "--store", "s3://bucket/x", home=home,
                AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="A" * 20, AWS_SECRET_ACCESS_KEY="s" * 40)
    assert r.returncode == 2
    err = " ".join(r.stderr.split())
    assert "http://127.0.0.1:9" in err and "AWS_ENDPOINT_URL" in err, err
    assert not (tmp_path / "o").exists()


def test_export_of_a_folder_without_a_search(home, tmp_path):
    r = autoqra("export", "--run", str(tmp_path), home=home)
    assert r.returncode == 2 and "result.json not found" in r.stderr


def test_export_names_the_formats_it_writes(home, tmp_path):
    r = autoqra("export", "--run", str(tmp_path), "--formats", "ct,onnx", home=home)
    assert r.returncode == 2 and "--formats 'ct,onnx'" in r.stderr and "ct, gguf" in r.stderr, r.stderr


def test_the_cli_the_flows_and_their_deployments_share_defaults():
    """A deployment run from the Prefect UI behaves like the same command line: `autoqra search` / `baselines`,
    the flows and prefect.yaml agree on every default they share (``--baselines`` included)."""
    import inspect

    import yaml
    from typer.main import get_command

    from flows import export, search
    from flows.cli import app

    flows = {"search": search.search_flow, "baselines": search.baselines_flow, "evaluate": search.evaluate_flow,
             "export": export.export_flow}
    defaults = {name: {k: p.default for k, p in inspect.signature(f.fn).parameters.items()
                       if p.default is not inspect.Parameter.empty} for name, f in flows.items()}
    for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]:
        shared = {k: v for k, v in d["parameters"].items() if k in defaults[d["name"]]}
        assert shared == {k: defaults[d["name"]][k] for k in shared}, d["name"]
    commands = get_command(app).commands
    for name in ("search", "baselines"):
        cli = {p.name: p.default for p in commands[name].params if p.name in defaults[name]}
        assert {"model", "budget", "out", "seed"} <= set(cli) and (name != "search" or "baselines" in cli)
        assert {k: str(v) for k, v in cli.items()} == {k: str(defaults[name][k]) for k in cli}, name


def test_the_summary_shows_each_methods_test_numbers_and_the_paired_difference(capsys, monkeypatch):
    """After a search the CLI prints, per method, the validation loss it was chosen on, its test mean ± sd over the
    report's seeds and its paired difference to uniform-4bit-r16 (from result.json's test entries)."""
    from autoqra_core.protocol import SeedScores, compare
    from autoqra_core.space import SearchSpace
    from flows.cli import _summary

    monkeypatch.setenv("COLUMNS", "200")
    config = SearchSpace(("a", "b")).uniform(4, 16).to_dict()
    tests = compare({"autoqra": SeedScores((1, 2), (1.0, 1.2), (0.5, 0.6)),
                     "uniform-4bit-r16": SeedScores((1, 2), (1.5, 1.6), (0.4, 0.4))})
    result = {"budget_bytes": 2**20, "protocol": {"report_seeds": [1, 2], "test_examples": 30},
              "best": {"config": config, "eval_loss": 0.9, "memory_bytes": 2**19, "test": tests["autoqra"]},
              "baselines": {"uniform-4bit-r16": {"config": config, "eval_loss": 1.4, "memory_bytes": 2**19,
                                                 "test": tests["uniform-4bit-r16"]}}}
    _summary(result)
    out = capsys.readouterr().out
    assert "test on seeds [1, 2], 30 rows" in out and "1.1000 ± 0.1414" in out and "1.5500 ± 0.0707" in out
    assert "-0.4500 ± 0.0707* (2/2 lower)" in out and "0.550 ± 0.071" in out
