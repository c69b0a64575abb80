"""Real text available offline: long documents from the Python standard library, with a package-level held-out split.

No download is possible on the machines this project trains on, so the demo model's real text (issue 20) is what
ships with every Python installation: the standard library's sources (code with docstrings and comments) and its
prose (the language reference's help topics in `pydoc_data`, IDLE's text files, the license).

A *document* is one top-level package or module of the standard library, of one kind:

- `code`: its `.py` files in sorted order, each after a header line `# file: <path relative to the library>`;
- `prose`: its `.txt` and `.rst` files, and for `pydoc_data` the help topics (`pydoc_data.topics.topics`), read
  with `ast.literal_eval`, never imported.

Directories named `test`, `tests` or `idle_test`, `site-packages`, `__pycache__`, the `encodings` package (generated codec
tables), compiled modules and files that are not UTF-8 are left out (the manifest counts the skipped files). Whole packages in `HELD_OUT` are the evaluation split and
never appear in the training split. The build is deterministic: sorted file lists, no randomness, and a manifest
with every file's size and SHA-256 and the Python version, so two builds can be compared (`corpus_digest`).

    longllama-corpus OUT                 # OUT/train.jsonl, OUT/heldout.jsonl, OUT/manifest.json
    longllama-corpus OUT --haystacks     # and OUT/heldout-code.txt, OUT/heldout-prose.txt
    python -m longllama.corpus OUT       # the same without the console script

The haystack files are the held-out documents of each kind, one after another, as plain text: long real text the
model never saw, for `longllama-passkey --filler FILE`.
"""

import argparse
import ast
import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_write_text

# The evaluation split: whole packages, never trained on. Code: asyncio, email, tomllib, xml (1.2 MB of code, the
# long held-out documents of benchmarks/long_context_ppl.py); prose: pydoc_data (the language reference's help
# topics, 0.7 MB of English, the held-out prose haystack of the passkey evaluation).
HELD_OUT = ("asyncio", "email", "pydoc_data", "tomllib", "xml")
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib-dynload", "ensurepip"}
# codec tables (1.4 MB of generated hex maps): data, not text
SKIP_PACKAGES = {"encodings"}
PROSE_SUFFIXES = (".txt", ".rst")


@dataclass(frozen=True)
class Document:
    """One package or module of one kind: `name` is `<package>:<kind>`; `files` the library-relative paths read."""

    package: str
    kind: str  # "code" or "prose"
    files: tuple[str, ...]
    text: str

    @property
    def name(self) -> str:
        return f"{self.package}:{self.kind}"

    def record(self) -> dict:
        return {"name": self.name, "package": self.package, "kind": self.kind, "files": list(self.files),
                "text": self.text}


def stdlib_dir() -> Path:
    """The running Python's standard library directory (`Lib/` of a source tree)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _package_of(relative: Path) -> str:
    """`asyncio/events.py` -> asyncio; `argparse.py` -> argparse; `LICENSE.txt` -> LICENSE."""
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def library_files(root: Path) -> list[Path]:
    """The library's `.py`, `.txt` and `.rst` files (relative to `root`), sorted, without the skipped directories."""
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("config-") for part in relative.parts[:-1]):
            continue
        if _package_of(relative) in SKIP_PACKAGES:
            continue
        if path.suffix in (".py", *PROSE_SUFFIXES) and path.is_file() and not path.is_symlink():
            found.append(relative)
    return sorted(found, key=lambda p: p.as_posix())


def _pydoc_topics(source: str) -> str:
    """The help topics of `pydoc_data/topics.py` as prose, one topic after another, without importing the module."""
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return "\n\n".join(f"{name}\n{'=' * len(name)}\n\n{text.strip()}" for name, text in sorted(topics.items()))
    raise ValueError("pydoc_data/topics.py has no `topics = {...}` assignment.")


