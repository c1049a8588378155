"""The export folder reloads with standard tools alone and reproduces the exported model's test loss;
the registered champion loads as an MLflow pyfunc and answers over REST from ``mlflow models serve``.

Tolerances: fp32 on the CPU. ``model/`` + ``adapter/`` (packed HQQ, dequantized per forward) vs the
fine-tuned model in memory (``sim``: the same dequantized weights held as fp32): 1e-4. ``merged/`` in fp32:
1e-4; in bf16 the weights round to 8 bits of mantissa: 2e-2 (measured 7e-5 on the embedded model).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from .helpers import EMBEDDED_DATA, EMBEDDED_MODEL, embedded  # noqa: F401 - fixture

TINY_EXPORT = {"steps": 4, "data_fraction": 0.02, "seq_len": 32, "batch_size": 4,  # the fine-tune (train:)
               "eval_examples": 12}  # test rows scored (report.test_examples)
BITS, RANKS = [2, 3, 4, 8, 16, 4], [8, 0, 16, 4, 8, 32]  # every bit-width, unquantized, and a layer without LoRA

# Scores a folder with transformers/hqq/peft only and proves autoqra was never imported.
RELOAD = r"""
import json, sys, torch
kind, folder, data = sys.argv[1:4]
if kind == "ct-without-adapter":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder + "/model-ct", dtype=torch.float32)
elif kind == "ct":
    from peft import PeftModel; from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder + "/model-ct", dtype=torch.float32),
                                      folder + "/adapter")
elif kind == "merged-ct":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder + "/merged-ct", dtype=torch.float32)
elif kind == "gguf":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder + "/gguf", gguf_file="model.gguf", dtype=torch.float32)
elif kind == "quantized":
    from hqq.models.hf.base import AutoHQQHFModel; from peft import PeftModel
    model = PeftModel.from_pretrained(AutoHQQHFModel.from_quantized(folder + "/model", compute_dtype=torch.float32,
                                                                    device="cpu"), folder + "/adapter")
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder + "/merged", dtype=torch.float32)
d = torch.load(data)
with torch.no_grad():
    logits = model.eval()(input_ids=d["ids"]).logits[:, :-1].float()
nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), d["ids"][:, 1:], reduction="none")
mask = d["mask"][:, 1:].float()
print(json.dumps({"loss": float((nll * mask).sum() / mask.sum()),
                  "autoqra_imported": sorted(m for m in sys.modules if m.split(".")[0] in ("autoqra_core", "tasks", "flows", "infra"))}))
"""


def _config(lmap):
    from autoqra_core.space import Config, LayerChoice

    return Config(tuple(LayerChoice(n, b, r) for n, b, r in zip(lmap.names, BITS, RANKS)))


def _eval_data(task, tok, folder: Path) -> Path:
    """The test rows TINY_EXPORT scores (the correct choice of each), saved for a process without AutoQRA."""
    from autoqra_core.data import eval_set

    ev = eval_set(task, tok, TINY_EXPORT["eval_examples"], max_len=TINY_EXPORT["seq_len"], split="test")
    torch.save({"ids": ev.input_ids[ev.correct], "mask": ev.target_mask[ev.correct]}, folder / "eval.pt")
    return folder / "eval.pt"


def _reload_loss(kind: str, folder: Path, data: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", RELOAD, kind, str(folder), str(data)], cwd=folder, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A test report of one configuration over two seeds (tiny fine-tune), then the export of its first seed's
    run (merged/ in fp32) into a temporary folder, as the export flow writes it."""
    from autoqra_core import export as ex
    from autoqra_core.data import load_task
    from autoqra_core.fidelity import Fidelity
    from autoqra_core.finetune import TrainSettings, run_config
    from autoqra_core.model import layer_map, load_model
    from autoqra_core.protocol import SeedScores
    from autoqra_core.quantize import QuantSettings

    out = tmp_path_factory.mktemp("export") / "champion"
    base, tok = load_model(EMBEDDED_MODEL)
    task, lmap = load_task(EMBEDDED_DATA), layer_map(base)
    cfg, q = _config(lmap), QuantSettings("sim")
    fid = Fidelity(**TINY_EXPORT)
    report = {s: run_config(base, tok, task, lmap, cfg, fid, 0, 0, q, TrainSettings(seed=s), split="test")
              for s in (1, 2)}
    scores = SeedScores.from_evaluations([1, 2], [report[s][0] for s in (1, 2)]).to_dict()
    metrics = ex.write_export(base, tok, task, lmap, cfg, report[1][1], fid,
                              ex.ExportSettings(merge=True, merged_dtype="float32"), q, TrainSettings(seed=1), out,
                              scores)
    return out, metrics, cfg


