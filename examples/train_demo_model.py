"""Retrain the demo model shipped in `longllama/demo_model` (issue 5): a small LongLLaMA trained from scratch on a CPU
with `longllama-train` (FoT crossbatch), its own sentencepiece tokenizer, and synthetic retrieval data this script
writes (passkey-style documents with varied filler and key names, several named keys per document, copy lists).

    python examples/train_demo_model.py --work demo-run             # seeded; resumable (run it again to continue)
    python examples/train_demo_model.py --work demo-run --install   # then copy the result into longllama/demo_model

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="directory for data, runs and the result")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the tokenizer and the training")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate of every stage")
    parser.add_argument("--stages", default="local,copy,fot", help="stages to run, in order (add 'positives' and "
                        "'documents' for the ablation)")
    parser.add_argument("--install", action="store_true", help="copy the fot model and tokenizer into the package")
    args = parser.parse_args()
    stages = args.stages.split(",")
    unknown = [name for name in stages if name not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    started = time.perf_counter()
    prepare(args.work, args.seed)
    for name in stages:
        train(args.work, name, args.seed, args.lr)
    print(f"all stages: {time.perf_counter() - started:.0f} s", flush=True)
    if args.install:
        from longllama.demo import DEMO_DIR, write_checkpoint

        if not (args.work / "fot" / "model" / "config.json").is_file():
            sys.exit(f"--install: {args.work / 'fot' / 'model'} does not exist yet; run the fot stage first.")
        write_checkpoint(args.work / "fot" / "model", args.work / "tokenizer", DEMO_DIR, CARD,
                         last_context_length=LAST_CONTEXT_LENGTH, mem_top_k=MEM_TOP_K, code=False)
        print(f"installed into {DEMO_DIR} (demo_checkpoint() adds the remote code from modeling/)")


if __name__ == "__main__":
    main()
