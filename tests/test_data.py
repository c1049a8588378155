"""The rows users bring: prompt/completion and chat rows trained with the loss where the answer is, a column
mapping for other column names, completions kept whole when rows are long, and bad input refused up front.
Checked token by token on real tokenizers: the embedded one and smollm2-135m's chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autoqra_core.data import (IGNORE, chat_ids, check_task, eval_set, example, load_task, parse_columns,
                               train_blocks)
from autoqra_core.errors import DatasetError

from .helpers import EMBEDDED_MODEL, MINI_SEARCH

CHAT = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 40 + 2?"}, {"role": "assistant", "content": "It is 42."}]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(EMBEDDED_MODEL))


@pytest.fixture(scope="module")
def chat_tok():
    """smollm2-135m's own tokenizer and chat template, read from the GGUF file the package ships."""
    from transformers import AutoTokenizer

    from infra.pretrained import NAMED_MODELS, _packaged_file

    gguf = _packaged_file(*NAMED_MODELS["smollm2-135m"])
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sums(n: int = 150) -> list[dict]:
    return [{"prompt": f"{a} + {a % 7} =", "completion": f" {a + a % 7}"} for a in range(n)]


def _runs(ids: list[int], mask: list[bool]) -> list[list[int]]:
    """The maximal runs of masked tokens."""
    out, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            out, cur = out + [cur], []
    return out + ([cur] if cur else [])


def test_completion_rows_train_and_score_on_the_completion_only(tmp_path, tok):
    task = load_task(_write(tmp_path / "sums.jsonl", _sums()))
    assert task.kind == "completion" and not task.labelled
    for row in task.train[:6]:
        ids, mask = example(tok, row)
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)]) and all(mask[len(prompt):])
        assert tok.decode([t for t, m in zip(ids, mask) if m]) == row["completion"] + tok.eos_token
    # packed whole: the labels are exactly every row's completion + EOS, in order, and each block starts a row
    blocks = train_blocks(task, tok, 24, 1.0)
    assert blocks.labels is not None and blocks.ids.shape[1] == 24
    labelled = [t for row in blocks.labels.tolist() for t in row if t != IGNORE]
    assert labelled == [t for r in task.train for t, m in zip(*example(tok, r)) if m]
    assert all(tok.decode(b[:3]).strip()[0].isdigit() for b in blocks.ids.tolist())
    ev = eval_set(task, tok, 5, 24)
    for i, row in enumerate(task.validation[:5]):
        scored = ev.input_ids[i][ev.target_mask[i]].tolist()
        assert tok.decode(scored) == row["completion"] + tok.eos_token


def test_the_loss_is_computed_only_where_a_token_is_trained(tmp_path, tok):
    """The head-on-trained-positions loss equals transformers' own masked causal-LM loss."""
    from autoqra_core.finetune import masked_loss
    from autoqra_core.scoring import exact_split
    from autoqra_core.model import load_model

    model, _ = load_model(str(EMBEDDED_MODEL))
    task = load_task(_write(tmp_path / "sums.jsonl", _sums()))
    b = train_blocks(task, tok, 24, 1.0)[[0, 1, 2]]
    with torch.no_grad():
        reference = model(input_ids=b.ids, labels=b.labels).loss
        split = exact_split(model, b.ids[:2])
        assert split is not None
        assert masked_loss(model, b.ids, b.labels, split) == pytest.approx(float(reference), rel=1e-5)
        assert masked_loss(model, b.ids, b.labels, None) == pytest.approx(float(reference), rel=1e-5)


def test_long_rows_lose_their_prompt_not_their_completion(tmp_path, tok):
    rows = [{"prompt": "word " * (40 + i % 5) + "answer:", "completion": f" yes {i}"} for i in range(150)]
    task = load_task(_write(tmp_path / "long.jsonl", rows))
    check_task(task, tok, 16)
    blocks = train_blocks(task, tok, 16, 1.0)
    assert len(blocks) == len(task.train)  # one row per block, each cut to its last 16 tokens
    for i, row in enumerate(task.train):
        kept = [t for t in blocks.labels[i].tolist() if t != IGNORE]
        assert tok.decode(kept) == row["completion"] + tok.eos_token
    ev = eval_set(task, tok, 4, 16)
    assert ev.input_ids.shape[1] == 16
    assert tok.decode(ev.input_ids[0][ev.target_mask[0]].tolist()) == task.validation[0]["completion"] + tok.eos_token
    rows[7]["completion"] = " and" * 30  # longer than the training length: refused, with its row and length
    task = load_task(_write(tmp_path / "too-long.jsonl", rows))
    split = next(s for s in ("train", "validation", "test") if rows[7] in [dict(r) for r in getattr(task, s)])
    with pytest.raises(DatasetError, match=rf"{split} row \d+'s completion is 31 tokens .*seq_len=16"):
        check_task(task, tok, 16)


def test_chat_rows_train_on_the_assistant_turns_only(tmp_path, chat_tok):
    ids, mask = chat_ids(chat_tok, CHAT)
    runs = [chat_tok.decode(r) for r in _runs(ids, mask)]
    assert runs == ["5<|im_end|>", "It is 42.<|im_end|>"]  # each reply and its end of turn, nothing else
    assert chat_tok.decode(ids) == chat_tok.apply_chat_template(CHAT, tokenize=False)
    rows = [{"messages": [{"role": "user", "content": f"{a} + 1?"}, {"role": "assistant", "content": str(a + 1)}]}
            for a in range(150)]
    task = load_task(_write(tmp_path / "chat.jsonl", rows))
    assert task.kind == "messages"
    check_task(task, chat_tok, 64)
    blocks = train_blocks(task, chat_tok, 64, 1.0)
    labelled = chat_tok.decode([t for row in blocks.labels.tolist() for t in row if t != IGNORE])
    assert labelled == "".join(r["messages"][1]["content"] + "<|im_end|>" for r in task.train)
    ev = eval_set(task, chat_tok, 3, 64)
    for i, row in enumerate(task.validation[:3]):
        assert chat_tok.decode(ev.input_ids[i][ev.target_mask[i]].tolist()) == row["messages"][1]["content"] + "<|im_end|>"


