"""Decoding after a long prompt: ms per generated token against the bytes a step must read, at 1k to 1M tokens of memory.

A benchmark, not a test. Model: the random model of `long_prompt.py` (hidden 256, 8 layers, memory layers [2, 5],
window 1024, bf16 memory, 90 MB of fp32 weights). For each memory size N, both memory layers get N entries of random
keys and values (what a prompt of N + 64 tokens leaves in memory; filled directly, a 1M-token prefill would take
minutes and change nothing here), then a 64-token prompt fills the local context. A step decodes one token and is
then cropped off the local context (`cache.crop(-1)`), so every step sees the same session. Modes, in turn within
each round so that machine load hits them alike:

- dense:        `import longllama`'s memory attention (the compiled kernel reads bf16 memory in place);
- dense-static: the same in a static session (`LongLlamaCache(config, static=True)`, what
                `generate(..., cache_implementation="static")` uses): the decoder layers as one compiled graph whose
                projections read their weights on all threads (docs/inference.md#static-decoding);
- dense-torch:  the checkpoint code's blockwise kernel (what decoding ran before the kernel, and what a remote-code
                load or a machine without a C compiler runs);
- top-k:        `mem_top_k=K` with the exact index (the compiled top-k scan reads bf16 keys in place);
- approximate:  `mem_top_k=K` with `mem_index="hnswlib"` (up to --approximate-max memory tokens: building the graphs
                of 1M entries takes many minutes);
- llama:        at the first size only, transformers' `LlamaForCausalLM` with the same weights and a 64-token
                `DynamicCache`: the fixed cost of a decode step of this architecture in transformers, no memory.

Bytes per step: the weights once (of the embedding table, one row), plus what the mode reads of memory (dense: all keys and values; top-k: all keys,
K values per query; approximate: K keys and values per query). The read bandwidth of the machine is measured in the
same run (`x.sum()` of a 1 GiB fp32 tensor, best of 5), so `bound` = bytes / bandwidth and `x bound` = ms / bound.
Each figure is the median over rounds of the round medians, with the range of the round medians.

    python benchmarks/decode.py                       # 1k, 16k, 100k and 1M tokens of memory
    python benchmarks/decode.py --json docs/figures/decode.json --plot docs/figures/decode.png
"""

import argparse
import json
import os
import statistics
import time

from harness import format_table, parse_tokens

SIZES = "1k,16k,100k,1M"
LOCAL, TOP_K, ROUNDS, STEPS = 64, 64, 5, 8
MODES = ("dense", "dense-static", "dense-torch", "top-k", "approximate", "llama")


