"""Exact top-k search throughput: LongLLaMA's `ExactIndex` against faiss `IndexFlatIP`, on the same data.

A benchmark, not a test. For each memory size n, head_dim D and number of queries nq, one key set of n random
Gaussian keys (float32, one row, one KV head) is searched for the top k=128 by inner product, by
the package's `longllama.search.ExactIndex` (reading the keys from memory-sized blocks as a `LayerMemory` hands
them over) and by `faiss.IndexFlatIP` holding the same keys. `ExactIndex` runs twice: with its C kernel
(`longllama/csrc`, built when the package is installed with a C compiler) and with its torch path (the fallback, and
the path on GPUs). All runs use the same threads. Their calls alternate, and the best of several repetitions is kept,
so that machine load hits all alike. The results are checked to agree (scores within 1e-4).

Target: exact top-k throughput (with the kernel) at least 80% of faiss IndexFlatIP's (faiss ms / exact ms >= 0.8)
everywhere.

    python benchmarks/topk_search.py                       # n 64k, 256k, 1M; D 32, 128; nq 1, 2048 (~10 min)
    python benchmarks/topk_search.py --quick               # n 64k, 256k; nq 1, 256 (~40 s)
    python benchmarks/topk_search.py --json docs/figures/topk_search.json --plot docs/figures/topk_search.png
    python benchmarks/topk_search.py --load docs/figures/topk_search.json   # re-print, no measuring

Needs faiss (`pip install "longllama[faiss]"`) and, for --plot, matplotlib.
"""

import argparse
import json
import math
import os
import time

import torch

from harness import format_table

BLOCK_ELEMENTS = 1 << 22  # LayerMemory hands over chunks of about this many elements


def best_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


def measure(n: int, D: int, nq: int, k: int, seed: int = 0) -> dict:
    import faiss

    from longllama import kernels, search
    from longllama.search import ExactIndex

    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 1, n, D, generator=generator)
    valid = torch.ones(1, n, dtype=torch.bool)
    block = BLOCK_ELEMENTS // D
    index = ExactIndex(lambda: ((s, keys[:, :, s : s + block], valid[:, s : s + block]) for s in range(0, n, block)))
    index.add(0, keys, valid)
    flat = faiss.IndexFlatIP(D)
    flat.add(keys[0, 0].numpy())
    queries = torch.randn(1, 1, nq, D, generator=generator)
    q = queries[0, 0].numpy()

    kernel = kernels.compiled()

    def torch_path():
        kernels._module = None  # as when installed without a compiler
        try:
            return index.search(queries, k)
        finally:
            kernels._module = kernel

    faiss_scores = torch.from_numpy(flat.search(q, k)[0])
    for name, run in [("exact", lambda: index.search(queries, k)), ("torch path", torch_path)]:
        if not torch.allclose(run()[0][0, 0], faiss_scores, atol=1e-4):
            raise AssertionError(f"{name} top-k and faiss disagree at n={n} D={D} nq={nq}")
    reps = max(3, min(15, int(20 / max(1e-3, n * D * nq / 2e10))))
    exact_ms, torch_ms, faiss_ms = [], [], []
    for _ in range(reps):  # alternate, so that load changes hit all
        faiss_ms.append(best_ms(lambda: flat.search(q, k), 1))
        exact_ms.append(best_ms(lambda: index.search(queries, k), 1))
        torch_ms.append(best_ms(torch_path, 1))
    return {"n": n, "D": D, "nq": nq, "k": k, "reps": reps, "exact_ms": min(exact_ms), "torch_ms": min(torch_ms),
            "faiss_ms": min(faiss_ms), "ratio": min(faiss_ms) / min(exact_ms), "kernel": kernel is not None}


def print_tables(payload: dict) -> None:
    rows = [
        [f"{r['n']:,}", str(r["D"]), str(r["nq"]), f"{r['exact_ms']:.1f}", f"{r.get('torch_ms', math.nan):.1f}",
         f"{r['faiss_ms']:.1f}", f"{r['ratio']:.2f}", ">= 0.8", "yes" if r["ratio"] >= 0.8 else "NO"]
        for r in payload["results"]
    ]
    kernel = "C kernel" if all(r.get("kernel") for r in payload["results"]) else "no C kernel: torch path"
    title = (f"Exact top-{payload['k']} search, one key set: ExactIndex ({kernel}) vs faiss IndexFlatIP, "
             f"{payload['threads']} threads, load average {payload['load'][0]:.1f}")
    headers = ["n", "D", "nq", "exact ms", "torch path ms", "faiss ms", "throughput exact/faiss", "target", "met?"]
    print(format_table(title, headers, rows))


def plot(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for D in sorted({r["D"] for r in payload["results"]}):
        for nq in sorted({r["nq"] for r in payload["results"]}):
            points = [r for r in payload["results"] if r["D"] == D and r["nq"] == nq]
            line = ax.plot([r["n"] for r in points], [r["ratio"] for r in points], marker="o", label=f"D={D}, nq={nq}")
            if all("torch_ms" in r for r in points):  # the torch path (no compiler, GPUs), dotted, same colour
                ratios = [r["faiss_ms"] / r["torch_ms"] for r in points]
                ax.plot([r["n"] for r in points], ratios, linestyle=":", color=line[0].get_color())
    ax.plot([], [], linestyle=":", color="black", label="same, torch path (no C kernel)")
    ax.axhline(0.8, color="gray", linestyle="--", label="target 0.8")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("keys in memory")
    ax.set_ylabel("throughput: exact top-k / faiss IndexFlatIP")
    ax.set_title(f"Exact top-{payload['k']} search vs faiss IndexFlatIP ({payload['threads']} threads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="65536,262144,1048576", help="memory sizes n (default 64k, 256k, 1M)")
    parser.add_argument("--dims", default="32,128", help="head dims D (default 32 (the demo model), 128 (7B))")
    parser.add_argument("--queries", default="1,2048", help="queries per search: 1 (decode), 2048 (a prefill window)")
    parser.add_argument("--top-k", type=int, default=128, help="k (default 128, the paper's)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for torch and faiss")
    parser.add_argument("--quick", action="store_true", help="smoke run: n 64k, 256k; nq 1, 256")
    parser.add_argument("--json", metavar="PATH", help="write the raw results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the throughput ratio")
    parser.add_argument("--load", metavar="PATH", help="measure nothing: print (and --plot) a file written by --json")
    args = parser.parse_args()

    if args.load:
        payload = json.loads(open(args.load).read())
    else:
        try:
            import faiss
        except ImportError:
            parser.error('this benchmark needs faiss: pip install "longllama[faiss]"')
        if args.quick:
            args.sizes, args.queries = "65536,262144", "1,256"
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
        payload = {"k": args.top_k, "threads": args.threads, "load": os.getloadavg(), "results": []}
        for n in [int(x) for x in args.sizes.split(",")]:
            for D in [int(x) for x in args.dims.split(",")]:
                for nq in [int(x) for x in args.queries.split(",")]:
                    result = measure(n, D, nq, args.top_k)
                    payload["results"].append(result)
                    print(f"n={n} D={D} nq={nq}: exact {result['exact_ms']:.1f} ms (torch path "
                          f"{result['torch_ms']:.1f}), faiss {result['faiss_ms']:.1f} ms, ratio {result['ratio']:.2f}",
                          flush=True)
        payload["load_end"] = os.getloadavg()
    print_tables(payload)
    if args.json and not args.load:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"raw results written to {args.json}")
    if args.plot:
        plot(payload, args.plot)


if __name__ == "__main__":
    main()
