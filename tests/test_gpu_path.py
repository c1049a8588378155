"""The GPU path, checked on the CPU: device placement and dtype, the per-worker cache of packed weights,
the memory model's GPU terms against tensor storage (at SmolLM2-135M's widths), ``autoqra estimate`` from a
config alone, and an existing Dask cluster by address."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch
from typer.testing import CliRunner

from autoqra_core.data import batches, train_blocks
from autoqra_core.errors import DeviceError
from autoqra_core.fidelity import Fidelity
from autoqra_core.finetune import TrainSettings, build, evaluate_config, train
from autoqra_core.memory import MemorySettings, logits_bytes, packed_bytes
from autoqra_core.model import layer_map, load_skeleton
from autoqra_core.packed import PackedCache
from autoqra_core.quantize import QuantSettings, quantize_module, storage_bytes
from autoqra_core.space import SearchSpace

from .helpers import AUTOQRA, EMBEDDED_DATA, EMBEDDED_MODEL, ROOT, TINY_SEARCH, cli_env, embedded  # noqa: F401
from .test_core import static_bytes

SMOLLM2 = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
               vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=256)
TINY = Fidelity(steps=2, data_fraction=0.05, seq_len=32, batch_size=4, eval_examples=16)


# ---- placement and dtype -----------------------------------------------------------------------


def test_auto_device_and_dtype_resolve_to_this_machine():
    q = QuantSettings("sim")
    assert q.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert q.compute_dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert QuantSettings("sim", device="cpu", compute_dtype="bfloat16").compute_dtype == torch.bfloat16


def _no_bf16_units(monkeypatch, units: bool = False) -> None:
    for unit in ("avx512_bf16", "amx_tile"):
        monkeypatch.setattr(torch.cpu, f"_is_{unit}_supported", lambda: units)


def _fp32_products(monkeypatch) -> list:
    """The matrix products every Fp32Matmuls from now on is handed (whatever their dtype), in order."""
    from autoqra_core.device import Fp32Matmuls

    seen, inner = [], Fp32Matmuls.__torch_dispatch__

    def spy(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            seen.append(func)
        return inner(self, func, types, args, kwargs)

    monkeypatch.setattr(Fp32Matmuls, "__torch_dispatch__", spy)
    return seen


@pytest.mark.parametrize("units", [False, True])
def test_16bit_compute_on_a_cpu_without_bf16_units_is_flagged(monkeypatch, units):
    from autoqra_core.device import slow_16bit

    _no_bf16_units(monkeypatch, units)
    why = slow_16bit("cpu", "bfloat16")
    assert (why is None) == units
    assert units or ("without bf16 matrix units" in why and "'float32'" in why)
    assert slow_16bit("cpu", torch.float32) is None and slow_16bit("cuda", "bfloat16") is None


def test_fp32_matmuls_round_bf16_products_as_bf16_units_do(monkeypatch):
    from autoqra_core.device import Fp32Matmuls, fp32_matmuls

    _no_bf16_units(monkeypatch, units=True)
    assert not isinstance(fp32_matmuls("cpu", "bfloat16"), Fp32Matmuls)  # the CPU's own bf16 kernels are fast
    _no_bf16_units(monkeypatch)
    assert not isinstance(fp32_matmuls("cpu", torch.float32), Fp32Matmuls)
    assert not isinstance(fp32_matmuls("cuda", "bfloat16"), Fp32Matmuls)
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 64).bfloat16()
    x = torch.randn(3, 20, 96).bfloat16().requires_grad_()
    seen = _fp32_products(monkeypatch)
    with Fp32Matmuls():
        assert isinstance(fp32_matmuls("cpu", "bfloat16"), Fp32Matmuls)
        y = lin(x)
        y.float().square().sum().backward()
    # forward and both backward products went through float32 (input and weight gradients)
    assert len(seen) >= 3 and y.dtype == x.grad.dtype == lin.weight.grad.dtype == torch.bfloat16
    ref = (x.float() @ lin.weight.float().T + lin.bias.float())
    gy = (2 * y.float()).bfloat16().float()
    ulp = 2.0 ** -7  # bf16's relative spacing: one rounding of a float32-accumulated product
    for got, want in [(y, ref), (x.grad, gy @ lin.weight.float()),
                      (lin.weight.grad, gy.reshape(-1, 64).T @ x.float().reshape(-1, 96))]:
        assert ((got.float() - want).abs() <= ulp * want.abs() + 1e-6).all()
    native = lin(x.detach())  # this CPU's own bf16 kernel: float32 accumulation too, same numbers within 1 ulp
    assert ((native.float() - y.float()).abs() <= 2 * ulp * ref.abs() + 1e-6).all()


def test_a_bf16_fine_tune_on_a_cpu_without_bf16_units_runs_its_products_in_fp32(monkeypatch, embedded):
    base, tok, task, lmap = embedded
    cfg = SearchSpace(lmap.names).config([4, 8, 3, 4, 2, 4], [8, 4, 16, 8, 4, 8])
    q, t = QuantSettings("sim", device="cpu", compute_dtype="bfloat16"), TrainSettings(seed=1)
    calls = _fp32_products(monkeypatch)
    _no_bf16_units(monkeypatch, units=True)
    native = evaluate_config(base, tok, task, lmap, cfg, TINY, 0, 0, q, t)
    assert not calls
    _no_bf16_units(monkeypatch)
    emulated = evaluate_config(base, tok, task, lmap, cfg, TINY, 0, 0, q, t)
    assert {torch.ops.aten.mm.default, torch.ops.aten.addmm.default} & set(calls)
    assert native.ok and emulated.ok and emulated.accuracy is not None
    assert emulated.eval_loss == pytest.approx(native.eval_loss, rel=0.02)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device,match", [("cuda:7", "no usable CUDA GPU.*'auto' or 'cpu'"),
                                          ("tpu", "not supported: use 'auto'")])
def test_a_device_this_machine_lacks_is_an_error_naming_the_fix(device, match):
    with pytest.raises(DeviceError, match=match):
        QuantSettings("hqq", device=device)


def test_every_tensor_and_batch_lives_on_the_chosen_device(embedded):
    base, tok, task, lmap = embedded
    q = QuantSettings("hqq", device="cpu")
    cfg = SearchSpace(lmap.names, bits=(2, 3, 4, 8, 16)).config([2, 4, 8, 16, 3, 4], [8, 0, 4, 16, 8, 4])
    model = build(base, cfg, lmap, q, TrainSettings())
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for m in model.modules() if isinstance(getattr(m, "meta", None), dict)
                for v in m.meta.values() if torch.is_tensor(v)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())
    seen = []
    model.get_input_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].device))
    train(model, batches(train_blocks(task, tok, 32, 0.05), 2, 4, 0), TrainSettings())
    assert seen == [torch.device("cpu")] * 2
    assert all(p.grad is None or p.grad.device.type == "cpu" for p in model.parameters())


def test_a_fake_device_in_the_settings_fails_preflight_with_exit_2(tmp_path):
    (tmp_path / "s.yaml").write_text("quant: {device: tpu}\n")
    (tmp_path / "c.json").write_text("{}")
    r = subprocess.run([*AUTOQRA, "evaluate", "--config", str(tmp_path / "c.json"), "--search-config",
                        str(tmp_path / "s.yaml")], cwd=ROOT, env=cli_env(tmp_path), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "quant" in r.stderr and "'tpu' is not supported: use 'auto'" in r.stderr


# ---- packed weights made once per worker ------------------------------------------------------


def test_cache_quantizes_each_module_and_bits_once_and_builds_the_same_model(embedded):
    base, tok, task, lmap = embedded
    before = {n: p.clone() for n, p in base.named_parameters()}
    space = SearchSpace(lmap.names)
    a = space.config([2, 4, 8, 4, 2, 3], [8, 8, 4, 0, 16, 4])
    b = space.config([2, 4, 3, 3, 2, 8], [4, 16, 8, 8, 4, 0])  # layers 0, 1, 4 share (module, bits) with a
    per_layer = len(lmap.layers[0][1])
    cache = PackedCache(base)
    q, t = QuantSettings("sim", device="cpu"), TrainSettings(seed=3)
    ev_a = evaluate_config(base, tok, task, lmap, a, TINY, 0, 0, q, t, cache=cache)
    assert cache.quantized == 6 * per_layer
    ev_b = evaluate_config(base, tok, task, lmap, b, TINY, 0, 0, q, t, cache=cache)
    assert cache.quantized == 9 * per_layer  # only layers 2, 3 and 5 were new
    fresh = evaluate_config(base, tok, task, lmap, b, TINY, 0, 0, q, t)  # a cache of its own, used once
    assert ev_a.ok and ev_b.ok and ev_b.eval_loss == fresh.eval_loss and ev_b.train_loss == fresh.train_loss
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())  # the base is never touched
    m1, m2 = cache.assemble(a, lmap, q), cache.assemble(a, lmap, q)
    name = lmap.layers[0][1][0]
    assert m1.get_submodule(name) is m2.get_submodule(name)  # shared, not copied
    assert m1.get_input_embeddings().weight.data_ptr() == base.get_input_embeddings().weight.data_ptr()


def test_cache_capacity_keeps_only_the_current_candidates_modules(embedded):
    base, _, _, lmap = embedded
    space = SearchSpace(lmap.names)
    cache, q = PackedCache(base, capacity_bytes=0), QuantSettings("hqq", device="cpu")
    cache.assemble(space.uniform(4, 0), lmap, q)
    full = cache.nbytes()
    cache.assemble(space.uniform(2, 0), lmap, q)
    assert 0 < cache.nbytes() < full  # the 4-bit entries were evicted


# ---- the memory model's GPU terms against tensor storage ----------------------------------------


def test_bnb_nf4_double_quant_metadata_matches_its_storage():
    lin = torch.nn.Linear(1536, 576, bias=False)  # SmolLM2-135M's down_proj
    q = quantize_module(lin, 4, QuantSettings("bnb", device="cpu"))
    st = q.weight.quant_state
    assert st.nested and st.absmax.dtype == torch.uint8  # Params4bit double-quantizes by default
    w, meta = packed_bytes(lin.weight.numel(), 4, MemorySettings(backend="bnb"))
    shared = st.code.untyped_storage().nbytes() + st.state2.code.untyped_storage().nbytes()  # one per process
    assert w == q.weight.untyped_storage().nbytes()
    assert meta == storage_bytes(q) - w - shared


def test_logits_term_matches_the_head_tensors_at_smollm2_vocab():
    """Logits + the log-softmax autograd keeps + the logits' gradient, measured as tensor storage."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2, "hidden_size": 64, "num_attention_heads": 4,
                                            "num_key_value_heads": 2, "intermediate_size": 64,
                                            "num_hidden_layers": 1}))
    saved: dict[int, int] = {}
    x = torch.randint(0, 1000, (2, 24))
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.__setitem__(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) or t,
            lambda t: t):
        out = model(input_ids=x, labels=x)
    grads = []
    out.logits.register_hook(lambda g: grads.append(g.untyped_storage().nbytes()))
    out.loss.backward()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # the tied head's matmul keeps it
    vocab_sized = sum(n for ptr, n in saved.items() if n >= 24 * 2 * 49152 and ptr not in weights)
    measured = out.logits.untyped_storage().nbytes() + vocab_sized + grads[0]
    assert logits_bytes(2 * 24, 49152, 4, backward=True) == measured


