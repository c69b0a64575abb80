"""Retrain the demo model (issues 5 and 20): a small LongLLaMA trained from scratch on a CPU
with `longllama-train` (FoT crossbatch), its own sentencepiece tokenizer, and synthetic retrieval data this script
writes (passkey-style documents with varied filler and key names, several named keys per document, copy lists).

    python examples/train_demo_model.py --work demo-run --stages local,copy,fot    # v1; seeded, resumable
    python examples/train_demo_model.py --work demo-run --install fot              # copy v1 into longllama/demo_model

The curriculum (retrieval does not emerge easily in tiny models trained from scratch; see docs/demo_model.md):

1. `local` (3,000 steps): documents mostly shorter than a window (half copy lists, half passkey documents), k = 2
   rows per document stream and memory = the stream's previous window only (positives).
2. `copy` (1,500 steps): as `local` with denser, longer copy lists: the induction mechanism (copy by content) forms
   here. The memory layer has no rotary, so the lookup it learns inside the window also reads memory keys.
3. `fot` (1,500 steps): documents of up to several windows (key lines in earlier windows, the question anywhere),
   k = 4, FoT crossbatch with negatives from other streams, d raised 3 -> 7 -> 15 (`--cross-batch-schedule`).
   `positives` is the same stage with positives only (the ablation in docs/demo_model.md), and `documents` the same
   with memory bounded by the document (`--mode memory`: one document per pack of 4 rows, left-padded, documents
   longer than 4 windows keep their last 1,024 tokens): `--stages local,copy,fot,positives,documents`.

Version 2 (issue 20) continues from the v1 model with real text:

4. `transfer`: the v1 model's layers, with embeddings for a new 2,048-piece sentencepiece tokenizer trained on the
   real-text corpus (`longllama.corpus`: the Python standard library's code and prose, whole packages held out):
   each new piece gets the v1 embedding of the same piece, or the mean of the v1 embeddings of its text.
5. `text` (2,000 steps): FoT crossbatch as in `fot` (k = 4, d = 3 -> 7 -> 15) on real text (45% of the
   characters, chunks of 2-24k characters of the training packages), passkey documents (45%; a third of those that
   are not in the benchmark's exact format hide their keys in real text, a span of it or a few of its lines
   repeated) and copy lists (10%). `text-positives` is the same stage with positives only (the ablation arm of
   benchmarks/long_context_ppl.py).

    python examples/train_demo_model.py --work demo-run --stages transfer,text --v1 V1_DIR   # from a v1 model
    python examples/train_demo_model.py --work demo-run --install text

6. `text2` (1,000 steps), a second mix that continues from `examples/demo_v2` (`text` at step 1,000): one example
   per pack of 8 windows, never cut at a pack boundary (`--mode memory --memory-negatives`, batch 32, d 15 then
   31), so every passkey question sees its key lines in memory, among real text, next to rows of other examples.
   Real text filling a pack (35% of the examples), passkeys in real text of one to eight windows with 1-3 named keys
   at any depth (35%), in a few real lines repeated (10%), in the synthetic fillers (12%) and copy lists (8%).
   `text2-positives` (500 steps) is the same without other examples in memory.

    python examples/train_demo_model.py --work demo-run --stages text2,text2-positives

7. `text2-bank` (400 steps), from `text2` at step 500 (`examples/demo_v2_text2`) on new examples of the same mix,
   lr 1e-3: every row's memory also holds each query's 4 best entries among the keys of the last 128 windows of
   earlier batches (`--memory-bank`, docs/training.md#memory-bank), the distractors kNN retrieval meets in a long
   memory.

   `text2-bank64` (100 steps) continues it with a bank of 256 windows (64k tokens) on new examples again: the
   shipped demo model (version 2).

    python examples/train_demo_model.py --work demo-run --stages text2-bank,text2-bank64 --install

Every stage is a `longllama-train` run in `WORK/<stage>` that resumes where it stopped (`--resume auto`).
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from longllama import LongLlamaConfig
from longllama.files import atomic_write_text
from longllama.synthetic import ADJECTIVES, KEY_NAMES, NOUNS, CopyTask, PasskeyTask

WINDOW = 256
# the final window of a prompt: a shorter one leaves room in the local context for the generated tokens (a full one
# moves the whole prompt window into memory at the first generated token, as in the published inference)
LAST_CONTEXT_LENGTH = 128
# kNN retrieval at inference: each memory-layer query reads its 64 best memory keys (passkey at 256k tokens: 20/20
# trials, against 16/20 attending to all of memory); training is dense, as in the paper
MEM_TOP_K = 64
NAMES = tuple(dict.fromkeys(KEY_NAMES + NOUNS + ADJECTIVES))
STAGE_DATA = {  # (copy share, copy task, passkey task, documents); these two share one generator and the tokenizer
    "local": (0.5, CopyTask(4, 30, 0, 60), PasskeyTask(30, 220, max_keys=3, spec_share=0.2, names=NAMES), 60000),
    "fot": (0.3, CopyTask(4, 40, 0, 700), PasskeyTask(60, 1100, max_keys=3, spec_share=0.2, names=NAMES), 40000),
}
# dense copies (longer lists, short gaps): the induction mechanism had not formed after 3,000 `local` steps
COPY_DATA = (0.7, CopyTask(10, 60, 0, 40), PasskeyTask(30, 220, max_keys=3, spec_share=0.2, names=NAMES), 40000)
STAGES = {  # name: (start from, data, steps, longllama-train flags)
    "local": (None, "local", 3000, ["--batch-size", "16", "--pack-size", "2", "--cross-batch-range", "1",
                                    "--positives-only"]),
    "copy": ("local", "copy", 1500, ["--batch-size", "16", "--pack-size", "2", "--cross-batch-range", "1",
                                     "--positives-only"]),
    "fot": ("copy", "fot", 1500, ["--batch-size", "16", "--pack-size", "4", "--cross-batch-range", "3",
                                   "--cross-batch-schedule", "300:7,700:15"]),
    "positives": ("copy", "fot", 1500, ["--batch-size", "16", "--pack-size", "4", "--cross-batch-range", "3",
                                         "--positives-only"]),
    # positives bounded by the document: one document per pack (memory fine-tuning layout), no negatives at all
    "documents": ("copy", "fot", 1500, ["--mode", "memory", "--batch-size", "16", "--pack-size", "4"]),
}

# ---- v2 (issue 20): real text. The v1 model's layers, its embeddings carried over to a tokenizer trained on the
# real-text corpus (`transfer`), then FoT training on real text mixed with passkey documents whose haystacks are real
# text and with copy lists. `text-positives` is the same stage without negatives (the ablation arm of
# benchmarks/long_context_ppl.py).
VOCAB_V2 = 2048
TEXT_SHARE, COPY_SHARE = 0.45, 0.10  # shares of the `text` stage's tokens; the rest are passkey documents
CHUNK_CHARS = (2000, 24000)  # training documents are cut into chunks of this many characters, at line starts
V2_FLAGS = ["--batch-size", "16", "--pack-size", "4", "--cross-batch-range", "3"]
STAGES_V2 = {  # name: (start from, steps, data, flags); start: a stage of WORK or a model directory
    "text": ("transfer", 2000, "text", V2_FLAGS + ["--cross-batch-schedule", "300:7,700:15"]),
    "text-positives": ("transfer", 2000, "text", V2_FLAGS + ["--positives-only"]),
}

# ---- v2, second mix (`text2`). In `text`, documents were cut into k = 4 windows wherever the stream's pack boundary
# fell, so a passkey question was often in another pack than its key line (and row 0 of a pack saw no memory at
# all): most real-haystack questions could not be answered, and the model learnt to guess a number. Here every
# example is at most one pack of 8 windows (`--mode memory`: one example per pack, left-padded, never cut) and rows
# also see other examples (`--memory-negatives`, d up to 31 of a batch of 32), so every key line is in the question
# row's memory among real text, next to other examples' rows. Kinds, as shares of the examples: real text that fills
# a pack (language modelling over up to 7 windows of memory), passkeys in real text (1-3 keys with distinct names
# at any depth, haystacks of one to eight windows), passkeys in a few real lines repeated, passkeys in the synthetic
# fillers (half of them the benchmark's exact format) and copy lists.
EXAMPLE_TOKENS = 8 * WINDOW - 2  # an example's text tokens: with <s> and </s> it fills one pack of 8 windows
TEXT2_KINDS = {"text": 0.35, "real": 0.35, "repeat": 0.10, "synthetic": 0.12, "copy": 0.08}
TEXT2_EXAMPLES = 12000
TEXT2_FLAGS = ["--mode", "memory", "--memory-negatives", "--batch-size", "32", "--pack-size", "8"]
V2_START = Path(__file__).resolve().parent / "demo_v2"  # the `text` model at step 1,000, and its tokenizer
STAGES_V2.update({
    "text2": (str(V2_START), 1000, "text2", TEXT2_FLAGS + ["--cross-batch-range", "15",
                                                               "--cross-batch-schedule", "100:31"]),
    "text2-positives": (str(V2_START), 500, "text2", ["--mode", "memory", "--batch-size", "32",
                                                            "--pack-size", "8"]),
})

# ---- v2, third step (`text2-bank`). `text2` at step 500 finds keys in 16k-32k tokens of prose but not in 100k: at
# inference kNN retrieval picks each query's 64 best keys from the whole memory, and among 100k+ tokens of real text
# some distractors outscore the key line, while in training a row's memory held at most 31 windows (8k tokens). A
# memory bank (`--memory-bank`) gives every row, besides its 31 windows, the 4 best entries of each of its queries
# among the keys that the last 128 windows (32k tokens) of earlier batches wrote: the hard negatives that kNN retrieval
# would put next to the key. From `text2` at step 500 (examples/demo_v2_text2), on new examples of the same mix.
V2_TEXT2 = Path(__file__).resolve().parent / "demo_v2_text2"
STAGES_V2["text2-bank"] = (str(V2_TEXT2), 400, "text2b", TEXT2_FLAGS + [
    "--cross-batch-range", "31", "--memory-bank", "128", "--memory-bank-top-k", "4", "--lr", "1e-3",
    "--save-every", "100", "--keep-checkpoints", "4"])
# then 100 steps with a bank of 256 windows (64k tokens, the longest context of benchmarks/long_context_ppl.py), on
# new examples again
STAGES_V2["text2-bank64"] = ("text2-bank", 100, "text2c", TEXT2_FLAGS + [
    "--cross-batch-range", "31", "--memory-bank", "256", "--memory-bank-top-k", "4", "--lr", "1e-3",
    "--warmup-steps", "10", "--save-every", "50", "--keep-checkpoints", "2"])


CARD = """# LongLLaMA demo model

