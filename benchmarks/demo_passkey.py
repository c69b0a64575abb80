"""Passkey accuracy and positive attention mass of demo-recipe models by prompt length (issue 5, docs/demo_model.md).

For each model: `longllama.passkey.run_passkey` (greedy, the prompts of docs/passkey.md#the-prompt, keys at depths
spread over the prompt) at every length, and for the same prompts the positive attention mass of the query that predicts
the key: the share of memory-layer attention (`longllama.evaluation.span_attention_mass`) that the query predicting the
key's first digit puts on the key line, which sits among up to a thousand windows of filler. Prints a table; writes JSON
and a plot.

    python benchmarks/demo_passkey.py --models fot=demo-run/fot/model,positives=demo-run/positives/model \\
        --lengths 1k,4k,16k,64k,100k,256k --trials 20 --json docs/figures/demo_ablation.json \\
        --plot docs/figures/demo_ablation.png
    python benchmarks/demo_passkey.py --lengths 100k,256k --trials 20     # the bundled demo model

With `--distractor-tokens`, memory also holds *other documents*, the distraction of the paper's section 3: each prompt
is that many tokens of unrelated documents (`<s> text </s>` each, as in training streams; the last one cut so that
the count is exact), then a passkey prompt of `--lengths` tokens (one length). `--distractors copy`: copy lists
(`longllama.synthetic.CopyTask`, the other task of the training mix); `keys`: passkey-style documents whose keys have
other names than `pass` (`PasskeyTask`). The attention mass is then that of the key line among memory that also holds
the other documents:

    python benchmarks/demo_passkey.py --models fot=demo-run/fot/model,positives=demo-run/positives/model \\
        --last-context-length 128 --lengths 1k --distractor-tokens 0,4k,16k,64k,100k --distractors copy --trials 20 \\
        --top-k dense --json docs/figures/demo_documents.json --plot docs/figures/demo_documents.png
"""

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
from transformers.utils import logging

from longllama import LongLlamaForCausalLM, demo_checkpoint
from longllama.data import encode_document, load_tokenizer
from longllama.evaluation import span_attention_mass
from longllama.passkey import PasskeyPrompts, answer_prompt, key_line, parse_lengths, plan_trials, run_passkey
from longllama.synthetic import KEY_NAMES, CopyTask, PasskeyTask

DISTRACTORS = {
    "copy": CopyTask(),
    "keys": PasskeyTask(names=tuple(name for name in KEY_NAMES if name != "pass")),
}


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


def parse_token_counts(text: str) -> list[int]:
    """'0,4k,16k' -> [0, 4000, 16000] (as `parse_lengths`, and 0 is allowed)."""
    return [0 if part.strip() == "0" else parse_lengths(part)[0] for part in text.split(",")]


def other_documents(tokenizer, tokens: int, kind: str, rng: random.Random) -> list[int]:
    """Exactly `tokens` token ids of unrelated documents of `kind` (see `DISTRACTORS`), `<s> text </s>` each, the last
    one cut short so that it still ends with `</s>`."""
    ids = []
    while len(ids) < tokens:
        ids += encode_document(tokenizer, DISTRACTORS[kind].document(rng)["text"])
    return ids[: tokens - 1] + [tokenizer.eos_token_id] if tokens else []


def evaluate_documents(name: str, model, tokenizer, args) -> list[dict]:
    """The passkey prompt of `args.lengths[0]` tokens after each of `args.distractor_tokens` tokens of other documents:
    greedy generation (`answer_prompt`, as `run_passkey`) and the key line's attention mass for the first `args.mass_trials` trials."""
    from tqdm.auto import tqdm

    prompts = PasskeyPrompts(tokenizer)
    plan = plan_trials(args.lengths, args.depths, args.trials, args.seed)
    results = []
    for tokens in args.distractor_tokens:
        rng = random.Random(args.seed)  # the same documents for every model
        for i, trial in enumerate(tqdm(plan, desc=f"{name}, {tokens:,} tokens of other documents", unit="trial")):
            prefix = other_documents(tokenizer, tokens, args.distractors, rng)
            ids, answer = prompts.build(trial.length, trial.depth, trial.key)
            ids = prefix + ids
            result = {"model": name, "distractors": args.distractors, "distractor_tokens": tokens,
                      "length": len(ids), "depth": trial.depth, "key": trial.key}
            if not args.mass_only:
                result.update(answer_prompt(model, tokenizer, ids, answer))
                for field in ("answer_ids", "generated_ids"):
                    del result[field]
            if i < args.mass_trials:
                span = key_line_span(prompts, ids, trial.key)
                result["positive_attention_mass"] = span_attention_mass(
                    model, ids + digit_query_prefix(tokenizer, answer), span)
            results.append(result)
    return results