def test_multiple_choice_can_train_on_the_answer_only(tok):
    row = {"prompt": "3 + 4 =", "choices": [" 6", " 7"], "label": 1}
    ids, mask = example(tok, row)
    assert all(mask)  # the default: the whole row, as before
    ids, mask = example(tok, row, answer_only=True)
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == " 7" + tok.eos_token


def test_a_column_mapping_reads_alpaca_rows(tmp_path, tok):
    rows = [{"instruction": f"Add one to {a}.", "input": "" if a % 2 else "Answer with digits.", "output": str(a + 1)}
            for a in range(150)]
    path = _write(tmp_path / "alpaca.jsonl", rows)
    with pytest.raises(DatasetError, match=r"looks like Alpaca: --columns prompt=instruction\+input,completion=output"):
        load_task(path)
    task = load_task(path, "prompt=instruction+input,completion=output")
    assert task.kind == "completion"
    by_output = {r["output"]: r for r in rows}
    for r in task.train[:4]:
        src = by_output[r["completion"]]
        assert r["prompt"] == "\n\n".join(x for x in (src["instruction"], src["input"]) if x)
    assert parse_columns("completion=output, prompt=instruction") == {"completion": "output", "prompt": "instruction"}


@pytest.mark.parametrize("rows,columns,message", [
    ([{"text": f"a b {i}"} for i in range(60)] + [{"prompt": f"p {i}", "completion": "c"} for i in range(60)], None,
     r"mixes row kinds: 'text' \(first at train row 0\), 'completion' \(first at"),
    ([{"prompt": "p", "completion": "  "}], None, r"all.jsonl:1: field 'completion' must be a non-empty string"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}], None,
     r"all.jsonl:1: the conversation has no assistant turn with content"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}], None,
     r"messages\[1\] must be \{'role': one of"),
    ([{"prompt": "p", "choices": ["a", "b"], "label": 2}], None, r"'label' must be an index into 'choices' \(0..1\), got 2"),
    ([{"instruction": "i", "output": "o"}], "prompt=instruction,completion=answer",
     r"all.jsonl:1: the column mapping completion=answer names column\(s\) \['answer'\] this row does not have"),
    ([{"question": "q"}], "query=question", r"column mapping query='question': write FIELD=COLUMN"),
])
def test_bad_rows_are_refused_with_the_row_and_the_fix(tmp_path, rows, columns, message):
    with pytest.raises(DatasetError, match=message):
        load_task(_write(tmp_path / "all.jsonl", rows), columns)


def test_chat_rows_need_a_chat_template(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": f"{a}?"}, {"role": "assistant", "content": str(a)}]}
            for a in range(150)]
    task = load_task(_write(tmp_path / "chat.jsonl", rows))
    with pytest.raises(DatasetError, match="the model's tokenizer has no chat template"):
        check_task(task, tok, 32)


# A chat template for a copy of the embedded model (its tokenizer ships none): each turn, then EOS.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["completion", "messages"])
def test_a_search_on_user_rows_through_the_cli_exports_a_model_that_answers(kind, tmp_path):
    """The user's own rows (the shipped addition task rewritten as prompt/completion or as a conversation)
    through ``autoqra search`` to result.json and an export; the exported champion answers such a row."""
    import shutil
    import subprocess

    from infra.champion_model import ChampionModel

    from .helpers import AUTOQRA, ROOT, cli_env

    src = ROOT / "infra" / "embedded" / "addition"
    rows = [json.loads(line) for f in ("train", "validation", "test") for line in (src / f"{f}.jsonl").open()][::3]
    if kind == "completion":
        data = [{"prompt": r["prompt"], "completion": r["choices"][r["label"]]} for r in rows]
        model, query = EMBEDDED_MODEL, {"prompt": "12 + 30 ="}
    else:
        data = [{"messages": [{"role": "user", "content": r["prompt"]},
                              {"role": "assistant", "content": r["choices"][r["label"]].strip()}]} for r in rows]
        model = tmp_path / "chat-model"
        shutil.copytree(EMBEDDED_MODEL, model)
        cfg = json.loads((model / "tokenizer_config.json").read_text())
        (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
        query = {"messages": [{"role": "user", "content": "12 + 30 ="}]}
    dataset = _write(tmp_path / f"{kind}.jsonl", data)
    (tmp_path / "quick.yaml").write_text(MINI_SEARCH)
    out = tmp_path / "out"
    r = subprocess.run([*AUTOQRA, "search", "--model", str(model), "--dataset", dataset, "--config",
                        str(tmp_path / "quick.yaml"), "--out", str(out)], cwd=ROOT, env=cli_env(tmp_path / "home"),
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["best"]["config"] and result["best"]["test"]["loss_mean"] < 20
    cost = result["search_cost"]  # the default budget, kept, and said in the summary
    assert cost["budget_fine_tunes"] == 8 and 0 < cost["fine_tunes"] <= 8
    assert f"search cost: {cost['fine_tunes']:.2f} full fine-tunes of a budget of 8 " in " ".join(r.stdout.split())
    export = Path(json.loads((out / "export.json").read_text())["export_dir"])
    champion = ChampionModel()
    champion.load_context(type("Context", (), {"artifacts": {"export": str(export)}})())
    answer = champion.predict(None, [query], params={"max_new_tokens": 4})[0]["text"]
    assert isinstance(answer, str) and answer
