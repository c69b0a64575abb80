"""Passkey accuracy and positive attention mass of demo-recipe models by prompt length (issue 5, docs/demo_model.md).

For each model: `longllama.passkey.run_passkey` (greedy, SPEC section 4 prompts, keys at depths spread over the
prompt) at every length, and for the same prompts the positive attention mass of the query that predicts the key:
the share of memory-layer attention (`longllama.evaluation.span_attention_mass`) that the query predicting the key's
first digit puts on the key line, which sits among up to a thousand windows of filler. Prints a table; writes JSON and a plot.

    python benchmarks/demo_passkey.py --models fot=demo-run/fot/model,positives=demo-run/positives/model \\
        --lengths 1k,4k,16k,64k,100k,256k --trials 20 --json docs/figures/demo_ablation.json \\
        --plot docs/figures/demo_ablation.png
    python benchmarks/demo_passkey.py --lengths 100k,256k --trials 20     # the bundled demo model
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers.utils import logging

from longllama import LongLlamaForCausalLM, demo_checkpoint
from longllama.data import load_tokenizer
from longllama.evaluation import span_attention_mass
from longllama.passkey import PasskeyPrompts, key_line, parse_lengths, plan_trials, run_passkey


def key_line_span(prompts: PasskeyPrompts, input_ids: list[int], key: int) -> tuple[int, int]:
    """Token positions `[start, end)` of the key line in the prompt."""
    line = prompts.encode("\n" + key_line(key))
    for candidate in (line, line[1:], line[2:]):  # the line break may merge with the token before it
        n = len(candidate)
        for start in range(len(input_ids) - n + 1):
            if input_ids[start : start + n] == candidate:
                return start, start + n
    raise ValueError(f"key line of {key} not found in the prompt")


def digit_query_prefix(tokenizer, answer: list[int]) -> list[int]:
    """The answer's tokens before its first digit (e.g. a lone `▁`): the query that predicts the first digit is the
    one that has to find the key."""
    for i, token in enumerate(answer):
        if any(c.isdigit() for c in tokenizer.decode([token])):
            return answer[:i]
    return answer


def evaluate(name: str, path: str, args) -> list[dict]:
    model = LongLlamaForCausalLM.from_pretrained(path).eval()
    tokenizer = load_tokenizer(Path(path))
    if args.last_context_length:
        model.config.last_context_length = args.last_context_length
    started = time.perf_counter()
    plan = plan_trials(args.lengths, args.depths, args.trials, args.seed)
    if args.mass_only:
        results = [{"length": t.length, "depth": t.depth, "key": t.key} for t in plan]
    else:
        results = run_passkey(model, tokenizer, args.lengths, trials=args.trials, seed=args.seed, progress=True)
    prompts = PasskeyPrompts(tokenizer)
    measured = {}
    for result, trial in zip(results, plan):
        assert (result["length"], result["key"]) == (trial.length, trial.key)
        result["model"] = name
        if trial.length > model.config.last_context_length and measured.get(trial.length, 0) < args.mass_trials:
            measured[trial.length] = measured.get(trial.length, 0) + 1
            ids, answer = prompts.build(trial.length, trial.depth, trial.key)
            span = key_line_span(prompts, ids, trial.key)
            query = ids + digit_query_prefix(tokenizer, answer)
            result["positive_attention_mass"] = span_attention_mass(model, query, span)
        for field in ("answer_ids", "generated_ids"):
            result.pop(field, None)
    print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    return results


def table(results: list[dict]) -> str:
    lengths = sorted({r["length"] for r in results})
    models = list(dict.fromkeys(r["model"] for r in results))
    lines = ["| model | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for model in models:
        cells = []
        for n in lengths:
            rows = [r for r in results if r["model"] == model and r["length"] == n and "correct" in r]
            masses = [r["positive_attention_mass"] for r in results
                      if r["model"] == model and r["length"] == n and "positive_attention_mass" in r]
            mass = f" / {sum(masses) / len(masses):.3f}" if masses else ""
            if rows:
                seconds = sum(r["seconds"] for r in rows) / len(rows)
                accuracy = sum(r["correct"] for r in rows) / len(rows)
                cells.append(f"{accuracy:.0%} ({len(rows)}){mass}, {seconds:.1f} s")
            else:
                cells.append(f"-{mass}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in results})
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for model in dict.fromkeys(r["model"] for r in results):
        rows = {n: [r for r in results if r["model"] == model and r["length"] == n] for n in lengths}
        scored = [n for n in lengths if any("correct" in r for r in rows[n])]
        left.plot(scored, [sum(r["correct"] for r in rows[n] if "correct" in r) / sum("correct" in r for r in rows[n])
                           for n in scored], "o-", label=model)
        masses = {n: [r["positive_attention_mass"] for r in rows[n] if "positive_attention_mass" in r] for n in lengths}
        shown = [n for n in lengths if masses[n]]
        right.plot(shown, [sum(masses[n]) / len(masses[n]) for n in shown], "o-", label=model)
    for axis, label in ((left, "passkey accuracy"), (right, "attention on the key line (first-digit query)")):
        axis.set_xscale("log")
        axis.set_xlabel("prompt tokens")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    right.set_yscale("log")
    fig.suptitle("Demo recipe: FoT crossbatch (negatives) vs positives only")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="name=checkpoint,... (default: demo=the bundled demo model; none: only "
                        "--merge)")
    parser.add_argument("--lengths", type=parse_lengths, default=parse_lengths("1k,4k,16k,64k,100k,256k"))
    parser.add_argument("--trials", type=int, default=20, help="trials per length, over depths 0, 0.25, ..., 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mass-trials", type=int, default=5,
                        help="trials per length whose attention mass is measured (one more prompt pass each)")
    parser.add_argument("--last-context-length", type=int, help="override the models' final window length")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--mass-only", action="store_true", help="only the attention mass (no generation)")
    parser.add_argument("--merge", nargs="*", default=[], help="JSON files of earlier runs to add to the table/plot")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write the plot here (needs matplotlib)")
    args = parser.parse_args()
    args.depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    torch.set_num_threads(args.threads)
    logging.disable_progress_bar()  # one bar per trial is enough
    if args.models is None:
        models = {"demo": demo_checkpoint()}
    elif args.models == "none":  # only --merge: redraw the table and plot of earlier runs
        models = {}
    else:
        models = dict(item.split("=", 1) for item in args.models.split(","))
    results = [r for file in args.merge for r in json.loads(Path(file).read_text())["results"]]
    results += [r for name, path in models.items() for r in evaluate(name, path, args)]
    args.lengths = sorted({r["length"] for r in results})
    print("accuracy (trials) / positive attention mass, seconds per trial")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"lengths": args.lengths, "results": results}, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