def evaluate(name: str, path: str, args) -> list[dict]:
    options = {} if args.top_k is None else {"mem_top_k": None if args.top_k == "dense" else int(args.top_k)}
    model = LongLlamaForCausalLM.from_pretrained(path, **options).eval()
    tokenizer = load_tokenizer(Path(path))
    if args.last_context_length:
        model.config.last_context_length = args.last_context_length
    if args.distractor_tokens:
        started = time.perf_counter()
        results = evaluate_documents(name, model, tokenizer, args)
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
        return results
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


def axis_of(results: list[dict]) -> str:
    """The field the results vary along: tokens of other documents (`--distractor-tokens`) or prompt length."""
    return "distractor_tokens" if any("distractor_tokens" in r for r in results) else "length"


def table(results: list[dict]) -> str:
    x = axis_of(results)
    values = sorted({r[x] for r in results})
    models = list(dict.fromkeys(r["model"] for r in results))
    heading = "other documents' tokens" if x == "distractor_tokens" else "prompt tokens"
    lines = [f"| model \\ {heading} | " + " | ".join(f"{n:,}" for n in values) + " |",
             "|---" * (len(values) + 1) + "|"]
    for model in models:
        cells = []
        for n in values:
            rows = [r for r in results if r["model"] == model and r[x] == n and "correct" in r]
            masses = [r["positive_attention_mass"] for r in results
                      if r["model"] == model and r[x] == n and "positive_attention_mass" in r]
            mass = f" / {sum(masses) / len(masses):.3f}" if masses else ""
            if rows:
                accuracy = sum(r["correct"] for r in rows) / len(rows)
                seconds = f", {sum(r['seconds'] for r in rows) / len(rows):.1f} s" if "seconds" in rows[0] else ""
                cells.append(f"{accuracy:.0%} ({len(rows)}){mass}{seconds}")
            else:
                cells.append(f"-{mass}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = axis_of(results)
    lengths = sorted({r[x] for r in results})
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for model in dict.fromkeys(r["model"] for r in results):
        rows = {n: [r for r in results if r["model"] == model and r[x] == n] for n in lengths}
        scored = [n for n in lengths if any("correct" in r for r in rows[n])]
        left.plot(scored, [sum(r["correct"] for r in rows[n] if "correct" in r) / sum("correct" in r for r in rows[n])
                           for n in scored], "o-", label=model)
        masses = {n: [r["positive_attention_mass"] for r in rows[n] if "positive_attention_mass" in r] for n in lengths}
        shown = [n for n in lengths if masses[n]]
        right.plot(shown, [sum(masses[n]) / len(masses[n]) for n in shown], "o-", label=model)
    for axis, label in ((left, "passkey accuracy"), (right, "attention on the key line (first-digit query)")):
        if x == "distractor_tokens":
            axis.set_xscale("symlog", linthresh=max(1000, min(n for n in lengths if n) if any(lengths) else 1))
            axis.set_xticks(lengths, [f"{n // 1000}k" if n >= 1000 else str(n) for n in lengths])
            kind = next(r["distractors"] for r in results if "distractors" in r)
            axis.set_xlabel(f"tokens of other documents ({kind}) before the prompt")
        else:
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
    parser.add_argument("--distractor-tokens", type=parse_token_counts,
                        help="tokens of other documents before each prompt, e.g. 0,4k,16k,64k (needs one --lengths)")
    parser.add_argument("--distractors", choices=sorted(DISTRACTORS), default="copy",
                        help="what the other documents are (default copy: copy lists)")
    parser.add_argument("--top-k", help="memory retrieval: an integer k (kNN top-k) or dense (default: the "
                        "checkpoint's mem_top_k)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--mass-only", action="store_true", help="only the attention mass (no generation)")
    parser.add_argument("--merge", nargs="*", default=[], help="JSON files of earlier runs to add to the table/plot")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write the plot here (needs matplotlib)")
    args = parser.parse_args()
    args.depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    if args.distractor_tokens and len(args.lengths) != 1:
        parser.error("--distractor-tokens varies the other documents before one passkey prompt: give one --lengths")
    if args.top_k not in (None, "dense") and not (args.top_k.isdigit() and int(args.top_k) > 0):
        parser.error(f"--top-k {args.top_k}: give a positive integer or dense")
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
    print("accuracy (trials) / positive attention mass, seconds per trial")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"lengths": sorted({r["length"] for r in results}), "results": results}, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
