"""The FoT distraction experiment at small scale: does training with negatives keep attention on the right document?

Two tiny LongLLaMA models (2 layers, hidden 128, memory layer 1 without rotary, as the paper's small models) are
trained from scratch with `longllama-train` on synthetic key-value retrieval (`longllama.synthetic.FactsTask`), with
the same budget, in two stages:

1. shared, from scratch: in-window recall (facts and questions about them in one 64-token window), half of the
   documents being copy warm-ups (a random run, `?`, the run again); content lookup emerges late in small models
   and the copy documents teach it fast (../shared/reference/demo_model_notes.md), so it is learnt first;
2. from that model, documents of two windows: facts in the first, questions in the second, so the answers come only
   through memory. The two arms differ only in what memory holds during training:
   - `positives`: only the document's own earlier window (`--positives-only`, d = 1);
   - `fot`: FoT crossbatch, also windows of other documents (d = 7 with k = 2: 1 positive + 6 negatives).

Then both answer held-out documents with 0, 1, 8, 64 and 512 windows of *unrelated* documents (sharing none of the
document's keys) in memory before their own, on the inference path. The table and plot give the answer accuracy of
the memory questions and the positive attention mass (`longllama.evaluation`).

    python benchmarks/distraction.py --work /tmp/distraction --json docs/figures/distraction.json \
        --plot docs/figures/distraction.png --stage1-steps 3500 --steps 4000   # ~35 minutes on 2 cores
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from longllama import LongLlamaConfig, LongLlamaForCausalLM
from longllama.data import encode_document
from longllama.evaluation import distraction_prompt, positive_attention_mass
from longllama.synthetic import FactsTask

DISTRACTORS = (0, 1, 8, 64, 512)
# one-symbol keys, distinct within a document: the lookup a 2-layer model can learn (an induction-style head)
STAGE1 = FactsTask(window=64, windows=1, key_length=1, symbols=128, values=16, local_facts=6, local_questions=10)
TASK = FactsTask(window=64, windows=2, key_length=1, symbols=128, values=16, local_facts=2, local_questions=2)
RUNS = {
    "positives": ["--positives-only", "--cross-batch-range", "1"],
    "fot": ["--cross-batch-range", "7"],
}


def prepare(work: Path, documents: int, seed: int) -> None:
    """Training documents of both stages, held-out documents, the word-level tokenizer and the model config."""
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = TASK.tokenizer()
    tokenizer.save_pretrained(work / "tokenizer")
    with open(work / "stage1.jsonl", "w") as f:
        for i in range(documents):
            f.write(json.dumps(STAGE1.copy_document(rng) if i % 2 else STAGE1.document(rng)) + "\n")
    for name, count in (("stage2.jsonl", documents), ("heldout.jsonl", 200)):
        with open(work / name, "w") as f:
            for _ in range(count):
                f.write(json.dumps(TASK.document(rng)) + "\n")
    config = LongLlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=TASK.window,
        last_context_length=TASK.window, mem_layers=[1], mem_positionals=False, mem_dtype="float32",
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.to_json_file(work / "tokenizer" / "config.json")


def launch(work: Path, name: str, start: list[str], data: str, steps: int, extra: list[str], args,
           threads: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "longllama.train", *start, "--data", str(work / data), "--output-dir", str(work / name),
        "--batch-size", "32", "--steps", str(steps), "--lr", str(args.lr), "--warmup-steps", "100",
        "--weight-decay", "0.01", "--seed", str(args.seed), "--save-every", "500", "--log-every", "50",
        "--resume", "auto", *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.err", "w"))


def train_all(work: Path, args) -> None:
    start = time.perf_counter()
    scratch = ["--init-config", str(work / "tokenizer" / "config.json"), "--tokenizer", str(work / "tokenizer")]
    stage1 = launch(work, "stage1", scratch, "stage1.jsonl", args.stage1_steps, ["--pack-size", "1",
                    "--cross-batch-range", "0"], args, threads=2)
    if stage1.wait() != 0:
        sys.exit(f"stage 1 failed: see {work / 'stage1.err'}")
    print(f"stage 1 (in-window recall) trained in {time.perf_counter() - start:.0f} s", flush=True)
    runs = {
        name: launch(work, name, ["--model", str(work / "stage1" / "model")], "stage2.jsonl", args.steps,
                     ["--pack-size", "2", *extra], args, threads=1)
        for name, extra in RUNS.items()
    }
    for name, process in runs.items():
        if process.wait() != 0:
            sys.exit(f"training {name} failed: see {work / name}.err")
    print(f"stage 2, both arms, trained in {time.perf_counter() - start:.0f} s in all", flush=True)


def encode(tokenizer, document: dict) -> list[int]:
    return encode_document(tokenizer, document["text"])


def distractor_windows(task: FactsTask, tokenizer, queries: list[dict], count: int, seed: int):
    """For each query document, `count` windows of fresh documents that share none of its keys (so no distractor
    holds the right answer by accident; what remains is the attention they draw)."""
    per_query = []
    for index, query in enumerate(queries):
        rng = random.Random(seed * 1_000_003 + index)
        windows = []
        while len(windows) < count:
            ids = encode(tokenizer, task.document(rng, exclude_keys=query["keys"]))
            windows += [ids[i : i + task.window] for i in range(0, len(ids), task.window)]
        per_query.append(windows[:count])
    return per_query


@torch.no_grad()
def answer_accuracy(model, queries: list[list[int]], answers: list[dict], distractors, window: int):
    """Greedy accuracy on the memory and local questions of each query document's last window, with the windows
    `distractors[i]` in memory before document i's own (the same ones the mass uses)."""
    hits = {"memory": [], "local": []}
    for index, ids in enumerate(queries):
        prompt, _ = distraction_prompt(ids, distractors[index], window)
        logits = model(torch.tensor([prompt]), use_cache=True, last_context_length=window,
                       logits_to_keep=window).logits[0]  # [window, vocab]: the document's last window
        last_start = len(ids) - window  # the document's last window, in document positions
        for kind in hits:
            for position in answers[index][f"{kind}_answers"]:
                predicted = logits[position - 1 - last_start].argmax().item()
                hits[kind].append(predicted == ids[position])
    return {kind: sum(h) / max(1, len(h)) for kind, h in hits.items()}


