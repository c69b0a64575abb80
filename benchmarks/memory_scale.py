"""Memory at scale on CPU: decoding speed as memory grows, recall of approximate top-k, memory bytes per token.

A benchmark, not a test: it prints one table per figure with a target and a "met?" column, and can write the raw
results (--json) and a plot (--plot, needs matplotlib).

Model: the bundled demo model (`longllama.demo_checkpoint()`, or `--model` another of its shape; the "small config":
4 layers, hidden 128, 4 heads and 4 KV heads of 32, one memory layer [2], window 256, last_context_length 128,
memory in float32). Prompts are training-style documents of `longllama.synthetic` (passkey documents with varied
filler and copy lists of random numbers and words, `<s> text </s>` one after another), so that memory keys are
varied: one repeated sentence would make near-duplicate keys and a meaningless recall. The same seed gives the same
prompt prefix at every size.

What is measured, each memory size and each mem_dtype in a fresh interpreter (this script re-run with a hidden
--worker argument):

1. Decode ms/token as memory grows (--sizes, default 16k,64k,256k,1M prompt tokens). Memory is built once by one
   prefill, `model(ids, use_cache=True, logits_to_keep=1)` (memory then holds the prompt minus its final 128
   tokens), then greedy decoding one token at a time, `model(token, cache=cache, use_cache=True, mem_top_k=...)`,
   continues the same session in three modes: dense (mem_top_k=None, every memory key), exact top-k (`--top-k`,
   default 128, `LayerMemory.use_index("exact")`) and approximate top-k (`--approx`, hnswlib by default, or faiss;
   options from `--index-options`). Each mode runs 2 warm-up steps, then --decode-tokens (16) timed steps; the median
   step is reported. Decoded tokens only fill the local context (128 tokens of room before it is flushed to memory),
   so all modes see the same memory; the script refuses settings that would flush. The first search after
   `use_index` builds the index: it is timed on its own (build time, and the RSS it adds), outside ms/token.
   Target: the approximate mode decodes at the largest size (1M) within 3x of its ms/token at the smallest (16k).
2. Recall@k of the approximate backend on real model keys: every query that the memory layer searches during the
   approximate mode's decode steps (captured by wrapping `LayerMemory.search` on the instance, with the ids it
   returned) is compared with brute force over all memory keys in float32. A returned id counts as a hit when its
   exact score is at least the k-th best exact score (tie-aware, up to float rounding); recall@k is the mean hit
   share. The same queries are searched again with larger `ef_search` (--ef-sweep) to show the recall/speed
   trade-off. Target: >= 0.9.
3. Memory bytes per token: the demo model loaded with each mem_dtype (bfloat16, float16, float32, int8) prefills
   --bytes-tokens (256k) tokens; `sum(memory_store.nbytes)` (allocated bytes of memory content over memory layers) per
   memory entry, against 2 x memory layers x KV heads x head_dim x bytes(mem_dtype). The int8 per-vector float16
   scales and unfilled chunk capacity count as overhead. Target: within 10% of the formula.

Run (the full default run takes about 15 minutes on a 2-core machine, 10 of them building the hnswlib index of the
1M-token memory; the 1M size alone needs ~4 GB of RAM, of which the hnswlib graphs take 2 GB):

    python benchmarks/memory_scale.py                              # 16k, 64k, 256k, 1M; bytes at 256k
    python benchmarks/memory_scale.py --quick                      # smoke run: 4k and 16k, bytes at 16k (~1 min)
    python benchmarks/memory_scale.py --json scale.json --plot scale.png
    python benchmarks/memory_scale.py --approx faiss --index-options '{"M": 48, "ef_search": 256}'
    python benchmarks/memory_scale.py --load scale.json --plot scale.png   # re-print and re-plot, no measuring

Timings are wall-clock and sensitive to other processes on the machine: the load average is printed with the tables.
"""

import argparse
import json
import os
import random
import sys
import time

from harness import current_rss, emit_result, format_table, parse_tokens, peak_rss, run_worker

