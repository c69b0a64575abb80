"""The FoT distraction experiment at small scale: does training with negatives keep attention on the right document?

Tiny LongLLaMA models (2 layers, hidden 128, memory layer 1 without rotary, as the paper's small models) are trained
from scratch with `longllama-train` on synthetic retrieval (`longllama.synthetic.FactsTask`), in three stages:

1. one window, from scratch: half copy warm-ups (a random run of symbols, later `?` and the run again), half
   key-value facts restated later (`k7 v3 ; ... k7 v3 ;`); this grows the induction mechanism (a previous-token
   head in layer 0, content matching in layer 1) that retrieval needs;
2. from that model, documents of two 64-token windows whose answers sit in the first window and are asked in the
   second (half copies, half facts), so that they come only through memory; positives only (memory = the
   document's own first window). Stages 1 and 2 are shared;
3. the two arms, from the stage-2 model, with the same budget; they differ only in what memory holds:
   - `positives`: only the document's own earlier window (`--positives-only`, d = 1), as in stage 2;
   - `fot`: FoT crossbatch, also windows of other documents: d = 3, from step 250 d = 7, from step 500 d = 15
     (k = 2: one positive and up to 14 negatives; d scheduled upwards, as the paper's small models).

Then both read held-out documents with 0, 1, 8, 64 and 512 windows of *unrelated* documents in memory before their
own (on the inference path) and answer: the table and plot give the accuracy of the copies and of the facts whose
answer is in memory, the positive attention mass and the own share of memory attention (`longllama.evaluation`).

    python benchmarks/distraction.py --work /tmp/distraction --json docs/figures/distraction.json \
        --plot docs/figures/distraction.png        # ~45 minutes on 2 cores
"""

import argparse
import json
import multiprocessing
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from longllama import LongLlamaConfig, LongLlamaForCausalLM
from longllama.data import encode_document
from longllama.evaluation import distraction_prompt, positive_attention_mass
from longllama.synthetic import FactsTask

DISTRACTORS = (0, 1, 8, 64, 512)
# one-symbol keys, restated without a marker: the lookup is the induction pattern the copy warm-ups teach
STAGE1 = FactsTask(window=64, windows=1, first_question_rate=0.5, question_marker=False)
TASK = FactsTask(window=64, windows=2, question_marker=False)
RUNS = {  # stage 3: what memory holds during training
    "positives": ["--positives-only", "--cross-batch-range", "1"],
    "fot": ["--cross-batch-range", "3", "--cross-batch-schedule", "250:7,500:15"],
}


def mixed(task: FactsTask, rng: random.Random, index: int) -> dict:
    """Every other document is a copy warm-up (`copy_answers`), the others facts (`memory_answers`, ...)."""
    return task.copy_document(rng) if index % 2 else task.document(rng)


def prepare(work: Path, documents: int, seed: int) -> None:
    """Training documents of both stages, held-out documents, the word-level tokenizer and the model config."""
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = TASK.tokenizer()
    tokenizer.save_pretrained(work / "tokenizer")
    for name, task, count in (("stage1.jsonl", STAGE1, documents), ("stage2.jsonl", TASK, documents),
                              ("heldout.jsonl", TASK, 400)):
        with open(work / name, "w") as f:
            for i in range(count):
                f.write(json.dumps(mixed(task, rng, i)) + "\n")
    config = LongLlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=TASK.window,
        last_context_length=TASK.window, mem_layers=[1], mem_positionals=False, mem_dtype="float32",
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.to_json_file(work / "tokenizer" / "config.json")