def build_documents(root: Path | None = None) -> tuple[list[Document], dict]:
    """Every document of the library at `root` (default: the running Python's) and the manifest: per file its size,
    SHA-256, package, kind and whether it was used; the skipped files with the reason."""
    root = Path(root) if root is not None else stdlib_dir()
    if not (root / "os.py").is_file():
        raise ValueError(f"{root} is not a Python standard library directory (no os.py there).")
    parts: dict[tuple[str, str], list[tuple[str, str]]] = {}
    files, skipped = [], []
    for relative in library_files(root):
        data = (root / relative).read_bytes()
        entry = {"path": relative.as_posix(), "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append({**entry, "reason": "not UTF-8"})
            continue
        package = _package_of(relative)
        if relative.as_posix() == "pydoc_data/topics.py":
            kind, text = "prose", _pydoc_topics(text)
        else:
            kind = "code" if relative.suffix == ".py" else "prose"
        if not text.strip():
            skipped.append({**entry, "reason": "empty"})
            continue
        files.append({**entry, "package": package, "kind": kind})
        header = f"# file: {relative.as_posix()}\n" if kind == "code" else f"{relative.as_posix()}\n\n"
        parts.setdefault((package, kind), []).append((relative.as_posix(), header + text.rstrip() + "\n"))
    documents = [
        Document(package, kind, tuple(path for path, _ in chunks), "\n".join(text for _, text in chunks))
        for (package, kind), chunks in sorted(parts.items())
    ]
    manifest = {
        "python": sys.version.split()[0], "root": str(root), "held_out": list(HELD_OUT), "files": files,
        "skipped": skipped,
    }
    return documents, manifest


def split_documents(documents: list[Document]) -> tuple[list[Document], list[Document]]:
    """(training documents, held-out documents): a document is held out when its package is in `HELD_OUT`."""
    train = [d for d in documents if d.package not in HELD_OUT]
    held_out = [d for d in documents if d.package in HELD_OUT]
    return train, held_out


def corpus_digest(documents: list[Document]) -> str:
    """SHA-256 over the documents' names and texts, in order: equal digests, equal corpora."""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(document.name.encode() + b"\0" + document.text.encode() + b"\0")
    return digest.hexdigest()


def write_corpus(out: Path, root: Path | None = None) -> dict:
    """Write `out/train.jsonl`, `out/heldout.jsonl` (one document per line: name, package, kind, files, text) and
    `out/manifest.json` (the file list, sizes, hashes, split and per-split digests). Returns the manifest."""
    documents, manifest = build_documents(root)
    train, held_out = split_documents(documents)
    out.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("heldout", held_out)):
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(d.record()) + "\n" for d in split))
        manifest[name] = {
            "documents": len(split), "characters": sum(len(d.text) for d in split),
            "packages": sorted({d.package for d in split}), "sha256": corpus_digest(split),
        }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def write_haystacks(out: Path, held_out: list[Document]) -> list[Path]:
    """`out/heldout-<kind>.txt` for each kind: the held-out documents of that kind joined by blank lines."""
    paths = []
    for kind in sorted({d.kind for d in held_out}):
        paths.append(out / f"heldout-{kind}.txt")
        atomic_write_text(paths[-1], "\n\n".join(d.text for d in held_out if d.kind == kind))
    return paths


def read_corpus(path: Path) -> list[Document]:
    """The documents of a `train.jsonl` / `heldout.jsonl` written by `write_corpus`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Corpus file {path} does not exist: build it with longllama-corpus DIR.")
    documents = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                documents.append(Document(record["package"], record["kind"], tuple(record["files"]), record["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number} is not a corpus document: {error}") from None
    return documents


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longllama-corpus",
        description="Build the real-text corpus from the Python standard library: one document per package and kind "
        f"(code, prose), with the packages {', '.join(HELD_OUT)} held out for evaluation.",
    )
    parser.add_argument("out", type=Path, help="output directory (train.jsonl, heldout.jsonl, manifest.json)")
    parser.add_argument("--root", type=Path, help="standard library directory (default: this Python's)")
    parser.add_argument("--haystacks", action="store_true", help="also write the held-out text of each kind as "
                        "OUT/heldout-code.txt and OUT/heldout-prose.txt (passkey haystacks: longllama-passkey --filler)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = write_corpus(args.out, args.root)
        haystacks = write_haystacks(args.out, read_corpus(args.out / "heldout.jsonl")) if args.haystacks else []
    except (ValueError, OSError) as error:
        print(f"longllama-corpus: error: {error}", file=sys.stderr)
        return 2
    for name in ("train", "heldout"):
        split = manifest[name]
        print(f"{name}: {split['documents']} documents, {split['characters']:,} characters, sha256 "
              f"{split['sha256'][:16]}")
    print(f"skipped {len(manifest['skipped'])} files; manifest in {args.out / 'manifest.json'}")
    for path in haystacks:
        print(f"haystack: {path} ({path.stat().st_size:,} bytes)")
    return 0


__all__ = ["HELD_OUT", "Document", "build_documents", "corpus_digest", "read_corpus", "split_documents",
           "stdlib_dir", "write_corpus", "write_haystacks"]


if __name__ == "__main__":
    sys.exit(main())
