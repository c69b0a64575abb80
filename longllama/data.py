"""Training data for FoT: documents in, crossbatch-ready batches out, resumable exactly.

Two layouts, both made of packs of k consecutive rows of one window each (`window` tokens):

- **k-packing** (`PackedBatches`, FoT pre-training): every pack is pinned to a document stream. Documents are
  tokenized as `<bos> text <eos>` and concatenated (so documents are separated by `<eos><bos>`, no padding), and at
  every step each pack takes the next `k * window` tokens of its stream: row i of the pack holds the i-th segment.
  Streams continue across steps.
- **memory fine-tuning** (`MemoryFineTuningBatches`, how the published instruct models were tuned): every pack holds
  one example, padded on the left by a random amount, so that a random part of it lands in the earlier rows (which
  the last rows see through memory, with gradients) and the rest in the last rows.

Every batch is a dict of `input_ids [B, window]`, `attention_mask [B, window]`, `targets [B, window]` (the next
token, already shifted; -100 where there is none) and `cross_batch_rows [B, R]` (`longllama.crossbatch`).
`state_dict()` / `load_state_dict()` capture the exact position, so a resumed run neither repeats nor skips data.

Documents come from `.txt` files (one document per file), `.jsonl` files (one JSON object per line, text in
`text_field`), directories of those, or any iterable of strings or dicts (e.g. a `datasets.Dataset`). With several
processes, document j goes to process `j % world_size`.
"""

import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from .crossbatch import cross_batch_ranges, cross_batch_rows

IGNORE_INDEX = -100
DATA_SUFFIXES = (".txt", ".jsonl")


# ---------------------------------------------------------------------------------------------------------------------
# Documents


def resolve_data_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories and check every file before any compute starts: it exists, is readable, is not empty and
    (for `.jsonl`) starts with a JSON object. Raises `ValueError` naming the file."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
            if not found:
                raise ValueError(f"Data directory {path} has no .txt or .jsonl files.")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in DATA_SUFFIXES:
                raise ValueError(f"Data file {path}: use .txt (one document per file) or .jsonl (one per line).")
            files.append(path)
        else:
            raise ValueError(f"Data file {path} does not exist.")
    if not files:
        raise ValueError("No data files given.")
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                head = f.readline()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"Data file {path} cannot be read as UTF-8 text: {error}") from error
        if not head.strip():
            raise ValueError(f"Data file {path} is empty (or starts with a blank line).")
        if path.suffix == ".jsonl":
            try:
                first = json.loads(head)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:1 is not a JSON object: {error}") from error
            if not isinstance(first, dict):
                raise ValueError(
                    f"{path}:1 is JSON but not an object: each line must be an object like {{\"text\": ...}}."
                )
    return files