@pytest.mark.slow
def test_the_readmes_loading_code_answers_a_prompt(exported, capsys):
    """The README's loading code as a user copies it, only its folder pointed at this export: model/ + adapter/
    through hqq, peft and transformers alone, then one generate() call."""
    import re

    from .helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "AutoHQQHFModel" in b)
    code = block.replace('"demo-output/export/autoqra-embedded"', repr(str(exported[0])))
    assert code != block, "the README's loading code no longer names demo-output's export folder"
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.startswith("apple: ")


@pytest.mark.slow
def test_export_folder_reloads_without_autoqra(exported, embedded, tmp_path):
    out, metrics, cfg = exported
    model, tok, task, lmap = embedded

    # The reported numbers are the report's, over both seeds; the exported run is its first seed's (the same run:
    # the same test loss to the last digit), and the files reproduce the model in memory.
    t = metrics["test"]
    assert t["seeds"] == [1, 2] and t["loss_sd"] > 0 and metrics["exported_seed"] == 1
    assert metrics["in_memory"]["loss"] == t["losses"][0]
    assert metrics["files"]["loss"] == pytest.approx(metrics["in_memory"]["loss"], abs=1e-4)
    assert metrics["merged"]["loss"] == pytest.approx(metrics["in_memory"]["loss"], abs=1e-4)
    assert metrics["fine_tune"]["steps"] == 4 and len(metrics["training_curves"]["1"]) == 4

    # Per-layer bits are in the packed weights, per-layer ranks in the adapter.
    state = torch.load(out / "model" / "qmodel.pt", weights_only=True)
    for (layer, mods), bits in zip(lmap.layers, BITS):
        for m in mods:
            assert (int(state[m]["nbits"]) == bits) if bits < 16 else ("W_q" not in state[m] and "weight" in state[m])
    acfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    got = {k.replace("\\", ""): v for k, v in acfg["rank_pattern"].items()}
    for (layer, mods), r in zip(lmap.layers, RANKS):
        assert all(got.get(m) == r for m in mods) if r else not any(m in got for m in mods)

    # A fresh process that never imports autoqra loads model/+adapter/ and merged/ and gets the same loss.
    data = _eval_data(task, tok, tmp_path)
    quantized, merged = _reload_loss("quantized", out, data), _reload_loss("merged", out, data)
    assert quantized["autoqra_imported"] == [] and merged["autoqra_imported"] == []
    assert quantized["loss"] == pytest.approx(metrics["files"]["loss"], abs=1e-4)
    assert merged["loss"] == pytest.approx(metrics["in_memory"]["loss"], abs=1e-4)


