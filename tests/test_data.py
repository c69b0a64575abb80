"""Training data for FoT (`longllama.data`, docs/training.md#crossbatch-rules): k-packed document streams, memory
fine-tuning packs, exact resume, sharding, document sources and their error messages; plus the synthetic `FactsTask`.

Every test uses the whitespace word-level tokenizer of `longllama.synthetic` over the words w0..w299: `<s>` = 1,
`</s>` = 2, `<pad>` = 3, and word `wN` has id N + 4, so expected token ids can be written by hand.
"""

import json
import random
import re

import pytest
import torch

from longllama.crossbatch import cross_batch_ranges, cross_batch_rows
from longllama.data import (
    IGNORE_INDEX,
    DocumentSource,
    MemoryFineTuningBatches,
    PackedBatches,
    TokenStream,
    resolve_data_files,
)
from longllama.synthetic import CopyTask, FactsTask, PasskeyTask, word_tokenizer

BOS, EOS, PAD = 1, 2, 3
WORDS = 300


@pytest.fixture(scope="module")
def tok():
    tokenizer = word_tokenizer([f"w{i}" for i in range(WORDS)])
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, PAD)
    assert tokenizer("w0 w7", add_special_tokens=False)["input_ids"] == [4, 11]
    return tokenizer


def text(words: list[int]) -> str:
    return " ".join(f"w{w}" for w in words)


def ids(words: list[int]) -> list[int]:
    """The token ids of a document made of these words: `<bos> ... <eos>`."""
    return [BOS, *(w + 4 for w in words), EOS]


def marked_documents(lengths: list[int]) -> list[list[int]]:
    """Document j (as word lists): the marker word w{j}, then w200, w201, ... (distinct positions are visible)."""
    return [[j] + [200 + i for i in range(n - 1)] for j, n in enumerate(lengths)]


def packed(documents, tok, batch_size, window, pack_size, cross_batch_range=0, rank=0, world_size=1, **kwargs):
    source = DocumentSource(documents) if isinstance(documents, list) else documents
    stream = TokenStream(source, tok, rank, world_size)
    return PackedBatches(stream, batch_size, window, pack_size, cross_batch_range, **kwargs)


def memory(documents, tok, batch_size, window, pack_size, seed=0, rank=0, world_size=1, cross_batch_range=None):
    source = DocumentSource(documents) if isinstance(documents, list) else documents
    stream = TokenStream(source, tok, rank, world_size)
    return MemoryFineTuningBatches(stream, batch_size, window, pack_size, seed=seed, pad_token_id=PAD,
                                   cross_batch_range=cross_batch_range)


def take(batches, n: int) -> list[dict]:
    return [next(batches) for _ in range(n)]


def split_documents(stream: list[int]) -> list[list[int]]:
    """Cut a token stream at every `<bos>`: the pieces are documents (the last one possibly cut short)."""
    starts = [i for i, t in enumerate(stream) if t == BOS]
    assert starts and starts[0] == 0, "a stream must start with <bos>"
    return [stream[a:b] for a, b in zip(starts, starts[1:] + [len(stream)])]


def assert_same_batches(actual: list[dict], expected: list[dict]):
    assert len(actual) == len(expected)
    for n, (a, e) in enumerate(zip(actual, expected)):
        assert a.keys() == e.keys()
        for key in e:
            assert torch.equal(a[key], e[key]), f"batch {n}, {key} differs"


# =========================================================================== k-packing


def test_k_packing_exact_batches_by_hand(tok):
    """window 4, k=2, 4 rows (2 packs), chunk 8 tokens (+1 for the last target).

    Document lengths in words 5, 3, 10, 2, 6, 1, 7, 4 (tokens: +2). Pack 0 fills first: D0 (7 tokens) + D1 (5) >= 9;
    pack 1: D2 (12). Step 2: pack 0 holds 4 leftover tokens + D3 (4) + D4 (8); pack 1: 4 leftover + D5 (3) + D6 (9).
    """
    words = marked_documents([5, 3, 10, 2, 6, 1, 7, 4])
    docs = [ids(w) for w in words]
    batches = packed([text(w) for w in words], tok, batch_size=4, window=4, pack_size=2)
    s0 = docs[0] + docs[1] + docs[3] + docs[4]
    s1 = docs[2] + docs[5] + docs[6]
    # literal first rows: <bos> w0 w200 w201 | w202 w203 <eos> <bos> (ids: word + 4)
    first = next(batches)
    assert first["input_ids"][0].tolist() == [BOS, 4, 204, 205]
    assert first["input_ids"][1].tolist() == [206, 207, EOS, BOS]
    assert first["targets"][0].tolist() == [4, 204, 205, 206]
    assert first["targets"][1].tolist() == [207, EOS, BOS, 5]  # the next token after the row: D1's first word
    assert first["input_ids"][2].tolist() == [BOS, 6, 204, 205]
    second = next(batches)
    for n, batch in enumerate([first, second]):
        for p, stream in enumerate([s0, s1]):
            for i in range(2):
                start = (n * 2 + i) * 4
                assert batch["input_ids"][p * 2 + i].tolist() == stream[start : start + 4], (n, p, i)
                assert batch["targets"][p * 2 + i].tolist() == stream[start + 1 : start + 5], (n, p, i)
    assert second["input_ids"][0].tolist() == [5, 204, 205, EOS]  # pack 0 continues where step 1 stopped (in D1)
    assert second["input_ids"][2].tolist() == [210, 211, 212, EOS]  # pack 1: the rest of D2, then D5
    assert second["input_ids"][3].tolist() == [BOS, 9, EOS, BOS]