def evaluate(work: Path, name: str, task: FactsTask, args) -> list[dict]:
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = LongLlamaForCausalLM.from_pretrained(work / name / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(work / name / "model")
    answers = [json.loads(line) for line in open(work / "heldout.jsonl")][: args.eval_documents]
    queries = [encode(tokenizer, d) for d in answers]
    pools = distractor_windows(task, tokenizer, answers, max(DISTRACTORS), args.seed + 1)
    rows = []
    for count in DISTRACTORS:
        distractors = [pool[:count] for pool in pools]
        accuracy = answer_accuracy(model, queries, answers, distractors, task.window)
        mass = positive_attention_mass(model, queries, count, task.window, distractors=distractors)
        row = {"model": name, "distractors": count, "acc_memory": accuracy["memory"],
               "acc_local": accuracy["local"], **mass}
        rows.append(row)
        print(f"{name:>10} {count:>5} {row['acc_memory']:>7.3f} {row['acc_local']:>7.3f} "
              f"{row['positive']:>8.3f} {row['memory_positive']:>7.3f}", flush=True)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("acc_memory", "answer accuracy (memory questions)"), ("positive", "positive attention mass"),
              ("memory_positive", "own share of memory attention")]
    for ax, (key, title) in zip(axes, panels):
        for name in RUNS:
            mine = [r for r in rows if r["model"] == name and r["distractors"] > 0]
            ax.plot([r["distractors"] for r in mine], [r[key] for r in mine], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("unrelated windows in memory")
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/longllama-distraction", help="data, runs and checkpoints go here")
    parser.add_argument("--stage1-steps", type=int, default=3500, help="in-window recall steps (shared)")
    parser.add_argument("--steps", type=int, default=4000, help="memory steps of each arm")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--documents", type=int, default=60000)
    parser.add_argument("--eval-documents", type=int, default=40)
    parser.add_argument("--skip-training", action="store_true", help="evaluate the existing runs in --work")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a PNG plot here")
    args = parser.parse_args()
    work = Path(args.work)

    if not args.skip_training:
        if not (work / "stage2.jsonl").is_file():
            prepare(work, args.documents, args.seed)
        train_all(work, args)

    torch.set_num_threads(2)
    print(f"{'model':>10} {'distr':>5} {'acc_mem':>7} {'acc_loc':>7} {'pos_mass':>8} {'mem_pos':>7}")
    rows = [row for name in RUNS for row in evaluate(work, name, TASK, args)]
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "results": rows}, indent=2))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
