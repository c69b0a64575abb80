"""The real-text corpus builder (`longllama.corpus`): package-level held-out split, determinism, what is skipped."""

import json
import random

import pytest

from longllama.corpus import (
    HELD_OUT,
    build_documents,
    corpus_digest,
    main,
    read_corpus,
    split_documents,
    stdlib_dir,
    write_corpus,
)
from longllama.synthetic import PasskeyTask


@pytest.fixture
def library(tmp_path):
    """A small standard library: modules, packages (one held out), prose, a test directory, a non-UTF-8 file."""
    root = tmp_path / "lib"
    files = {
        "os.py": "import sys\n",
        "argparse.py": '"""Command-line parsing."""\n',
        "json/__init__.py": "from .decoder import JSONDecoder\n",
        "json/decoder.py": "class JSONDecoder:\n    pass\n",
        "asyncio/events.py": "class AbstractEventLoop:\n    pass\n",
        "asyncio/tasks.py": "def sleep(delay):\n    pass\n",
        "idlelib/NEWS.txt": "What's new in IDLE.\n",
        "idlelib/editor.py": "class EditorWindow:\n    pass\n",
        "idlelib/idle_test/test_editor.py": "import unittest\n",
        "test/test_os.py": "import unittest\n",
        "encodings/cp1252.py": "decoding_table = ()\n",
        "pydoc_data/topics.py": "topics = {'assert': 'The assert statement.\\n', 'if': 'The if statement.\\n'}\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "latin.py").write_bytes(b"# caf\xe9\n")
    return root


def test_split_is_by_package_and_disjoint(library):
    documents, manifest = build_documents(library)
    train, held_out = split_documents(documents)
    assert {d.package for d in train} & {d.package for d in held_out} == set()
    assert {d.package for d in held_out} == {"asyncio", "pydoc_data"} <= set(HELD_OUT)
    assert {d.name for d in train} == {"argparse:code", "idlelib:code", "idlelib:prose", "json:code", "os:code"}
    files = {path for d in train for path in d.files}
    assert not files & {path for d in held_out for path in d.files}
    assert not any("test" in path.split("/")[:-1] or path.startswith("encodings/") for path in files)
    assert [s["path"] for s in manifest["skipped"]] == ["latin.py"]  # not UTF-8
    json_code = next(d for d in train if d.name == "json:code")
    assert json_code.files == ("json/__init__.py", "json/decoder.py")  # sorted, each after a header line
    assert json_code.text.index("# file: json/__init__.py") < json_code.text.index("# file: json/decoder.py")
    topics = next(d for d in held_out if d.package == "pydoc_data")
    assert topics.kind == "prose" and "The assert statement." in topics.text and "topics = {" not in topics.text


def test_build_is_deterministic_and_round_trips(library, tmp_path):
    one = write_corpus(tmp_path / "one", library)
    two = write_corpus(tmp_path / "two", library)
    for split in ("train", "heldout"):
        assert one[split]["sha256"] == two[split]["sha256"]
        assert (tmp_path / "one" / f"{split}.jsonl").read_bytes() == (tmp_path / "two" / f"{split}.jsonl").read_bytes()
        assert corpus_digest(read_corpus(tmp_path / "one" / f"{split}.jsonl")) == one[split]["sha256"]
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["held_out"] == list(HELD_OUT)
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in manifest["files"])
    (library / "json" / "decoder.py").write_text("class JSONDecoder:\n    strict = True\n")
    assert write_corpus(tmp_path / "three", library)["train"]["sha256"] != one["train"]["sha256"]


def test_the_held_out_packages_exist_in_this_python():
    documents, _ = build_documents(stdlib_dir())
    train, held_out = split_documents(documents)
    assert {d.package for d in held_out} == set(HELD_OUT)
    assert not {d.package for d in train} & set(HELD_OUT)
    # long enough for benchmarks/long_context_ppl.py (64k tokens of context at about 3 characters a token)
    assert max(len(d.text) for d in held_out if d.kind == "code") > 300_000
    assert sum(len(d.text) for d in train) > 5_000_000


def test_cli_errors_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "out"), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a Python standard library" in err
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_corpus(tmp_path / "bad.jsonl")


def test_passkey_documents_with_real_haystacks():
    haystack = "\n".join(f"def function_{i}(value):\n    return value * {i}" for i in range(400))
    task = PasskeyTask(200, 400, max_keys=1, spec_share=0.0, haystacks=(haystack,))
    styles = set()
    rng = random.Random(0)
    for _ in range(60):
        document = task.document(rng)
        text, key = document["text"], document["key"]
        assert text.endswith(f"is {key}.") and f"key is {key}. Remember it." in text
        styles.add("text" if "function_" in text and "return" in text else "other")
    assert styles == {"text", "other"}
    # without haystacks the styles are those of the v1 recipe, so its documents are unchanged
    assert PasskeyTask()._styles() == ["standard", "shuffled", "varied"]


def test_haystacks_are_the_held_out_text_by_kind(library, tmp_path):
    assert main([str(tmp_path / "out"), "--root", str(library), "--haystacks"]) == 0
    code = (tmp_path / "out" / "heldout-code.txt").read_text()
    prose = (tmp_path / "out" / "heldout-prose.txt").read_text()
    assert "class AbstractEventLoop" in code and "def sleep" in code and "EditorWindow" not in code
    assert "The assert statement." in prose and "What's new in IDLE" not in prose