@pytest.mark.parametrize("pack_size,batch_size,d,window", [(1, 3, 2, 5), (2, 6, 3, 4), (3, 6, 5, 3), (4, 8, 3, 6)])
def test_k_packing_layout_and_streams(tok, pack_size, batch_size, d, window):
    """Random document lengths: every batch is the next chunk of each pack's stream, the streams are made of whole
    documents in order, every document lands in exactly one pack, no padding anywhere."""
    rng = random.Random(pack_size * 100 + batch_size)
    lengths = [rng.randint(1, 3 * window) for _ in range(120)]
    words = marked_documents(lengths)
    docs = [ids(w) for w in words]
    batches = packed([text(w) for w in words], tok, batch_size, window, pack_size, d)
    steps = 12
    out = take(batches, steps)
    assert batches.stream.epoch == 0, "the test must stay within one epoch"
    packs = batch_size // pack_size
    expected_rows = cross_batch_rows(cross_batch_ranges(batch_size, d, pack_size))
    streams = [[] for _ in range(packs)]
    for n, batch in enumerate(out):
        assert set(batch) == {"input_ids", "attention_mask", "targets", "cross_batch_rows"}
        assert batch["input_ids"].shape == batch["targets"].shape == (batch_size, window)
        assert batch["input_ids"].dtype == torch.long
        assert torch.equal(batch["attention_mask"], torch.ones(batch_size, window, dtype=torch.long))
        assert torch.equal(batch["cross_batch_rows"], expected_rows)
        assert not (batch["input_ids"] == PAD).any() and not (batch["targets"] == IGNORE_INDEX).any()
        flat_inputs = batch["input_ids"].view(packs, pack_size * window)
        flat_targets = batch["targets"].view(packs, pack_size * window)
        # targets are the next tokens, also across row boundaries inside a pack
        assert torch.equal(flat_targets[:, :-1], flat_inputs[:, 1:])
        if n > 0:  # the last target of the previous step is this step's first input of the pack
            previous = out[n - 1]["targets"].view(packs, pack_size * window)
            assert torch.equal(flat_inputs[:, 0], previous[:, -1])
        for p in range(packs):
            streams[p] += flat_inputs[p].tolist()
    for p in range(packs):  # the last target: a document whose <bos> is only a target so far
        streams[p].append(out[-1]["targets"][p * pack_size + pack_size - 1, -1].item())
    seen, lone = [], 0
    for p, stream in enumerate(streams):
        pieces = split_documents(stream)
        for piece in pieces[:-1]:
            j = piece[1] - 4  # the marker word: document j
            assert piece == docs[j], f"pack {p}: document {j} is not whole"
            seen.append(j)
        if len(pieces[-1]) > 1:
            j = pieces[-1][1] - 4
            assert pieces[-1] == docs[j][: len(pieces[-1])]
            seen.append(j)
        else:  # only the <bos> of the pack's next document so far (the last target)
            lone += 1
        # a pack's documents come in stream order
        mine = [piece[1] - 4 for piece in pieces if len(piece) > 1]
        assert mine == sorted(mine)
    # every document consumed so far went to exactly one pack; none skipped
    assert len(set(seen)) == len(seen)
    assert set(seen) <= set(range(batches.stream.consumed))
    assert len(seen) + lone == batches.stream.consumed
    assert len(seen) >= packs * 2


