"""Long-prompt benchmark of LongLLaMA on CPU: prefill time, peak memory, kernel efficiency and decoding.

A benchmark, not a test: it prints a table with a target and a "met?" column for each figure, and can write the raw
results (--json) and a plot (--plot, needs matplotlib).

Model: a small random fp32 LongLLaMA (hidden 256, 8 layers, 4 heads, intermediate 688, vocab 32000, memory layers
[2, 5], window = max_position_embeddings = 1024, last_context_length = 1024, memory stored in bfloat16 as by default,
seed 0), compared with transformers' `LlamaForCausalLM` (full attention, attn_implementation="sdpa") holding the very
same weights.

What is measured, each model and prompt length in a fresh subprocess (this script re-run with a hidden --worker
argument) so that peak RSS belongs to that measurement alone:

1. Prefill: what `generate()` does with the prompt, `model(ids, use_cache=True, logits_to_keep=1)`, timed after a
   short warm-up. Target: at 32k tokens LongLLaMA is at least 2.5x faster than Llama. Llama needs a full
   `[T x T]` attention, so it only runs up to --llama-max-tokens (default 32768) and shows "n/a" beyond.
2. Memory: peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`) minus the RSS of the process before the model was built,
   next to the model bytes, the memory bytes (2 x mem layers x kv heads x head_dim x bytes(mem_dtype) x tokens),
   the `nbytes` of the returned LongLlamaCache and an estimate of the activations (one window, plus the prompt's
   token ids). Target: measured <= 1.5x (weights + memory + activations).
3. Memory-attention kernel: `blockwise_memory_attention_forward` on the shapes of one memory layer at the end of the
   longest prompt (queries [1, 4, 1024, 64], 1024 local keys, the memory in bfloat16), counting
   4 * B * H * t * (n + M) * D FLOPs, as a fraction of the best fp32 `torch.bmm` throughput on the attention's
   shapes (Q K^T and P V, measured before and after the kernel in the same process). Target: at least 50%.
4. Greedy decoding after the longest prompt: the prefill above is continued by `generate(..., cache=...)` for the
   remaining tokens (the same computation as one `generate()` call, without paying the prefill twice). Reports the
   total time for --generate-tokens (default 20) tokens and milliseconds per decoded token.

Run (the full default run takes about 5 minutes on an idle 2-core machine, and up to 15 when other processes
compete for the cores):

    python benchmarks/long_prompt.py                          # 8k, 32k, 100k tokens (k = 1024)
    python benchmarks/long_prompt.py --quick                  # smoke run: 2k and 4k tokens, about a minute
    python benchmarks/long_prompt.py --plot bench.png --json bench.json
    python benchmarks/long_prompt.py --load bench.json --plot bench.png   # re-print and re-plot, no measuring

Timings are wall-clock and sensitive to other processes on the machine: the load average is printed with the table.
"""

import argparse
import gc
import json
import os
import sys
import time

from harness import current_rss, emit_result, format_table, parse_tokens, peak_rss, run_worker

CONFIG = dict(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    last_context_length=1024,
    mem_layers=[2, 5],
)
SEED = 0
SPEEDUP_TARGET = 2.5
SPEEDUP_TARGET_TOKENS = 32 * 1024
KERNEL_FRACTION_TARGET = 0.5
RSS_RATIO_TARGET = 1.5
MB = 1 << 20
# ----------------------------------------------------------------------------------------------- measurements (worker)


def build_longllama():
    import torch
    from longllama import LongLlamaConfig, LongLlamaForCausalLM

    torch.manual_seed(SEED)
    return LongLlamaForCausalLM(LongLlamaConfig(**CONFIG, torch_dtype="float32")).eval()


def build_llama(length: int):
    """`LlamaForCausalLM` with full sdpa attention and LongLLaMA's weights (shared tensors, no copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in CONFIG.items() if k not in ("mem_layers", "last_context_length")}
    fields["max_position_embeddings"] = max(length, CONFIG["max_position_embeddings"])
    model = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa")).eval()
    source = build_longllama()
    model.load_state_dict(source.state_dict(), strict=True, assign=True)
    del source
    gc.collect()
    return model


def model_bytes(model) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def cache_bytes(cache) -> int:
    """`nbytes` of a LongLlamaCache, or the key/value bytes of a transformers DynamicCache."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes)
    layers = getattr(cache, "layers", [])
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values) if t is not None)