def launch(work: Path, name: str, start: list[str], data: str, steps: int, extra: list[str], args, threads: int,
           seed: int) -> subprocess.Popen | None:
    """Start one `longllama-train` run (resumable: `--resume auto`); None when its model exists already."""
    if (work / name / "model" / "config.json").is_file():
        return None
    command = [
        sys.executable, "-m", "longllama.train", *start, "--data", str(work / data), "--output-dir", str(work / name),
        "--batch-size", "32", "--steps", str(steps), "--lr", str(args.lr), "--warmup-steps", "100",
        "--weight-decay", "0.01", "--seed", str(seed), "--save-every", "250", "--log-every", "50",
        "--resume", "auto", *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.err", "w"))


def wait(work: Path, runs: dict, started: float, what: str) -> None:
    for name, process in runs.items():
        if process is not None and process.wait() != 0:
            sys.exit(f"training {name} failed: see {work / name}.err")
    print(f"{what}: done after {time.perf_counter() - started:.0f} s", flush=True)


def train_all(work: Path, args) -> None:
    started = time.perf_counter()
    scratch = ["--init-config", str(work / "tokenizer" / "config.json"), "--tokenizer", str(work / "tokenizer")]
    stage1 = launch(work, "stage1", scratch, "stage1.jsonl", args.stage1_steps,
                    ["--pack-size", "1", "--cross-batch-range", "0"], args, threads=2, seed=args.seed)
    wait(work, {"stage1": stage1}, started, "stage 1 (one window: copies and facts, from scratch)")
    stage2 = launch(work, "stage2", ["--model", str(work / "stage1" / "model")], "stage2.jsonl", args.memory_steps,
                    ["--pack-size", "2", *RUNS["positives"]], args, threads=2, seed=args.seed)
    wait(work, {"stage2": stage2}, started, "stage 2 (two windows, the answers through memory, positives only)")
    runs = {
        name: launch(work, name, ["--model", str(work / "stage2" / "model")], "stage2.jsonl", args.steps,
                     ["--pack-size", "2", *extra], args, threads=1, seed=args.seed + 1)
        for name, extra in RUNS.items()
    }
    wait(work, runs, started, "stage 3 (the two arms)")


def encode(tokenizer, document: dict) -> list[int]:
    return encode_document(tokenizer, document["text"])


def distractor_windows(task: FactsTask, tokenizer, queries: list[dict], count: int, seed: int):
    """For each query document, `count` windows of fresh documents (copies and facts, as in training) that share none
    of its keys, so no distractor holds the right answer by accident; what remains is the attention they draw. (A
    random copy run of 4+ symbols out of 160 does not recur by chance.)"""
    per_query = []
    for index, query in enumerate(queries):
        rng = random.Random(seed * 1_000_003 + index)
        windows = []
        while len(windows) < count:
            document = task.copy_document(rng) if len(windows) % 4 else task.document(rng, exclude_keys=query["keys"])
            ids = encode(tokenizer, document)
            windows += [ids[i : i + task.window] for i in range(0, len(ids), task.window)]
        per_query.append(windows[:count])
    return per_query


ANSWERS = {"copy": "copy_answers", "memory": "memory_answers", "local": "local_answers"}


@torch.no_grad()
def answer_accuracy(model, queries: list[list[int]], answers: list[dict], distractors, window: int):
    """Greedy next-token accuracy on the answers of each query document's last window (copied symbols whose run is in
    the first window; values of facts stated in the first window, or in the last), with the windows
    `distractors[i]` in memory before document i's own (the same ones the mass uses)."""
    hits = {kind: [] for kind in ANSWERS}
    for index, ids in enumerate(queries):
        prompt, _ = distraction_prompt(ids, distractors[index], window)
        logits = model(torch.tensor([prompt]), use_cache=True, last_context_length=window,
                       logits_to_keep=window).logits[0]  # [window, vocab]: the document's last window
        last_start = len(ids) - window  # the document's last window, in document positions
        for kind, field in ANSWERS.items():
            for position in answers[index].get(field, []):
                predicted = logits[position - 1 - last_start].argmax().item()
                hits[kind].append(predicted == ids[position])
    return {kind: sum(h) / max(1, len(h)) for kind, h in hits.items()}


def answer_queries(document: dict) -> list[int]:
    """Token positions whose next-token prediction is an answer that only memory holds (copies, memory facts)."""
    return [p - 1 for p in document.get("copy_answers", []) + document.get("memory_answers", [])]


def evaluate(work: Path, name: str, task: FactsTask, args) -> list[dict]:
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = LongLlamaForCausalLM.from_pretrained(work / name / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(work / name / "model")
    answers = [json.loads(line) for line in open(work / "heldout.jsonl")][: args.eval_documents]
    queries = [encode(tokenizer, d) for d in answers]
    pools = distractor_windows(task, tokenizer, answers, max(DISTRACTORS), args.seed + 1)
    asking = [i for i, d in enumerate(answers) if answer_queries(d)]
    rows = []
    for count in DISTRACTORS:
        distractors = [pool[:count] for pool in pools]
        accuracy = answer_accuracy(model, queries, answers, distractors, task.window)
        mass = positive_attention_mass(model, queries, count, task.window, distractors=distractors)
        at_answers = positive_attention_mass(
            model, [queries[i] for i in asking], count, task.window, distractors=[distractors[i] for i in asking],
            positions=[answer_queries(answers[i]) for i in asking],
        )
        row = {"model": name, "distractors": count, **{f"acc_{kind}": accuracy[kind] for kind in ANSWERS}, **mass,
               "answer_positive": at_answers["positive"], "answer_memory_positive": at_answers["memory_positive"]}
        rows.append(row)
        print(f"{name:>10} {count:>5} {row['acc_copy']:>8.3f} {row['acc_memory']:>7.3f} {row['acc_local']:>7.3f} "
              f"{row['positive']:>8.3f} {row['answer_positive']:>8.3f} {row['answer_memory_positive']:>8.3f}",
              flush=True)
    return rows


def evaluate_in_process(work: Path, name: str, args) -> list[dict]:
    torch.set_num_threads(1)
    return evaluate(work, name, TASK, args)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    panels = [("acc_copy", "copy through memory: accuracy"), ("acc_memory", "facts in memory: accuracy"),
              ("answer_positive", "positive attention mass\n(answer queries; dashed: all queries)"),
              ("answer_memory_positive", "own share of memory attention\n(answer queries)")]
    for ax, (key, title) in zip(axes, panels):
        for color, name in zip(("tab:orange", "tab:blue"), RUNS):
            mine = [r for r in rows if r["model"] == name and r["distractors"] > 0]
            x = [r["distractors"] for r in mine]
            ax.plot(x, [r[key] for r in mine], marker="o", color=color, label=name)
            if key == "answer_positive":
                ax.plot(x, [r["positive"] for r in mine], linestyle="--", color=color, alpha=0.6)
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
    parser.add_argument("--stage1-steps", type=int, default=4000, help="stage 1 steps: one window (shared)")
    parser.add_argument("--memory-steps", type=int, default=2000, help="stage 2 steps: through memory (shared)")
    parser.add_argument("--steps", type=int, default=1000, help="stage 3 steps of each arm")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--documents", type=int, default=60000)
    parser.add_argument("--eval-documents", type=int, default=24, help="held-out documents (half copies, half facts)")
    parser.add_argument("--skip-training", action="store_true", help="evaluate the existing runs in --work")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a PNG plot here")
    args = parser.parse_args()
    work = Path(args.work)

    if not args.skip_training:
        if not (work / "stage2.jsonl").is_file():
            prepare(work, args.documents, args.seed)
        train_all(work, args)

    print(f"{'model':>10} {'distr':>5} {'acc_copy':>8} {'acc_mem':>7} {'acc_loc':>7} {'pos_mass':>8} {'ans_pos':>8} "
          f"{'ans_own':>8}", flush=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(len(RUNS), mp_context=multiprocessing.get_context("spawn")) as pool:  # one per core
        futures = [pool.submit(evaluate_in_process, work, name, args) for name in RUNS]
        rows = [row for future in futures for row in future.result()]
    print(f"evaluated in {time.perf_counter() - started:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "results": rows}, indent=2))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
