"""What the benchmark scripts share: RSS readings, one measurement per fresh interpreter, plain-text tables.

A script re-runs itself as `python SCRIPT --worker JSON`; the worker prints its result as one `RESULT_MARKER` line
(`emit_result`), which `run_worker` reads back. Imported by the scripts in this folder (their folder is on sys.path).
"""

import json
import os
import resource
import subprocess
import sys
import time

RESULT_MARKER = "BENCHMARK-RESULT "


def current_rss() -> int:
    """Resident set size of this process now, in bytes (/proc, else psutil)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (ru_maxrss is in KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def emit_result(result: dict) -> None:
    """Worker side: hand `result` to the parent."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


def run_worker(script: str, spec: dict, timeout: float | None) -> dict:
    """Run `script --worker spec` in a fresh interpreter; returns its result (plus `worker_wall_s`) or
    {"error": ...}."""
    command = [sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if done.returncode != 0 or not lines:
        killed = " (killed: out of memory?)" if done.returncode == -9 else ""
        return {"error": f"worker exit code {done.returncode}{killed}"}
    result = json.loads(lines[-1][len(RESULT_MARKER) :])
    result["worker_wall_s"] = time.perf_counter() - start
    return result


def parse_tokens(text: str) -> int:
    """A token count: `4096`, `4k` (x1024), `1M` (x1048576)."""
    text = text.strip().lower()
    scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def format_table(title: str, headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    line = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([title, line(headers), "-+-".join("-" * w for w in widths), *map(line, rows), ""])
