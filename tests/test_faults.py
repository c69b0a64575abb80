"""Faults and hostile input (issue 18, docs/reliability.md): kill -9 at random points of session saves, conversions and
training checkpoints, full disks (`RLIMIT_FSIZE`), read-only targets (`tests/faults_worker.py`, in subprocesses), and a
seeded fuzzer of `session.json`, `config.json` and `model.safetensors.index.json`.

After every fault the previous good state is whole and loadable, the error is the documented one (the API raises
`OSError` / `ValueError` / `FileNotFoundError`; the command lines print one line and exit with status 2) and the next
write leaves no stray files. The default run injects a few faults of each kind; `-m slow` sweeps more seeds. With
`LONGLLAMA_FAULTS_REPORT=FILE` the counts of the run are written to FILE (docs/reliability.md quotes them).
"""

import contextlib
import copy
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from test_conversion import save_source, tiny_llama

from longllama import LongLlamaCache
from longllama.conversion.cli import main as convert_main

WORKER = Path(__file__).parent / "faults_worker.py"
TOTALS: Counter = Counter()  # what this run injected and tried, for docs/reliability.md


@pytest.fixture(scope="module", autouse=True)
def report_totals():
    yield
    path = os.environ.get("LONGLLAMA_FAULTS_REPORT")
    if path:
        totals = Counter(json.loads(Path(path).read_text()) if Path(path).is_file() else {})
        totals.update(TOTALS)  # (not `+`, which drops the zero counts: losses 0 is the point)
        Path(path).write_text(json.dumps(dict(totals), indent=1, sort_keys=True) + "\n")
        TOTALS.clear()


# --------------------------------------------------------------------------------------------------------------------
# kill -9, full disk, read-only
# --------------------------------------------------------------------------------------------------------------------


def inject(kind: str, tmp_path: Path, seed: int, count: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, str(WORKER), kind, str(tmp_path / "work"), str(seed), str(count)],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    TOTALS.update({f"{kind}.{key}": value for key, value in report.items() if isinstance(value, int)})
    return report


def check(report: dict, count: int) -> None:
    assert report["problems"] == [] and report["losses"] == 0
    assert report["kill"] == count and report["fsize"] == count


@pytest.mark.parametrize("kind, count", [("session", 6), ("convert", 6), ("train", 2)])
def test_faults(tmp_path, kind, count):
    check(inject(kind, tmp_path, seed=0, count=count), count)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("kind, count", [("session", 40), ("convert", 40), ("train", 8)])
def test_faults_sweep(tmp_path, kind, count, seed):
    report = inject(kind, tmp_path, seed=seed, count=count)
    check(report, count)
    assert report["mid_write"] > 0  # some kills landed inside a write, not only between two


# --------------------------------------------------------------------------------------------------------------------
# a seeded JSON fuzzer
# --------------------------------------------------------------------------------------------------------------------

ODD_VALUES = [
    None, True, False, 0, -1, 1, 7, 2**63, -(2**31), 1e308, math.inf, math.nan, 0.5, "", "abc", "../x.safetensors",
    "/etc/passwd", "/dev/zero", "memory.0123456789abcdef.safetensors", [], [1, "a"], [[[]]], {}, {"a": 1},
]


def mutate(text: str, rng: random.Random) -> bytes:
    """One mutation of the JSON document `text`: of its bytes (flip, truncate, insert, delete, non-UTF-8) or of its
    structure (a value replaced by an odd one or a deep nest, a key removed or added, the whole made a list)."""
    data = text.encode()
    kind = rng.randrange(9)
    if kind == 0:
        i = rng.randrange(len(data))
        return data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]
    if kind == 1:
        return data[: rng.randrange(len(data))]
    if kind == 2:
        i = rng.randrange(len(data))
        return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8))) + data[i:]
    if kind == 3:
        i = rng.randrange(len(data))
        return data[:i] + data[i + rng.randrange(1, 40) :]
    document = json.loads(text)
    if kind == 4:
        return json.dumps(rng.choice([[document], 5, "session", None])).encode()
    container, key = random_slot(document, rng)
    if container is None:
        return b"[" * 100_000  # nesting deeper than the JSON parser recurses
    if kind in (5, 6):
        container[key] = copy.deepcopy(rng.choice(ODD_VALUES))
    elif kind == 7:
        del container[key]
    else:
        container[key] = {"nested": [container[key]] * 2, "extra": rng.choice(ODD_VALUES)}
    return json.dumps(document).encode()