def test_logits_term_of_a_masked_batch_counts_only_the_trained_positions():
    """Rows with a loss mask: the head runs on the trained positions only, and the memory model charges those."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from autoqra_core.data import IGNORE, Blocks, loss_tokens
    from autoqra_core.finetune import masked_loss
    from autoqra_core.scoring import exact_split

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2, "hidden_size": 64, "num_attention_heads": 4,
                                            "num_key_value_heads": 2, "intermediate_size": 64,
                                            "num_hidden_layers": 1}))
    x = torch.randint(0, 1000, (2, 24))
    labels = torch.full_like(x, IGNORE)
    labels[0, 10:14], labels[1, 20:24] = x[0, 10:14], x[1, 20:24]  # 4 + 4 trained tokens
    split = exact_split(model, x)
    saved: dict[int, int] = {}
    logits: list[torch.Tensor] = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, o: logits.append(o))
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.__setitem__(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) or t,
            lambda t: t):
        loss = masked_loss(model, x, labels, split)
    hook.remove()
    grads = []
    logits[0].register_hook(lambda g: grads.append(g.untyped_storage().nbytes()))
    loss.backward()
    n = loss_tokens(Blocks(x, labels), batch_size=2)
    assert n == 8 and logits[0].shape == (8, 49152)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    vocab_sized = sum(b for ptr, b in saved.items() if b >= 8 * 49152 and ptr not in weights)
    assert logits_bytes(n, 49152, 4, backward=True) == logits[0].untyped_storage().nbytes() + vocab_sized + grads[0]


def test_memory_model_matches_storage_at_smollm2_widths():
    """SmolLM2-135M's widths, heads and tied 49k vocabulary (2 of its 30 blocks), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMOLLM2, num_hidden_layers=2))
    base.config.use_cache = False
    lmap = layer_map(base, "module")
    space = SearchSpace(lmap.names, bits=(2, 3, 4, 8, 16))
    bits = [2, 3, 4, 8, 16, 4, 3] * 2
    ranks = [0, 4, 8, 16, 32, 0, 8] * 2
    cfg = space.config(bits, ranks)
    predicted, measured = static_bytes(base, lmap, cfg, QuantSettings("hqq", device="cpu"),
                                       torch.randint(0, 1000, (1, 8)))
    assert abs(predicted - measured) / measured < 0.01, (predicted, measured)


