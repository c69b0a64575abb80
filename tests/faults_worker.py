"""Fault injection for tests/test_faults.py, run as `python tests/faults_worker.py KIND WORKDIR SEED COUNT`.

KIND is `session`, `convert` or `train`. The worker builds a good state in WORKDIR (a saved session, a converted
checkpoint, a training run's checkpoints), then `COUNT` times forks a child that writes over it and injects one fault:

- kill: the child writes in a loop and is killed with SIGKILL after a seeded random delay;
- fsize: the child writes under `RLIMIT_FSIZE` of a seeded random size (a full disk: writes fail with EFBIG);
- readonly: (once) the target is made read-only (`chattr +i` as root, `chmod` otherwise).

After each fault it checks that the state at the path is a complete good one (the old or the new), that the child
reported its error as documented (the API: `OSError`; the command lines: exit status 2 and one line on stderr), and
at the end that the next write succeeds and leaves no stray files. It prints one JSON line: the counts and every
problem found (`problems`, empty when all held).
"""

import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

torch.set_num_threads(1)

import longllama  # noqa: E402,F401
from tqdm.auto import tqdm  # noqa: E402


class Report:
    def __init__(self, kind: str):
        # mid_write: kills that left a partial write behind (they landed inside a write, not between two)
        self.counts = {"kind": kind, "kill": 0, "mid_write": 0, "fsize": 0, "readonly": 0, "losses": 0}
        self.problems: list[str] = []

    def check(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok

    def lost(self, problem: str) -> None:
        self.counts["losses"] += 1
        self.problems.append(problem)


# ---------------------------------------------------------------------------------------------------------------------
# children


def fork(body, *, fsize: int | None = None, stderr: Path | None = None) -> int:
    """Run `body()` in a forked child; returns its pid. The child exits with `body`'s return value (an int), 70 on an
    unexpected exception (its traceback goes to `stderr`)."""
    pid = os.fork()
    if pid:
        return pid
    try:
        # tqdm's write lock is a multiprocessing lock shared with every forked process: a child killed while holding
        # it would hang the others (an artifact of forking, not of the code under test), so each child has its own
        tqdm.set_lock(threading.RLock())
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the worker's stdout carries its report only
        os.dup2(os.open(stderr or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))
        code = body()
    except BaseException:
        traceback.print_exc()
        code = 70
    finally:
        sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0)


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def kill_after(pid: int, delay: float) -> None:
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    wait(pid)


def forever(write):
    def body():
        while True:
            write()

    return body


def one_line_error(path: Path, prefix: str) -> bool:
    """stderr ends with one error line (before it only progress bars may appear) and holds no traceback."""
    lines = [line for line in path.read_text().replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(prefix)]
    return "Traceback" not in path.read_text() and len(errors) == 1 and lines[-1] == errors[0]


