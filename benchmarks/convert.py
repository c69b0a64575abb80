"""Conversion benchmark: time and peak RSS of `longllama.conversion.convert` on a checkpoint of OpenLLaMA 3B's shape.

A benchmark, not a test: it prints a table with a target and a "met?" column for each figure, and can write the raw
results (--json) and a plot (--plot, needs matplotlib).

Source checkpoint: synthetic, the real OpenLLaMA 3B shape (hidden 3200, intermediate 8640, 26 layers, 32 heads,
vocab 32000, untied lm_head), random bfloat16 weights (`torch.empty(...).normal_()`, seed 0), plus a float32
`rotary_emb.inv_freq` per layer as in the original checkpoints (the converter drops it). It is written shard by
shard with safetensors' `save_file` (shards of at most --src-shard-size, 2GB by default: 4 shards, ~6.85 GB), with a
model.safetensors.index.json and a config.json with model_type "llama"; only one shard of tensors is in memory at
a time.

What is measured:

1. Copy: `shutil.copyfile` of every source file (shards, index, config) into a scratch directory, timed. This is
   the reference throughput: the converter can hardly beat copying the same bytes.
2. Conversion: `convert(src, dst, dtype="keep", shard_size=--shard-size)` with the default `mem_layers`, in a fresh
   interpreter (this script re-run with a hidden --worker argument). The worker records its RSS after the imports,
   `getrusage(RUSAGE_SELF).ru_maxrss` after the conversion, and samples /proc/self/status every 10 ms for the peak
   anonymous and file-backed RSS (mmapped source pages count in RSS). It checks that the default memory layers
   are [6, 12, 18] for the 3B shape (floor(n*k/4), k=1..3 otherwise) and compares a few tensors with the source.

Targets: peak RSS of the conversion worker below 2x the largest shard (source or output), and conversion throughput
(source bytes / seconds) at least 50% of the copy's, measured in the same run.

Page cache: dropping it needs root, so it is not dropped. The source is read right after it was written (or read
once before timing, when --workdir holds a reusable source), so both the copy and the conversion read from a warm
cache and the comparison is fair. Dirty pages are flushed with os.sync() (untimed) before each timed phase, each
phase's output is deleted after it, and by default the phases run in the order copy, convert, convert, copy
(--order abba) so that neither side always goes first; --order copy-first runs copy then convert once.

    python benchmarks/convert.py                         # full 3B shape: ~6.85 GB on disk, a few minutes
    python benchmarks/convert.py --quick                 # 4 layers, 500MB source / 400MB output shards: ~1.4 GB
    python benchmarks/convert.py --json convert.json --plot convert.png
    python benchmarks/convert.py --load convert.json     # re-print (and --plot) without measuring

The temporary --workdir (default: a new directory under /tmp) is deleted at the end unless --keep; with --keep
and the same --workdir, a later run reuses the source checkpoint instead of generating it again.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import current_rss, emit_result, format_table, peak_rss, run_worker

SHAPE = dict(
    vocab_size=32000,
    hidden_size=3200,
    intermediate_size=8640,
    num_hidden_layers=26,
    num_attention_heads=32,
    num_key_value_heads=32,
)
QUICK_LAYERS = 4
QUICK_SRC_SHARD = "500MB"
QUICK_OUT_SHARD = "400MB"
SEED = 0
RSS_TARGET_RATIO = 2.0  # peak RSS < 2x the largest shard
THROUGHPUT_TARGET = 0.5  # conversion >= 50% of the copy's throughput
GB = 10**9
MB = 10**6
SPEC_FILE = "benchmark-spec.json"


# ----------------------------------------------------------------------------------------------- synthetic source


def llama_config(layers: int) -> dict:
    """config.json of OpenLLaMA 3B (with `layers` layers), as transformers writes it for LlamaForCausalLM."""
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        hidden_act="silu",
        initializer_range=0.02,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        use_cache=True,
        **dict(SHAPE, num_hidden_layers=layers),
    )


def tensor_specs(layers: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every source tensor, in the order of a transformers Llama state dict."""
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    head_dim = h // SHAPE["num_attention_heads"]
    specs = [("model.embed_tokens.weight", (v, h), "bfloat16")]
    for idx in range(layers):
        prefix = f"model.layers.{idx}."
        specs += [
            (prefix + "self_attn.q_proj.weight", (h, h), "bfloat16"),
            (prefix + "self_attn.k_proj.weight", (h, h), "bfloat16"),
            (prefix + "self_attn.v_proj.weight", (h, h), "bfloat16"),
            (prefix + "self_attn.o_proj.weight", (h, h), "bfloat16"),
            (prefix + "self_attn.rotary_emb.inv_freq", (head_dim // 2,), "float32"),
            (prefix + "mlp.gate_proj.weight", (i, h), "bfloat16"),
            (prefix + "mlp.up_proj.weight", (i, h), "bfloat16"),
            (prefix + "mlp.down_proj.weight", (h, i), "bfloat16"),
            (prefix + "input_layernorm.weight", (h,), "bfloat16"),
            (prefix + "post_attention_layernorm.weight", (h,), "bfloat16"),
        ]
    specs += [("model.norm.weight", (h,), "bfloat16"), ("lm_head.weight", (v, h), "bfloat16")]
    return specs


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * {"bfloat16": 2, "float32": 4}[dtype]


def group_shards(specs, shard_bytes: int) -> list[list[tuple]]:
    """Greedy grouping in order into shards of at most shard_bytes (a bigger tensor alone), like transformers."""
    from longllama.conversion.convert import group_by_size

    return group_by_size(specs, lambda spec: nbytes(spec[1], spec[2]), shard_bytes)


def write_source(src: Path, layers: int, shard_bytes: int) -> dict:
    """Write the synthetic checkpoint one shard at a time; returns what was written."""
    import torch
    from safetensors.torch import save_file

    src.mkdir(parents=True)
    generator = torch.Generator().manual_seed(SEED)
    groups = group_shards(tensor_specs(layers), shard_bytes)
    names = [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    weight_map, total = {}, 0
    for name, group in zip(names, groups):
        print(f"[bench] writing {name} ({len(group)} tensors)", file=sys.stderr, flush=True)
        tensors = {}
        for tensor_name, shape, dtype in group:
            if tensor_name.endswith("inv_freq"):
                dim = shape[0] * 2
                tensors[tensor_name] = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            else:
                tensors[tensor_name] = torch.empty(shape, dtype=getattr(torch, dtype)).normal_(generator=generator)
            weight_map[tensor_name] = name
            total += nbytes(shape, dtype)
        save_file(tensors, src / name, metadata={"format": "pt"})
        del tensors  # free the shard before generating the next one
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (src / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (src / "config.json").write_text(json.dumps(llama_config(layers), indent=2) + "\n")
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    return dict(shards=names, tensor_bytes=total)


def dir_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file())


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in dir_files(path))


def shard_sizes(path: Path) -> list[int]:
    return [p.stat().st_size for p in dir_files(path) if p.suffix == ".safetensors"]


def read_all(path: Path) -> None:
    """Read every file once (warms the page cache for a reused source)."""
    for file in dir_files(path):
        with open(file, "rb") as handle:
            while handle.read(64 << 20):
                pass


# ----------------------------------------------------------------------------------------------- measurements (worker)


class RssSampler(threading.Thread):
    """Samples RssAnon / RssFile of /proc/self/status: which part of the peak is heap and which is mmapped file."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval, self.stop_event = interval, threading.Event()
        self.peak_anon = self.peak_file = self.peak_total = 0
        self.samples = 0

    @staticmethod
    def read() -> tuple[int, int]:
        values = {}
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                    key, value = line.split(":")
                    values[key] = int(value.split()[0]) * 1024
        return values.get("RssAnon", 0), values.get("RssFile", 0) + values.get("RssShmem", 0)

    def run(self) -> None:
        if not os.path.exists("/proc/self/status"):
            return
        while not self.stop_event.is_set():
            anon, file = self.read()
            self.peak_anon, self.peak_file = max(self.peak_anon, anon), max(self.peak_file, file)
            self.peak_total = max(self.peak_total, anon + file)
            self.samples += 1
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


def check_tensors(src: Path, dst: Path, names: list[str]) -> bool:
    """The named tensors are bit-identical in the source and the output (dtype="keep")."""
    import torch
    from safetensors import safe_open

    def locate(directory: Path, name: str) -> Path:
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            return directory / json.loads(index.read_text())["weight_map"][name]
        return directory / "model.safetensors"

    for name in names:
        with safe_open(locate(src, name), framework="pt") as a, safe_open(locate(dst, name), framework="pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.int16), y.view(torch.int16)):
                return False
    return True


def worker_main(spec: dict) -> None:
    start = time.perf_counter()
    from longllama.conversion.convert import convert, default_mem_layers

    import_s = time.perf_counter() - start
    rss_after_imports, peak_after_imports = current_rss(), peak_rss()
    anon_after_imports, file_after_imports = RssSampler.read()
    sampler = RssSampler()
    sampler.start()
    start = time.perf_counter()
    convert(spec["src"], spec["dst"], dtype="keep", shard_size=spec["shard_size"])
    convert_s = time.perf_counter() - start
    sampler.stop()
    peak = peak_rss()
    dst = Path(spec["dst"])
    config = json.loads((dst / "config.json").read_text())
    layers = spec["layers"]
    check = [
        "model.embed_tokens.weight", f"model.layers.{layers // 2}.mlp.down_proj.weight",
        f"model.layers.{layers - 1}.self_attn.o_proj.weight", "lm_head.weight",
    ]
    result = dict(
        import_s=import_s,
        convert_s=convert_s,
        rss_after_imports=rss_after_imports,
        peak_rss_after_imports=peak_after_imports,
        anon_after_imports=anon_after_imports,
        file_after_imports=file_after_imports,
        peak_rss=peak,
        sampled_peak_anon=sampler.peak_anon,
        sampled_peak_file=sampler.peak_file,
        sampled_peak_total=sampler.peak_total,
        samples=sampler.samples,
        out_bytes=dir_bytes(dst),
        out_shards=shard_sizes(dst),
        model_type=config.get("model_type"),
        mem_layers=config.get("mem_layers"),
        expected_mem_layers=default_mem_layers(layers, SHAPE["hidden_size"]),
        tensors_equal=check_tensors(Path(spec["src"]), dst, check),
    )
    emit_result(result)


# -------------------------------------------------------------------------------------------------- driver (parent)


def timed_copy(src: Path, scratch: Path) -> dict:
    scratch.mkdir()
    start = time.perf_counter()
    for file in dir_files(src):
        shutil.copyfile(file, scratch / file.name)
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, bytes=dir_bytes(scratch))


def flush() -> None:
    """Write back dirty pages (untimed) so a phase does not pay for the previous phase's writes."""
    if hasattr(os, "sync"):
        os.sync()


def prepare_source(src: Path, layers: int, src_shard: str) -> dict:
    """Generate the source, or reuse one from an earlier --keep run with the same spec (then read it once)."""
    from longllama.conversion.convert import parse_size

    wanted = dict(layers=layers, src_shard_size=parse_size(src_shard), seed=SEED, shape=SHAPE)
    marker = src / SPEC_FILE
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        print(f"[bench] reusing the source checkpoint in {src}; reading it once to warm the cache",
              file=sys.stderr, flush=True)
        start = time.perf_counter()
        read_all(src)
        return dict(reused=True, seconds=time.perf_counter() - start)
    if src.exists():
        shutil.rmtree(src)
    start = time.perf_counter()
    written = write_source(src, layers, parse_size(src_shard))
    seconds = time.perf_counter() - start
    marker.write_text(json.dumps(wanted))
    return dict(reused=False, seconds=seconds, **written)


def collect(args) -> dict:
    from longllama.conversion.convert import parse_size

    layers = args.layers
    owned = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="longllama-convert-bench-", dir="/tmp")) if owned else Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"[bench] workdir {workdir}", file=sys.stderr, flush=True)
    src = workdir / "source"
    results = dict(
        layers=layers, src_shard_size=args.src_shard_size, shard_size=args.shard_size, order=args.order,
        cpus=os.cpu_count(), load_average_start=os.getloadavg(), workdir=str(workdir), copies=[], conversions=[],
    )
    try:
        results["source"] = prepare_source(src, layers, args.src_shard_size)
        results["source"].update(bytes=dir_bytes(src), shards_bytes=shard_sizes(src))
        print(f"[bench] source: {results['source']['bytes'] / GB:.2f} GB in {len(shard_sizes(src))} shard(s), "
              f"{results['source']['seconds']:.1f} s", file=sys.stderr, flush=True)
        phases = ["copy", "convert"] if args.order == "copy-first" else ["copy", "convert", "convert", "copy"]
        for k, phase in enumerate(phases):
            flush()
            scratch = workdir / f"{phase}-{k}"
            print(f"[bench] {phase} ...", file=sys.stderr, flush=True)
            if phase == "copy":
                result = timed_copy(src, scratch)
                results["copies"].append(result)
                print(f"[bench]   copy {result['seconds']:.1f} s", file=sys.stderr, flush=True)
            else:
                spec = dict(src=str(src), dst=str(scratch), shard_size=args.shard_size, layers=layers)
                result = run_worker(__file__, spec, args.timeout)
                results["conversions"].append(result)
                if "error" in result:
                    print(f"[bench]   conversion failed: {result['error']}", file=sys.stderr, flush=True)
                else:
                    print(f"[bench]   convert {result['convert_s']:.1f} s, peak RSS {result['peak_rss'] / MB:.0f} MB",
                          file=sys.stderr, flush=True)
            shutil.rmtree(scratch, ignore_errors=True)  # its pages leave the cache with it
        results["largest_shard"] = max(
            [*results["source"]["shards_bytes"], *(s for c in results["conversions"] for s in c.get("out_shards", []))]
        )
        results["shard_size_bytes"] = parse_size(args.shard_size)
    finally:
        if args.keep:
            print(f"[bench] kept {workdir}", file=sys.stderr, flush=True)
        elif owned:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for child in ("source",):
                shutil.rmtree(workdir / child, ignore_errors=True)
    results["load_average_end"] = os.getloadavg()
    return results