def test_k_packing_reproduces_each_packs_documents(tok):
    """Concatenating the inputs of a pack over steps (plus the last target) gives exactly the concatenation of that
    pack's documents, and the packs share no document."""
    words = marked_documents([3, 9, 1, 14, 6, 2, 8, 5, 11, 4, 7, 3, 2, 9, 6, 1, 12, 5, 2, 2, 3, 8, 1, 4])
    docs = [ids(w) for w in words]
    batches = packed([text(w) for w in words], tok, batch_size=6, window=5, pack_size=2, cross_batch_range=1)
    out = take(batches, 4)
    assert batches.stream.epoch == 0
    owners = {}
    for p in range(3):
        stream = []
        for batch in out:
            stream += batch["input_ids"][2 * p : 2 * p + 2].flatten().tolist()
        stream.append(out[-1]["targets"][2 * p + 1, -1].item())
        mine = [piece[1] - 4 for piece in split_documents(stream) if len(piece) > 1]
        for j in mine:
            assert j not in owners, f"document {j} in packs {owners[j]} and {p}"
            owners[j] = p
        expected = [t for j in mine for t in docs[j]]
        assert stream[: len(expected)] == expected[: len(stream)]
        assert len(expected) >= len(stream) - 1  # at most a lone <bos> of the next document
    assert sorted(owners) == list(range(len(owners)))


def test_k_packing_stepping_and_positives_only_rows(tok):
    batches = packed([text([1] * 50)], tok, 8, 4, 4, 6)
    assert torch.equal(next(batches)["cross_batch_rows"], cross_batch_rows(torch.tensor([0, 1, 2, 3, 0, 3, 6, 6])))
    batches = packed([text([1] * 50)], tok, 8, 4, 4, 2, stepping=False)
    assert torch.equal(next(batches)["cross_batch_rows"], cross_batch_rows(torch.tensor([0, 1, 2, 2, 2, 2, 2, 2])))
    batches = packed([text([1] * 50)], tok, 8, 4, 4, 6, positives_only=True)
    assert torch.equal(next(batches)["cross_batch_rows"], cross_batch_rows(torch.tensor([0, 1, 2, 3] * 2)))
    batches = packed([text([1] * 50)], tok, 4, 4, 2, 0)
    assert next(batches)["cross_batch_rows"].shape == (4, 0)


def test_k_packing_cycles_over_epochs(tok):
    """A small dataset is read again: the stream continues into epoch 1 with the same documents in the same order."""
    words = marked_documents([4, 6, 3, 5])
    docs = [ids(w) for w in words]
    batches = packed([text(w) for w in words], tok, batch_size=2, window=3, pack_size=2)
    stream = []
    for batch in take(batches, 8):
        stream += batch["input_ids"].flatten().tolist()
    assert batches.stream.epoch >= 1
    cycle = [t for d in docs for t in d]
    assert stream == (cycle * 3)[: len(stream)]


# =========================================================================== exact resume


def _resume_case(make, steps: int, cut: int):
    """Batches `cut..steps` of an uninterrupted run, and of a new object resumed from a JSON round trip of the state
    after `cut` batches."""
    full = make()
    expected = take(full, steps)[cut:]
    first = make()
    take(first, cut)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    return expected, take(resumed, steps - cut), full, first


@pytest.mark.parametrize("cut", [0, 1, 3, 5, 6, 12])
def test_packed_exact_resume_across_epochs(tok, cut):
    words = marked_documents([7, 2, 11, 5, 3, 9, 4, 1, 6])  # 66 tokens: an epoch lasts ~5.5 steps of 12 tokens

    def make():
        return packed([text(w) for w in words], tok, batch_size=4, window=3, pack_size=2, cross_batch_range=2)

    expected, actual, full, first = _resume_case(make, 14, cut)
    assert full.stream.epoch >= 2, "the run must cross epoch boundaries"
    assert_same_batches(actual, expected)


def test_packed_exact_resume_from_files_and_shards(tok, tmp_path):
    """Resume with a file source (documents skipped by position, not re-read into the buffers) and 2 processes."""
    words = marked_documents([5, 9, 2, 7, 3, 12, 4, 6, 8, 1, 10])
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": text(w), "id": j}) + "\n" for j, w in enumerate(words)))
    for rank in range(2):

        def make():
            source = DocumentSource(files=[data])
            return packed(source, tok, batch_size=2, window=4, pack_size=2, rank=rank, world_size=2)

        for cut in (2, 5):
            expected, actual, full, first = _resume_case(make, 9, cut)
            assert full.stream.epoch >= 1
            assert_same_batches(actual, expected)


def test_packed_state_mismatch_is_an_error(tok):
    batches = packed([text([1] * 40)], tok, 4, 3, 2)
    next(batches)
    state = json.loads(json.dumps(batches.state_dict()))
    other = packed([text([1] * 40)], tok, 4, 3, 1)
    with pytest.raises(ValueError, match="batch_size and pack_size"):
        other.load_state_dict(state)


@pytest.mark.parametrize("cut", [0, 2, 7])
def test_memory_exact_resume_across_epochs(tok, cut):
    words = marked_documents([3, 20, 9, 5, 14, 2, 7])  # 20 words (22 tokens): truncated to 16 tokens

    def make():
        return memory([text(w) for w in words], tok, batch_size=4, window=4, pack_size=4, seed=5)

    expected, actual, full, first = _resume_case(make, 12, cut)
    assert full.stream.epoch >= 1
    assert_same_batches(actual, expected)
    # the truncation counter is part of the state
    assert first.truncated > 0 or cut == 0
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.truncated == first.truncated