A small LongLLaMA (4 layers, hidden 128, memory layer 2 without rotary, window 256 tokens, fp32 memory) trained from
scratch on a 2-core CPU with `longllama-train` (FoT crossbatch) on synthetic passkey-style documents and copy lists,
by `examples/train_demo_model.py` in the longllama repository (docs/demo_model.md has the recipe and the measured
passkey accuracy). It knows this synthetic text only; it is not a language model.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from longllama import demo_checkpoint

model = AutoModelForCausalLM.from_pretrained(demo_checkpoint())
tokenizer = AutoTokenizer.from_pretrained(demo_checkpoint())
```

Without the longllama package: `trust_remote_code=True` (the remote code is in this directory).
"""

CARD_V2 = CARD.replace(
    "on synthetic passkey-style documents and copy lists,",
    "on synthetic passkey-style documents and copy lists (v1),\nthen on real text (the Python standard library's code "
    "and prose, a few packages held out) mixed with passkey\ndocuments whose haystacks are real text, last with a "
    "memory bank of earlier batches' keys in training (v2),",
).replace("It knows this synthetic text only; it is not a language model.",
          "It is a very small language model of Python code and technical English.")


def write_documents(path: Path, data: tuple, rng: random.Random) -> list[str]:
    """Write a stage's documents as JSON lines; returns the texts."""
    copy_share, copy, passkey, count = data
    texts = []
    with open(path, "w") as f:
        for _ in range(count):
            document = copy.document(rng) if rng.random() < copy_share else passkey.document(rng)
            texts.append(document["text"])
            f.write(json.dumps({"text": document["text"]}) + "\n")
    return texts


def prepare(work: Path, seed: int) -> None:
    """The stages' documents, the tokenizer (sentencepiece BPE, digits split) and the model config."""
    import io

    import sentencepiece as spm

    from longllama.modeling import LongLlamaTokenizer
    from longllama.passkey import FILLER, QUESTION, TASK

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "copy.jsonl").is_file():
        write_documents(work / "copy.jsonl", COPY_DATA, random.Random(f"copy-{seed}"))
    if (work / "tokenizer" / "config.json").is_file():
        return
    rng = random.Random(seed)
    sample = [TASK, FILLER, QUESTION]
    for name, data in STAGE_DATA.items():
        sample += write_documents(work / f"{name}.jsonl", data, rng)[:3000]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        split_digits=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
        num_threads=1,
    )
    (work / "tokenizer").mkdir(exist_ok=True)
    (work / "tokenizer" / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LongLlamaTokenizer(vocab_file=str(work / "tokenizer" / "tokenizer.model"))
    tokenizer.save_pretrained(work / "tokenizer")
    LongLlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=WINDOW,
        last_context_length=LAST_CONTEXT_LENGTH,
        mem_layers=[2], mem_positionals=False, mem_dtype="float32", tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    ).to_json_file(work / "tokenizer" / "config.json")


def train(work: Path, name: str, seed: int, lr: float) -> None:
    start, data, steps, flags = STAGES[name]
    if (work / name / "model" / "config.json").is_file():
        print(f"{name}: done already", flush=True)
        return
    if start is not None and not (work / start / "model" / "config.json").is_file():
        sys.exit(f"stage {name} starts from the model of stage {start}, which is not trained yet: run {start} first.")
    begin = ["--init-config", str(work / "tokenizer" / "config.json")] if start is None else [
        "--model", str(work / start / "model")]
    command = [
        sys.executable, "-m", "longllama.train", *begin, "--tokenizer", str(work / "tokenizer"),
        "--data", str(work / f"{data}.jsonl"), "--output-dir", str(work / name), "--steps", str(steps),
        "--lr", str(lr), "--warmup-steps", "100", "--seed", str(seed), "--save-every", "250", "--log-every", "50",
        "--resume", "auto", *flags,
    ]
    started = time.perf_counter()
    print(f"{name}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")))
    print(f"{name}: trained in {time.perf_counter() - started:.0f} s", flush=True)


def text_chunks(text: str, rng: random.Random) -> list[str]:
    """`text` cut at line starts into chunks of `CHUNK_CHARS` characters (the last one may be shorter)."""
    chunks, start = [], 0
    while start < len(text):
        end = text.find("\n", start + rng.randint(*CHUNK_CHARS))
        end = len(text) if end < 0 else end + 1
        chunks.append(text[start:end])
        start = end
    return chunks


def prepare_v2(work: Path, seed: int) -> None:
    """The real-text corpus (`longllama.corpus`, held-out packages excluded), the `text` stage's documents and the v2
    tokenizer (sentencepiece BPE of `VOCAB_V2` pieces on the training split, whitespace kept for code); the model
    config comes from the v1 model (`transfer`)."""
    import io

    import sentencepiece as spm

    from longllama.corpus import read_corpus, write_corpus
    from longllama.modeling import LongLlamaTokenizer
    from longllama.passkey import FILLER, QUESTION, TASK, key_line

    if not (work / "corpus" / "manifest.json").is_file():
        write_corpus(work / "corpus")
    train = read_corpus(work / "corpus" / "train.jsonl")
    rng = random.Random(f"text-{seed}")
    if not (work / "text.jsonl").is_file():
        chunks = [chunk for document in train for chunk in text_chunks(document.text, rng)]
        text_chars = sum(map(len, chunks))
        # passkey and copy documents in proportion to the text, by characters
        passkey = PasskeyTask(60, 1100, max_keys=3, spec_share=0.2, names=NAMES,
                              haystacks=tuple(document.text for document in train))
        copy = CopyTask(4, 40, 0, 700)
        documents = [{"text": chunk, "kind": "text"} for chunk in chunks]
        for share, task, kind in ((1 - TEXT_SHARE - COPY_SHARE, passkey, "passkey"), (COPY_SHARE, copy, "copy")):
            chars = 0
            while chars < text_chars * share / TEXT_SHARE:
                documents.append({"text": task.document(rng)["text"], "kind": kind})
                chars += len(documents[-1]["text"])
        rng.shuffle(documents)
        atomic_write_text(work / "text.jsonl", "".join(json.dumps(d) + "\n" for d in documents))
    tokenizer_dir = work / "tokenizer-v2"
    if (tokenizer_dir / "tokenizer.model").is_file():
        return
    lines = [line for document in train for line in document.text.split("\n") if line.strip()]
    sample = [TASK, FILLER, QUESTION] + [key_line(n, name) for n, name in enumerate(NAMES, 1)]
    sample += rng.sample(lines, min(len(lines), 150000))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample), model_writer=model, vocab_size=VOCAB_V2, model_type="bpe",
        byte_fallback=True, split_digits=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        max_sentence_length=8192, minloglevel=2, num_threads=1,
    )
    tokenizer_dir.mkdir(exist_ok=True)
    (tokenizer_dir / "tokenizer.model").write_bytes(model.getvalue())
    LongLlamaTokenizer(vocab_file=str(tokenizer_dir / "tokenizer.model")).save_pretrained(tokenizer_dir)


def transfer(work: Path, v1: Path) -> None:
    """WORK/transfer/model: the v1 model with the v2 vocabulary. Every v2 piece's embedding is the v1 embedding of
    the same piece, or else the mean of the v1 embeddings of the piece's text as v1 tokenizes it (the layers, which
    hold the retrieval mechanism, are kept as they are)."""
    import sentencepiece as spm
    import torch
    from safetensors.torch import load_file

    from longllama import LongLlamaConfig, LongLlamaForCausalLM

    out = work / "transfer" / "model"
    if (out / "config.json").is_file():
        print("transfer: done already", flush=True)
        return
    if not (v1 / "model.safetensors").is_file():
        sys.exit(f"transfer: {v1} has no model.safetensors; train the v1 stages (local,copy,fot) or pass --v1 DIR.")
    old_sp = spm.SentencePieceProcessor(model_file=str(v1 / "tokenizer.model") if (v1 / "tokenizer.model").is_file()
                                        else str(work / "tokenizer" / "tokenizer.model"))
    new_sp = spm.SentencePieceProcessor(model_file=str(work / "tokenizer-v2" / "tokenizer.model"))
    weights = load_file(v1 / "model.safetensors")
    old = weights["model.embed_tokens.weight"]
    rows = []
    for i in range(new_sp.get_piece_size()):
        piece = new_sp.id_to_piece(i)
        same = old_sp.piece_to_id(piece)
        if same != old_sp.unk_id() or i == new_sp.unk_id():
            rows.append(old[same])
            continue
        ids = old_sp.encode(piece.replace("\u2581", " ")) or [old_sp.unk_id()]
        rows.append(old[ids].mean(0))
    config = json.loads((v1 / "config.json").read_text())
    config.update(vocab_size=new_sp.get_piece_size(), mem_top_k=None)
    config = LongLlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "auto_map")})
    model = LongLlamaForCausalLM(config)
    weights["model.embed_tokens.weight"] = torch.stack(rows)
    weights.pop("lm_head.weight", None)  # tied to the embeddings
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [key for key in missing if key != "lm_head.weight"]:
        sys.exit(f"transfer: the v1 weights do not fit the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(out)
    print(f"transfer: {out} ({sum(p.numel() for p in model.parameters()):,} parameters)", flush=True)


def insert_keys(rng: random.Random, haystack: str, keys: dict[str, int]) -> str:
    """TASK, `haystack` with the key lines of `keys` ({name: key}) on lines of their own at random depths (each
    where a space or line break was), the question about one of them, and its answer."""
    from longllama.passkey import TASK, key_line, question_line

    spaces = [i for i, c in enumerate(haystack) if c in " \n"] or [0]
    cuts = sorted(rng.choice(spaces) for _ in keys)
    parts, previous = [TASK], 0
    for (name, key), cut in zip(rng.sample(list(keys.items()), len(keys)), cuts):
        if cut > previous:
            parts.append(haystack[previous:cut].strip())
        parts.append(key_line(key, name))
        previous = cut
    parts.append(haystack[previous:].strip() or "The grass is green.")
    asked = rng.choice(list(keys))
    return "\n".join(parts + [question_line(asked)]) + f" {keys[asked]}."


def text2_example(rng: random.Random, kind: str, texts: list[str], count_tokens) -> str:
    """One example of the `text2` mix, of at most EXAMPLE_TOKENS tokens (`count_tokens(text)`)."""
    from longllama.passkey import KEY_RANGE

    if kind == "copy":
        return CopyTask(4, 40, 0, 700).document(rng)["text"]
    if kind == "synthetic":  # the v1 fillers; half of these in the benchmark's exact format
        task = PasskeyTask(60, 1400, max_keys=3, spec_share=0.5, names=NAMES)
        while count_tokens(text := task.document(rng)["text"]) > EXAMPLE_TOKENS:
            pass
        return text
    if kind == "text":  # a span that fills the pack, from a line start
        chars = round(3.3 * EXAMPLE_TOKENS)
    else:  # one to eight windows of haystack
        chars = round(2.9 * rng.randint(WINDOW // 2, EXAMPLE_TOKENS - 100))
    text = rng.choice(texts)
    start = text.find("\n", rng.randrange(max(1, len(text) - chars))) + 1
    names = ["pass"] if rng.random() < 0.4 else rng.sample(NAMES, rng.randint(1, 3))
    keys = {name: rng.randrange(*KEY_RANGE) for name in names}
    if kind == "repeat":  # one to four lines repeated: an unseen repeated filler
        lines = [line.strip() for line in text[start:].split("\n", 8)[:-1] if line.strip()][: rng.randint(1, 4)]
        unit = " ".join(lines) or "The grass is green."
        haystack = " ".join([unit] * max(1, chars // (len(unit) + 1)))
    else:
        haystack = text[start : start + chars]
    while True:
        example = haystack if kind == "text" else insert_keys(rng, haystack, keys)
        if count_tokens(example) <= EXAMPLE_TOKENS:
            return example
        cut = haystack.rfind("\n" if kind == "text" else " ", 0, len(haystack) * 9 // 10)
        haystack = haystack[: cut if cut > 0 else len(haystack) * 9 // 10]


def prepare_text2(work: Path, seed: int, tokenizer_dir: Path, name: str = "text2") -> None:
    """WORK/NAME.jsonl: TEXT2_EXAMPLES examples of the `text2` mix from the corpus's training split, each at most
    one pack (its tokens counted with the tokenizer of `tokenizer_dir`); each name draws other examples."""
    import sentencepiece as spm

    from longllama.corpus import read_corpus, write_corpus

    if (work / f"{name}.jsonl").is_file():
        return
    if not (work / "corpus" / "manifest.json").is_file():
        write_corpus(work / "corpus")
    texts = [document.text for document in read_corpus(work / "corpus" / "train.jsonl")]
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    rng = random.Random(f"{name}-{seed}")
    kinds = rng.choices(list(TEXT2_KINDS), weights=list(TEXT2_KINDS.values()), k=TEXT2_EXAMPLES)
    lines = [json.dumps({"text": text2_example(rng, kind, texts, lambda t: len(sp.encode(t))), "kind": kind}) + "\n"
             for kind in kinds]
    atomic_write_text(work / f"{name}.jsonl", "".join(lines))


def train_v2(work: Path, name: str, seed: int, lr: float) -> None:
    start, steps, data, flags = STAGES_V2[name]
    if (work / name / "model" / "config.json").is_file():
        print(f"{name}: done already", flush=True)
        return
    start = work / start / "model" if start in STAGES_V2 or start == "transfer" else Path(start)
    if not (start / "config.json").is_file():
        sys.exit(f"stage {name} starts from {start}, which is not trained yet.")
    tokenizer = work / "tokenizer-v2" if data == "text" else start
    command = [
        sys.executable, "-m", "longllama.train", "--model", str(start),
        "--tokenizer", str(tokenizer), "--data", str(work / f"{data}.jsonl"),
        "--output-dir", str(work / name), "--steps", str(steps), "--lr", str(lr), "--warmup-steps", "100",
        "--seed", str(seed), "--save-every", "250", "--log-every", "50", "--resume", "auto", *flags,
    ]
    started = time.perf_counter()
    print(f"{name}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")))
    print(f"{name}: trained in {time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="directory for data, runs and the result")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the tokenizer and the training")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate of every stage")
    parser.add_argument("--stages", default="local,copy,fot,transfer,text", help="stages to run, in order (v1: "
                        "local,copy,fot, and positives,documents for its ablation; v2: transfer,text, and "
                        "text-positives for its ablation; v2's second mix, from examples/demo_v2: text2, and "
                        "text2-positives for its ablation; from examples/demo_v2_text2: text2-bank, then "
                        "text2-bank64, the shipped demo; default: %(default)s)")
    parser.add_argument("--v1", type=Path, help="the v1 model that `transfer` starts from (default: WORK/fot/model; "
                        "e.g. examples/demo_v1)")
    parser.add_argument("--install", nargs="?", const="text2-bank64",
                        choices=["fot", "text", "text2", "text2-bank", "text2-bank64"],
                        help="copy this stage's model (default: text2-bank64, the shipped demo; text2-bank and text2: "
                        "the stages before it; text: the first v2 mix; fot: the v1 model) and its "
                        "tokenizer into the package")
    args = parser.parse_args()
    stages = args.stages.split(",")
    known = [*STAGES, "transfer", *STAGES_V2]
    unknown = [name for name in stages if name not in known]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {known}")
    started = time.perf_counter()
    if any(name in STAGES for name in stages):
        prepare(args.work, args.seed)
    if any(name in ("transfer", "text", "text-positives") for name in stages):
        prepare_v2(args.work, args.seed)
    if any(name in ("text2", "text2-positives") for name in stages):
        prepare_text2(args.work, args.seed, V2_START)
    if "text2-bank" in stages:
        prepare_text2(args.work, args.seed, V2_START, "text2b")
    if "text2-bank64" in stages:
        prepare_text2(args.work, args.seed, V2_START, "text2c")
    for name in stages:
        if name in STAGES:
            train(args.work, name, args.seed, args.lr)
        elif name == "transfer":
            transfer(args.work, args.v1 or args.work / "fot" / "model")
        else:
            train_v2(args.work, name, args.seed, args.lr)
    print(f"all stages: {time.perf_counter() - started:.0f} s", flush=True)
    if args.install:
        from longllama.demo import DEMO_DIR, write_checkpoint

        model = args.work / args.install / "model"
        if not (model / "config.json").is_file():
            sys.exit(f"--install: {model} does not exist yet; run the {args.install} stage first.")
        tokenizer = {"fot": args.work / "tokenizer", "text": args.work / "tokenizer-v2"}.get(args.install, model)
        write_checkpoint(model, tokenizer, DEMO_DIR, CARD if args.install == "fot" else CARD_V2,
                         last_context_length=LAST_CONTEXT_LENGTH, mem_top_k=MEM_TOP_K, code=False)
        print(f"installed into {DEMO_DIR} (demo_checkpoint() adds the remote code from modeling/)")


if __name__ == "__main__":
    main()
