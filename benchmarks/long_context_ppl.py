"""Perplexity vs context through memory on held-out long documents: the FoT paper's second result (issue 20).

For every held-out document of the real-text corpus (`longllama.corpus`, packages never trained on) that is long
enough, `--spans` spans of `--eval-tokens` tokens are scored, spread over the document's second half. Each span is
scored given C tokens of the document before it, for every C in `--contexts`: one forward call over the C + E tokens
with `logits_to_keep=E` (the context windows run to the memory layer and fill memory; the scored windows read it,
docs/inference.md#windows). The same spans at every C, so the curves compare like with like.

Arms, for each `--models` entry (e.g. `fot=` the FoT model, `positives=` the positives-only arm of the same recipe):
the model as it is, and for the first model also **memory off**: the same model given only the window of tokens
just before the span (`W` tokens, the context one window of a model without memory sees), the same at every C.

    python benchmarks/long_context_ppl.py --models fot=RUN/text/model,positives=RUN/text-positives/model \\
        --json docs/figures/long_context_ppl.json --plot docs/figures/long_context_ppl.png

A terminal shows a progress bar; Ctrl-C stops the run and keeps the finished spans in --json (written after each).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

CONTEXTS = "256,1k,4k,16k,64k"


def parse_counts(text: str) -> list[int]:
    from longllama.passkey import parse_lengths

    return parse_lengths(text)


def spans_of(length: int, longest: int, eval_tokens: int, count: int) -> list[int]:
    """End positions of `count` spans in a document of `length` tokens, each with `longest` tokens before it, spread
    evenly over the positions that allow it (the last one ends the document)."""
    first = longest + eval_tokens
    if length < first:
        return []
    if count == 1:
        return [length]
    step = (length - first) / (count - 1)
    return sorted({first + round(i * step) for i in range(count)})


def span_loss(model, ids: list[int], eval_tokens: int) -> tuple[float, int]:
    """(sum of next-token losses of the last `eval_tokens` tokens of `ids`, their count) in one forward call."""
    import torch

    inputs = torch.tensor([ids])
    with torch.no_grad():
        logits = model(inputs, logits_to_keep=eval_tokens + 1).logits[0, :-1].float()  # predicts the last E tokens
    targets = inputs[0, -eval_tokens:]
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item(), eval_tokens


def evaluate(models: dict, documents: list, args, on_result) -> None:
    """Score every span of every document at every context, for every arm; `on_result(record)` after each."""
    from tqdm.auto import tqdm

    from longllama import LongLlamaForCausalLM
    from longllama.data import load_tokenizer

    for index, (name, path) in enumerate(models.items()):
        options = {} if args.top_k is None else {"mem_top_k": None if args.top_k == "dense" else int(args.top_k)}
        model = LongLlamaForCausalLM.from_pretrained(path, **options).eval()
        tokenizer = load_tokenizer(Path(path))
        window = model.config.max_position_embeddings
        arms = [(name, False)] + ([("memory off", True)] if index == 0 else [])
        work = []
        for document in documents:
            ids = [tokenizer.bos_token_id, *tokenizer(document.text, add_special_tokens=False)["input_ids"]]
            for end in spans_of(len(ids), max(args.contexts), args.eval_tokens, args.spans):
                work += [(arm, off, document, ids, end, c) for arm, off in arms for c in args.contexts]
        for arm, off, document, ids, end, context in tqdm(work, desc=name, unit="span", disable=None):
            before = min(context, window) if off else context
            started = time.perf_counter()
            loss, count = span_loss(model, ids[end - args.eval_tokens - before : end], args.eval_tokens)
            on_result({"arm": arm, "model": str(path), "document": document.name, "span_end": end,
                       "context": context, "context_used": before, "loss": loss, "tokens": count,
                       "seconds": time.perf_counter() - started})


def summarize(results: list[dict]) -> dict:
    """{arm: {context: perplexity over all scored tokens}}."""
    sums = {}
    for r in results:
        total = sums.setdefault(r["arm"], {}).setdefault(r["context"], [0.0, 0])
        total[0] += r["loss"]
        total[1] += r["tokens"]
    return {arm: {c: math.exp(loss / n) for c, (loss, n) in sorted(by.items())} for arm, by in sums.items()}


def table(results: list[dict]) -> str:
    summary = summarize(results)
    contexts = sorted({c for by in summary.values() for c in by})
    tokens = {arm: sum(r["tokens"] for r in results if r["arm"] == arm and r["context"] == contexts[0])
              for arm in summary}
    lines = ["| arm | " + " | ".join(f"{c:,}" for c in contexts) + " | scored tokens |",
             "|---|" + "---|" * (len(contexts) + 1)]
    for arm, by in summary.items():
        lines.append(f"| {arm} | " + " | ".join(f"{by[c]:.3f}" if c in by else "" for c in contexts)
                     + f" | {tokens[arm]:,} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4.2))
    axis = figure.subplots()
    for arm, by in summarize(results).items():
        axis.plot(list(by), list(by.values()), marker="o", label=arm, linestyle="--" if arm == "memory off" else "-")
    axis.set_xscale("log")
    axis.set_xlabel("tokens of the document before the scored span (in memory)")
    axis.set_ylabel("perplexity of the scored span")
    documents = sorted({r["document"] for r in results})
    axis.set_title(f"Held-out documents: {', '.join(documents)}", fontsize=8)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="name=checkpoint,... (default: demo=the bundled demo model); the first one "
                        "also gets the memory-off arm")
    parser.add_argument("--corpus", type=Path, help="a directory with heldout.jsonl (longllama-corpus; "
                        "default: built from this Python's standard library)")
    parser.add_argument("--documents", help="held-out documents to use, comma-separated names like asyncio:code "
                        "(default: every one long enough)")
    parser.add_argument("--contexts", type=parse_counts, default=CONTEXTS,  # a string: parsed after --help
                        help=f"context lengths in tokens, k = 1000 (default: {CONTEXTS})")
    parser.add_argument("--eval-tokens", type=int, default=512, help="tokens scored per span (default: 512)")
    parser.add_argument("--spans", type=int, default=4, help="spans per document (default: 4)")
    parser.add_argument("--top-k", help="memory retrieval: an integer k or dense (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", help="write every span's result here (after each)")
    parser.add_argument("--plot", help="write the plot here (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.eval_tokens < 1 or args.spans < 1:
        parser.error("--eval-tokens and --spans must be at least 1")
    if args.top_k not in (None, "dense") and not (args.top_k.isdigit() and int(args.top_k) > 0):
        parser.error(f"--top-k {args.top_k}: give a positive integer or dense")
    models = dict(item.split("=", 1) for item in args.models.split(",")) if args.models else None
    if models is not None and not all(models.values()):
        parser.error("--models: give name=checkpoint pairs separated by commas")

    from longllama import demo_checkpoint
    from longllama.cli import start
    from longllama.corpus import build_documents, read_corpus, split_documents
    from longllama.files import atomic_write_text

    start(args.threads)  # threads; no progress bars (weight loading's included) when stderr is not a terminal
    models = models or {"demo": demo_checkpoint()}
    try:
        held_out = read_corpus(args.corpus / "heldout.jsonl") if args.corpus else split_documents(build_documents()[0])[1]
    except ValueError as error:
        parser.exit(2, f"long_context_ppl.py: error: {error}\n")
    if args.documents:
        names = args.documents.split(",")
        unknown = sorted(set(names) - {d.name for d in held_out})
        if unknown:
            parser.exit(2, f"long_context_ppl.py: error: no held-out document {unknown}; "
                        f"choose from {[d.name for d in held_out]}\n")
        held_out = [d for d in held_out if d.name in names]
    results = []
    settings = {k: getattr(args, k) for k in ("contexts", "eval_tokens", "spans", "top_k")}

    def save(complete: bool) -> None:
        if args.json:
            atomic_write_text(args.json, json.dumps({"settings": settings, "models": models, "complete": complete,
                                                     "results": results}, indent=1) + "\n")

    started = time.perf_counter()
    try:
        evaluate(models, held_out, args, lambda r: (results.append(r), save(False)))
    except KeyboardInterrupt:
        print(f"\nInterrupted after {len(results)} spans.", file=sys.stderr)
    else:
        save(True)
    if not results:
        print("No held-out document is long enough for the longest context; lower --contexts.", file=sys.stderr)
        return 1
    print(f"perplexity of the scored spans by tokens of context ({time.perf_counter() - started:.0f} s)")
    print(table(results))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
