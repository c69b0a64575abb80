"""How CPU contention slows the demo passkey run, and what `--threads` does about it (docs/troubleshooting.md).

Runs `longllama-passkey --demo` (or `--model`'s checkpoint) with each `--threads` value, first alone, then next to N
busy processes (pure-Python spin loops, one core each, stopped afterwards), and records the wall time of the
command, the seconds of its `generate()` calls (from its --json) and the 1-minute load average before and after each
run:

    python benchmarks/contention.py --lengths 100k --trials 1 --busy 0,1,2 --threads 2,1 \
        --json docs/figures/contention.json

torch's default is one intra-op thread per core; when other processes keep the cores busy, its OpenMP threads wait
for each other at every parallel region, and a run with fewer threads than cores can be several times faster.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

SPIN = "while True: pass"


def run_passkey(model: str | None, lengths: str, trials: int, threads: int) -> dict:
    """One `longllama-passkey --demo` (or MODEL) run: wall seconds, generate() seconds, load average before and
    after."""
    with tempfile.TemporaryDirectory() as tmp:
        results = os.path.join(tmp, "passkey.json")
        script = shutil.which("longllama-passkey", path=os.path.dirname(sys.executable)) or "longllama-passkey"
        command = [script, model or "--demo", "--lengths", lengths, "--trials", str(trials),
                   "--threads", str(threads), "--json", results]
        load_before, start = os.getloadavg()[0], time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        trials_done = json.loads(open(results).read())["results"]
    return {"threads": threads, "wall_s": round(wall, 2),
            "generate_s": round(sum(r["seconds"] for r in trials_done), 2),
            "correct": sum(r["correct"] for r in trials_done), "trials": len(trials_done),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}


def measure(model: str | None, lengths: str, trials: int, busy_counts: list[int],
            thread_counts: list[int]) -> list[dict]:
    rows = []
    for busy in busy_counts:
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
        try:
            time.sleep(2)  # the spinners are running before the measurement starts
            for threads in thread_counts:
                row = {"busy_processes": busy, **run_passkey(model, lengths, trials, threads)}
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint for longllama-passkey (default: --demo, the bundled demo model)")
    parser.add_argument("--lengths", default="16k", help="passed to longllama-passkey (default: 16k)")
    parser.add_argument("--trials", type=int, default=1, help="passed to longllama-passkey (default: 1)")
    parser.add_argument("--busy", default="0,1,2", help="numbers of busy processes, comma-separated (default: 0,1,2)")
    parser.add_argument("--threads", default="2,1", help="--threads values, comma-separated (default: 2,1)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = measure(args.model, args.lengths, args.trials, [int(n) for n in args.busy.split(",")],
                   [int(n) for n in args.threads.split(",")])
    if args.json:
        payload = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "rows": rows}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)


if __name__ == "__main__":
    main()