# ------------------------------------------------------------------------------------------------------------ report


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "NO")


def summary(results: dict) -> dict:
    """The figures the table shows: means over the runs of each phase."""
    source_bytes = results["source"]["bytes"]
    ok = [c for c in results["conversions"] if "error" not in c]
    copy_s = mean([c["seconds"] for c in results["copies"]])
    out = dict(source_bytes=source_bytes, copy_s=copy_s, copy_gbps=source_bytes / copy_s / GB)
    if ok:
        convert_s = mean([c["convert_s"] for c in ok])
        out.update(
            convert_s=convert_s,
            convert_gbps=source_bytes / convert_s / GB,
            peak_rss=max(c["peak_rss"] for c in ok),
            rss_after_imports=mean([c["rss_after_imports"] for c in ok]),
            peak_net=max(c["peak_rss"] - c["rss_after_imports"] for c in ok),
        )
    return out


def report(results: dict) -> str:
    s = summary(results)
    largest = results["largest_shard"]
    rss_limit = RSS_TARGET_RATIO * largest
    layers = results["layers"]
    ok = [c for c in results["conversions"] if "error" not in c]
    errors = [c["error"] for c in results["conversions"] if "error" in c]
    src = results["source"]
    header = (
        f"LongLLaMA conversion benchmark: OpenLLaMA 3B shape with {layers} layers, bf16, "
        f"{s['source_bytes'] / GB:.2f} GB in {len(src['shards_bytes'])} source shard(s) (--src-shard-size "
        f"{results['src_shard_size']}), output --shard-size {results['shard_size']}; order {results['order']}; "
        f"cpus={results['cpus']}, load average {results['load_average_start'][0]:.1f} at start, "
        f"{results['load_average_end'][0]:.1f} at end\n"
        f"source {'reused (read once to warm the cache)' if src['reused'] else 'generated'} in {src['seconds']:.1f} s; "
        f"the copy and the conversion both read it from a warm page cache; os.sync() before each phase\n"
    )
    runs = []
    for k, c in enumerate(results["copies"]):
        runs.append([f"copy #{k + 1}", f"{c['seconds']:.2f}", f"{s['source_bytes'] / c['seconds'] / GB:.2f}",
                     "", "", "", ""])
    for k, c in enumerate(results["conversions"]):
        if "error" in c:
            runs.append([f"convert #{k + 1}", "error: " + c["error"], "", "", "", "", ""])
            continue
        runs.append([
            f"convert #{k + 1}", f"{c['convert_s']:.2f}", f"{s['source_bytes'] / c['convert_s'] / GB:.2f}",
            f"{c['rss_after_imports'] / MB:.0f}", f"{c['peak_rss'] / MB:.0f}",
            f"{c['anon_after_imports'] / MB:.0f} / {c['file_after_imports'] / MB:.0f} -> "
            f"{c['sampled_peak_anon'] / MB:.0f} / {c['sampled_peak_file'] / MB:.0f}",
            f"{c['import_s']:.1f} / {c['worker_wall_s']:.1f}",
        ])
    run_table = format_table(
        "Runs, in order of kind (seconds; GB/s = source bytes / seconds; MB = 10^6 bytes)",
        ["run", "seconds", "GB/s", "RSS after imports MB", "peak RSS MB", "anon / file-backed RSS MB: imports -> peak",
         "import s / worker wall s"], runs)
    rows = []
    if ok:
        ratio = s["convert_gbps"] / s["copy_gbps"]
        rows += [
            ["conversion throughput (mean)", f"{s['convert_gbps']:.2f} GB/s ({s['convert_s']:.2f} s)",
             f">= {THROUGHPUT_TARGET:.0%} of copy", f"{ratio:.0%} of copy", met(ratio >= THROUGHPUT_TARGET)],
            ["copy throughput (mean)", f"{s['copy_gbps']:.2f} GB/s ({s['copy_s']:.2f} s)", "reference", "", ""],
            ["peak RSS (ru_maxrss)", f"{s['peak_rss'] / MB:.0f} MB",
             f"< {RSS_TARGET_RATIO:g}x largest shard = {rss_limit / MB:.0f} MB",
             f"{s['peak_rss'] / largest:.2f}x", met(s["peak_rss"] < rss_limit)],
            ["peak RSS - RSS after imports", f"{s['peak_net'] / MB:.0f} MB (imports {s['rss_after_imports'] / MB:.0f})",
             f"< {rss_limit / MB:.0f} MB", f"{s['peak_net'] / largest:.2f}x", met(s["peak_net"] < rss_limit)],
            ["default mem_layers", str(ok[0]["mem_layers"]), str(ok[0]["expected_mem_layers"]),
             "", met(all(c["mem_layers"] == c["expected_mem_layers"] for c in ok))],
            ["output", f"model_type {ok[0]['model_type']}, {ok[0]['out_bytes'] / GB:.2f} GB, "
             f"{len(ok[0]['out_shards'])} shard(s), largest {max(ok[0]['out_shards']) / MB:.0f} MB",
             "longllama; sampled tensors bit-identical", "",
             met(all(c["model_type"] == "longllama" and c["tensors_equal"] for c in ok))],
        ]
    for error in errors:
        rows.append(["conversion", f"error: {error}", "completes", "", met(False)])
    figures = format_table(
        f"Targets (largest shard, source or output: {largest / MB:.0f} MB)",
        ["figure", "value", "target", "measured", "met?"], rows)
    return "\n".join([header, run_table, figures])


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)")
        return
    source_bytes = results["source"]["bytes"]
    labels, seconds = [], []
    for k, c in enumerate(results["copies"]):
        labels.append(f"copy #{k + 1}")
        seconds.append(c["seconds"])
    for k, c in enumerate(results["conversions"]):
        if "error" not in c:
            labels.append(f"convert #{k + 1}")
            seconds.append(c["convert_s"])
    colors = ["tab:gray" if label.startswith("copy") else "tab:blue" for label in labels]
    figure, (time_axis, rate_axis, rss_axis) = plt.subplots(1, 3, figsize=(14, 4.5))
    time_axis.bar(labels, seconds, color=colors)
    time_axis.set(ylabel="seconds", title=f"Time for {source_bytes / GB:.2f} GB")
    rates = [source_bytes / s / GB for s in seconds]
    rate_axis.bar(labels, rates, color=colors)
    copy_rates = [r for label, r in zip(labels, rates) if label.startswith("copy")]
    if copy_rates:
        rate_axis.axhline(THROUGHPUT_TARGET * mean(copy_rates), color="tab:red", ls="--",
                          label=f"target: {THROUGHPUT_TARGET:.0%} of mean copy")
        rate_axis.legend()
    rate_axis.set(ylabel="GB/s (source bytes / s)", title="Throughput")
    ok = [c for c in results["conversions"] if "error" not in c]
    rss_labels = [f"convert #{k + 1}" for k in range(len(ok))]
    rss_axis.bar(rss_labels, [c["peak_rss"] / MB for c in ok], color="tab:blue", label="peak RSS")
    rss_axis.bar(rss_labels, [c["rss_after_imports"] / MB for c in ok], color="tab:cyan", label="after imports")
    rss_axis.axhline(RSS_TARGET_RATIO * results["largest_shard"] / MB, color="tab:red", ls="--",
                     label=f"target: {RSS_TARGET_RATIO:g}x largest shard")
    rss_axis.set(ylabel="MB", title="Conversion worker RSS")
    rss_axis.legend()
    for axis in (time_axis, rate_axis, rss_axis):
        axis.grid(True, axis="y", alpha=0.3)
        axis.tick_params(axis="x", labelrotation=20)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}")


