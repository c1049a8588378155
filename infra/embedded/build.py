"""Build the embedded default: a small pretrained Llama and a WordNet task.

Nothing can be downloaded from a model hub here, so the project pretrains its own
model. Two *different* offline English texts are used:

* pretraining corpus: the reStructuredText sources of the Python 3.11 docs
  (Debian package ``python3.11-doc``, /usr/share/doc/python3.11-doc/html/_sources);
* fine-tuning task: WordNet 3.0 glosses (Debian package ``wordnet-base``,
  /usr/share/wordnet/data.*): "word: definition" lines, plus a 4-way multiple
  choice test ("which definition belongs to this word?") scored by log-likelihood.
  Train, validation and test are split by headword, so no held-out word is trained on.

Usage (build-time only; needs ``apt-get install python3.11-doc wordnet-base``)::

    .venv/bin/python infra/embedded/build.py --minutes 14

Writes ``infra/embedded/model/`` (config, fp16 safetensors, tokenizer) and
``infra/embedded/wordnet/{train,validation,test}.jsonl`` (``--skip-model``: only these).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = Path("/usr/share/doc/python3.11-doc/html/_sources")
WORDNET = Path("/usr/share/wordnet")

_ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_MARK = re.compile(r"(\*\*|\*|``|`_?)")


def docs_corpus() -> list[str]:
    """Prose paragraphs of the Python docs (directives, code and tables dropped)."""
    paragraphs: list[str] = []
    for path in sorted(DOCS.rglob("*.rst.txt")):
        block: list[str] = []
        for raw in path.read_text(errors="ignore").splitlines() + [""]:
            line = raw.strip()
            if line and not line.startswith(("..", ">>>", "...", ":", "|", "+", "$", "#")) and not re.fullmatch(r"[\W_]+", line):
                block.append(line)
                continue
            text = _MARK.sub("", _ROLE.sub(r"\1", " ".join(block)))
            letters = sum(ch.isalpha() or ch == " " for ch in text)
            if len(text) > 80 and letters > 0.85 * len(text) and text.endswith((".", ":")):
                paragraphs.append(text)
            block = []
    return paragraphs


def wordnet_rows(n_train: int, n_validation: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) rows: {"prompt": "word:", "choices": [4 glosses], "label": i}."""
    entries: list[tuple[str, str, str]] = []  # (pos, word, definition)
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{pos}").read_text(errors="ignore").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            fields = head.split()
            word = fields[4].replace("_", " ")
            word = re.sub(r"\(.*\)$", "", word)
            definition = gloss.split(";")[0].strip().strip('"').strip()
            if 10 <= len(definition) <= 120 and word.isascii() and definition.isascii():
                entries.append((pos, word, definition))
    # Split by headword hash: a word is in exactly one of train, validation and test.
    def bucket(word: str) -> float:
        return int(hashlib.sha1(word.lower().encode()).hexdigest()[:8], 16) / 16**8

    rng = random.Random(seed)
    rng.shuffle(entries)
    test_pool = [e for e in entries if bucket(e[1]) < 0.1]
    validation_pool = [e for e in entries if 0.1 <= bucket(e[1]) < 0.2]
    train_pool = [e for e in entries if bucket(e[1]) >= 0.2]

    def rows(pool: list[tuple[str, str, str]], n: int) -> list[dict]:
        by_pos: dict[str, list[str]] = {}
        for pos, _, d in pool:
            by_pos.setdefault(pos, []).append(d)
        out = []
        for pos, word, d in pool[:n]:
            distractors = rng.sample([x for x in by_pos[pos] if x != d][:5000], 3)
            choices = [d] + distractors
            rng.shuffle(choices)
            out.append({"prompt": f"{word}:", "choices": [" " + c for c in choices], "label": choices.index(d)})
        return out

    return rows(train_pool, n_train), rows(validation_pool, n_validation), rows(test_pool, n_test)


def train_tokenizer(corpus: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(out)
    return fast


def pretrain(corpus: list[str], tokenizer, out: Path, minutes: float, seq_len: int, batch: int, seed: int,
             resume: bool = False, lr_max: float = 1e-3) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    ids: list[int] = []
    for p in corpus:
        ids.extend(tokenizer(p)["input_ids"] + [tokenizer.eos_token_id])
    data = torch.tensor(ids, dtype=torch.long)
    n_val = 50_000
    train, val = data[:-n_val], data[-n_val:]
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32) if resume else LlamaForCausalLM(config)
    prev = json.loads((out / "pretrain_stats.json").read_text()) if resume else {"steps": 0, "train_tokens": 0}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    deadline = time.time() + minutes * 60
    est_steps = int(minutes * 60 / 2.0)  # ~2 s per step on 2 CPU cores
    step, log = 0, []
    model.train()
    while time.time() < deadline:
        lr = lr_max * min(1.0, (step + 1) / 100) * max(0.1, 0.5 * (1 + math.cos(math.pi * min(1.0, step / est_steps))))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train) - seq_len - 1, (batch,))
        x = torch.stack([train[s : s + seq_len] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            log.append({"step": step, "loss": round(loss.item(), 4), "lr": lr})
            print(log[-1], flush=True)
    model.eval()
    with torch.no_grad():
        v = val[: (len(val) // seq_len) * seq_len].view(-1, seq_len)
        val_loss = sum(model(input_ids=b, labels=b).loss.item() for b in v.split(16)) / math.ceil(len(v) / 16)
    model.half().save_pretrained(out, safe_serialization=True)
    return {"steps": prev["steps"] + step, "train_tokens": prev["train_tokens"] + step * batch * seq_len, "corpus_tokens": len(data), "val_loss": val_loss,
            "params": sum(p.numel() for p in model.parameters()), "log": log[-5:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=14.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-model", action="store_true", help="only rebuild the WordNet task")
    ap.add_argument("--resume", action="store_true", help="continue pretraining the existing checkpoint")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()

    splits = dict(zip(("train", "validation", "test"),
                      wordnet_rows(n_train=20000, n_validation=600, n_test=1000, seed=args.seed)))
    wn = HERE / "wordnet"
    wn.mkdir(exist_ok=True)
    for name, rows in splits.items():
        with open(wn / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print("wordnet: " + ", ".join(f"{len(rows)} {name}" for name, rows in splits.items()) + " rows")
    if args.skip_model:
        return
    corpus = docs_corpus()
    print(f"docs corpus: {len(corpus)} paragraphs, {sum(map(len, corpus))} chars")
    out = HERE / "model"
    out.mkdir(exist_ok=True)
    if args.resume:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out)
    else:
        tok = train_tokenizer(corpus, vocab_size=4096, out=out)
    stats = pretrain(corpus, tok, out, args.minutes, seq_len=128, batch=16, seed=args.seed, resume=args.resume,
                     lr_max=args.lr)
    cmd = f"python infra/embedded/build.py --minutes {args.minutes} --seed {args.seed}"
    stats["commands"] = [*(json.loads((out / "pretrain_stats.json").read_text())["commands"] if args.resume else []),
                         cmd + (f" --resume --lr {args.lr}" if args.resume else "")]
    (out / "pretrain_stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps({k: v for k, v in stats.items() if k != "log"}, indent=2))


if __name__ == "__main__":
    main()
