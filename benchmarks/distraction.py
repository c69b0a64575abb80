"""The FoT distraction experiment at small scale: does training with negatives keep attention on the right document?

Two tiny LongLLaMA models are trained from scratch with `longllama-train` on the same synthetic retrieval task
(`longllama.synthetic.FactsTask`: key-value facts in the first window of a document, questions about them in the
second, so answers come only through memory), with the same budget:

- `positives`: memory holds only the document's own earlier window (`--positives-only`, d = 1);
- `fot`: FoT crossbatch, memory also holds windows of other documents (d = 7: 1 positive + 6 negatives).

Then both answer held-out documents with 1, 8, 64 and 512 windows of *unrelated* documents in memory before their
own (the inference path, window by window). The table and plot give the answer accuracy and the positive attention
mass (`longllama.evaluation`).

    python benchmarks/distraction.py --work /tmp/distraction --json docs/figures/distraction.json \
        --plot docs/figures/distraction.png          # ~25 minutes on 2 cores
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
from longllama.evaluation import distraction_prompt, positive_attention_mass
from longllama.synthetic import FactsTask

DISTRACTORS = (0, 1, 8, 64, 512)
# single-symbol keys from a large alphabet: the lookup a 2-layer model learns (an induction head) in minutes
TASK = FactsTask(window=64, windows=2, key_length=1, symbols=1024, values=32, local_facts=2, local_questions=2)
RUNS = {
    "positives": ["--positives-only", "--cross-batch-range", "1"],
    "fot": ["--cross-batch-range", "7"],
}


def prepare(work: Path, task: FactsTask, documents: int, seed: int) -> None:
    """Training documents, held-out documents, the word-level tokenizer and the model config."""
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = task.tokenizer()
    tokenizer.save_pretrained(work / "tokenizer")
    with open(work / "train.jsonl", "w") as f:
        for _ in range(documents):
            f.write(json.dumps(task.document(rng)) + "\n")
    with open(work / "heldout.jsonl", "w") as f:
        for _ in range(200):
            f.write(json.dumps(task.document(rng)) + "\n")
    config = LongLlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=task.window,
        last_context_length=task.window, mem_layers=[1], mem_positionals=False, mem_dtype="float32",
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.to_json_file(work / "tokenizer" / "config.json")


def train(work: Path, name: str, args) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "longllama.train", "--init-config", str(work / "tokenizer" / "config.json"),
        "--tokenizer", str(work / "tokenizer"), "--data", str(work / "train.jsonl"), "--output-dir",
        str(work / name), "--batch-size", "32", "--pack-size", "2", "--steps", str(args.steps), "--lr", str(args.lr),
        "--warmup-steps", "100", "--weight-decay", "0.01", "--seed", str(args.seed), "--save-every", "500",
        "--log-every", "50", "--resume", "auto", *RUNS[name],
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.err", "w"))


def encode(tokenizer, document: dict) -> list[int]:
    ids = tokenizer(document["text"], add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]


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
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--documents", type=int, default=50000)
    parser.add_argument("--threads", type=int, default=1, help="threads per training run (both run at once)")
    parser.add_argument("--eval-documents", type=int, default=40)
    parser.add_argument("--skip-training", action="store_true", help="evaluate the existing runs in --work")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a PNG plot here")
    args = parser.parse_args()
    work, task = Path(args.work), TASK

    if not args.skip_training:
        if not (work / "train.jsonl").is_file():
            prepare(work, task, args.documents, args.seed)
        start = time.perf_counter()
        runs = {name: train(work, name, args) for name in RUNS}
        for name, process in runs.items():
            if process.wait() != 0:
                sys.exit(f"training {name} failed: see {work / name}.err")
        print(f"trained both in {time.perf_counter() - start:.0f} s")

    torch.set_num_threads(2)
    print(f"{'model':>10} {'distr':>5} {'acc_mem':>7} {'acc_loc':>7} {'pos_mass':>8} {'mem_pos':>7}")
    rows = [row for name in RUNS for row in evaluate(work, name, task, args)]
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "results": rows}, indent=2))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