class DocumentSource:
    """A restartable sequence of document texts: files (see `resolve_data_files`) or an in-memory iterable.

    Iterating yields the texts in a fixed order; `iter_from` shards them and skips cheaply (no parsing).
    """

    def __init__(self, documents=None, *, files=None, text_field: str = "text"):
        """Pass `files` (paths of .txt / .jsonl files or directories) or `documents` (strings or dicts with
        `text_field`, e.g. a `datasets.Dataset`)."""
        if (files is None) == (documents is None):
            raise ValueError("Pass either files or documents.")
        if isinstance(documents, str):
            raise ValueError("documents must be a sequence of texts (or dicts), not one string.")
        self.text_field = text_field
        self.files = None
        if files is not None:
            self.files = resolve_data_files([files] if isinstance(files, (str, Path)) else files)
        else:
            self.items = documents if hasattr(documents, "__getitem__") else list(documents)
            if len(self.items) == 0:
                raise ValueError("The dataset has no documents.")

    def __iter__(self) -> Iterator[str]:
        return self.iter_from(0)

    def iter_from(self, skip: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[str]:
        """The texts of documents `rank, rank + world_size, ...` after the first `skip` of those (skipped documents
        are not parsed)."""
        for j, (where, kind, payload) in enumerate(self._raw()):
            if j % world_size == rank and j // world_size >= skip:
                yield self._text(where, kind, payload)

    def _raw(self):
        """(where, kind, payload): kind "text" (a .txt file), "json" (a .jsonl line) or "item" (in-memory)."""
        if self.files is None:
            for i, item in enumerate(self.items):
                yield f"document {i}", "item", item
            return
        for path in self.files:
            try:
                if path.suffix == ".txt":
                    yield str(path), "text", path.read_text(encoding="utf-8")
                    continue
                with open(path, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        if line.strip():
                            yield f"{path}:{number}", "json", line
            except UnicodeDecodeError as error:
                raise ValueError(f"Data file {path} is not valid UTF-8 text: {error}") from error

    def _text(self, where: str, kind: str, item) -> str:
        if kind == "json":
            try:
                item = json.loads(item)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON: {error}") from error
        if isinstance(item, dict):
            if self.text_field not in item:
                raise ValueError(f"{where} has no field {self.text_field!r} (set text_field); fields: {sorted(item)}")
            item = item[self.text_field]
        if not isinstance(item, str):
            raise ValueError(f"{where}: expected text, got {type(item).__name__}.")
        return item


def load_tokenizer(path: str | Path):
    """The tokenizer of a checkpoint or tokenizer directory. A sentencepiece `tokenizer.model` is read with
    `LongLlamaTokenizer` (sentencepiece's exact ids, as the published code used; transformers 5's converted
    `LlamaTokenizer` differs on runs of spaces, and a saved `LongLlamaTokenizer` would otherwise need
    `trust_remote_code`); anything else with `AutoTokenizer`."""
    from transformers import AutoTokenizer

    from .modeling import LongLlamaTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"Tokenizer directory {path} does not exist.")
    if (path / "tokenizer.model").is_file():
        return LongLlamaTokenizer.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def encode_document(tokenizer, text: str) -> list[int]:
    """`<bos> text <eos>` as token ids: how every document is fed, so documents are separated by `<eos><bos>`."""
    return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


class TokenStream:
    """The token ids of this process's documents, `<bos> text <eos>` each, cycling over epochs.

    State: epoch, documents and tokens consumed in this epoch; documents are assigned to processes round-robin.
    An epoch of fewer than `min_epoch_tokens` tokens is an error (one batch would repeat documents).
    """

    def __init__(self, source: DocumentSource, tokenizer, rank: int = 0, world_size: int = 1):
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer needs bos and eos tokens: documents are separated by <eos><bos>.")
        self.source, self.tokenizer = source, tokenizer
        self.rank, self.world_size = rank, world_size
        self.epoch, self.consumed, self.tokens = 0, 0, 0
        self.min_epoch_tokens = 0
        self._iterator = None

    def next_document(self) -> list[int]:
        if self._iterator is None:
            self._iterator = self._documents(self.consumed)
        text = next(self._iterator, None)
        if text is None:  # end of the epoch: start the next one
            if self.tokens < max(self.min_epoch_tokens, 1):
                raise ValueError(
                    f"Process {self.rank} of {self.world_size} has {self.consumed} documents of {self.tokens} tokens "
                    f"in all, fewer than one batch pack needs ({self.min_epoch_tokens}): add data, or use a smaller "
                    "window, pack_size or batch."
                )
            self.epoch, self.consumed, self.tokens = self.epoch + 1, 0, 0
            self._iterator = self._documents(0)
            text = next(self._iterator)
        self.consumed += 1
        ids = encode_document(self.tokenizer, text)
        self.tokens += len(ids)
        return ids

    def _documents(self, skip: int) -> Iterator[str]:
        return self.source.iter_from(skip, self.rank, self.world_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed, self.tokens = state["epoch"], state["consumed"], state["tokens"]
        self._iterator = None


# ---------------------------------------------------------------------------------------------------------------------
# Batches


def _check_layout(batch_size: int, pack_size: int, window: int, cross_batch_range: int) -> None:
    if window < 2:
        raise ValueError(f"window={window} must be at least 2 tokens.")
    if batch_size % pack_size != 0:
        raise ValueError(f"batch_size={batch_size} must be a multiple of pack_size={pack_size}.")
    cross_batch_ranges(batch_size, cross_batch_range, pack_size)  # validates d against the batch


class PackedBatches:
    """FoT k-packing: `batch_size // pack_size` document streams, each feeding `pack_size` consecutive rows.

    Args:
        stream: this process's `TokenStream`.
        batch_size: rows per batch (per process and micro-batch); a multiple of `pack_size`.
        window: tokens per row (at most the model's window, `max_position_embeddings`).
        pack_size: k. cross_batch_range: d. stepping, positives_only: see `cross_batch_ranges`.
    """

    def __init__(self, stream: TokenStream, batch_size: int, window: int, pack_size: int = 1,
                 cross_batch_range: int = 0, stepping: bool | None = None, positives_only: bool = False):
        self.stream, self.batch_size, self.window, self.pack_size = stream, batch_size, window, pack_size
        self.stepping, self.positives_only = stepping, positives_only
        self.cross_batch_range = None
        self.set_cross_batch_range(cross_batch_range)  # checks the layout
        self.buffers: list[list[int]] = [[] for _ in range(batch_size // pack_size)]
        stream.min_epoch_tokens = pack_size * window + 1

    def set_cross_batch_range(self, cross_batch_range: int) -> None:
        """A new d (a scheduled one) for the batches from now on: only which rows each row's memory sees changes,
        not the documents or their place in the batch."""
        if cross_batch_range != self.cross_batch_range:
            _check_layout(self.batch_size, self.pack_size, self.window, cross_batch_range)
            self.rows = cross_batch_rows(cross_batch_ranges(
                self.batch_size, cross_batch_range, self.pack_size, self.stepping, self.positives_only
            ))
            self.cross_batch_range = cross_batch_range

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        chunk = self.pack_size * self.window
        packs = []
        for buffer in self.buffers:
            while len(buffer) < chunk + 1:  # +1: the target of the last token
                buffer.extend(self.stream.next_document())
            packs.append(buffer[: chunk + 1])
            del buffer[:chunk]
        tokens = torch.tensor(packs, dtype=torch.long)  # [packs, k * window + 1]
        input_ids = tokens[:, :-1].reshape(self.batch_size, self.window)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "targets": tokens[:, 1:].reshape(self.batch_size, self.window),
            "cross_batch_rows": self.rows,
        }

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "buffers": [list(b) for b in self.buffers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["buffers"]) != len(self.buffers):
            raise ValueError(
                f"The saved data position has {len(state['buffers'])} document streams, this run has "
                f"{len(self.buffers)}: resume with the same batch_size and pack_size."
            )
        self.stream.load_state_dict(state["stream"])
        self.buffers = [list(b) for b in state["buffers"]]


class MemoryFineTuningBatches:
    """Memory fine-tuning: each pack of `pack_size` rows holds one example of at most `pack_size * window` tokens,
    left-padded by a random amount; row i sees the earlier rows of its pack (no negatives). Longer examples keep
    their last `pack_size * window` tokens (`truncated` counts them).

    With `cross_batch_range` d (at least `pack_size - 1`) rows also see rows of earlier packs, which hold other
    examples (negatives), by the FoT stepping rule (`cross_batch_ranges`); every row still sees all earlier rows of
    its own pack, so an example's question can always reach its answer, wherever the padding put it."""

    def __init__(self, stream: TokenStream, batch_size: int, window: int, pack_size: int, seed: int = 0,
                 pad_token_id: int = 0, cross_batch_range: int | None = None):
        _check_layout(batch_size, pack_size, window, pack_size - 1)
        self.stream, self.batch_size, self.window, self.pack_size = stream, batch_size, window, pack_size
        self.pad_token_id = pad_token_id
        self.cross_batch_range = None
        self.set_cross_batch_range(cross_batch_range)
        self.rng = random.Random(seed)
        self.truncated = 0

    def set_cross_batch_range(self, cross_batch_range: int | None) -> None:
        """d for the batches from now on (None: positives only, the earlier rows of the pack)."""
        if cross_batch_range is None:
            self.rows = cross_batch_rows(cross_batch_ranges(
                self.batch_size, self.pack_size - 1, self.pack_size, positives_only=True))
        elif cross_batch_range != self.cross_batch_range:
            if cross_batch_range < self.pack_size - 1:
                raise ValueError(
                    f"cross_batch_range={cross_batch_range} with negatives must be at least pack_size - 1 = "
                    f"{self.pack_size - 1}, so that every row sees all earlier rows of its own example."
                )
            _check_layout(self.batch_size, self.pack_size, self.window, cross_batch_range)
            self.rows = cross_batch_rows(cross_batch_ranges(self.batch_size, cross_batch_range, self.pack_size))
        self.cross_batch_range = cross_batch_range

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        length = self.pack_size * self.window
        packs = self.batch_size // self.pack_size
        input_ids = torch.full((packs, length), self.pad_token_id, dtype=torch.long)
        targets = torch.full((packs, length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(packs, length, dtype=torch.long)
        for p in range(packs):
            example = self.stream.next_document()
            if len(example) > length:
                example, self.truncated = example[-length:], self.truncated + 1
            n = len(example)
            left = self.rng.randint(0, length - n)
            input_ids[p, left : left + n] = torch.tensor(example)
            targets[p, left : left + n - 1] = torch.tensor(example[1:])
            mask[p, left : left + n] = 1
        shape = (self.batch_size, self.window)
        return {
            "input_ids": input_ids.reshape(shape),
            "attention_mask": mask.reshape(shape),
            "targets": targets.reshape(shape),
            "cross_batch_rows": self.rows,
        }

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "rng": self.rng.getstate(), "truncated": self.truncated}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        rng = state["rng"]
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))  # JSON turns the tuple into a list
        self.truncated = state["truncated"]


__all__ = [
    "DocumentSource",
    "IGNORE_INDEX",
    "MemoryFineTuningBatches",
    "PackedBatches",
    "TokenStream",
    "encode_document",
    "resolve_data_files",
]