SEED = 0
SPEED_RATIO_TARGET = 3.0
RECALL_TARGET = 0.9
BYTES_TOLERANCE = 0.10
WARMUP_STEPS = 2
ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "int8": 1}
MB = 1 << 20
# ----------------------------------------------------------------------------------------------- measurements (worker)


def load_model(path: str | None, mem_dtype: str | None = None):
    import longllama  # noqa: F401  (registers the model type)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path or longllama.demo_checkpoint()
    overrides = {} if mem_dtype is None else {"mem_dtype": mem_dtype}
    model = AutoModelForCausalLM.from_pretrained(path, **overrides).eval()
    return model, AutoTokenizer.from_pretrained(path)


def prompt_ids(tokenizer, length: int):
    """`[1, length]` token ids: passkey documents (varied filler) and copy lists, `<s> text </s>` after one another."""
    import torch
    from longllama.synthetic import CopyTask, PasskeyTask

    rng = random.Random(SEED)
    tasks = [PasskeyTask(spec_share=0.0), CopyTask(max_items=60, max_gap_words=100)]
    ids: list[int] = []
    while len(ids) < length:
        texts = [rng.choice(tasks).document(rng)["text"] for _ in range(256)]
        for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids += [tokenizer.bos_token_id, *row, tokenizer.eos_token_id]
    return torch.tensor([ids[:length]])


def memory_stores(model, cache) -> list:
    return [cache.layers[i].memory_store for i in model.config.mem_layers]


