"""Build the embedded default: a small pretrained Llama and a WordNet task.

Nothing can be downloaded from a model hub here, so the project pretrains its own
model. Two *different* offline English texts are used:

* pretraining corpus: the reStructuredText sources of the Python 3.11 docs
  (Debian package ``python3.11-doc``, /usr/share/doc/python3.11-doc/html/_sources);
* fine-tuning task: WordNet 3.0 glosses (Debian package ``wordnet-base``,
  /usr/share/wordnet/data.*): "word: definition" lines, plus a 4-way multiple
  choice test ("which definition belongs to this word?") scored by log-likelihood.
  Train, validation and test are split by headword, so no held-out word is trained on.

``TASKS`` also builds the other candidate tasks this machine's files allow (WordNet hypernyms and antonyms,
two-digit addition); ``bench/task_choice.py`` compares them on a real model to justify the default.

Usage (build-time only; needs ``apt-get install python3.11-doc wordnet-base``)::

    .venv/bin/python infra/embedded/build.py --minutes 14

Writes ``infra/embedded/model/`` (config, fp16 safetensors, tokenizer) and
``infra/embedded/{wordnet,addition}/{train,validation,test}.jsonl`` (``--skip-model``: only these).
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


SPLIT_NAMES = ("train", "validation", "test")
SIZES = (20000, 600, 1000)  # rows written per split (fewer where a task has fewer)


def split_of(key: str) -> int:
    """0 (train), 1 (validation) or 2 (test) from the key's hash: 80/10/10, whatever the other rows are."""
    u = int(hashlib.sha1(key.lower().encode()).hexdigest()[:8], 16) / 16**8
    return 0 if u >= 0.2 else 1 if u >= 0.1 else 2


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
    rng = random.Random(seed)
    rng.shuffle(entries)
    train_pool, validation_pool, test_pool = ([e for e in entries if split_of(e[1]) == i] for i in range(3))

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


def _synsets(pos: str) -> dict[str, tuple[list[str], list[tuple[str, ...]]]]:
    """WordNet's data.POS as offset -> (lemmas, pointers (symbol, offset, pos, source/target lemma numbers))."""
    out = {}
    for line in (WORDNET / f"data.{pos}").read_text(errors="ignore").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue
        f = line.split("|", 1)[0].split()
        n = int(f[3], 16)
        lemmas = [re.sub(r"\(.*\)$", "", f[4 + 2 * i]).replace("_", " ") for i in range(n)]
        k = 4 + 2 * n
        out[f[0]] = (lemmas, [tuple(f[k + 1 + 4 * j: k + 5 + 4 * j]) for j in range(int(f[k]))])
    return out


def hypernym_pairs() -> list[tuple[str, str]]:
    """(noun, its hypernym's first lemma): "a plum is a kind of position" (instance-of links left out)."""
    nouns = _synsets("noun")
    pairs = {(lemmas[0], nouns[off][0][0]) for lemmas, ptrs in nouns.values() for sym, off, _, _ in ptrs
             if sym == "@" and lemmas[0].isascii()}
    return sorted(pairs)


def antonym_pairs() -> list[tuple[str, str]]:
    """(word, its antonym) over every part of speech; both directions of a pair are kept (split together)."""
    pairs = set()
    for pos in ("noun", "verb", "adj", "adv"):
        syn = _synsets(pos)
        for lemmas, ptrs in syn.values():
            for sym, off, p, st in ptrs:
                if sym == "!" and p[0] == pos[0] and off in syn:
                    pairs.add((lemmas[int(st[:2], 16) - 1], syn[off][0][int(st[2:], 16) - 1]))
    return sorted((a, b) for a, b in pairs if a.isascii() and b.isascii())


def choice_rows(pairs: list[tuple[str, str]], prompt: str, n: tuple[int, int, int], seed: int = 0,
                by_pair: bool = False) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) 4-way rows from (subject, answer) pairs, split by the subject's hash (no held-out
    word is trained on), or by the unordered pair's (``by_pair``: an antonym pair and its reverse land together);
    distractors are answers of other pairs in the same split that are not an answer of this subject."""
    rng = random.Random(seed)
    answers: dict[str, set[str]] = {}
    for a, b in pairs:
        answers.setdefault(a, set()).add(b)
    shuffled = list(pairs)
    rng.shuffle(shuffled)
    pools = ([], [], [])
    for a, b in shuffled:
        pools[split_of("|".join(sorted((a, b))) if by_pair else a)].append((a, b))
    out = []
    for pool, count in zip(pools, n):
        names = sorted({b for _, b in pool})
        rows = []
        for a, b in pool[:count]:
            wrong = rng.sample([x for x in names if x not in answers[a] and x != a][:5000], 3)
            choices = [b] + wrong
            rng.shuffle(choices)
            rows.append({"prompt": prompt.format(a), "choices": [" " + c for c in choices], "label": choices.index(b)})
        out.append(rows)
    return out[0], out[1], out[2]


def addition_rows(n: tuple[int, int, int], seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """Two-digit additions ("47 + 38 =") with near-miss choices (the sum +-1, +-10), split by the unordered pair."""
    rng = random.Random(seed)
    pools = ([], [], [])
    for a in range(10, 100):
        for b in range(10, 100):
            pools[split_of(f"{min(a, b)}+{max(a, b)}")].append((a, b))
    out = []
    for pool, count in zip(pools, n):
        rng.shuffle(pool)
        rows = []
        for a, b in pool[:count]:
            choices = [a + b] + [a + b + d for d in rng.sample((-10, -1, 1, 10), 3)]
            rng.shuffle(choices)
            rows.append({"prompt": f"{a} + {b} =", "choices": [f" {c}" for c in choices], "label": choices.index(a + b)})
        out.append(rows)
    return out[0], out[1], out[2]


# Candidate tasks built from files on this machine (bench/task_choice.py compares them on a real model).
TASKS = {
    "wordnet": lambda n, seed=0: wordnet_rows(*n, seed=seed),
    "hypernym": lambda n, seed=0: choice_rows(hypernym_pairs(), "{} is a kind of", n, seed),
    "antonym": lambda n, seed=0: choice_rows(antonym_pairs(), "The opposite of {} is", n, seed, by_pair=True),
    "addition": addition_rows,
}


def write_task(rows: tuple[list[dict], list[dict], list[dict]], out: Path) -> None:
    """``out/{train,validation,test}.jsonl``, the layout ``--dataset PATH`` reads."""
    out.mkdir(parents=True, exist_ok=True)
    for name, split in zip(SPLIT_NAMES, rows):
        with open(out / f"{name}.jsonl", "w") as f:
            for r in split:
                f.write(json.dumps(r) + "\n")


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
    ap.add_argument("--skip-model", action="store_true", help="only rebuild the tasks")
    ap.add_argument("--tasks", nargs="+", default=["wordnet", "addition"], choices=list(TASKS),
                    help="tasks to write into infra/embedded/NAME (shipped: wordnet, addition)")
    ap.add_argument("--resume", action="store_true", help="continue pretraining the existing checkpoint")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()

    for task in args.tasks:
        splits = TASKS[task](SIZES, seed=args.seed)
        write_task(splits, HERE / task)
        print(f"{task}: " + ", ".join(f"{len(rows)} {name}" for name, rows in zip(SPLIT_NAMES, splits)) + " rows")
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