# =========================================================================== sharding


@pytest.mark.parametrize("count", [7, 8])
def test_sharding_two_ranks_cover_each_epoch_once(tok, count):
    words = marked_documents([3 + j % 4 for j in range(count)])
    docs = [ids(w) for w in words]
    per_rank = []
    for rank in range(2):
        stream = TokenStream(DocumentSource([text(w) for w in words]), tok, rank=rank, world_size=2)
        epochs = {0: [], 1: []}
        while True:
            document = stream.next_document()
            if stream.epoch > 1:
                break
            epochs[stream.epoch].append(document)
        assert epochs[0] == epochs[1], "every epoch reads the same documents in the same order"
        per_rank.append(epochs[0])
    assert len(per_rank[0]) == (count + 1) // 2 and len(per_rank[1]) == count // 2
    together = per_rank[0] + per_rank[1]
    assert sorted(together) == sorted(docs)  # every document once, no overlap
    assert per_rank[0] == docs[0::2] and per_rank[1] == docs[1::2]


def test_sharding_files_and_batches(tok, tmp_path):
    """The same with .txt files and whole PackedBatches: the two ranks' streams partition the documents."""
    words = marked_documents([4, 7, 2, 9, 5, 3])
    for j, w in enumerate(words):
        (tmp_path / f"doc{j}.txt").write_text(text(w) + "\n")
    seen = []
    for rank in range(2):
        batches = packed(DocumentSource(files=tmp_path), tok, 2, 4, 2, rank=rank, world_size=2)
        stream = []
        while batches.stream.epoch == 0:
            stream += next(batches)["input_ids"].flatten().tolist()
        ranks_docs = {piece[1] - 4 for piece in split_documents(stream) if len(piece) > 1}
        seen.append(ranks_docs)
    assert seen[0] == {0, 2, 4} and seen[1] == {1, 3, 5}


def test_rank_without_documents_is_an_error(tok):
    batches = packed([text([1] * 30)], tok, 2, 4, 2, rank=1, world_size=2)
    with pytest.raises(ValueError, match="Process 1 of 2 has 0 documents"):
        next(batches)


# =========================================================================== memory fine-tuning