def read_bandwidth(torch) -> float:
    """Bytes per second that `sum` reads from a tensor far larger than the caches (best of 5)."""
    x = torch.ones(1 << 28)  # 1 GiB
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(5))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fill_session(torch, model, tokens: int, index: str, static: bool = False):
    """A cache whose memory layers hold `tokens` random entries each and whose local context holds LOCAL tokens."""
    from long_prompt import random_prompt

    from longllama import LongLlamaCache

    config = model.config
    cache = LongLlamaCache(config, static=static)
    cache.bind(model)  # the session is this model's, though filled by hand
    generator = torch.Generator().manual_seed(tokens)
    shape = (1, config.num_key_value_heads, 0, config.head_dim)
    for idx in config.mem_layers:
        layer = cache.layers[idx]
        layer.memory_store.use_index(index)
        for start in range(0, tokens, 1 << 16):
            n = min(1 << 16, tokens - start)
            keys = torch.randn(*shape[:2], n, shape[3], generator=generator)
            values = torch.randn(*shape[:2], n, shape[3], generator=generator)
            layer.add_to_memory(keys, values, torch.ones(1, n, dtype=torch.bool))
    cache.seen_tokens = tokens
    with torch.no_grad():
        out = model(random_prompt(LOCAL), cache=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits.argmax(-1)


def memory_bytes(config, tokens: int, mode: str) -> int:
    """Bytes of memory a decode step reads in `mode` (bf16 keys and values; K entries per query head group)."""
    entry = config.num_key_value_heads * config.head_dim * 2  # one key or one value of one layer, bf16
    layers = len(config.mem_layers)
    if mode in ("dense", "dense-static", "dense-torch"):
        return layers * tokens * 2 * entry
    groups = config.num_attention_heads // config.num_key_value_heads
    selected = min(TOP_K, tokens) * groups * 2 * entry
    return layers * (tokens * entry + selected) if mode == "top-k" else layers * selected


def llama_session(torch):
    """Stock `LlamaForCausalLM` with the benchmark model's weights (`long_prompt.build_llama`) after a LOCAL-token
    prompt: (model, DynamicCache, next token)."""
    from long_prompt import build_llama, random_prompt
    from transformers import DynamicCache

    llama = build_llama(LOCAL)
    cache = DynamicCache()
    with torch.no_grad():
        out = llama(random_prompt(LOCAL), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return llama, cache, out.logits.argmax(-1)


def measure(tokens: int, args, model, torch, with_llama: bool) -> dict:
    from long_prompt import model_bytes

    from longllama import attention
    from longllama.modeling import attention_longllama

    functions = attention_longllama.MEMORY_ATTENTION_FUNCTIONS
    kernels = {"package": attention.blockwise_memory_attention_forward,
               "checkpoint": attention_longllama.blockwise_memory_attention_forward}
    modes = [m for m in MODES if (m != "approximate" or tokens <= args.approximate_max) and (m != "llama" or with_llama)]
    start = time.perf_counter()
    exact, token = fill_session(torch, model, tokens, "exact")
    fill_s = time.perf_counter() - start
    sessions = {m: exact for m in modes}
    if "approximate" in modes:
        sessions["approximate"], _ = fill_session(torch, model, tokens, "hnswlib")
    sessions["dense-static"], _ = fill_session(torch, model, tokens, "exact", static=True)
    steps = {  # mode: one decode step
        "dense": lambda: model(token, cache=exact, logits_to_keep=1),
        "dense-static": lambda: model(token, cache=sessions["dense-static"], logits_to_keep=1),
        "dense-torch": lambda: model(token, cache=exact, logits_to_keep=1),
        "top-k": lambda: model(token, cache=exact, logits_to_keep=1, mem_top_k=TOP_K),
        "approximate": lambda: model(token, cache=sessions["approximate"], logits_to_keep=1, mem_top_k=TOP_K),
    }
    if with_llama:
        llama, sessions["llama"], llama_token = llama_session(torch)
        steps["llama"] = lambda: llama(llama_token, past_key_values=sessions["llama"], logits_to_keep=1)

    def run(mode: str) -> float:
        """One step in `mode`, undone afterwards: seconds."""
        functions["blockwise"] = kernels["checkpoint" if mode == "dense-torch" else "package"]
        seconds = _timed(steps[mode])
        sessions[mode].crop(-1)
        return seconds

    rounds = {m: [] for m in modes}
    with torch.no_grad():
        for mode in modes:  # warm-up (the approximate index's build; compiling the static step, in the first size)
            build = run(mode)
            if mode == "approximate":
                approximate_build_s = build
        for _ in range(args.rounds):
            for mode in modes:
                rounds[mode].append(statistics.median(run(mode) for _ in range(args.steps)) * 1000)
    functions["blockwise"] = kernels["package"]
    result = {"tokens": tokens, "fill_s": fill_s, "modes": {}}
    if "approximate" in modes:
        result["approximate_build_s"] = approximate_build_s
    # a step reads every weight once, except the embedding table: one row of it
    embedding = model.get_input_embeddings().weight
    weights = model_bytes(model) - embedding.nbytes + embedding[0].nbytes
    for mode in modes:
        step_bytes = weights + (0 if mode == "llama" else memory_bytes(model.config, tokens, mode))
        bound_ms = step_bytes / args.bandwidth * 1000
        ms = statistics.median(rounds[mode])
        result["modes"][mode] = {"ms": ms, "ms_min": min(rounds[mode]), "ms_max": max(rounds[mode]),
                                 "rounds_ms": rounds[mode], "bytes": step_bytes, "bound_ms": bound_ms}
    return result


def table(payload: dict) -> str:
    rows = []
    for r in payload["results"]:
        for mode, m in r["modes"].items():
            rows.append([f"{r['tokens']:,}", mode, f"{m['ms']:.1f} ({m['ms_min']:.1f}-{m['ms_max']:.1f})",
                         f"{m['bytes'] / 2**20:.0f}", f"{m['bound_ms']:.1f}", f"{m['ms'] / m['bound_ms']:.2f}x"])
    title = (f"Decoding one token after N tokens of memory, {payload['threads']} threads, read bandwidth "
             f"{payload['bandwidth'] / 1e9:.1f} GB/s, load average {payload['load'][0]:.1f} at the start and "
             f"{payload['load_end'][0]:.1f} at the end; ms: median (range) of {payload['rounds']} round medians")
    return format_table(title, ["memory tokens", "mode", "ms/token", "MiB read", "bound ms", "x bound"], rows)


def plot(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7, 4.5))
    for mode in MODES:
        points = [(r["tokens"], r["modes"][mode]) for r in payload["results"] if mode in r["modes"]]
        if not points or mode == "llama":
            continue
        tokens = [t for t, _ in points]
        line, = ax.plot(tokens, [m["ms"] for _, m in points], marker="o", label=mode)
        ax.fill_between(tokens, [m["ms_min"] for _, m in points], [m["ms_max"] for _, m in points],
                        color=line.get_color(), alpha=0.15)
        if mode == "dense":
            ax.plot(tokens, [m["bound_ms"] for _, m in points], linestyle=":", color=line.get_color(),
                    label="dense: bandwidth bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens in memory")
    ax.set_ylabel("ms per generated token")
    ax.set_title(f"Decoding after a long prompt ({payload['threads']} threads, "
                 f"{payload['bandwidth'] / 1e9:.1f} GB/s read bandwidth)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=SIZES, help=f"memory tokens per point, comma-separated (default {SIZES})")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds over the modes (default {ROUNDS})")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"timed steps per mode and round (default {STEPS})")
    parser.add_argument("--approximate-max", type=parse_tokens, default=parse_tokens("100k"),
                        help="largest memory with the approximate mode (default 100k)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--json", metavar="PATH", help="write the raw results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a plot (PNG)")
    args = parser.parse_args()

    import torch
    from long_prompt import build_longllama

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    args.bandwidth = read_bandwidth(torch)
    model = build_longllama()
    results = []
    for i, size in enumerate(args.sizes.split(",")):
        results.append(measure(parse_tokens(size), args, model, torch, with_llama=i == 0))
        print(f"{results[-1]['tokens']:,} tokens done", flush=True)
    payload = {"threads": args.threads, "bandwidth": args.bandwidth, "rounds": args.rounds, "steps": args.steps,
               "top_k": TOP_K, "load": load, "load_end": os.getloadavg(), "results": results}
    print(table(payload))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"raw results written to {args.json}")
    if args.plot:
        plot(payload, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