# ------------------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time and peak RSS of longllama.conversion.convert on a synthetic bf16 checkpoint of OpenLLaMA "
        "3B's shape, against a plain copy of the same files in the same run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--layers", type=int, default=None,
                        help=f"decoder layers of the source (default {SHAPE['num_hidden_layers']}; "
                        f"{QUICK_LAYERS} with --quick)")
    parser.add_argument("--src-shard-size", default=None,
                        help=f"source shard size (default 2GB; {QUICK_SRC_SHARD} with --quick)")
    parser.add_argument("--shard-size", default=None,
                        help=f"output shard size passed to convert() (default 2GB; {QUICK_OUT_SHARD} with --quick)")
    parser.add_argument("--order", choices=("abba", "copy-first"), default="abba",
                        help="abba: copy, convert, convert, copy; copy-first: copy then convert once")
    parser.add_argument("--workdir", help="where the checkpoints go (default: a new temporary directory under /tmp)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the workdir (a later run with the same --workdir reuses its source)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_LAYERS} layers, {QUICK_SRC_SHARD} source and {QUICK_OUT_SHARD} "
                        "output shards (explicit options still win)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per conversion (None: no limit)")
    parser.add_argument("--json", metavar="PATH", help="write the raw results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG: seconds, GB/s and RSS of copy vs convert")
    parser.add_argument("--load", metavar="PATH",
                        help="measure nothing: print the table (and --plot) from a file written by --json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layers is None:
        args.layers = QUICK_LAYERS if args.quick else SHAPE["num_hidden_layers"]
    if args.src_shard_size is None:
        args.src_shard_size = QUICK_SRC_SHARD if args.quick else "2GB"
    if args.shard_size is None:
        args.shard_size = QUICK_OUT_SHARD if args.quick else "2GB"
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    if args.load:
        with open(args.load) as source:
            results = json.load(source)
    else:
        results = collect(args)
    print(report(results))
    if args.json:
        with open(args.json, "w") as sink:
            json.dump(results, sink, indent=2)
        print(f"raw results written to {args.json}")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