def test_memory_fine_tuning_packs(tok):
    window, k, batch_size = 4, 3, 6
    length = window * k
    rng = random.Random(0)
    lengths = [rng.randint(1, length - 2) for _ in range(40)] + [length - 2, 1]  # up to exactly pack length
    words = marked_documents(lengths)
    docs = [ids(w) for w in words]
    batches = memory([text(w) for w in words], tok, batch_size, window, k, seed=3)
    expected_rows = cross_batch_rows(cross_batch_ranges(batch_size, k - 1, k, positives_only=True))
    lefts, first_rows, examples = [], set(), []
    for _ in range(len(docs) // (batch_size // k)):
        batch = next(batches)
        assert torch.equal(batch["cross_batch_rows"], expected_rows)
        # positives only: a row sees exactly the earlier rows of its own pack
        for b, seen in enumerate(batch["cross_batch_rows"].tolist()):
            assert [r for r in seen if r >= 0] == list(range(b - b % k, b))
        inputs = batch["input_ids"].view(-1, length)
        mask = batch["attention_mask"].view(-1, length)
        targets = batch["targets"].view(-1, length)
        for p in range(inputs.shape[0]):
            valid = mask[p].nonzero().flatten().tolist()
            left, n = valid[0], len(valid)
            assert valid == list(range(left, left + n)), "one contiguous example"
            example = inputs[p, left : left + n].tolist()
            examples.append(example)
            assert (inputs[p, :left] == PAD).all() and (inputs[p, left + n :] == PAD).all()
            assert left + n == length or (mask[p, left + n :] == 0).all()
            assert targets[p, left : left + n - 1].tolist() == example[1:]
            assert (targets[p, :left] == IGNORE_INDEX).all()
            assert targets[p, left + n - 1].item() == IGNORE_INDEX  # the example's last token has no target
            assert (targets[p, left + n :] == IGNORE_INDEX).all()
            lefts.append(left)
            first_rows.add(left // window)
    assert examples == docs[: len(examples)], "one example per pack, in order, untruncated"
    assert batches.truncated == 0
    assert len(set(lefts)) > 3, "left padding must vary across examples"
    assert len(first_rows) > 1, "examples must start in different rows"


def test_memory_fine_tuning_seeded(tok):
    words = [text(w) for w in marked_documents([2, 5, 3, 1, 4, 6, 2, 3])]
    a = take(memory(words, tok, 4, 4, 2, seed=1), 4)
    b = take(memory(words, tok, 4, 4, 2, seed=1), 4)
    c = take(memory(words, tok, 4, 4, 2, seed=2), 4)
    assert_same_batches(a, b)
    assert any(not torch.equal(x["attention_mask"], y["attention_mask"]) for x, y in zip(a, c))


def test_memory_fine_tuning_truncates_long_examples(tok):
    window, k = 4, 2
    words = marked_documents([3, 12, 30, 6])  # 5, 14, 32, 8 tokens; a pack holds 8
    docs = [ids(w) for w in words]
    batches = memory([text(w) for w in words], tok, 2, window, k, seed=0)
    examples = []
    for _ in range(4):
        batch = next(batches)
        valid = batch["attention_mask"].flatten().nonzero().flatten()
        examples.append(batch["input_ids"].flatten()[valid].tolist())
        if len(valid) == 8:
            assert batch["attention_mask"].flatten().all()
            assert batch["targets"].flatten()[:-1].tolist() == examples[-1][1:]
            assert batch["targets"][-1, -1].item() == IGNORE_INDEX
    assert examples == [docs[0], docs[1][-8:], docs[2][-8:], docs[3]]
    assert examples[1][-1] == EOS and examples[1][0] != BOS
    assert batches.truncated == 2


def test_memory_fine_tuning_with_negatives(tok):
    """--memory-negatives: the same packs (one example each, same padding for the same seed), and every row sees all
    earlier rows of its own example plus rows of earlier packs (other examples), by the stepping rule."""
    window, k, batch_size, d = 4, 3, 9, 7
    words = [text(w) for w in marked_documents([3, 9, 1, 10, 5, 7, 2, 8, 4])]
    plain = take(memory(words, tok, batch_size, window, k, seed=5), 3)
    negatives = memory(words, tok, batch_size, window, k, seed=5, cross_batch_range=d)
    expected_rows = cross_batch_rows(cross_batch_ranges(batch_size, d, k))
    for a, b in zip(plain, take(negatives, 3)):
        for key in ("input_ids", "attention_mask", "targets"):
            assert torch.equal(a[key], b[key])
        assert torch.equal(b["cross_batch_rows"], expected_rows)
    seen = [[r for r in row if r >= 0] for row in expected_rows.tolist()]
    for b, rows in enumerate(seen):
        assert set(range(b - b % k, b)) <= set(rows), "all earlier rows of its own example"
    assert seen[8] == list(range(1, 8)), "the last row: its example's two earlier rows and five of other examples"
    assert any(r < b - b % k for b, rows in enumerate(seen) for r in rows), "negatives: rows of other examples"
    negatives.set_cross_batch_range(None)
    assert torch.equal(next(negatives)["cross_batch_rows"], plain[0]["cross_batch_rows"])
    with pytest.raises(ValueError, match="at least pack_size - 1 = 2"):
        memory(words, tok, batch_size, window, k, cross_batch_range=1)
    with pytest.raises(ValueError, match="needs more rows than the batch"):
        memory(words, tok, batch_size, window, k, cross_batch_range=9)


def test_memory_fine_tuning_layout_errors(tok):
    with pytest.raises(ValueError, match="multiple of pack_size"):
        memory([text([1])], tok, 5, 4, 2)


# =========================================================================== document sources


def test_sources_txt_jsonl_directories(tmp_path):
    (tmp_path / "a.txt").write_text("w1 w2\nw3\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "w4 w5", "meta": 1}) + "\n\n" + json.dumps({"text": "w6"}) + "\n"
    )
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.txt").write_text("w7")
    (sub / "notes.md").write_text("ignored")
    (sub / "d.jsonl").write_text(json.dumps({"body": "w8"}) + "\n" + json.dumps({"body": "w9 w10"}) + "\n")
    assert list(DocumentSource(files=tmp_path / "a.txt")) == ["w1 w2\nw3\n"]  # one document per .txt file
    assert list(DocumentSource(files=[tmp_path / "b.jsonl"])) == ["w4 w5", "w6"]  # blank lines skipped
    assert list(DocumentSource(files=[str(sub / "d.jsonl")], text_field="body")) == ["w8", "w9 w10"]
    # a directory: its .txt / .jsonl files (recursively, sorted), nothing else
    assert resolve_data_files([tmp_path]) == [tmp_path / "a.txt", tmp_path / "b.jsonl", sub / "c.txt", sub / "d.jsonl"]
    assert list(DocumentSource(files=[sub], text_field="body")) == ["w7", "w8", "w9 w10"]
    # several paths, in the given order
    assert list(DocumentSource(files=[sub / "c.txt", tmp_path / "a.txt"])) == ["w7", "w1 w2\nw3\n"]
    # restartable, and iter_from skips / shards
    source = DocumentSource(files=[tmp_path / "b.jsonl", sub / "c.txt"])
    assert list(source) == list(source) == ["w4 w5", "w6", "w7"]
    assert list(source.iter_from(1)) == ["w6", "w7"]
    assert list(source.iter_from(0, rank=1, world_size=2)) == ["w6"]
    assert list(source.iter_from(1, rank=0, world_size=2)) == ["w7"]


class FakeDataset:
    """Like a `datasets.Dataset`: indexable, sized, rows are dicts."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, int) and not -len(self.rows) <= i < len(self.rows):
            raise IndexError(i)
        return self.rows[i]

    def __iter__(self):
        return iter(self.rows)


def test_sources_in_memory(tok):
    assert list(DocumentSource(["w1", "w2 w3"])) == ["w1", "w2 w3"]
    assert list(DocumentSource(iter(["w1", "w2"]))) == ["w1", "w2"]  # any iterable (read once, kept)
    assert list(DocumentSource([{"text": "w1"}, {"text": "w2", "x": 0}])) == ["w1", "w2"]
    dataset = FakeDataset([{"content": "w5 w6"}, {"content": "w7"}, {"content": "w8"}])
    source = DocumentSource(dataset, text_field="content")
    assert list(source) == ["w5 w6", "w7", "w8"]
    assert list(source.iter_from(1, rank=0, world_size=2)) == ["w8"]
    stream = TokenStream(source, tok)
    assert stream.next_document() == ids([5, 6])
    assert stream.state_dict() == {"epoch": 0, "consumed": 1, "tokens": 4}
    with pytest.raises(ValueError, match=r"document 1 has no field 'text'"):
        list(DocumentSource([{"text": "w1"}, {"body": "w2"}]))
    with pytest.raises(ValueError, match="expected text, got int"):
        list(DocumentSource(["w1", 5]))


def _bad(tmp_path, name: str, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.txt", b"", "is empty"),
        ("empty.jsonl", b"", "is empty"),
        ("blank.txt", b"\n\n  \n", "is empty"),
        ("binary.txt", b"\x00\xff\xfe\x81binary", "cannot be read as UTF-8"),
        ("latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), "cannot be read as UTF-8"),
        ("data.csv", b"text\nw1\n", "use .txt"),
        ("data", b"w1 w2\n", "use .txt"),
        ("notjson.jsonl", b"w1 w2 w3\n", "not a JSON object"),
    ],
)
def test_bad_files_are_named(tmp_path, name, content, message):
    path = _bad(tmp_path, name, content)
    with pytest.raises(ValueError, match=message) as error:
        DocumentSource(files=[path])
    assert str(path) in str(error.value)
    good = _bad(tmp_path, "good.txt", b"w1 w2")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        resolve_data_files([good, path])


def test_missing_file_and_bad_directories(tmp_path):
    good = _bad(tmp_path, "good.txt", b"w1")
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ValueError, match=re.escape(str(missing)) + ".*does not exist"):
        DocumentSource(files=[good, missing])
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ".*no .txt or .jsonl"):
        DocumentSource(files=[empty])
    other = tmp_path / "other_dir"
    other.mkdir()
    (other / "readme.md").write_text("w1")
    with pytest.raises(ValueError, match=re.escape(str(other))):
        DocumentSource(files=other)
    # a bad file inside a directory is named too
    bad_dir = tmp_path / "bad_dir"
    bad_dir.mkdir()
    (bad_dir / "a.txt").write_text("w1")
    (bad_dir / "b.txt").write_text("")
    with pytest.raises(ValueError, match=re.escape(str(bad_dir / "b.txt"))):
        DocumentSource(files=bad_dir)


def test_bad_jsonl_lines_are_named_when_read(tmp_path):
    path = _bad(tmp_path, "d.jsonl", b'{"text": "w1"}\n{"text": "w2"}\n{"text": oops}\n')
    source = DocumentSource(files=path)  # the first line is fine: found when that line is read
    with pytest.raises(ValueError, match=re.escape(f"{path}:3") + " is not valid JSON"):
        list(source)
    path = _bad(tmp_path, "e.jsonl", b'{"text": "w1"}\n{"txt": "w2"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2") + " has no field 'text'"):
        list(DocumentSource(files=path))
    with pytest.raises(ValueError, match=re.escape(f"{path}:1") + " has no field 'body'"):
        list(DocumentSource(files=path, text_field="body"))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_invalid_utf8_late_in_a_large_file_is_named(tmp_path, suffix):
    line = b'{"text": "w1 w2"}\n' if suffix == ".jsonl" else b"w1 w2\n"
    path = _bad(tmp_path, "big" + suffix, line * 3000 + b"\xff\xfe\n")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        list(DocumentSource(files=path))


def test_empty_document_lists_and_arguments(tok):
    with pytest.raises(ValueError, match="no documents"):
        DocumentSource([])
    with pytest.raises(ValueError, match="no documents"):
        DocumentSource(iter([]))
    with pytest.raises(ValueError, match="either files or documents"):
        DocumentSource()
    with pytest.raises(ValueError, match="either files or documents"):
        DocumentSource(["w1"], files=["x.txt"])
    no_bos = word_tokenizer(["w1"])
    no_bos.bos_token = None
    with pytest.raises(ValueError, match="bos and eos"):
        TokenStream(DocumentSource(["w1"]), no_bos)


def test_empty_file_list_is_a_value_error():
    with pytest.raises(ValueError, match="No data files"):
        list(DocumentSource(files=[]))


def test_too_little_data_for_one_pack(tok):
    # 2 documents of 3 + 4 tokens: fewer than one pack of 2 rows x 4 tokens (+1 target)
    batches = packed(["w1", "w2 w3"], tok, batch_size=2, window=4, pack_size=2)
    with pytest.raises(ValueError, match=r"2 documents of 7 tokens.*\(9\)"):
        next(batches)
    # exactly enough for the pack works
    batches = packed(["w1 w2 w3 w4 w5 w6 w7"], tok, batch_size=2, window=4, pack_size=2)
    assert next(batches)["input_ids"].flatten().tolist() == [BOS, 5, 6, 7, 8, 9, 10, 11]


def test_layout_errors(tok):
    docs = [text([1] * 30)]
    with pytest.raises(ValueError, match="batch_size=6 must be a multiple of pack_size=4"):
        packed(docs, tok, 6, 4, 4)
    with pytest.raises(ValueError, match="cross_batch_range=4 needs more rows"):
        packed(docs, tok, 4, 4, 2, 4)
    with pytest.raises(ValueError, match="cross_batch_range=5"):
        packed(docs, tok, 4, 4, 1, 5)
    with pytest.raises(ValueError, match="window=1"):
        packed(docs, tok, 4, 1, 2)
    packed(docs, tok, 4, 4, 2, 3)  # d = batch_size - 1 is fine


# =========================================================================== FactsTask


@pytest.mark.parametrize("window,windows,key_length,marker", [(16, 2, 2, True), (32, 3, 1, True), (24, 2, 3, False),
                                                              (64, 1, 1, False)])
def test_facts_task_documents(window, windows, key_length, marker):
    task = FactsTask(window=window, windows=windows, key_length=key_length, symbols=40 if key_length == 1 else 8, values=8,
                     question_marker=marker)
    tokenizer = task.tokenizer()
    assert tokenizer.bos_token_id is not None and tokenizer.eos_token_id is not None
    rng = random.Random(window)
    counts = {"memory": 0, "local": 0}
    offsets = set()
    for _ in range(30):
        document = task.document(rng)
        tokens = [tokenizer.bos_token_id, *tokenizer(document["text"], add_special_tokens=False)["input_ids"]]
        tokens.append(tokenizer.eos_token_id)
        assert len(tokens) == windows * window
        assert tokenizer.unk_token_id not in tokens
        words = ["<s>", *document["text"].split(), "</s>"]
        stated = {}  # key -> (position of the fact's first word, its value)
        asked, i = 0, 1
        while i < len(words) - 1:  # parse the items: every word is a fact, a question, or filler
            if words[i] == ".":
                i += 1
                continue
            start = i
            if words[i] == "?":
                i += 1
            key = tuple(words[i : i + key_length])
            assert all(symbol.startswith("k") for symbol in key)
            value, end = words[i + key_length], words[i + key_length + 1]
            assert value.startswith("v") and end == ";"
            assert start // window == (i + key_length + 1) // window  # no item straddles a window boundary
            answer = i + key_length
            if key in stated:  # a question: it restates an earlier fact
                assert (words[start] == "?") == marker
                first, stated_value = stated[key]
                assert stated_value == value
                assert tokens[answer] == tokenizer.convert_tokens_to_ids(value)  # token positions, 0 = <s>
                kind = "memory" if first // window < answer // window else "local"
                assert answer in document[f"{kind}_answers"]
                counts[kind] += 1
                asked += 1
                offsets.add(answer % window)
            else:
                assert words[start] != "?"
                stated[key] = (start, value)
            i += key_length + 2
        answers = document["memory_answers"] + document["local_answers"]
        assert len(answers) == len(set(answers)) == asked  # every question is listed, once
        assert {tuple(k) for k in document["keys"]} == set(stated)
        assert len(document["keys"]) == len(stated)  # keys are distinct within a document
    assert counts["local"] > 0
    assert (counts["memory"] > 0) == (windows > 1)
    assert len(offsets) > window // 4  # questions fall at many offsets within a window


@pytest.mark.parametrize("windows", [1, 2, 3])
def test_facts_task_copy_documents_and_excluded_keys(windows):
    window = 32
    task = FactsTask(window=window, windows=windows, key_length=1, symbols=40, values=8)
    tokenizer = task.tokenizer()
    rng = random.Random(0)
    lengths, sources, copies = set(), set(), set()
    for _ in range(30):
        document = task.copy_document(rng)
        words = ["<s>", *document["text"].split(), "</s>"]
        assert len(tokenizer(document["text"], add_special_tokens=False)["input_ids"]) == windows * window - 2
        question = words.index("?")
        run = [w for w in words[1:question] if w != "."]
        start = words.index(run[0])
        assert words[start : start + len(run)] == run  # one contiguous run before "?"
        assert words[question + 1 : question + 1 + len(run)] == run  # repeated right after "?"
        assert set(words[question + 1 + len(run) :]) <= {".", "</s>"}
        assert document["copy_answers"] == list(range(question + 2, question + 1 + len(run)))
        if windows > 1:  # the run sits in an earlier window than "?" and its copy: a copy through memory
            assert (start + len(run) - 1) // window < question // window == windows - 1
        lengths.add(len(run))
        sources.add(start)
        copies.add(question)
    assert min(len(lengths), len(sources), len(copies)) > 5  # the copy offset varies: position cannot predict it
    first = task.document(rng)
    other = task.document(rng, exclude_keys=first["keys"])
    assert not {tuple(k) for k in first["keys"]} & {tuple(k) for k in other["keys"]}
    with pytest.raises(ValueError, match="No distinct key left"):
        FactsTask(window=64, windows=2, key_length=1, symbols=8).document(rng)


# =========================================================================== PasskeyTask


def test_passkey_task_documents():
    """Benchmark-format documents (exactly the benchmark prompt of docs/passkey.md#the-prompt plus the answer) and
    varied ones: distinct key names, every key line well formed, the question about one of them answered at
    `answer_start`, lengths in range."""
    from longllama.passkey import prompt_text

    task = PasskeyTask(min_words=50, max_words=400)
    rng = random.Random(0)
    spec = styles = 0
    for _ in range(200):
        document = task.document(rng)
        text, key, name = document["text"], document["key"], document["name"]
        assert text[document["answer_start"] :] == f"{key}."
        lines = text[: document["answer_start"]].rstrip(" ").split("\n")
        assert lines[-1] == f"What is the {name} key? The {name} key is"
        key_lines = [line for line in lines if " key is " in line and line.endswith(" key.")]
        names = [line.split()[1] for line in key_lines]
        assert len(names) == len(set(names)) and name in names
        assert f"The {name} key is {key}. Remember it. {key} is the {name} key." in key_lines
        assert 1 <= key < 50000
        assert 50 - 30 <= len(text.split()) <= 400 + 20
        if len(key_lines) == 1 and name == "pass":  # the benchmark's format when the filler is the standard cycle
            before, after = lines[1], lines[3]
            if prompt_text(key, before, after) + f" {key}." == text:
                spec += 1
        styles += any("The river is" in line or "The stone is" in line for line in lines)
    assert spec > 40  # ~40% are exactly the benchmark's prompt
    assert styles > 10  # some have varied filler sentences


def test_passkey_task_takes_its_key_names_from_names():
    task = PasskeyTask(min_words=50, max_words=100, spec_share=0.0, names=("alpha", "beta", "gamma", "delta"))
    rng = random.Random(1)
    used = set()
    for _ in range(100):
        lines = task.document(rng)["text"].split("\n")
        used.update(line.split()[1] for line in lines if line.startswith("The ") and " key is " in line)
    assert used == {"alpha", "beta", "gamma", "delta"}


# =========================================================================== CopyTask


def test_copy_task_repeats_the_list_after_filler():
    from longllama.passkey import FILLER_SENTENCES

    task = CopyTask(min_items=3, max_items=12, min_gap_words=5, max_gap_words=40)
    rng = random.Random(2)
    numbers = total = 0
    for _ in range(200):
        document = task.document(rng)
        text, items = document["text"], document["items"]
        listed = " ".join(items)
        assert 3 <= len(items) <= 12
        assert text.startswith(f"Here is a list: {listed}.\n")
        assert text[document["copy_start"] :] == f"{listed}."
        assert text[: document["copy_start"]].endswith("\nRepeat the list: ")
        filler = text.split("\n")[1]
        assert 5 <= len(filler.split()) <= 40 + 5
        assert all(sentence + "." in FILLER_SENTENCES for sentence in filler.rstrip(".").split(". "))
        numbers += sum(item.isdigit() for item in items)
        total += len(items)
    assert 0.4 < numbers / total < 0.6  # half numbers (1 to 5 digits), half words