@pytest.mark.slow
def test_deployable_formats_load_with_transformers_alone(exported, embedded, tmp_path):
    """model-ct/ + adapter/ (compressed-tensors), merged-ct/ and gguf/ load in a process that never imports
    AutoQRA: model-ct/ holds HQQ's weights exactly (checked weight by weight) and reproduces the fine-tuned
    model's loss; merged-ct/ holds the merged weights re-quantized at each layer's bits; gguf/ holds each weight
    in its layer's GGML type, as the gguf package rounds it."""
    import gguf
    from safetensors.torch import load_file

    from autoqra_core import export as ex
    from autoqra_core.formats import GGUF_TYPES

    out, metrics, cfg = exported
    base, tok, task, lmap = embedded
    # Transcoding: every quantized module's stored (q', scale, zero') dequantizes to HQQ's own weights.
    ct = load_file(out / "model-ct" / "model.safetensors")
    qcfg = json.loads((out / "model-ct" / "config.json").read_text())["quantization_config"]
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(qcfg)
    targets = {m: g["weights"]["num_bits"] for g in qcfg["config_groups"].values() for m in g["targets"]}
    deq = ex.dequantized(base, cfg, lmap, 64)
    for (layer, mods), bits in zip(lmap.layers, BITS):
        for m in mods:
            if bits >= 16:  # unquantized: a plain weight, in no group
                assert m not in targets and ct[f"{m}.weight"].dtype == torch.float32
                continue
            assert targets[m] == bits and ct[f"{m}.weight"].dtype == torch.int8
            # compressed-tensors' dequantization: (q' - zero') * scale per group of 64 input features
            q, scale, zero = ct[f"{m}.weight"].float(), ct[f"{m}.weight_scale"], ct[f"{m}.weight_zero_point"]
            w = ((q.reshape(q.shape[0], -1, 64) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(q.shape)
            assert torch.allclose(w, deq.get_submodule(m).weight, atol=1e-6), m
    # gguf/: each linear weight in its layer's type (rows of 256 and 704 inputs: both multiples of 32).
    reader = gguf.GGUFReader(out / "gguf" / "model.gguf")
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    for i, bits in enumerate(BITS):
        assert kinds[f"blk.{i}.attn_q.weight"] == GGUF_TYPES.get(bits, "F16")
        assert kinds[f"blk.{i}.attn_norm.weight"] == "F32"
    assert metrics["formats"]["gguf"]["tensor_types"] == kinds
    # `autoqra estimate`'s serving bytes: GGUF's tensor data as written (norms are F32 there, 16-bit in the
    # estimate) and model/'s packed state (HQQ's scale/zero in fp32 here: 4 bytes).
    from autoqra_core.formats import serving_bytes
    from autoqra_core.model import model_shape

    shape = model_shape(base, lmap)
    assert serving_bytes(cfg, shape)["gguf/"] == pytest.approx(sum(int(t.n_bytes) for t in reader.tensors), rel=0.01)
    packed = serving_bytes(cfg, shape, dtype_bytes=4)
    assert packed["model/+adapter/"] == pytest.approx(ex.folder_bytes(out / "model") + ex.folder_bytes(out / "adapter")
                                                      - sum(f.stat().st_size for f in (out / "model").glob("tok*")),
                                                      rel=0.03)
    # A fresh process: the same loss as the export measured, within 1e-3 of the model in memory for model-ct/.
    data = _eval_data(task, tok, tmp_path)
    ct_run, gguf_run = _reload_loss("ct", out, data), _reload_loss("gguf", out, data)
    assert ct_run["autoqra_imported"] == [] and gguf_run["autoqra_imported"] == []
    assert ct_run["loss"] == pytest.approx(metrics["in_memory"]["loss"], abs=1e-3)
    assert ct_run["loss"] == pytest.approx(metrics["formats"]["ct"]["loss"], abs=1e-4)
    assert gguf_run["loss"] == pytest.approx(metrics["formats"]["gguf"]["loss"], abs=1e-4)
    assert metrics["formats"]["gguf"]["loss"] == pytest.approx(metrics["in_memory"]["loss"], abs=0.2)
    # merged-ct/: the merged model re-quantized at the searched bits, the same groups as model-ct/.
    mcfg = json.loads((out / "merged-ct" / "config.json").read_text())["quantization_config"]
    assert {m: g["weights"]["num_bits"] for g in mcfg["config_groups"].values() for m in g["targets"]} == targets
    assert "lora_A" not in "".join(load_file(out / "merged-ct" / "model.safetensors"))
    merged_ct = _reload_loss("merged-ct", out, data)
    assert merged_ct["autoqra_imported"] == []
    assert merged_ct["loss"] == pytest.approx(metrics["formats"]["merged-ct"]["loss"], abs=1e-4)
    # Re-quantizing the merged weights moves the loss (by how much is the card's), but it keeps the adapter's
    # effect: closer to the fine-tuned model than the quantized base without its adapter.
    plain = _reload_loss("ct-without-adapter", out, data)["loss"]
    assert abs(merged_ct["loss"] - metrics["in_memory"]["loss"]) < abs(plain - metrics["in_memory"]["loss"])
    assert set(metrics["bytes"]) == {"model", "adapter", "merged", "model-ct", "merged-ct", "gguf"}


@pytest.mark.slow
def test_bf16_merge_is_close_and_transformers_alone_loads_it(exported, embedded, tmp_path):
    from autoqra_core import export as ex
    from autoqra_core.data import eval_set
    from autoqra_core.scoring import score
    from transformers import AutoModelForCausalLM

    out, metrics, cfg = exported
    base, tok, task, lmap = embedded
    merged = ex.merge(base, cfg, lmap, 64, out / "adapter", torch.bfloat16)
    ex.save_merged(merged, tok, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert reloaded.dtype == torch.bfloat16
    test_rows = eval_set(task, tok, TINY_EXPORT["eval_examples"], TINY_EXPORT["seq_len"], split="test")
    loss, _ = score(reloaded.float(), test_rows)
    assert loss == pytest.approx(metrics["in_memory"]["loss"], abs=2e-2)
    # Merging into the dequantized base is what keeps the adapter: without it the loss is the plain base's.
    plain, _ = score(ex.dequantized(base, cfg, lmap, 64), test_rows)
    assert abs(plain - metrics["in_memory"]["loss"]) > 10 * abs(loss - metrics["in_memory"]["loss"])


@pytest.mark.slow
def test_model_card_has_what_a_user_needs(exported):
    from autoqra_core.export import Card
    from infra.fingerprint import library_versions

    out, metrics, cfg = exported
    card = Card(name="autoqra-x", base_model="m", dataset="d", config=cfg, budget_bytes=5 * 2**20,
                memory={"weights": 2**20, "total": 3 * 2**20}, test=metrics["test"], fine_tune=metrics["fine_tune"],
                exported={"seed": metrics["exported_seed"], **metrics["in_memory"]},
                versions=library_versions(), mlflow_run_id="run123", prefect_flow_run_id="flow456",
                merged=metrics["merged"], formats=metrics["formats"], bytes=metrics["bytes"]).render()
    for needle in ("model-ct/ + adapter/ (transformers)", "merged-ct/ (merged, re-quantized)", "gguf/ (merged)", "Q8_0 ", "vllm serve", "| model-ct/ |",
                   "run123", "flow456", "AutoHQQHFModel.from_quantized", "PeftModel.from_pretrained",
                   "| model.layers.0 | 2 | 8 |", "allocation.png", "5.00 MiB", "hqq", "transformers",
                   f"{metrics['test']['loss_mean']:.4f} ± {metrics['test']['loss_sd']:.4f}"):
        assert needle in card, needle


def test_a_result_without_its_settings_is_refused_with_the_fix(tmp_path):
    from autoqra_core.errors import AutoQRAError
    from flows.config import RunConfig
    from flows.export import read_result

    result = {"model": "m", "dataset": "d", "budget_bytes": 1, "best": {"config": {"layers": []}}}
    (tmp_path / "result.json").write_text(json.dumps(result))
    with pytest.raises(AutoQRAError, match="re-run the search with the same --out"):
        read_result(tmp_path)
    settings = RunConfig().model_dump(mode="json")
    (tmp_path / "result.json").write_text(json.dumps({**result, "settings": settings, "seed": 0}))
    assert read_result(tmp_path)["settings"] == settings


# ---------------------------------------------------------------- registry and serving


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """export_flow on a result.json (tiny export settings), MLflow on a SQLite file, a local store."""
    from flows.config import RunConfig
    from prefect.testing.utilities import prefect_test_harness

    from autoqra_core.model import layer_map, load_model

    home = tmp_path_factory.mktemp("registry-home")
    mp = pytest.MonkeyPatch()
    env = {"AUTOQRA_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
           "AUTOQRA_STORE": (home / "store").as_uri(), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results")}
    for k, v in env.items():
        mp.setenv(k, v)
    base, _ = load_model(EMBEDDED_MODEL)
    cfg = _config(layer_map(base))
    fine_tune = {k: v for k, v in TINY_EXPORT.items() if k != "eval_examples"}
    settings = RunConfig.model_validate({"train": fine_tune, "search": {"rungs": [{"fraction": 1.0}]},
                                         "report": {"test_examples": TINY_EXPORT["eval_examples"]},
                                         "space": {"bits": [2, 3, 4, 8, 16]}})
    run = home / "run"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({
        "model": str(EMBEDDED_MODEL), "dataset": str(EMBEDDED_DATA), "budget_bytes": 100_000_000, "seed": 0,
        "settings": settings.model_dump(mode="json"), "best": {"config": cfg.to_dict(), "eval_loss": 3.0}}))
    from flows.export import export_flow

    try:
        with prefect_test_harness(server_startup_timeout=180):
            first = export_flow(str(run))
            metrics = Path(first["export_dir"]) / "autoqra_metrics.json"
            written = metrics.stat().st_mtime_ns
            second = export_flow(str(run))  # Prefect's cache: the fine-tune is reused, its files left as they are
            reused = metrics.stat().st_mtime_ns == written
            shutil.rmtree(Path(first["export_dir"]) / "model")
            export_flow(str(run))  # its files gone: fine-tuned again, not served from the cache
            redone = (Path(first["export_dir"]) / "model").is_dir() and metrics.stat().st_mtime_ns != written
        yield first, second, env, (reused, redone)
    finally:
        mp.undo()


@pytest.mark.slow
def test_an_export_rerun_reuses_the_fine_tune_unless_its_files_are_gone(registered):
    first, second, _, (reused, redone) = registered
    assert reused and second["test"] == first["test"]
    assert redone


@pytest.mark.slow
def test_registered_champion_loads_as_pyfunc(registered, embedded):
    import mlflow
    import pandas as pd

    from infra import tracking

    first, second, env, _ = registered
    _, _, task, _ = embedded
    uri = env["MLFLOW_TRACKING_URI"]
    # The same run exported twice is one version; the alias, tags and card are on it.
    c = tracking.client(uri)
    versions = c.search_model_versions(f"name='{first['registered_model']}'")
    assert len(versions) == 1 and first["version"] == second["version"] == "1"
    v = tracking.resolve_alias(first["registered_model"], "champion", uri)
    for tag in ("budget_bytes", "memory_bytes", "test_loss", "test_accuracy", "mean_bits", "mean_rank"):
        assert tag in v.tags, tag
    assert float(v.tags["test_loss"]) == pytest.approx(second["test"]["loss_mean"])
    assert "AutoHQQHFModel.from_quantized" in v.description and "| model.layers.0 | 2 | 8 |" in v.description
    logged = [a.path for a in c.list_artifacts(first["mlflow_run_id"], "export")]
    assert logged == ["export/training_curve.png"]  # the final fine-tune's curve, beside the pyfunc model

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{first['registered_model']}@champion")
    finally:  # process-wide settings: later tests talk to other servers
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    rows = [dict(prompt=r["prompt"], choices=r["choices"]) for r in task.test[:TINY_EXPORT["eval_examples"]]]
    pred = model.predict(pd.DataFrame(rows))
    acc = sum(p["choice"] == r["label"] for p, r in zip(pred, task.test)) / len(rows)
    assert acc == pytest.approx(second["files"]["accuracy"])  # the export's own accuracy, from the registry
    inner = model.unwrap_python_model().model  # the base came from model-ct/ through transformers, not hqq
    assert not any(type(m).__name__ == "HQQLinear" for m in inner.modules())
    text = model.predict(pd.DataFrame([{"prompt": "dog:"}]), params={"max_new_tokens": 5})
    assert isinstance(text[0]["text"], str)


@pytest.mark.slow
def test_mlflow_models_serve_answers_rest(registered, embedded):
    from infra.stack import free_port

    first, _, env, _ = registered
    _, _, task, _ = embedded
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{first['registered_model']}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        # MLflow execs `uvicorn` from PATH: the venv's bin, as in an activated venv.
        env={**os.environ, **env, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "mlflow models serve did not answer /ping in 120 s"
            time.sleep(1)
        row = task.test[0]
        body = json.dumps({"dataframe_records": [{"prompt": row["prompt"], "choices": row["choices"]}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            got = json.loads(r.read())["predictions"][0]
        assert len(got["scores"]) == len(row["choices"]) and got["choice"] in range(len(row["choices"]))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)  # the server and its uvicorn worker
        proc.wait(timeout=30)
    deadline = time.time() + 20
    while time.time() < deadline:  # really stopped (its uvicorn worker may outlive the parent by a moment)
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
        except OSError:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the served model still answers on port {port} after being stopped")