@contextlib.contextmanager
def read_only(path: Path):
    """`path` (a directory) cannot be written, even by root; yields False where that cannot be arranged."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield True
        finally:
            path.chmod(mode)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def strays(directory: Path, allowed) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not allowed(p.name))


# ---------------------------------------------------------------------------------------------------------------------
# sessions


def session_faults(work: Path, rng: random.Random, count: int, report: Report) -> None:
    from conftest import tiny_model

    from longllama import LongLlamaCache

    model = tiny_model(1, mem_layers=[1, 2])
    ids = torch.randint(3, 99, (1, 4 + 40 * 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        caches = {n: model(ids[:, :n], use_cache=True).cache for n in (4 + 20 * 8, 4 + 40 * 8)}  # two sessions
    target = work / "session"
    target.mkdir()
    (target / "notes.txt").write_text("the user's")
    caches[164].save(target)

    def intact(path: Path, what: str, may_be_absent: bool = False) -> None:
        if may_be_absent and not path.exists():
            return
        try:
            loaded = LongLlamaCache.load(path, model)
        except (ValueError, FileNotFoundError) as error:
            report.lost(f"{what}: the session at {path.name} no longer loads ({error})")
            return
        report.check(loaded.get_seq_length() in caches, f"{what}: a session of {loaded.get_seq_length()} tokens")

    def ours(name: str) -> bool:
        return name in ("session.json", "notes.txt") or (name.startswith("memory.") and name.endswith(".safetensors"))

    for i in range(count):
        order = [caches[164], caches[324]] if i % 2 else [caches[324], caches[164]]
        fresh = work / f"fresh-{i}" if i % 3 == 2 else None  # a first save, which creates the directory
        path = fresh or target
        saves = iter(order * 10**6)
        pid = fork(forever(lambda: next(saves).save(path)))
        kill_after(pid, rng.uniform(0.0, 0.03 if fresh else 0.08))
        report.counts["kill"] += 1
        leftovers = [p for p in work.glob(".*.partial-*")] + (strays(path, ours) if path.exists() else [])
        report.counts["mid_write"] += bool(leftovers) or len(list(path.glob("memory.*"))) > 1
        intact(path, f"kill {i}", may_be_absent=fresh is not None)
    for i in range(count):
        limit = rng.randrange(0, 300_000)
        code = wait(fork(lambda: _save_expecting_oserror(caches[324], target), fsize=limit))
        report.counts["fsize"] += 1
        report.check(code in (0, 3), f"fsize {limit}: the save ended with {code}, not a saved session or an OSError")
        intact(target, f"fsize {limit}")
        report.check(not strays(target, ours), f"fsize {limit}: stray files {strays(target, ours)}")
    with read_only(target) as possible:
        if possible:
            report.counts["readonly"] += 1
            try:
                caches[164].save(target)
                report.problems.append("readonly: a save into a read-only directory succeeded")
            except OSError:
                pass
            intact(target, "readonly")
    caches[164].save(target)  # the next save cleans what killed saves left
    report.check(sorted(os.listdir(target))[1:] == ["notes.txt", "session.json"] and len(os.listdir(target)) == 3,
                 f"after the last save: {sorted(os.listdir(target))}")
    for fresh in [work / f"fresh-{i}" for i in range(count) if i % 3 == 2]:  # whether a killed save made it or not
        caches[164].save(fresh)
    partials = [p.name for p in work.iterdir() if ".partial-" in p.name]
    report.check(not partials, f"partial directories left after the next saves: {partials}")


def _save_expecting_oserror(cache, target) -> int:
    try:
        cache.save(target)
    except OSError:
        return 3
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# the converter


def convert_faults(work: Path, rng: random.Random, count: int, report: Report) -> None:
    from safetensors.torch import load_file
    from test_conversion import save_source, tiny_llama

    from longllama.conversion.cli import main

    llama = tiny_llama()
    src = save_source(llama, work / "src", "safetensors-sharded")
    expected = llama.state_dict()
    dst = work / "out" / "dst"
    args = [str(src), str(dst), "--no-verify", "--shard-size", "40KB", "--force"]
    assert main(args) == 0

    def intact(what: str, may_be_absent: bool = False) -> None:
        if may_be_absent and not dst.exists():
            return
        try:
            index = json.loads((dst / "model.safetensors.index.json").read_text())
            json.loads((dst / "config.json").read_text())
            tensors = {}
            for shard in set(index["weight_map"].values()):
                tensors.update(load_file(dst / shard))
            whole = tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in tensors)
        except (OSError, ValueError, KeyError) as error:
            whole = False
            what += f" ({error})"
        if not whole:
            report.lost(f"{what}: the checkpoint at {dst} is not whole")

    for i in range(count):
        first = i % 3 == 2
        if first:  # a first conversion, without --force
            shutil.rmtree(dst)
        pid = fork(lambda: main(args[:-1]) + forever(lambda: main(args))() if first else forever(lambda: main(args))())
        kill_after(pid, rng.uniform(0.0, 0.15 if first else 0.4))
        report.counts["kill"] += 1
        report.counts["mid_write"] += any(".partial-" in p.name for p in dst.parent.iterdir())
        intact(f"kill {i}", may_be_absent=first)
        if not dst.exists():
            assert main(args) == 0
    for i in range(count):
        limit = rng.randrange(0, 120_000)
        err = work / "stderr"
        code = wait(fork(lambda: main(args), fsize=limit, stderr=err))
        report.counts["fsize"] += 1
        report.check(code == 0 or (code == 2 and one_line_error(err, "error: ")),
                     f"fsize {limit}: exit {code}, stderr {err.read_text()[-300:]!r}")
        intact(f"fsize {limit}")
    with read_only(dst.parent) as possible:
        if possible:
            report.counts["readonly"] += 1
            err = work / "stderr"
            code = wait(fork(lambda: main(args), stderr=err))
            report.check(code == 2 and one_line_error(err, "error: "), f"readonly: exit {code}, {err.read_text()!r}")
            intact("readonly")
    assert main(args) == 0  # the next conversion cleans what killed ones left
    report.check(os.listdir(dst.parent) == ["dst"], f"left beside DST: {os.listdir(dst.parent)}")


# ---------------------------------------------------------------------------------------------------------------------
# training checkpoints


def train_faults(work: Path, rng: random.Random, count: int, report: Report) -> None:
    from safetensors.torch import load_file
    from test_train import make_workspace

    from longllama.train import main

    workspace = make_workspace(work, documents=60)

    def args(output: Path, steps: int) -> list[str]:
        return ["--init-config", str(workspace.config), "--tokenizer", str(workspace.tokenizer), "--data",
                str(workspace.data), "--batch-size", "4", "--pack-size", "2", "--cross-batch-range", "1", "--lr",
                "3e-3", "--steps", str(steps), "--save-every", "1", "--keep-checkpoints", "2", "--log-every", "1",
                "--output-dir", str(output), "--resume", "auto"]

    def run(output: Path, steps: int, **options) -> int:
        return wait(fork(lambda: main(args(output, steps)), **options))

    total = 2 * count + 4
    reference, output = work / "reference", work / "run"
    report.check(run(reference, total) == 0, "the uninterrupted run failed")
    report.check(run(output, 2) == 0, "the first run failed")

    def intact(what: str) -> None:
        checkpoints = sorted((output / "checkpoints").glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
        if not checkpoints:
            report.lost(f"{what}: no checkpoint left")
        for checkpoint in checkpoints:
            try:
                state = json.loads((checkpoint / "trainer_state.json").read_text())
                json.loads((checkpoint / "data-rank0.json").read_text())
                for name in ("model", "optimizer", "rng-rank0"):
                    load_file(checkpoint / f"{name}.safetensors")
                report.check(state["step"] == int(checkpoint.name.split("-")[1]), f"{what}: {checkpoint.name} step")
            except (OSError, ValueError, KeyError) as error:
                report.lost(f"{what}: {checkpoint.name} is not whole ({error})")

    steps = 2
    for i in range(count):
        steps += 2
        pid = fork(forever(lambda s=steps: main(args(output, s))))
        kill_after(pid, rng.uniform(0.3, 3.0))
        report.counts["kill"] += 1
        partial = [*(output / "checkpoints").glob("*.partial"), *(output / "checkpoints").glob("*.deleting")]
        report.counts["mid_write"] += bool(partial or list(output.glob(".model.partial-*")))
        intact(f"kill {i}")
    for i in range(count):
        limit = rng.randrange(0, 60_000)
        err = work / "stderr"
        code = run(output, steps + 1, fsize=limit, stderr=err)
        report.counts["fsize"] += 1
        report.check(code == 0 or (code == 2 and one_line_error(err, "longllama-train: error: ")),
                     f"fsize {limit}: exit {code}, stderr {err.read_text()[-300:]!r}")
        intact(f"fsize {limit}")
    with read_only(output / "checkpoints") as possible:
        if possible:
            report.counts["readonly"] += 1
            err = work / "stderr"
            code = run(output, total, stderr=err)
            report.check(code == 2 and one_line_error(err, "longllama-train: error: "), f"readonly: exit {code}")
            intact("readonly")
    # resuming after every fault ends where the uninterrupted run ends, bit for bit, and leaves nothing behind
    report.check(run(output, total) == 0, "the last resume failed")
    a, b = load_file(reference / "model" / "model.safetensors"), load_file(output / "model" / "model.safetensors")
    if not (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)):
        report.lost("the resumed run's final model differs from the uninterrupted run's")
    left = [p.name for p in (output / "checkpoints").iterdir() if not p.name.startswith("step-") or "." in p.name]
    left += [p.name for p in output.iterdir() if ".partial-" in p.name]
    report.check(not left, f"stray files after the last resume: {left}")


def main() -> None:
    kind, work, seed, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    report = Report(kind)
    work.mkdir(parents=True, exist_ok=True)
    {"session": session_faults, "convert": convert_faults, "train": train_faults}[kind](
        work, random.Random(seed), count, report
    )
    print(json.dumps({**report.counts, "problems": report.problems}))


if __name__ == "__main__":
    main()