def random_slot(document, rng: random.Random):
    """(container, key) of a value chosen by a random walk from the root, or (None, None) for an empty root."""
    container, key, node = None, None, document
    while isinstance(node, (dict, list)) and node and (container is None or rng.random() < 0.7):
        container = node
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        node = node[key]
    return container, key


@pytest.fixture(scope="module")
def saved_session(tmp_path_factory):
    model = tiny_model(1, mem_layers=[1, 2], mem_max_tokens=24, mem_keep_first=2)
    ids = torch.randint(3, 99, (2, 4 + 6 * 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    path = tmp_path_factory.mktemp("fuzz") / "session"
    cache.save(path)
    return model, path


def fuzz_session(saved_session, seed: int, count: int) -> Counter:
    """Load a mutated session.json `count` times: either a loaded session that answers a question, or a ValueError /
    FileNotFoundError; never another exception, and the directory is never changed by a load."""
    model, path = saved_session
    original = (path / "session.json").read_text()
    listing = sorted(os.listdir(path))
    rng, outcomes = random.Random(seed), Counter()
    question = torch.randint(3, 99, (2, 3), generator=torch.Generator().manual_seed(1))
    try:
        for _ in range(count):
            (path / "session.json").write_bytes(mutate(original, rng))
            try:
                cache = LongLlamaCache.load(path, model)
            except (ValueError, FileNotFoundError) as error:
                assert "\n" not in str(error), str(error)
                outcomes["refused"] += 1
                continue
            with torch.no_grad():
                try:
                    model(question, use_cache=True, cache=cache)
                    outcomes["loaded"] += 1
                except ValueError:  # accepted by load, refused by forward (e.g. another batch size): documented
                    outcomes["refused_by_forward"] += 1
            assert sorted(os.listdir(path)) == listing
    finally:
        (path / "session.json").write_text(original)
    TOTALS.update({"fuzz.session_json": count})
    return outcomes


def test_fuzzed_session_file(saved_session):
    outcomes = fuzz_session(saved_session, seed=0, count=150)
    assert outcomes["refused"] > 100  # most mutations break it; a few (an unused field) are harmless


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_fuzzed_session_file_sweep(saved_session, seed):
    fuzz_session(saved_session, seed=seed, count=500)


@pytest.fixture(scope="module")
def converter_source(tmp_path_factory):
    """A sharded Llama checkpoint, and beside it (outside SRC) a shard of the same names holding 7.0 everywhere: a
    conversion that reads it shows it in DST."""
    root = tmp_path_factory.mktemp("fuzz-convert")
    llama = tiny_llama()
    src = save_source(llama, root / "src", "safetensors-sharded")
    for shard in sorted(src.glob("model-*.safetensors")):
        save_file({name: torch.full_like(t, 7.0) for name, t in load_file(shard).items()}, root / "x.safetensors")
        break
    return llama, src


def fuzz_converter(converter_source, tmp_path: Path, name: str, seed: int, count: int) -> Counter:
    """Convert with a mutated `name` `count` times through the command line: exit 0 with a checkpoint of SRC's
    weights, or exit 2 with one line on stderr and nothing written; never a traceback, never a byte from outside SRC."""
    llama, src = converter_source
    original = (src / name).read_text()
    rng, outcomes = random.Random(seed), Counter()
    out = tmp_path / "out"
    out.mkdir()
    try:
        for i in range(count):
            (src / name).write_bytes(mutate(original, rng))
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = convert_main([str(src), str(out / "dst"), "--no-verify"])
            if code == 2:
                assert stderr.getvalue().startswith("error: ") and stderr.getvalue().count("\n") == 1, stderr.getvalue()
                assert os.listdir(out) == []
                outcomes["refused"] += 1
                continue
            assert code == 0, stderr.getvalue()
            for shard in (out / "dst").glob("*.safetensors"):
                assert not any(bool((t == 7.0).all()) for t in load_file(shard).values()), "read outside SRC"
            shutil.rmtree(out / "dst")
            outcomes["converted"] += 1
    finally:
        (src / name).write_text(original)
    TOTALS.update({f"fuzz.{name}": count})
    return outcomes


@pytest.mark.parametrize("name, count", [("config.json", 60), ("model.safetensors.index.json", 60)])
def test_fuzzed_converter_inputs(converter_source, tmp_path, name, count):
    assert fuzz_converter(converter_source, tmp_path, name, seed=0, count=count)["refused"] > count // 3


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_fuzzed_converter_inputs_sweep(converter_source, tmp_path, name, seed):
    fuzz_converter(converter_source, tmp_path, name, seed=seed, count=300)