def random_prompt(length: int):
    import torch

    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, CONFIG["vocab_size"], (1, length), generator=generator)


def prefill(model, ids):
    """What `generate()` does with the prompt: returns (seconds, output)."""
    start = time.perf_counter()
    output = model(ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start, output


def decode(model, ids, output, new_tokens: int) -> dict:
    """Greedy decoding continuing the prefilled session: the first token comes from the prefill logits, the others
    from `generate()` with the returned cache (so generate() processes only the new tokens)."""
    import torch

    if new_tokens < 2:
        return {"decode_s": 0.0, "decode_steps": 0, "generated_tokens": new_tokens}
    first = output.logits[:, -1].argmax(dim=-1, keepdim=True)
    start = time.perf_counter()
    generated = model.generate(
        torch.cat([ids, first], dim=1), cache=output.cache, max_new_tokens=new_tokens - 1, do_sample=False,
        pad_token_id=0,
    )
    seconds = time.perf_counter() - start
    steps = generated.shape[1] - ids.shape[1] - 1
    return {"decode_s": seconds, "decode_steps": steps, "generated_tokens": generated.shape[1] - ids.shape[1]}


def measure_model(spec: dict) -> dict:
    """Worker: build one model, warm it up, then time and measure one prefill (and optionally decoding)."""
    import torch

    import longllama  # noqa: F401  (imported before measuring the runtime RSS: only the model is counted)
    import transformers.generation  # noqa: F401

    length, is_llama = spec["length"], spec["model"] == "llama"
    runtime_rss = current_rss()
    model = build_llama(length) if is_llama else build_longllama()
    ids = random_prompt(length)
    with torch.inference_mode():
        # warm-up on one memory window plus the final window (fewer tokens than any measured prompt >= 2k)
        warmup = min(length, CONFIG["max_position_embeddings"] + 64)
        model(random_prompt(warmup), use_cache=True, logits_to_keep=1)
        gc.collect()
        baseline_rss, baseline_peak = current_rss(), peak_rss()
        seconds, output = prefill(model, ids)
        result = dict(
            prefill_s=seconds, runtime_rss=runtime_rss, baseline_rss=baseline_rss, baseline_peak_rss=baseline_peak,
            peak_rss=peak_rss(), model_bytes=model_bytes(model), cache_nbytes=cache_bytes(output.cache),
        )
        if hasattr(output.cache, "memory_length"):
            result["memory_length"] = output.cache.memory_length()
        if spec.get("generate_tokens"):
            result.update(decode(model, ids, output, spec["generate_tokens"]))
            result["generate_total_s"] = seconds + result["decode_s"]
    return result


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bmm_gflops(a_shape, b_shape, repeats: int = 10) -> float:
    """Best fp32 `torch.bmm` throughput for [h, r, k] x [h, k, c] operands."""
    import torch

    x, y = torch.randn(a_shape), torch.randn(b_shape)
    seconds = best_seconds(lambda: torch.bmm(x, y), repeats)
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2] / seconds / 1e9


def matmul_peak_gflops(heads: int, queries: int, head_dim: int) -> float:
    """Best fp32 batched-matmul GFLOP/s over the shapes of attention: scores Q K^T and weighted values P V."""
    best = 0.0
    for keys in (1024, 2048, 4096):
        best = max(best, bmm_gflops((heads, queries, head_dim), (heads, head_dim, keys)))
        best = max(best, bmm_gflops((heads, queries, keys), (heads, keys, head_dim)))
    return best


def measure_kernel(spec: dict) -> dict:
    """Worker: blockwise memory attention of one memory layer at the end of the longest prompt vs matmul peak."""
    import torch
    from longllama.modeling.attention_longllama import blockwise_memory_attention_forward
    from longllama import LongLlamaConfig

    config = LongLlamaConfig(**CONFIG)
    B, H, Hkv, D = 1, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    t = n = config.last_context_length
    M = spec["memory_tokens"]
    query, key, value = torch.randn(B, H, t, D), torch.randn(B, Hkv, n, D), torch.randn(B, Hkv, n, D)
    visible = torch.ones(t, n, dtype=torch.bool).tril(n - t)[None, None]
    memory = (
        torch.randn(B, Hkv, M, D).to(config.mem_torch_dtype),
        torch.randn(B, Hkv, M, D).to(config.mem_torch_dtype),
        torch.ones(B, M, dtype=torch.bool),
    )
    run = lambda: blockwise_memory_attention_forward(None, query, key, value, visible, memory, scaling=D**-0.5)
    with torch.inference_mode():
        peak = matmul_peak_gflops(H, t, D)
        seconds = best_seconds(run, spec.get("repeats", 2))
        peak = max(peak, matmul_peak_gflops(H, t, D))  # best of before and after: less sensitive to other load
        dense = bmm_gflops((H, t, 4 * D), (H, 4 * D, n))  # not attention-shaped: for reference only
    flops = 4 * B * H * t * (n + M) * D
    return dict(memory_tokens=M, kernel_s=seconds, kernel_gflops=flops / seconds / 1e9, matmul_peak_gflops=peak,
                fraction=flops / seconds / 1e9 / peak, mem_dtype=config.mem_dtype, dense_bmm_gflops=dense)


