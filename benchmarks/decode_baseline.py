"""Decoding speed of this checkout against another version of the package, side by side (issue 17's "today").

A benchmark, not a test. Each `--python` interpreter must have its own longllama installed (e.g. a venv with an older
commit: `git worktree add /tmp/old COMMIT && python -m venv /tmp/oldvenv && /tmp/oldvenv/bin/pip install /tmp/old`).
In every round, each interpreter runs one child process (this file with `--child`), in turn, so that machine load hits
them alike. The child builds the model of `long_prompt.py` (hidden 256, 8 layers, memory layers [2, 5], window 1024,
bf16 memory), fills both memory layers with N random entries (as `decode.py` does), reads a 64-token prompt, and times
decode steps (each cropped off again, so that every step sees the same session): ms per token, median of the steps
after a warm-up. `--static` also times a static session (`LongLlamaCache(config, static=True)`) where the package has
one. The table gives the median over rounds and the range.

    python benchmarks/decode_baseline.py --python /tmp/oldvenv/bin/python --python .venv/bin/python
"""

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import format_table, parse_tokens

SIZES = "1k,16k,100k"
LOCAL, WARMUP, STEPS = 64, 10, 30


def child(sizes: list[int], threads: int, static: bool) -> dict:
    import torch
    from long_prompt import build_longllama, random_prompt

    import longllama
    from longllama import LongLlamaCache

    torch.set_num_threads(threads)
    model = build_longllama()
    config = model.config
    kinds = ["eager"]
    if static and "static" in inspect.signature(LongLlamaCache).parameters:
        kinds.append("static")
    result = {"package": str(Path(longllama.__file__).parent), "ms": {}}
    for tokens in sizes:
        for kind in kinds:
            cache = LongLlamaCache(config, static=True) if kind == "static" else LongLlamaCache(config)
            if hasattr(cache, "bind"):
                cache.bind(model)  # the session is this model's, though filled by hand
            generator = torch.Generator().manual_seed(tokens)
            for idx in config.mem_layers:
                for start in range(0, tokens, 1 << 16):
                    n = min(1 << 16, tokens - start)
                    keys, values = (
                        torch.randn(1, config.num_key_value_heads, n, config.head_dim, generator=generator)
                        for _ in range(2)
                    )
                    cache.layers[idx].add_to_memory(keys, values, torch.ones(1, n, dtype=torch.bool))
            cache.seen_tokens = tokens
            times = []
            with torch.no_grad():
                token = model(random_prompt(LOCAL), cache=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
                for _ in range(WARMUP + STEPS):
                    start = time.perf_counter()
                    model(token, cache=cache, logits_to_keep=1)
                    times.append(time.perf_counter() - start)
                    cache.crop(-1)
            result["ms"][f"{kind} {tokens}"] = statistics.median(times[WARMUP:]) * 1000
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", required=True, metavar="PYTHON",
                        help="an interpreter with longllama installed; give it once per version to compare")
    parser.add_argument("--sizes", default=SIZES, help=f"memory tokens, comma-separated (default {SIZES})")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the interpreters (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--static", action="store_true", help="also time static sessions where the package has them")
    parser.add_argument("--json", metavar="PATH", help="write the raw results as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [parse_tokens(x) for x in args.sizes.split(",")]
    if args.child:
        print(json.dumps(child(sizes, args.threads, args.static)))
        return

    interpreters = [os.path.abspath(p) if os.sep in p else p for p in args.python]  # children run in benchmarks/
    load = os.getloadavg()
    runs = {python: [] for python in interpreters}
    for _ in range(args.rounds):
        for python in interpreters:
            command = [python, __file__, "--child", "--sizes", args.sizes, "--threads", str(args.threads),
                       "--python", python] + (["--static"] if args.static else [])
            out = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)
            if out.returncode:
                sys.exit(f"{python} failed:\n{out.stderr.strip()}")
            runs[python].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for python, results in runs.items():
        for key in results[0]["ms"]:
            values = [r["ms"][key] for r in results]
            kind, tokens = key.split()
            rows.append([results[0]["package"], f"{int(tokens):,}", kind,
                         f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"])
    load_end = os.getloadavg()
    print(format_table(
        f"ms per decoded token, {args.threads} threads, median (range) of {args.rounds} rounds, load average "
        f"{load[0]:.1f} at the start and {load_end[0]:.1f} at the end",
        ["package", "memory tokens", "session", "ms/token"], rows,
    ))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rounds": args.rounds, "load": load, "load_end": load_end,
                       "runs": runs}, f, indent=1)
        print(f"raw results written to {args.json}")


if __name__ == "__main__":
    main()
