"""Static decoding (one compiled graph per decode step) against eager decoding: compile time, graphs, ms per token.

A benchmark, not a test. Model: the random model of `long_prompt.py` (hidden 256, 8 layers, memory layers [2, 5],
window 1024, bf16 memory). One prompt of --prompt tokens is read twice, into a plain session and into a static one
(`LongLlamaCache(config, static=True)`, what `generate(..., cache_implementation="static")` uses; docs/inference.md),
then the same greedy tokens are decoded on both, step by step in turn, so that load hits both alike. The default
1,000-token prompt leaves 24 tokens to the window: the decoded tokens cross a flush, which the static step must survive
without compiling again. Tokens and logits are checked to agree. Compiling starts from an empty inductor cache
(a temporary directory), as on a first run.

    python benchmarks/decode_compile.py                        # 1,000-token prompt, 64 decoded tokens
    python benchmarks/decode_compile.py --json docs/figures/decode_compile.json

Timings are wall-clock on a shared machine: the load average is printed with the table.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

from harness import format_table

PROMPT, STEPS = 1000, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=PROMPT, help="prompt tokens (default 1000)")
    parser.add_argument("--steps", type=int, default=STEPS, help="decoded tokens (default 64)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--json", metavar="PATH", help="write the raw results as JSON")
    args = parser.parse_args()

    # a cold compile: inductor's on-disk cache would otherwise serve the graph of an earlier run
    inductor_cache = tempfile.TemporaryDirectory(prefix="longllama-inductor-")  # removed when main() returns
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache.name
    import torch
    from long_prompt import build_longllama, random_prompt
    from torch._dynamo.utils import counters

    from longllama import LongLlamaCache

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    model = build_longllama()
    ids = random_prompt(args.prompt)
    with torch.no_grad():
        eager_cache = model(ids, use_cache=True, logits_to_keep=1).cache
        out = model(ids, cache=LongLlamaCache(model.config, static=True), use_cache=True, logits_to_keep=1)
        compiled_cache, token = out.cache, out.logits.argmax(-1)
        eager_ms, compiled_ms, graphs, max_diff = [], [], [], 0.0
        for _ in range(args.steps):
            start = time.perf_counter()
            expected = model(token, cache=eager_cache, logits_to_keep=1).logits
            eager_ms.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            actual = model(token, cache=compiled_cache, logits_to_keep=1).logits
            compiled_ms.append((time.perf_counter() - start) * 1000)
            graphs.append(counters["stats"]["unique_graphs"])
            max_diff = max(max_diff, float((actual - expected).abs().max()))
            if not torch.equal(actual.argmax(-1), expected.argmax(-1)):
                raise AssertionError("compiled and eager decoding chose different tokens")
            token = expected.argmax(-1)
    compiling = [i for i in range(args.steps) if i == 0 or graphs[i] > graphs[i - 1]]
    steady = [ms for i, ms in enumerate(compiled_ms) if i not in compiling]
    steady_eager = [ms for i, ms in enumerate(eager_ms) if i not in compiling]
    result = {
        "prompt": args.prompt, "steps": args.steps, "threads": args.threads, "load": load, "load_end": os.getloadavg(),
        "graphs": graphs[-1], "compiling_steps": compiling, "compile_s": sum(compiled_ms[i] for i in compiling) / 1000,
        "eager_ms": statistics.median(steady_eager), "compiled_ms": statistics.median(steady),
        "max_logit_diff": max_diff, "eager_ms_all": eager_ms, "compiled_ms_all": compiled_ms,
    }
    title = (f"Greedy decoding after a {args.prompt:,}-token prompt, {args.steps} tokens, {args.threads} threads, "
             f"load average {load[0]:.1f} at the start and {result['load_end'][0]:.1f} at the end")
    rows = [
        ["eager ms/token (median, steady steps)", f"{result['eager_ms']:.1f}"],
        ["static (compiled) ms/token (median, steady steps)", f"{result['compiled_ms']:.1f}"],
        ["speed-up", f"{result['eager_ms'] / result['compiled_ms']:.2f}x"],
        ["graphs compiled", f"{result['graphs']} (at steps {compiling})"],
        ["time spent compiling", f"{result['compile_s']:.1f} s"],
        ["largest logit difference", f"{max_diff:.2e}"],
    ]
    print(format_table(title, ["figure", "value"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"raw results written to {args.json}")


if __name__ == "__main__":
    main()