def prefill(model, ids) -> tuple[float, object]:
    """One prefill that builds the session memory: returns (seconds, output)."""
    start = time.perf_counter()
    output = model(ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start, output


def decode(model, cache, token, steps: int, top_k: int | None) -> tuple:
    """Greedy steps of one token each: returns (next token, milliseconds per step)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        output = model(token, cache=cache, use_cache=True, mem_top_k=top_k)
        token = output.logits[:, -1:].argmax(dim=-1)
        times.append((time.perf_counter() - start) * 1000)
    return token, times


def record_searches(store) -> list:
    """Wrap `store.search` on this instance: every call appends (queries, ids) to the returned list."""
    calls, search = [], store.search

    def recording(queries, k):
        scores, ids = search(queries, k)
        calls.append((queries.detach().clone(), ids.clone()))
        return scores, ids

    store.search = recording
    return calls


def build_index(stores, config, index: str, options: dict, k: int) -> dict:
    """Switch every memory layer to backend `index`; the first search builds it: time those searches and the RSS
    they add."""
    import torch

    probe = torch.randn(1, config.num_key_value_heads, 1, config.head_dim)  # [B, Hkv, r, D]
    rss, start = current_rss(), time.perf_counter()
    for store in stores:
        store.use_index(index, **options)
        store.search(probe, k)
    return {"build_s": time.perf_counter() - start, "index_rss_bytes": current_rss() - rss}


def memory_keys(store):
    """All memory keys `[B, Hkv, M, D]` float32 and validity `[B, M]`, entry j having id j (no eviction)."""
    import torch

    chunks = [chunk for _, chunk in store.chunks()]
    assert store.length == store.next_id and len(store.segments) == 1 and store.segments[0].rows is None
    keys = torch.cat([chunk.decoded("keys", torch.float32) for chunk in chunks], dim=-2)
    return keys, torch.cat([chunk.view("valid") for chunk in chunks], dim=-1)


def recall_at_k(keys, valid, queries, ids) -> list[float]:
    """Per query vector: share of `ids` `[B, H, r, k]` whose exact score reaches the k-th best exact score."""
    import torch

    k = ids.shape[-1]
    exact = torch.matmul(queries.float(), keys.transpose(-1, -2))  # [B, H, r, M]
    exact.masked_fill_(~valid[:, None, None, :], -float("inf"))
    kth = exact.topk(k, dim=-1).values[..., -1:]  # [B, H, r, 1]
    found = exact.gather(-1, ids.clamp(min=0)).masked_fill(ids < 0, -float("inf"))
    tolerance = 1e-5 * kth.abs().clamp(min=1.0)  # float rounding: the index and the matmul sum in other orders
    hits = (found >= kth - tolerance).float().mean(dim=-1)  # [B, H, r]
    return hits.flatten().tolist()


def sweep_ef(store, calls, keys, valid, ef_values: list[int], k: int) -> list[dict]:
    """Search the captured queries again with each `ef_search` (no rebuild): recall and ms per decode step."""
    rows = []
    for ef in ef_values:
        for segment in store.segments:
            segment.index.options["ef_search"] = ef
        recalls, start = [], time.perf_counter()
        results = [store.search(queries, k) for queries, _ in calls]
        seconds = time.perf_counter() - start
        for (queries, _), (_, ids) in zip(calls, results):
            recalls += recall_at_k(keys, valid, queries, ids)
        rows.append({"ef_search": ef, "recall": sum(recalls) / len(recalls), "min_recall": min(recalls),
                     "search_ms": seconds / len(calls) * 1000})
    return rows


def decode_mode(model, cache, stores, token, mode: str, spec: dict) -> tuple[dict, object, list | None]:
    """Warm-up and timed decoding in one mode ("dense", "exact" or the approximate backend) on the session; returns
    (result, next token, the searches of the first memory layer when the mode is approximate)."""
    result, index = {}, None if mode == "dense" else mode
    if index is not None:
        options = spec["index_options"] if index == spec["approx"] else {}
        result.update(build_index(stores, model.config, index, options, spec["top_k"]), index=index, options=options)
    calls = record_searches(stores[0]) if mode == spec["approx"] else None
    top_k = None if index is None else spec["top_k"]
    token, _ = decode(model, cache, token, WARMUP_STEPS, top_k)
    token, result["step_ms"] = decode(model, cache, token, spec["decode_tokens"], top_k)
    if calls is not None:
        del stores[0].search  # the instance attribute set by record_searches
    return result, token, calls


def measure_recall(store, calls: list, ef_sweep: list[int], k: int) -> dict:
    """Recall@k of the searches made while decoding, then of the same queries at each `ef_search` of the sweep."""
    keys, valid = memory_keys(store)
    recalls = [x for queries, found in calls for x in recall_at_k(keys, valid, queries, found)]
    options = dict(store.segments[0].index.options)
    efs = sorted({options["ef_search"], *ef_sweep})
    return dict(recall=dict(queries=len(recalls), mean=sum(recalls) / len(recalls), min=min(recalls), options=options),
                ef_sweep=sweep_ef(store, calls, keys, valid, efs, k))


def measure_decode(spec: dict) -> dict:
    """Worker: one prefill of `size` tokens, then each decode mode on the same session, recall and ef sweep."""
    import torch

    model, tokenizer = load_model(spec["model"])
    config = model.config
    room = config.max_position_embeddings - config.last_context_length
    if len(spec["modes"]) * (WARMUP_STEPS + spec["decode_tokens"]) > room:
        raise ValueError(f"decoding more than {room} tokens would flush the local context into memory")
    ids = prompt_ids(tokenizer, spec["size"])
    with torch.no_grad():
        model(ids[:, : config.max_position_embeddings * 4], use_cache=True, logits_to_keep=1)  # warm-up
        seconds, output = prefill(model, ids)
        cache, token = output.cache, output.logits[:, -1:].argmax(dim=-1)
        stores = memory_stores(model, cache)
        result = dict(size=spec["size"], prefill_s=seconds, memory_entries=stores[0].length,
                      memory_bytes=sum(s.nbytes for s in stores), cache_nbytes=cache.nbytes, modes={})
        for mode in spec["modes"]:
            result["modes"][mode], token, calls = decode_mode(model, cache, stores, token, mode, spec)
            if calls is not None:
                result.update(measure_recall(stores[0], calls, spec["ef_sweep"], spec["top_k"]))
        result["memory_entries_after"] = stores[0].length  # unchanged: decoding never flushed
    result["peak_rss"] = peak_rss()
    return result


def measure_bytes(spec: dict) -> dict:
    """Worker: the demo model with `mem_dtype`, one prefill of `tokens` tokens; memory bytes."""
    import torch

    model, tokenizer = load_model(spec["model"], spec["mem_dtype"])
    ids = prompt_ids(tokenizer, spec["tokens"])
    with torch.no_grad():
        seconds, output = prefill(model, ids)
    stores = memory_stores(model, output.cache)
    config = model.config
    return dict(mem_dtype=spec["mem_dtype"], tokens=spec["tokens"], prefill_s=seconds,
                memory_entries=stores[0].length, memory_bytes=sum(s.nbytes for s in stores),
                mem_layers=len(config.mem_layers), kv_heads=config.num_key_value_heads, head_dim=config.head_dim)


def worker_main(spec: dict) -> None:
    import torch
    from transformers.utils import logging

    logging.disable_progress_bar()  # weight loading and long-prompt windows: the parent prints its own progress
    torch.set_num_threads(spec["threads"])
    emit_result(measure_bytes(spec) if spec["kind"] == "bytes" else measure_decode(spec))


# -------------------------------------------------------------------------------------------------- driver (parent)


def measure(spec: dict, timeout: float | None) -> dict:
    """One measurement in a fresh interpreter, announced on stderr."""
    shown = {k: v for k, v in spec.items() if k in ("kind", "size", "mem_dtype", "tokens", "approx")}
    print(f"[bench] {' '.join(f'{k}={v}' for k, v in shown.items())} ...", file=sys.stderr, flush=True)
    result = run_worker(__file__, spec, timeout)
    if "worker_wall_s" in result:
        print(f"[bench]   done in {result['worker_wall_s']:.1f} s", file=sys.stderr, flush=True)
    return result


def collect(args, sizes: list[int], bytes_tokens: int) -> dict:
    """Run every measurement; returns the raw results."""
    started = time.perf_counter()
    results = dict(model=args.model, sizes=sizes, threads=args.threads, top_k=args.top_k, approx=args.approx,
                   index_options=args.index_options, decode_tokens=args.decode_tokens, bytes_tokens=bytes_tokens,
                   load_average_start=os.getloadavg(), decode={}, bytes={})
    base = dict(model=args.model, threads=args.threads, top_k=args.top_k, decode_tokens=args.decode_tokens,
                approx=args.approx, index_options=args.index_options, ef_sweep=args.ef_sweep,
                modes=["dense", "exact", args.approx])
    for size in sizes:
        results["decode"][size] = measure(dict(base, kind="decode", size=size), args.timeout)
    for mem_dtype in args.mem_dtypes:
        spec = dict(kind="bytes", model=args.model, threads=args.threads, mem_dtype=mem_dtype, tokens=bytes_tokens)
        results["bytes"][mem_dtype] = measure(spec, args.timeout)
    results["load_average_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - started
    return results


# ---------------------------------------------------------------------------------------------------------- report


def tokens_label(n: int) -> str:
    if n % (1 << 20) == 0:
        return f"{n >> 20}M"
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def ms_per_token(result: dict, mode: str) -> float | None:
    entry = result.get("modes", {}).get(mode, {})
    return median(entry["step_ms"]) if entry.get("step_ms") else None


def decode_rows(results: dict) -> list[list[str]]:
    approx, sizes = results["approx"], results["sizes"]
    reference = ms_per_token(results["decode"][sizes[0]], approx)
    rows = []
    for size in sizes:
        r = results["decode"][size]
        if "modes" not in r:
            rows.append([tokens_label(size), f"failed: {r.get('error')}", *[""] * 7, met(False)])
            continue
        cells = [f"{ms_per_token(r, mode):.1f}" for mode in ("dense", "exact", approx)]
        entry = r["modes"][approx]
        ratio = ms_per_token(r, approx) / reference if reference else None
        is_target = size == sizes[-1] and len(sizes) > 1
        target = f"<= {SPEED_RATIO_TARGET:g}x of {tokens_label(sizes[0])}" if is_target else "-"
        rows.append([
            tokens_label(size), f"{r['memory_entries']:,}", f"{r['prefill_s']:.1f} s", f"{r['memory_bytes'] / MB:.0f}",
            *cells, f"{entry['build_s']:.1f} s / {entry['index_rss_bytes'] / MB:.0f} MB",
            f"{ratio:.2f}x" if ratio is not None else "n/a", target,
            met(ratio <= SPEED_RATIO_TARGET if is_target and ratio is not None else None),
        ])
    return rows


def recall_rows(results: dict) -> list[list[str]]:
    rows = []
    for size in results["sizes"]:
        r = results["decode"][size]
        if "recall" not in r:
            rows.append([tokens_label(size), "failed", "", "", "", "", f">= {RECALL_TARGET}", met(False)])
            continue
        recall = r["recall"]
        sweep = {point["ef_search"]: point for point in r.get("ef_sweep", [])}
        used = sweep.get(recall["options"]["ef_search"])
        options = ", ".join(f"{k}={v}" for k, v in recall["options"].items())
        rows.append([tokens_label(size), options + " (decode)", str(recall["queries"]), f"{recall['mean']:.3f}",
                     f"{recall['min']:.2f}", f"{used['search_ms']:.1f}" if used else "n/a", f">= {RECALL_TARGET}",
                     met(recall["mean"] >= RECALL_TARGET)])
        for ef, point in sweep.items():
            if point is not used:
                rows.append(["", f"ef_search={ef} (same queries, same graph)", str(recall["queries"]),
                             f"{point['recall']:.3f}", f"{point['min_recall']:.2f}", f"{point['search_ms']:.1f}",
                             f">= {RECALL_TARGET}", met(point["recall"] >= RECALL_TARGET)])
    return rows


def formula_bytes(r: dict) -> int:
    return 2 * r["mem_layers"] * r["kv_heads"] * r["head_dim"] * ELEMENT_BYTES[r["mem_dtype"]]


def bytes_rows(results: dict) -> list[list[str]]:
    rows = []
    for mem_dtype, r in results["bytes"].items():
        if "memory_bytes" not in r:
            rows.append([mem_dtype, f"failed: {r.get('error')}", "", "", "", "", f"within {BYTES_TOLERANCE:.0%}",
                         met(False)])
            continue
        measured, formula = r["memory_bytes"] / r["memory_entries"], formula_bytes(r)
        ratio = measured / formula
        rows.append([mem_dtype, tokens_label(r["tokens"]), f"{r['memory_entries']:,}", f"{measured:.1f}",
                     str(formula), f"{ratio:.3f}", f"within {BYTES_TOLERANCE:.0%}",
                     met(abs(ratio - 1) <= BYTES_TOLERANCE)])
    return rows


def report(results: dict) -> str:
    start, end = results["load_average_start"][0], results["load_average_end"][0]
    approx, k = results["approx"], results["top_k"]
    model = results.get("model") or "demo model"
    header = (f"LongLLaMA memory-scale benchmark ({model}): torch threads={results['threads']}, "
              f"cpus={os.cpu_count()}, load average {start:.1f} at start, {end:.1f} at end (timings are noisy when "
              f"it exceeds the cpus); run took {results.get('wall_s', 0) / 60:.1f} min\n")
    decode = format_table(
        f"Decode ms/token (median of {results['decode_tokens']} steps after {WARMUP_STEPS} warm-up) as memory grows; "
        f"top-k k={k}; index build = first search after use_index, not in ms/token",
        ["tokens", "memory entries", "prefill", "memory MB", "dense", "exact top-k", f"{approx} top-k",
         f"{approx} build / RSS", f"{approx} vs {tokens_label(results['sizes'][0])}", "target", "met?"],
        decode_rows(results))
    recall = format_table(
        f"Recall@{k} of {approx} vs brute force on the decode queries of the memory layer (tie-aware)",
        ["tokens", "index options", "queries", "recall", "min", "search ms/step", "target", "met?"], recall_rows(results))
    memory = format_table(
        "Memory bytes per memory entry: sum(memory_store.nbytes) / entries vs 2 x mem layers x kv heads x head_dim "
        "x bytes(mem_dtype)",
        ["mem_dtype", "prompt", "memory entries", "measured B/token", "formula", "ratio", "target", "met?"],
        bytes_rows(results))
    return "\n".join([header, decode, recall] + ([memory] if results["bytes"] else []))


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)")
        return
    figure, (speed_axis, bytes_axis) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    k, approx = results["top_k"], results["approx"]
    labels = {"dense": "dense (all memory)", "exact": f"exact top-{k}", approx: f"{approx} top-{k}"}
    done = [(size, r) for size, r in results["decode"].items() if "modes" in r]
    for mode, label in labels.items():
        speed_axis.plot([r["memory_entries"] for _, r in done], [ms_per_token(r, mode) for _, r in done], "o-",
                        label=label)
    for _, r in done:  # the approximate line is only as good as its recall
        if "recall" in r:
            speed_axis.annotate(f"recall {r['recall']['mean']:.2f}", (r["memory_entries"], ms_per_token(r, approx)),
                                textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
    speed_axis.set_xscale("log")
    speed_axis.set(xlabel="memory entries (tokens)", ylabel="decode ms/token (median)", title="Decoding vs memory size")
    speed_axis.set_ylim(bottom=0)
    measured = {d: r for d, r in results["bytes"].items() if "memory_bytes" in r}
    positions = range(len(measured))
    bytes_axis.bar([p - 0.2 for p in positions], [r["memory_bytes"] / r["memory_entries"] for r in measured.values()],
                   width=0.4, label="measured")
    bytes_axis.bar([p + 0.2 for p in positions], [formula_bytes(r) for r in measured.values()], width=0.4,
                   label="formula")
    bytes_axis.set_xticks(list(positions), list(measured))
    bytes_axis.set(ylabel="bytes per memory entry", title="Memory bytes per token by mem_dtype")
    for axis in (speed_axis, bytes_axis):
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}")


# ------------------------------------------------------------------------------------------------------------- main


def load_results(path: str) -> dict:
    """Results written by --json (JSON turns the per-size keys into strings)."""
    with open(path) as source:
        results = json.load(source)
    results["decode"] = {int(size): r for size, r in results["decode"].items()}
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Decode ms/token of the demo LongLLaMA as its memory grows (dense, exact and approximate "
        "top-k), recall@k of the approximate index, and memory bytes per token for each mem_dtype.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", help="a LongLLaMA checkpoint of the small config, instead of the bundled demo model")
    parser.add_argument("--sizes", default="16k,64k,256k,1M",
                        help="comma-separated prompt lengths that build the memory; k = x1024, M = x1048576")
    parser.add_argument("--top-k", type=int, default=128, help="memory keys per query in the top-k modes")
    parser.add_argument("--approx", choices=["hnswlib", "faiss"], default="hnswlib", help="approximate backend")
    parser.add_argument("--index-options", type=json.loads, default={},
                        help='JSON options of the approximate backend, e.g. \'{"M": 32, "ef_search": 1024}\'')
    parser.add_argument("--ef-sweep", default="512,2048,8192",
                        help="ef_search values to re-search the captured queries with (recall/speed trade-off)")
    parser.add_argument("--decode-tokens", type=int, default=16, help="timed decode steps per mode")
    parser.add_argument("--bytes-tokens", type=parse_tokens, default=256 * 1024,
                        help="prompt tokens of the bytes-per-token measurement")
    parser.add_argument("--mem-dtypes", default="bfloat16,float16,float32,int8", help="mem_dtype values to measure")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch (and index) threads")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per measurement (None: no limit)")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG: ms/token vs memory size, bytes per token")
    parser.add_argument("--json", metavar="PATH", help="write the raw results as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: sizes 4k,16k and --bytes-tokens 16k (overrides both)")
    parser.add_argument("--load", metavar="PATH",
                        help="measure nothing: print the tables (and --plot) from a file written by --json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.ef_sweep = [int(x) for x in args.ef_sweep.split(",") if x.strip()]
    args.mem_dtypes = [x.strip() for x in args.mem_dtypes.split(",") if x.strip()]
    unknown = sorted(set(args.mem_dtypes) - set(ELEMENT_BYTES))
    if unknown:
        parser.error(f"unknown --mem-dtypes {unknown}; choose from {list(ELEMENT_BYTES)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    if args.load:
        results = load_results(args.load)
    else:
        sizes = sorted({parse_tokens(x) for x in ("4k,16k" if args.quick else args.sizes).split(",") if x.strip()})
        results = collect(args, sizes, 16 * 1024 if args.quick else args.bytes_tokens)
    print(report(results))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
        print(f"raw results written to {args.json}")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