# ---- autoqra estimate ---------------------------------------------------------------------------


def test_estimate_reads_a_config_only_folder(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(**SMOLLM2, num_hidden_layers=30).save_pretrained(tmp_path)  # config.json, no weights
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    from flows.cli import app

    t0 = time.perf_counter()
    r = CliRunner().invoke(app, ["estimate", "--model", str(tmp_path), "--bits", "4", "--rank", "16",
                                 "--device", "cuda", "--budget", "2GiB", "--json"])
    assert r.exit_code == 0, r.output
    assert time.perf_counter() - t0 < 60
    out = json.loads(r.output)
    terms = out["config"]
    for k in ("weights", "metadata", "unquantized", "lora", "gradients", "optimizer", "activations", "logits",
              "dequantized", "scoring", "total"):
        assert isinstance(terms[k], int), k
    assert out["settings"]["act_bytes"] == 2 and out["settings"]["grad_checkpointing"] is True  # cuda defaults
    assert terms["unquantized"] == 49152 * 576 * 2 + (2 * 30 + 1) * 576 * 2  # tied embedding once, norms; bf16
    assert set(out["baselines"]) == {"uniform-2bit-r16", "uniform-3bit-r16", "uniform-4bit-r16", "uniform-8bit-r16"}
    assert terms["fits"] is (terms["total"] <= 2 * 2**30) and out["smallest"]["name"] == "uniform-2bit-r0"
    # Serving weights per export part: packed 4-bit (+ adapter) and GGUF Q4_1 about half the dense bf16 model;
    # the dense parts do not depend on bits, model-ct/ adds its adapter.
    serve, eight = terms["serving"], out["baselines"]["uniform-8bit-r16"]["serving"]
    assert max(serve["model/+adapter/"], serve["gguf/"]) < 0.5 * serve["merged/"] < serve["model-ct/+adapter/"]
    assert serve["merged/"] == 134_515_008 * 2 == eight["merged/"]  # every parameter in bf16
    assert eight["gguf/"] > serve["gguf/"] and eight["model/+adapter/"] > serve["model/+adapter/"]
    bad = CliRunner().invoke(app, ["estimate", "--model", str(tmp_path / "nope"), "--bits", "4", "--rank", "16"])
    assert bad.exit_code == 2 and "not found" in bad.output


def test_estimate_equals_the_search_cost(embedded, tmp_path):
    from flows.cli import app
    from flows.config import RunConfig
    from flows.prepared_run import Run

    run = Run.prepare("embedded", "embedded", None, RunConfig(), 0)
    cfg = run.space.config([2, 3, 4, 8, 2, 4], [0, 4, 64, 16, 8, 32])
    (tmp_path / "c.json").write_text(cfg.to_json())
    r = CliRunner().invoke(app, ["estimate", "--config", str(tmp_path / "c.json"), "--json", "--device", "auto"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["config"]["total"] == run.cost(cfg)
    assert load_skeleton(EMBEDDED_MODEL).get_input_embeddings().weight.device.type == "meta"


def test_sim_is_refused_on_a_gpu_and_auto_picks_the_backend():
    from autoqra_core.errors import SpaceError
    from autoqra_core.quantize import check_placement
    from flows.config import QuantSection

    with pytest.raises(SpaceError, match="use quant.backend 'hqq'.*or 'bnb'"):
        check_placement("sim", "cuda:0")
    check_placement("hqq", "cuda")
    q = QuantSection()
    assert (q.backend, q.compute_dtype) == (("hqq", "bfloat16") if torch.cuda.is_available() else ("sim", "float32"))


def test_dask_address_is_validated(tmp_path):
    from flows.config import ConfigError, load_run_config

    (tmp_path / "a.yaml").write_text("execution: {task_runner: dask, address: 'tcp://127.0.0.1:8786'}\n")
    assert load_run_config(tmp_path / "a.yaml").execution.address == "tcp://127.0.0.1:8786"
    (tmp_path / "b.yaml").write_text("execution: {task_runner: thread, address: 'tcp://127.0.0.1:8786'}\n")
    with pytest.raises(ConfigError, match="set task_runner: dask"):
        load_run_config(tmp_path / "b.yaml")
