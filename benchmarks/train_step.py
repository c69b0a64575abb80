"""Training-step benchmark: what FoT crossbatch costs, next to plain Llama steps over the same tokens (CPU).

A benchmark, not a test: it prints a table (tokens/s, step time, peak RSS) and can write the raw results (--json) and
a plot (--plot, needs matplotlib).

Model: a small random fp32 LongLLaMA (hidden 256, 8 layers, 4 heads, intermediate 688, vocab 8000, memory layers
[2, 5], window 512), and transformers' `LlamaForCausalLM` with the same weights (`attn_implementation="sdpa"`).
A step is forward, next-token cross-entropy, backward and an AdamW update, on a batch of 8 rows x 512 tokens
(4096 tokens) for LongLLaMA:

- `crossbatch d`: k = 4 packs with the FoT stepping rule and cross_batch_range d = 0, 1, 3, 7 (what
  `longllama-train` runs); each row attends to its own window plus up to d other rows in memory layers;
- `llama 8x512`: the same rows through plain Llama (no crossbatch);
- `llama same context (d)`: the same 4096 tokens as 8 / (d+1) sequences of (d+1) x 512 tokens, so every token has
  the total context a crossbatch row of range d can reach. Target: crossbatch d = 3 costs at most 1.5x this step
  (d = 3: two sequences of 2048).

Each variant runs in a fresh interpreter (so peak RSS is its own): 2 warm-up steps, then the median of --steps.

    python benchmarks/train_step.py --json docs/figures/train_step.json --plot docs/figures/train_step.png
    python benchmarks/train_step.py --quick          # 128-token rows: a smoke run
"""

import argparse
import json
import os
import statistics
import sys
import time

from harness import current_rss, emit_result, format_table, peak_rss, run_worker

CONFIG = dict(
    vocab_size=8000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=4,
    mem_layers=[2, 5],
    mem_dtype="float32",
)
ROWS, PACK = 8, 4
RANGES = (0, 1, 3, 7)


def variants(window: int) -> list[dict]:
    out = [{"name": f"crossbatch d={d}", "kind": "crossbatch", "d": d, "rows": ROWS, "length": window} for d in RANGES]
    out.append({"name": f"llama {ROWS}x{window}", "kind": "llama", "d": 0, "rows": ROWS, "length": window})
    for d in RANGES[1:]:
        rows = ROWS // (d + 1)
        out.append({"name": f"llama {rows}x{(d + 1) * window} (d={d})", "kind": "llama", "d": d, "rows": rows,
                    "length": (d + 1) * window})
    return out


def worker(spec: dict) -> None:
    import torch
    import torch.nn.functional as F

    from longllama import LongLlamaConfig, LongLlamaForCausalLM
    from longllama.crossbatch import cross_batch_ranges, cross_batch_rows

    torch.set_num_threads(spec["threads"])
    base_rss = current_rss()
    torch.manual_seed(0)
    config = LongLlamaConfig(**CONFIG, max_position_embeddings=spec["window"], last_context_length=spec["window"])
    model = LongLlamaForCausalLM(config)
    if spec["kind"] == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        llama_config = LlamaConfig(**{k: v for k, v in CONFIG.items() if not k.startswith("mem_")},
                                   max_position_embeddings=spec["length"], attn_implementation="sdpa")
        llama = LlamaForCausalLM(llama_config)
        llama.load_state_dict(model.state_dict())
        model = llama
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    ids = torch.randint(3, CONFIG["vocab_size"], (spec["rows"], spec["length"] + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    extra = {"use_cache": False}
    if spec["kind"] == "crossbatch":
        extra["cross_batch_rows"] = cross_batch_rows(cross_batch_ranges(spec["rows"], spec["d"], PACK))

    def step():
        logits = model(input_ids=inputs, **extra).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    emit_result({"step_s": seconds, "tokens_per_s": inputs.numel() / seconds,
                 "peak_rss_mb": (peak_rss() - base_rss) / 2**20})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=512, help="tokens per crossbatch row (default 512)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="128-token rows, 3 steps")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--plot", help="write a bar plot here (matplotlib)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.quick:
        args.window, args.steps = 128, 3

    load = os.getloadavg()[0]
    results = []
    for spec in variants(args.window):
        spec.update(window=args.window, steps=args.steps, threads=args.threads)
        result = run_worker(__file__, spec, timeout=1800)
        results.append({**spec, **result})
        print(f"  {spec['name']}: {result}", file=sys.stderr, flush=True)

    by_name = {r["name"]: r for r in results}
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["name"], "error", r["error"], "", ""])
            continue
        rows.append([r["name"], f"{r['rows']}x{r['length']}", f"{r['tokens_per_s']:.0f}", f"{r['step_s']:.3f}",
                     f"{r['peak_rss_mb']:.0f}"])
    print(format_table(f"Training step, CPU, {args.threads} threads (load average {load:.1f} -> "
                       f"{os.getloadavg()[0]:.1f})", ["variant", "batch", "tokens/s", "step s", "peak RSS MB"], rows))
    for d in RANGES[1:]:
        cross = by_name.get(f"crossbatch d={d}")
        plain = next((r for r in results if r["kind"] == "llama" and r["d"] == d), None)
        if cross and plain and "error" not in cross and "error" not in plain:
            ratio = cross["step_s"] / plain["step_s"]
            target = "  (target <= 1.5x: " + ("met" if ratio <= 1.5 else "NOT met") + ")" if d == 3 else ""
            print(f"crossbatch d={d} step / llama step of the same context: {ratio:.2f}x{target}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"window": args.window, "threads": args.threads, "results": results}, f, indent=2)
    if args.plot:
        plot(results, args.plot)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = [r["name"] for r in ok]
    colors = ["tab:blue" if r["kind"] == "crossbatch" else "tab:gray" for r in ok]
    axes[0].barh(names, [r["tokens_per_s"] for r in ok], color=colors)
    axes[0].set_xlabel("tokens / s (training step)")
    axes[1].barh(names, [r["peak_rss_mb"] for r in ok], color=colors)
    axes[1].set_xlabel("peak RSS above start (MB)")
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
