"""infra/: settings, object storage, MLflow tracking/registry, local stack, plots — against real servers."""

from __future__ import annotations

import filecmp
import json
import os
import time
from pathlib import Path

import pytest

from infra import stack as local_stack
from infra import tracking
from infra.plots import plot_allocation, plot_pareto, plot_progress
from infra.settings import Settings, SettingsError, embedded_dataset_path, embedded_model_path
from infra.storage import StoreError, open_store
from infra.tracking import TrackingError

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def _config(pairs: list[tuple[int, int]]) -> dict:
    return {"layers": [{"name": f"model.layers.{i}", "bits": b, "rank": r} for i, (b, r) in enumerate(pairs)]}


def _tree(root: Path) -> Path:
    """A small adapter-like folder: nested files, binary and text."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "adapter_model.safetensors").write_bytes(os.urandom(300_000))
    (root / "adapter_config.json").write_text(json.dumps({"r": 16, "rank_pattern": {"layers.0.mlp": 64}}))
    (root / "sub" / "deeper" / "quant.json").write_text('{"bits": [2, 4, 8]}')
    return root


# --- settings ------------------------------------------------------------------------------


def test_settings_defaults_precedence_and_redaction(tmp_path: Path) -> None:
    env = {"AUTOQRA_HOME": str(tmp_path / "h"), "AWS_SECRET_ACCESS_KEY": SECRET, "AUTOQRA_STORE": "s3://envbucket/p"}
    s = Settings.load(environ=env)
    assert s.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'h' / 'mlflow.db'}"
    assert s.prefect_api_url is None and s.store == "s3://envbucket/p"
    assert SECRET not in repr(s) and SECRET not in str(s) and s.redacted()["aws_secret_access_key"] == "***"

    file = tmp_path / "settings.yaml"
    file.write_text("AUTOQRA_STORE: s3://filebucket/x\nmlflow_tracking_uri: http://127.0.0.1:5000\n")
    s = Settings.load(file, overrides={"store": "file:///tmp/flag", "prefect_api_url": None}, environ=env)
    assert s.store == "file:///tmp/flag"  # flag > file > environment
    assert s.mlflow_tracking_uri == "http://127.0.0.1:5000"
    assert s.to_env()["AWS_SECRET_ACCESS_KEY"] == SECRET

    bad = tmp_path / "bad.yaml"
    bad.write_text("MLFLOW_TRACKING_URL: oops\n")
    with pytest.raises(SettingsError, match="MLFLOW_TRACKING_URL"):
        Settings.load(bad, environ={})
    default = Settings.load(environ={"AUTOQRA_HOME": str(tmp_path)})
    assert default.store == (tmp_path / "store").as_uri()


def test_the_embedded_model_and_task_are_what_the_docs_say() -> None:
    """The shipped checkpoint is a loadable Hugging Face folder and the WordNet task has the documented splits."""
    from autoqra_core.data import load_task

    model = embedded_model_path()
    assert (model / "config.json").is_file() and json.loads((model / "config.json").read_text())["num_hidden_layers"] == 6
    assert any(model.glob("*.safetensors")) and (model / "tokenizer.json").is_file()
    task = load_task(embedded_dataset_path())
    assert (len(task.train), len(task.validation), len(task.test)) == (20_000, 600, 1_000)


def test_shipped_addition_task_resolves_loads_and_rebuilds_identically() -> None:
    """``--dataset addition`` is the shipped two-digit addition task, and ``build.py --tasks addition`` would
    write exactly the committed rows (so what was benchmarked is what ships)."""
    from autoqra_core.data import load_task
    from flows.prepared_run import resolve
    from infra.embedded.build import SIZES, TASKS

    assert resolve("embedded", "dataset") == str(embedded_dataset_path()) == resolve("wordnet", "dataset")
    path = resolve("addition", "dataset")
    assert path == str(embedded_dataset_path("addition"))
    task = load_task(path)
    assert task.labelled and (len(task.train), len(task.held_out("validation")), len(task.held_out("test"))) == (6482, 600, 856)
    for split, rows in zip(("train", "validation", "test"), TASKS["addition"](SIZES)):
        shipped = [json.loads(line) for line in (Path(path) / f"{split}.jsonl").read_text().splitlines()]
        assert shipped == rows


# --- storage ----------------------------------------------------------------------------------


def test_file_store_roundtrip(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    store = open_store((tmp_path / "store").as_uri())
    keys = store.put_dir(src, "runs/r1/adapter")
    assert sorted(keys) == store.list("runs/r1")
    assert store.list("runs/r") == []  # prefixes match whole path components
    assert store.exists("runs/r1/adapter/sub/deeper/quant.json") and not store.exists("runs/r1/nope")
    assert store.url_for("a/b.json") == (tmp_path / "store" / "a" / "b.json").as_uri()
    store.get_dir("runs/r1/adapter", tmp_path / "back")
    cmp = filecmp.dircmp(src, tmp_path / "back")
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    with pytest.raises(StoreError):
        store.put_file(src / "adapter_config.json", "../escape.json")


@pytest.mark.slow
def test_s3_store_roundtrip_on_real_server(s3_server: local_stack.Stack, tmp_path: Path, monkeypatch) -> None:
    import boto3

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    src = _tree(tmp_path / "src")
    store = open_store("s3://fresh-bucket/exports/run1")  # bucket does not exist yet: created
    keys = store.put_dir(src, "adapter")
    assert len(keys) == 3 and store.list("adapter") == sorted(keys)
    assert store.exists("adapter/sub/deeper/quant.json") and not store.exists("adapter/missing")
    assert store.url_for("adapter/adapter_config.json") == "s3://fresh-bucket/exports/run1/adapter/adapter_config.json"

    # Read back with plain boto3 (what any other S3 client would see) and through the store.
    env = s3_server.env()
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket="fresh-bucket", Prefix="exports/run1/")["Contents"]]
    assert sorted(listed) == sorted(f"exports/run1/{k}" for k in keys)
    body = s3.get_object(Bucket="fresh-bucket", Key="exports/run1/adapter/adapter_model.safetensors")["Body"].read()
    assert body == (src / "adapter_model.safetensors").read_bytes()
    store.get_dir("adapter", tmp_path / "back")
    cmp = filecmp.dircmp(src, tmp_path / "back", ignore=[])
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    assert filecmp.cmp(src / "sub/deeper/quant.json", tmp_path / "back/sub/deeper/quant.json", shallow=False)

    # The secret reaches rclone through its environment, never its command line.
    cmdline = Path(f"/proc/{s3_server.services['s3'].pid}/cmdline").read_bytes()
    assert env["AWS_SECRET_ACCESS_KEY"].encode() not in cmdline

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x" * 40)
    with pytest.raises(StoreError, match="AWS_SECRET_ACCESS_KEY"):
        open_store("s3://fresh-bucket/exports")


def test_s3_unreachable_endpoint_fails_fast(monkeypatch) -> None:
    port = local_stack.free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    start = time.monotonic()
    with pytest.raises(StoreError) as err:
        open_store("s3://bucket/prefix")
    assert time.monotonic() - start < 8
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "AWS_ENDPOINT_URL" in message and "AUTOQRA_STORE" in message
    assert SECRET not in message
    from autoqra_core.errors import AutoQRAError

    assert isinstance(err.value, AutoQRAError)


# --- tracking -------------------------------------------------------------------------------


@pytest.mark.slow
def test_mlflow_server_nested_runs_and_champion_alias(mlflow_server: local_stack.Stack, tmp_path: Path, monkeypatch) -> None:
    import boto3
    import mlflow

    uri = mlflow_server.env()["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # must never be logged
    exp_id = tracking.ensure_experiment("autoqra-test", uri=uri)
    assert tracking.ensure_experiment("autoqra-test", uri=uri) == exp_id  # idempotent
    parent = tracking.start_search_run(
        exp_id, "search", params={"model": "embedded", "budget_bytes": 123, "aws_secret_access_key": SECRET}, uri=uri
    )
    configs = [_config([(2, 64), (4, 16), (8, 0)]), _config([(4, 16)] * 3), _config([(3, 32), (3, 32), (8, 4)])]
    children = []
    for i, cfg in enumerate(configs):
        children.append(
            tracking.log_evaluation(
                parent,
                {"config": cfg, "fidelity": i % 2, "eval_loss": 2.5 - 0.1 * i, "accuracy": 0.3 + 0.1 * i,
                 "memory_bytes": 5_000_000 + i, "seconds": 1.5, "status": "ok", "stage": "evolution"},
                uri=uri,
            )
        )  # fmt: skip
    children.append(
        tracking.log_evaluation(
            parent,
            {"config": configs[0], "fidelity": 0, "eval_loss": float("nan"), "memory_bytes": 1, "seconds": 0.2,
             "status": "failed", "reason": "NaN loss"},
            uri=uri,
        )
    )  # fmt: skip
    for step in range(3):
        tracking.log_progress(parent, step, {"best_eval_loss": 2.5 - 0.1 * step, "evaluations": 2 * step}, uri=uri)

    adapter = _tree(tmp_path / "adapter")
    plot = plot_allocation(configs[0], tmp_path / "allocation.png")
    tracking.log_artifacts(parent, [adapter, plot], uri=uri)
    version = tracking.register_model(parent, "adapter", "autoqra-test-model", uri=uri)
    tracking.end_run(parent, uri=uri)

    client = tracking.client(uri)
    nested = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_id for r in nested) == sorted(children)
    assert {r.info.status for r in nested} == {"FINISHED", "FAILED"}
    ok = next(r for r in nested if r.info.run_id == children[0])
    assert ok.data.params["bits"] == "2,4,8" and ok.data.params["ranks"] == "64,16,0" and ok.data.params["rung"] == "0"
    assert ok.data.metrics["eval_loss"] == pytest.approx(2.5) and ok.data.metrics["memory_bytes"] == 5_000_000
    failed = next(r for r in nested if r.info.run_id == children[-1])
    assert failed.data.tags["autoqra.reason"] == "NaN loss" and "eval_loss" not in failed.data.metrics
    history = client.get_metric_history(parent, "best_eval_loss")
    assert [m.step for m in history] == [0, 1, 2]
    parent_run = client.get_run(parent)
    assert "aws_secret_access_key" not in parent_run.data.params
    assert SECRET not in json.dumps([parent_run.data.params, parent_run.data.tags])

    # Registry: alias "champion" resolves through MLflow's own models:/ URI to the adapter files.
    assert version.aliases == ["champion"]
    assert client.get_model_version_by_alias("autoqra-test-model", "champion").version == version.version
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # process-wide: whatever an earlier test left there, models:/ resolves here
    try:
        got = Path(mlflow.artifacts.download_artifacts("models:/autoqra-test-model@champion", dst_path=str(tmp_path / "dl")))
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert filecmp.cmp(got / "adapter_model.safetensors", adapter / "adapter_model.safetensors", shallow=False)
    again = tracking.download_model("autoqra-test-model", tmp_path / "dl2", uri=uri)
    assert (again / "sub" / "deeper" / "quant.json").read_text() == '{"bits": [2, 4, 8]}'

    # The server keeps artifacts in the S3 server (bucket "mlflow").
    env = mlflow_server.env()
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")  # fmt: skip
    stored = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow", Prefix="artifacts/")["Contents"]]
    assert any(k.endswith(f"{parent}/artifacts/adapter/adapter_model.safetensors") for k in stored)
    assert any(k.endswith("allocation.png") for k in stored)


def test_mlflow_sqlite_registry_without_server(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = tracking.ensure_experiment("local", uri=uri)
    assert tracking.client(uri).get_experiment(exp_id).artifact_location == (tmp_path / "mlartifacts").as_uri()
    parent = tracking.start_search_run(exp_id, "search", uri=uri)
    tracking.log_evaluation(parent, {"config": _config([(4, 8)]), "fidelity": 1, "eval_loss": 1.0,
                                     "memory_bytes": 10, "seconds": 0.1, "status": "ok"}, uri=uri)  # fmt: skip
    tracking.log_artifacts(parent, [_tree(tmp_path / "adapter")], uri=uri)
    version = tracking.register_model(parent, "adapter", "local-model", uri=uri)
    assert tracking.resolve_alias("local-model", uri=uri).version == version.version
    # The same run's folder registered again: the same version, its tags/description updated.
    again = tracking.register_model(parent, "adapter", "local-model", tags={"test_loss": 1.5}, description="card",
                                    uri=uri)
    assert again.version == version.version and again.tags["test_loss"] == "1.5" and again.description == "card"
    assert len(tracking.client(uri).search_model_versions("name='local-model'")) == 1
    first = tracking.find_or_start_run(exp_id, "export-x", key="export:x/run", uri=uri)
    assert tracking.find_or_start_run(exp_id, "export-x", key="export:x/run", uri=uri) == first != parent
    assert len(tracking.child_runs(parent, uri=uri)) == 1
    # Registering the same run's files again (a retried publish) adds no version.
    again = tracking.register_model(parent, "adapter", "local-model", uri=uri)
    assert again.version == version.version
    assert len(tracking.client(uri).search_model_versions("name = 'local-model'")) == 1
    with pytest.raises(TrackingError, match="no artifacts"):
        tracking.register_model(parent, "not-there", "local-model", uri=uri)


def test_mlflow_unreachable_uri_fails_fast() -> None:
    uri = f"http://127.0.0.1:{local_stack.free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError) as err:
        tracking.check_tracking(uri)
    assert time.monotonic() - start < 5
    assert uri in str(err.value) and "MLFLOW_TRACKING_URI" in str(err.value)
    with pytest.raises(TrackingError):
        tracking.ensure_experiment("x", uri=uri)  # checks before MLflow's own long retry loop


# --- stack ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_stack_up_is_idempotent_and_down_stops_everything(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with local_stack.running(home, services=("s3",)) as stack:
        service = stack.services["s3"]
        assert local_stack.up(home, services=("s3",)).services["s3"].pid == service.pid  # reused, not restarted
        assert (home / "stack" / "pids" / "s3.pid").read_text() == str(service.pid)
        assert stack.env()["AWS_SECRET_ACCESS_KEY"] not in stack.shell_exports()
        assert oct((home / "stack" / "s3-credentials").stat().st_mode)[-3:] == "600"
    assert not local_stack._alive(service)
    assert local_stack.status(home).services == {}
    assert not (home / "stack" / "pids" / "s3.pid").exists()
    assert local_stack.down(home) == []


# --- plots ------------------------------------------------------------------------------------


def test_plots_draw_the_data_they_are_given(tmp_path: Path, monkeypatch) -> None:
    """Each plot is read back from its figure: the allocation's bars are the bits and ranks per layer, the
    progress line is the incumbent's curve, the Pareto plot drops failed points, draws the front in memory
    order, labels each baseline and marks the budget; and each is written as a PNG."""
    import infra.plots as plots

    figures = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), real_save(fig, path))[1])
    cfg = _config([(2, 64), (4, 16), (8, 0), (3, 32)])
    evaluations = [
        {"config": cfg, "memory_bytes": (5 + i) * 2**20, "eval_loss": 3 - 0.05 * i, "status": "ok"} for i in range(10)
    ] + [{"config": cfg, "memory_bytes": 2**20, "eval_loss": float("nan"), "status": "failed"}]
    pareto = [{"memory_bytes": 14 * 2**20, "eval_loss": 2.55}, {"memory_bytes": 5 * 2**20, "eval_loss": 3.0}]
    records = [{"evaluations": i, "best_loss": 3 - 0.02 * i, "stage": "evolution" if i < 8 else "turbo"} for i in range(12)]
    paths = [
        plot_allocation({"config": cfg}, tmp_path / "a.png"),
        plot_progress(records, tmp_path / "p.png"),
        plot_pareto(evaluations, pareto, tmp_path / "sub" / "f.png",
                    baselines={"uniform-4bit-r16": {"memory_bytes": 9 * 2**20, "eval_loss": 2.8}}, budget_bytes=12 * 2**20),
    ]  # fmt: skip
    allocation, progress, front = figures
    bits_ax, rank_ax = allocation.axes
    assert [bar.get_height() for bar in bits_ax.patches] == [2, 4, 8, 3]
    assert [bar.get_height() for bar in rank_ax.patches] == [64, 16, 0, 32]
    assert [t.get_text() for t in rank_ax.get_xticklabels()] == [layer["name"] for layer in cfg["layers"]]
    (curve,) = progress.axes[0].lines
    assert list(curve.get_xdata()) == list(range(12)) and curve.get_ydata()[-1] == pytest.approx(3 - 0.02 * 11)
    assert sorted(t.get_text() for t in progress.axes[0].get_legend().get_texts()) == ["evolution", "turbo"]
    ax = front.axes[0]
    grey = ax.collections[0].get_offsets()
    assert len(grey) == 10 and min(grey[:, 0]) == 5  # the failed 1 MiB point is left out
    front_line, budget_line = ax.lines
    assert list(front_line.get_xdata()) == [5, 14] and list(front_line.get_ydata()) == [3.0, 2.55]
    assert list(budget_line.get_xdata()) == [12, 12]
    assert [t.get_text() for t in ax.texts] == ["uniform-4bit-r16"]
    for path in paths:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_candidate_tasks_keep_held_out_words_out_of_training() -> None:
    """bench/task_choice.py's candidate tasks: every label points at the answer, no distractor is another answer of the
    same subject, and no subject (antonym pair, addition pair in either order) appears in two splits, so a
    held-out question is never trained on."""
    from infra.embedded.build import addition_rows, choice_rows

    pairs = [(f"w{i}", f"h{i % 37}") for i in range(3000)] + [(f"w{i}", f"g{i % 41}") for i in range(300)]
    answers = {}
    for a, b in pairs:
        answers.setdefault(a, set()).add(" " + b)
    antonyms = [(f"a{i}", f"b{i}") for i in range(1500)]
    antonyms += [(b, a) for a, b in antonyms]
    everything = (10**6,) * 3
    hypernym = choice_rows(pairs, "{} is a kind of", everything)
    for rows, key in ((hypernym, lambda r: r["prompt"].split()[0]),
                      (choice_rows(antonyms, "The opposite of {} is", everything, by_pair=True),
                       lambda r: frozenset((r["prompt"].split()[3], r["choices"][r["label"]].strip()))),
                      (addition_rows(everything), lambda r: frozenset(r["prompt"].rstrip(" =").split(" + ")))):
        splits = [{key(r) for r in split} for split in rows]
        assert all(len(s) > 0 for s in splits)
        assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
        assert all(len(set(r["choices"])) == 4 and 0 <= r["label"] < 4 for split in rows for r in split)
    assert sum(map(len, hypernym)) == len(pairs)
    for r in (r for split in hypernym for r in split):
        assert r["choices"][r["label"]] in answers[r["prompt"].split()[0]]
        assert answers[r["prompt"].split()[0]].isdisjoint(c for i, c in enumerate(r["choices"]) if i != r["label"])
    for r in addition_rows(everything)[1]:
        a, b = map(int, r["prompt"].rstrip(" =").split(" + "))
        assert int(r["choices"][r["label"]]) == a + b