def worker_main(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    result = measure_kernel(spec) if spec["kind"] == "kernel" else measure_model(spec)
    emit_result(result)


# -------------------------------------------------------------------------------------------------- driver (parent)


def measure(spec: dict, timeout: float | None) -> dict:
    """One measurement in a fresh interpreter, announced on stderr."""
    label = " ".join(f"{k}={v}" for k, v in spec.items() if k != "threads")
    print(f"[bench] {label} ...", file=sys.stderr, flush=True)
    result = run_worker(__file__, spec, timeout)
    if "worker_wall_s" in result:
        print(f"[bench]   done in {result['worker_wall_s']:.1f} s", file=sys.stderr, flush=True)
    return result


def activation_bytes(length: int) -> int:
    """Estimate of the activations alive at the peak of a LongLLaMA prefill (fp32): the prompt's token ids, and for one
    window (the model embeds the prompt window by window): hidden-sized tensors, MLP intermediates, the additive and boolean attention masks,
    and one block of memory keys and values cast to fp32 as the blockwise kernel reads them (block size as in
    `blockwise_memory_attention_forward`: MEMORY_BLOCK_ELEMENTS // (kv heads x head_dim) keys). The fused attention
    kernels do not materialise [t x n] scores."""
    from longllama.modeling import attention_longllama as kernels

    c, f = CONFIG, 4  # fp32
    t = n = min(length, c["max_position_embeddings"])
    kv_heads, head_dim = c["num_key_value_heads"], c["hidden_size"] // c["num_attention_heads"]
    block_elements = getattr(kernels, "MEMORY_BLOCK_ELEMENTS", 1 << 24)
    block = max(getattr(kernels, "MIN_BLOCK", 256), block_elements // (kv_heads * head_dim))
    memory_tokens = max(length - c["last_context_length"], 0)
    token_ids = length * 8  # int64
    hidden = 8 * t * c["hidden_size"] * f
    mlp = 3 * t * c["intermediate_size"] * f
    masks = 2 * t * n * f + t * n
    memory_block = 2 * kv_heads * min(block, memory_tokens) * head_dim * f
    return token_ids + hidden + mlp + masks + memory_block


def memory_formula_bytes(length: int) -> int:
    """2 (keys, values) x memory layers x kv heads x head_dim x bytes(mem_dtype) x tokens."""
    from longllama import LongLlamaConfig

    config = LongLlamaConfig(**CONFIG)
    element = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}[config.mem_dtype]
    return 2 * len(config.mem_layers) * config.num_key_value_heads * config.head_dim * element * length


def collect(args, lengths: list[int]) -> dict:
    """Run every measurement; returns the raw results."""
    base = {"threads": args.threads}
    longest = max(lengths)
    results = {"lengths": lengths, "threads": args.threads, "config": CONFIG, "longllama": {}, "llama": {}}
    results["load_average_start"] = os.getloadavg()
    for length in lengths:
        spec = dict(base, kind="model", model="longllama", length=length)
        if length == longest and args.generate_tokens > 0:
            spec["generate_tokens"] = args.generate_tokens
        results["longllama"][length] = measure(spec, args.timeout)
        if length <= args.llama_max_tokens:
            spec = dict(base, kind="model", model="llama", length=length)
            results["llama"][length] = measure(spec, args.timeout)
        else:
            results["llama"][length] = {"skipped": f"n/a (does not fit: > --llama-max-tokens {args.llama_max_tokens})"}
    memory_tokens = max(longest - CONFIG["last_context_length"], 1)
    results["kernel"] = measure(dict(base, kind="kernel", memory_tokens=memory_tokens), args.timeout)
    results["load_average_end"] = os.getloadavg()
    return results


# ---------------------------------------------------------------------------------------------------------- report


def tokens_label(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def seconds_cell(result: dict) -> str:
    if "prefill_s" in result:
        return f"{result['prefill_s']:.2f} s"
    return result.get("skipped") or f"failed: {result.get('error')}"


def met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def prefill_rows(results: dict) -> list[list[str]]:
    rows = []
    for length in results["lengths"]:
        long, llama = results["longllama"][length], results["llama"][length]
        speedup = llama["prefill_s"] / long["prefill_s"] if "prefill_s" in long and "prefill_s" in llama else None
        has_target = length == SPEEDUP_TARGET_TOKENS
        target = f">= {SPEEDUP_TARGET}x" if has_target else "-"
        ok = speedup >= SPEEDUP_TARGET if has_target and speedup is not None else (False if has_target else None)
        rows.append([
            tokens_label(length), seconds_cell(long), seconds_cell(llama),
            f"{speedup:.2f}x" if speedup is not None else "n/a", target, met(ok),
        ])
    return rows


def memory_rows(results: dict) -> list[list[str]]:
    rows = []
    for length in results["lengths"]:
        r = results["longllama"][length]
        if "peak_rss" not in r:
            rows.append([tokens_label(length), *["n/a"] * 7, f"<= {RSS_RATIO_TARGET}x", met(False)])
            continue
        measured = r["peak_rss"] - r["runtime_rss"]
        expected = r["model_bytes"] + memory_formula_bytes(length) + activation_bytes(length)
        llama = results["llama"][length]
        llama_peak = f"{(llama['peak_rss'] - llama['runtime_rss']) / MB:.0f}" if "peak_rss" in llama else "n/a"
        rows.append([
            tokens_label(length), f"{r['model_bytes'] / MB:.0f}", f"{memory_formula_bytes(length) / MB:.0f}",
            f"{r['cache_nbytes'] / MB:.0f}", f"{activation_bytes(length) / MB:.0f}",
            f"{(r['peak_rss'] - r['baseline_rss']) / MB:.0f}", f"{measured / MB:.0f} ({measured / expected:.2f}x)",
            llama_peak, f"<= {RSS_RATIO_TARGET}x", met(measured <= RSS_RATIO_TARGET * expected),
        ])
    return rows


def rss_growth_row(results: dict) -> list[str] | None:
    """Peak RSS growth per 1k tokens between the shortest and longest prompt, vs memory + token ids per 1k."""
    points = [(n, r["peak_rss"]) for n, r in results["longllama"].items() if "peak_rss" in r]
    if len(points) < 2:
        return None
    (n0, rss0), (n1, rss1) = min(points), max(points)
    slope = (rss1 - rss0) / (n1 - n0) * 1024
    expected = (memory_formula_bytes(1024) + 1024 * 8) / MB
    label = f"LongLLaMA peak RSS growth per 1k tokens ({tokens_label(n0)} -> {tokens_label(n1)})"
    return [label, f"{slope / MB:.2f} MB (memory + token ids: {expected:.2f} MB)", "-", "-"]


def kernel_and_generate_rows(results: dict) -> list[list[str]]:
    kernel, rows = results["kernel"], []
    if "fraction" in kernel:
        label = f"blockwise kernel, t=n=1024, M={kernel['memory_tokens']} ({kernel['mem_dtype']})"
        peak = f"{kernel['matmul_peak_gflops']:.1f} GFLOP/s"
        rows.append(["peak fp32 bmm on attention shapes", peak, "(the limit)", "-"])
        if "dense_bmm_gflops" in kernel:
            dense = f"{kernel['dense_bmm_gflops']:.1f} GFLOP/s"
            rows.append(["fp32 bmm [4,1024,256]x[4,256,1024] (info)", dense, "-", "-"])
        rows.append([label, f"{kernel['kernel_gflops']:.1f} GFLOP/s ({kernel['kernel_s']:.2f} s)", "-", "-"])
        ok = kernel["fraction"] >= KERNEL_FRACTION_TARGET
        rows.append(["kernel / matmul peak", f"{kernel['fraction']:.0%}", f">= {KERNEL_FRACTION_TARGET:.0%}", met(ok)])
    else:
        failed = f"failed: {kernel.get('error')}"
        rows.append(["memory-attention kernel", failed, f">= {KERNEL_FRACTION_TARGET:.0%}", met(False)])
    growth = rss_growth_row(results)
    if growth:
        rows.append(growth)
    longest = max(results["lengths"])
    r = results["longllama"][longest]
    label = f"greedy generate() after {tokens_label(longest)} prompt"
    if "generated_tokens" in r:
        per_token = r["decode_s"] / max(r["decode_steps"], 1) * 1000
        value = (f"{r['generated_tokens']} tokens in {r['generate_total_s']:.1f} s (prefill {r['prefill_s']:.1f} s"
                 f" + decode {per_token:.0f} ms/token)")
        rows.append([label, value, "completes", met(True)])
    elif "error" in r:
        rows.append([label, f"failed: {r['error']}", "completes", met(False)])
    else:
        rows.append([label, "not run (--generate-tokens 0)", "completes", met(None)])
    return rows


def report(results: dict) -> str:
    start, end = results["load_average_start"][0], results["load_average_end"][0]
    header = (f"LongLLaMA long-prompt benchmark: torch threads={results['threads']}, cpus={os.cpu_count()}, "
              f"load average {start:.1f} at start, {end:.1f} at end (timings are noisy when it exceeds the cpus)\n")
    prefill = format_table(
        "Prefill: model(ids, use_cache=True, logits_to_keep=1)",
        ["tokens", "LongLLaMA", "Llama (sdpa)", "speedup", "target", "met?"], prefill_rows(results))
    memory = format_table(
        "Memory (MB): peak RSS of the prefill minus RSS before building the model, vs weights + memory + activations",
        ["tokens", "weights", "memory", "cache nbytes", "activations est.", "peak - baseline", "measured (ratio)",
         "Llama measured", "target", "met?"], memory_rows(results))
    other = format_table(
        "Kernel, memory growth and decoding", ["figure", "value", "target", "met?"], kernel_and_generate_rows(results))
    return "\n".join([header, prefill, memory, other])


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)")
        return
    figure, (time_axis, rss_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, label in (("longllama", "LongLLaMA"), ("llama", "Llama (full attention, sdpa)")):
        points = [(n, r) for n, r in results[name].items() if "prefill_s" in r]
        if points:
            tokens = [n / 1024 for n, _ in points]
            time_axis.plot(tokens, [r["prefill_s"] for _, r in points], "o-", label=label)
            rss_axis.plot(tokens, [(r["peak_rss"] - r["runtime_rss"]) / MB for _, r in points], "o-", label=label)
    time_axis.set(xlabel="prompt tokens (k = 1024)", ylabel="prefill time (s)", title="Prefill time")
    rss_axis.set(xlabel="prompt tokens (k = 1024)", ylabel="peak RSS above runtime (MB)", title="Peak RSS")
    for axis in (time_axis, rss_axis):
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}")


# ------------------------------------------------------------------------------------------------------------- main


def load_results(path: str) -> dict:
    """Results written by --json (JSON turns the per-length keys into strings)."""
    with open(path) as source:
        results = json.load(source)
    for name in ("longllama", "llama"):
        results[name] = {int(length): result for length, result in results[name].items()}
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Prefill time, peak RSS, memory-attention kernel efficiency and decoding of a small random "
        "LongLLaMA on long prompts, against transformers' LlamaForCausalLM with the same weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--lengths", default="8k,32k,100k",
                        help="comma-separated prompt lengths in tokens; a k suffix means x1024")
    parser.add_argument("--llama-max-tokens", type=parse_tokens, default=32768,
                        help="run LlamaForCausalLM only up to this many tokens (full attention is quadratic)")
    parser.add_argument("--generate-tokens", type=int, default=20,
                        help="greedy tokens to generate after the longest prompt (0: skip)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in each measurement")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per measurement (None: no limit)")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of prefill time and peak RSS vs length")
    parser.add_argument("--json", metavar="PATH", help="write the raw results as JSON")
    parser.add_argument("--quick", action="store_true", help="smoke run: lengths 2k,4k (overrides --lengths)")
    parser.add_argument("--load", metavar="PATH",
                        help="measure nothing: print the table (and --plot) from a file written by --json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    if args.load:
        results = load_results(args.load)
    else:
        lengths = sorted({parse_tokens(x) for x in ("2k,4k" if args.quick else args.lengths).split(",") if x.strip()})
        results = collect(args, lengths)
    print(report(results))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
        print(f"raw results written to {args.json}")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
