"""Top-k index backends against brute-force ground truth, as faiss tests its indexes: the checkpoint code's reference
exact search (modeling/knn_longllama.py) and the package's accelerated and approximate ones (longllama/search.py,
longllama/hnsw.py)."""

import builtins
import math
import os
import shutil
import warnings

import pytest
import torch

from longllama import hnsw, kernels, search
from longllama.modeling import knn_longllama
from longllama.modeling.knn_longllama import INDEX_BACKENDS, ExactIndex, make_index

APPROXIMATE = ["faiss", "hnswlib"]


class Memory:
    """Keys `[B, H, n, D]` and valid `[B, n]` that `source()` serves in blocks of `block` entries (id = position)."""

    def __init__(self, B=2, H=3, n=1000, D=16, block=300, padding=0.2, seed=0, clusters=0):
        generator = torch.Generator().manual_seed(seed)
        if clusters:  # keys near a few centres: the data HNSW graphs are built for
            self.centres = 3 * torch.randn(clusters, D, generator=generator)
            assignment = torch.randint(clusters, (B, H, n), generator=generator)
            self.keys = self.centres[assignment] + torch.randn(B, H, n, D, generator=generator)
        else:
            self.keys = torch.randn(B, H, n, D, generator=generator)
        self.valid = torch.rand(B, n, generator=generator) >= padding
        self.block = block
        self.source_calls = 0

    def source(self):
        self.source_calls += 1
        starts = range(0, self.keys.shape[2], self.block)
        return ((s, self.keys[:, :, s : s + self.block], self.valid[:, s : s + self.block]) for s in starts)

    def index(self, name: str, **options):
        index = make_index(name, self.source, **options)
        for first_id, keys, valid in self.source():
            index.add(first_id, keys, valid)
        return index

    def queries(self, Bq=None, r=4, seed=1):
        B, H, n, D = self.keys.shape
        generator = torch.Generator().manual_seed(seed)
        queries = torch.randn(Bq or B, H, r, D, generator=generator)
        if hasattr(self, "centres"):
            queries += self.centres[torch.randint(len(self.centres), (Bq or B, H, r), generator=generator)]
        return queries


def brute_force(memory: Memory, queries, k, rows=None, live=None):
    """One full matmul and topk: scores and ids `[Bq, H, r, k]`, (-inf, -1) where fewer than k keys are valid."""
    rows = torch.arange(queries.shape[0]) if rows is None else rows
    keys, valid = memory.keys[rows], memory.valid[rows]
    if live is not None:  # [n] bool: not evicted
        valid = valid & live
    scores = (queries @ keys.transpose(-1, -2)).masked_fill(~valid[:, None, None, :], -math.inf)
    if scores.shape[-1] < k:
        scores = torch.cat([scores, torch.full((*scores.shape[:-1], k - scores.shape[-1]), -math.inf)], -1)
    top = scores.topk(k)
    return top.values, top.indices.masked_fill(top.values == -math.inf, -1)


def assert_same(result, expected):
    """Same scores (to float rounding) and ids. Ids may differ only between scores equal to rounding: the C kernel sums
    its products in another order than a matmul, so two keys whose scores differ by an ulp can trade places."""
    scores, ids = result
    assert scores.dtype == torch.float32 and ids.dtype == torch.long
    torch.testing.assert_close(scores, expected[0], rtol=1e-5, atol=1e-5)
    mismatch = ids != expected[1]
    if mismatch.any():
        s = expected[0]
        close = (s[..., 1:] - s[..., :-1]).abs() <= 1e-5 * s[..., 1:].abs().clamp(min=1)  # [..., k - 1]
        tied = torch.zeros_like(mismatch)
        tied[..., 1:] |= close
        tied[..., :-1] |= close
        assert tied[mismatch].all(), f"ids differ at {mismatch.nonzero().tolist()[:5]} where no scores tie"


def returns_valid(memory: Memory, ids, rows=None) -> bool:
    """Whether every id >= 0 points at a valid entry of the memory row its query row searches."""
    rows = torch.arange(ids.shape[0]) if rows is None else rows
    return bool(((ids < 0) | memory.valid[rows[:, None, None, None], ids.clamp(min=0)]).all())


def graph_sizes(index) -> list[int]:
    """Entries held by each HNSW graph, evicted ones included (white-box: the backends' per-row state)."""
    graphs = [graph for row in index._rows for graph in row.indexes]
    return [graph.ntotal if index.name == "faiss" else graph.get_current_count() for graph in graphs]


def recall(ids, reference_ids):
    """Fraction of the reference results (ids >= 0) that `ids` found, over all queries."""
    found = (ids[..., :, None] == reference_ids[..., None, :]).any(-2) & (reference_ids >= 0)
    return found.sum().item() / (reference_ids >= 0).sum().item()


# ---------------------------------------------------------------------------------------------------- exact


def has_compiler() -> bool:
    return any(shutil.which(name) for name in ("cc", "gcc", "clang"))


def kernel_or_fail():
    """The package's compiled kernel; a test fails where a C compiler is installed but the kernel was not built."""
    kernel = kernels.compiled()
    if kernel is None:
        if has_compiler() and os.environ.get(kernels.ENV_SWITCH) != "0":
            pytest.fail("a C compiler is installed but the package was installed without its compiled kernels")
        pytest.skip("the package was installed without a C compiler: no compiled kernels")
    return kernel


@pytest.fixture(params=["kernel", "torch", "reference"])
def exact_path(request, monkeypatch):
    """Run a test with each exact search: the package's with its compiled kernel (checked to be used), the package's
    torch path (`FilteredTopK`), and the checkpoint code's plain-torch reference (`knn_longllama.ExactIndex`)."""
    if request.param == "reference":
        monkeypatch.setitem(INDEX_BACKENDS, "exact", knn_longllama.ExactIndex)
        yield "reference"
        return
    assert INDEX_BACKENDS["exact"] is search.ExactIndex  # registered by `import longllama`
    if request.param == "torch":
        monkeypatch.setattr(kernels, "_module", None)
        yield "torch"
        return
    kernel_or_fail()
    made = []

    class Counted(search.KernelTopK):
        def __init__(self, *args, **kwargs):
            made.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(search, "KernelTopK", Counted)
    yield "kernel"
    assert made, "the exact backend never used the kernel"


@pytest.mark.parametrize("k", [1, 10, 200])
@pytest.mark.parametrize("tile", [knn_longllama.SCORE_TILE, 2**10])  # one tile per block, or 256-key tiles
def test_exact_matches_brute_force(monkeypatch, exact_path, k, tile):
    monkeypatch.setattr(knn_longllama, "SCORE_TILE", tile)
    memory = Memory()
    index = memory.index("exact")
    queries = memory.queries()
    calls = memory.source_calls
    assert_same(index.search(queries, k), brute_force(memory, queries, k))
    assert memory.source_calls > calls  # it stores nothing: every search reads the memory again
    assert index.ntotal == 1000


@pytest.mark.parametrize("dense", [0.0, 2.0])  # every key of a tile compared with the floor, or only passing groups
def test_exact_running_top_k_filters(monkeypatch, dense):
    """Torch path: tiles after the first yield only the keys that beat the running k-th score, found either way; a tail
    of keys outside the groups, padding, and a second search on the reused score tile."""
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(search, "DENSE", dense)
    monkeypatch.setattr(knn_longllama, "SCORE_TILE", 2**14)  # a tile per 300-key block: 256 keys in groups, 44 not
    memory = Memory(B=2, H=2, n=3000, D=16, padding=0.1)
    index = memory.index("exact")
    for r in (8, 1):
        queries = memory.queries(r=r, seed=r)
        assert_same(index.search(queries, 50), brute_force(memory, queries, 50))
    assert_same(index.search(queries, 50), brute_force(memory, queries, 50))


def test_exact_single_query_and_long_blocks(exact_path):
    """One query per key set, blocks longer than a tile: the matrix-vector path and several tiles per block."""
    memory = Memory(B=1, H=1, n=5000, D=32, block=4096, padding=0.0)
    index = memory.index("exact")
    queries = memory.queries(r=1)
    assert_same(index.search(queries, 128), brute_force(memory, queries, 128))


def test_exact_padding_is_never_returned(exact_path):
    memory = Memory(B=3, n=600, padding=0.5)
    memory.valid[1] = False
    memory.valid[1, [5, 250, 599]] = True  # row 1: three valid keys
    memory.valid[2] = False  # row 2: padding only
    index = memory.index("exact")
    queries = memory.queries()
    scores, ids = index.search(queries, 20)
    assert_same((scores, ids), brute_force(memory, queries, 20))
    assert set(ids[1, ..., :3].flatten().tolist()) == {5, 250, 599}
    assert (ids[1, ..., 3:] == -1).all() and (scores[1, ..., 3:] == -math.inf).all()
    assert (ids[2] == -1).all() and (scores[2] == -math.inf).all()
    assert returns_valid(memory, ids)
    assert index.ntotal == 600  # padding takes an id


def test_exact_nan_scores_are_never_returned(exact_path):
    """A NaN score (a NaN in a memory key, or a query) counts as -inf in every exact path: such keys are never
    returned, and a query whose scores are all NaN gets no result (-1), as the C kernel's ordered comparisons give."""
    memory = Memory(B=2, n=700, padding=0.1)
    memory.keys[0, :, 10:40] = math.nan
    memory.keys[1, 1, 300] = math.nan
    index = memory.index("exact")
    queries = memory.queries()
    queries[1, 2, 0, 3] = math.nan
    scores, ids = index.search(queries, 30)
    keys = memory.keys.nan_to_num(nan=0.0)  # then mask NaN scores: the same ground truth without NaN arithmetic
    expected_scores = (queries @ memory.keys.transpose(-1, -2))
    hidden = expected_scores.isnan() | ~memory.valid[:, None, None, :]
    expected = (queries.nan_to_num(0.0) @ keys.transpose(-1, -2)).masked_fill(hidden, -math.inf).topk(30)
    assert_same((scores, ids), (expected.values, expected.indices.masked_fill(expected.values == -math.inf, -1)))
    assert not scores.isnan().any() and (ids[1, 2, 0] == -1).all()
    assert not ((ids[0] >= 10) & (ids[0] < 40)).any() and not (ids[1, 1] == 300).any()


def test_exact_beam_rows(exact_path):
    """Query rows repeated per beam (`arange(B).repeat_interleave(G)`) search their memory row."""
    memory = Memory()
    index = memory.index("exact")
    rows = torch.arange(2).repeat_interleave(3)
    queries = memory.queries(Bq=6)
    assert_same(index.search(queries, 10, rows=rows), brute_force(memory, queries, 10, rows=rows))


@pytest.mark.parametrize("rows", [[1, 0], [1, 1, 0], [0, 0, 1, 1, 1]])  # a permutation, a gather, an uneven split
@pytest.mark.parametrize("padding", [0.0, 0.2])
def test_exact_arbitrary_rows(exact_path, rows, padding):
    memory = Memory(padding=padding)
    index = memory.index("exact")
    rows = torch.tensor(rows)
    queries = memory.queries(Bq=len(rows))
    assert_same(index.search(queries, 10, rows=rows), brute_force(memory, queries, 10, rows=rows))


def test_exact_evict(exact_path):
    memory = Memory()
    index = memory.index("exact")
    index.evict(0, 400)
    index.evict(550, 620)
    index.evict(300, 450)  # overlaps an evicted range
    index.evict(5000, 6000)  # was never added
    live = torch.ones(1000, dtype=torch.bool)
    live[:450] = live[550:620] = False
    assert index.ntotal == live.sum().item()
    queries = memory.queries()
    scores, ids = index.search(queries, 50)
    assert_same((scores, ids), brute_force(memory, queries, 50, live=live))
    assert not live[ids[ids >= 0]].logical_not().any()


def test_reset_and_growing_ids(exact_path):
    memory = Memory()
    index = memory.index("exact")
    with pytest.raises(ValueError, match="ids must grow"):
        index.add(999, memory.keys[:, :, :1], memory.valid[:, :1])
    index.reset()
    assert index.ntotal == 0
    scores, ids = index.search(memory.queries(), 5)
    assert (ids == -1).all() and (scores == -math.inf).all()
    index.add(0, memory.keys[:, :, :300], memory.valid[:, :300])  # a new session starts at id 0
    queries = memory.queries()
    live = torch.arange(1000) < 300
    assert_same(index.search(queries, 5), brute_force(memory, queries, 5, live=live))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_exact_on_gpu_memory():
    memory = Memory()
    cpu_result = memory.index("exact").search(memory.queries(), 10)
    memory.keys, memory.valid = memory.keys.cuda(), memory.valid.cuda()
    scores, ids = memory.index("exact").search(memory.queries(), 10)  # CPU queries, GPU memory
    assert scores.device.type == "cpu"
    assert_same((scores, ids), cpu_result)


def test_exact_passes_bounded_by_top_k_state(monkeypatch, exact_path):
    """Large k: the queries are searched in several passes over memory, each with a bounded running top-k."""
    monkeypatch.setattr(knn_longllama, "TOPK_STATE", 2 * search.candidates(200) * 3 * 5)  # 5 queries per pass
    memory = Memory(padding=0.1)
    index = memory.index("exact")
    queries = memory.queries(r=12)
    assert_same(index.search(queries, 200), brute_force(memory, queries, 200))


@pytest.mark.parametrize("D", [12, 16])  # the kernel's own product takes D % 8 == 0
def test_exact_kernel_limits(monkeypatch, exact_path, D):
    """k above the kernel's limit, more queries than it computes products for, and head dims its product does not
    take: matmul tiles (and the torch path beyond the limit), the same results."""
    monkeypatch.setattr(search, "MAX_K", 5)
    memory = Memory(D=D, padding=0.1)
    index = memory.index("exact")
    for r, k in [(1, 10), (200, 10), (1, 3), (search.FUSED_QUERIES + 1, 3)]:
        queries = memory.queries(r=r)
        assert_same(index.search(queries, k), brute_force(memory, queries, k))


# ---------------------------------------------------------------------------------------------------- the C kernel


def kernel_reference(blocks, queries, k):
    """Top k of `queries [B, H, R, D]` over `blocks` [(first_id, keys [B, H, n, D], valid [B, n] | None)] by a full
    matmul and a stable sort: ties keep the earliest id. Scores and ids `[B * H * R, k]`, (-inf, -1) padded."""
    parts = []
    for _, keys, valid in blocks:
        part = queries @ keys.transpose(-1, -2)
        parts.append(part if valid is None else part.masked_fill(~valid[:, None, None, :], -math.inf))
    scores = torch.cat(parts, -1).flatten(0, 2)
    ids = torch.cat([torch.arange(first, first + keys.shape[2]) for first, keys, _ in blocks])
    scores = torch.cat([scores, torch.full((scores.shape[0], k), -math.inf)], 1)
    ids = torch.cat([ids, torch.full((k,), -1)])
    values, order = scores.sort(dim=1, descending=True, stable=True)
    values, ids = values[:, :k], ids[order[:, :k]]
    return values, ids.masked_fill(values == -math.inf, -1)


def kernel_blocks(B, H, n, D, block, padding, integer, generator):
    """Key blocks with gaps between their ids; `integer` keys give many tied scores."""
    blocks, first = [], 0
    for start in range(0, n, block):
        m = min(block, n - start)
        keys = torch.randint(-2, 3, (B, H, m, D), generator=generator).float() if integer else torch.randn(
            B, H, m, D, generator=generator)
        valid = torch.rand(B, m, generator=generator) >= padding if padding else None
        blocks.append((first, keys, valid))
        first += m + 7  # ids need not be contiguous across blocks (evicted ranges)
    return blocks


@pytest.fixture(params=["native", "generic"], scope="module")
def kernel(request):
    """The kernels `kernels.compiled` picks (AVX2 where the CPU has it), and the portable build (non-x86 machines'
    code)."""
    native = kernel_or_fail()
    if request.param == "native":
        return native
    from longllama import _kernels

    assert _kernels.simd == 0
    return _kernels


@pytest.mark.parametrize("mode", ["scan", "push", "mixed"])
@pytest.mark.parametrize("integer", [False, True])  # random scores, or many ties
@pytest.mark.parametrize(
    "B,H,R,n,D,k,padding",
    [
        (2, 3, 4, 1000, 16, 10, 0.2),
        (1, 2, 3, 900, 12, 50, 0.0),  # D not a multiple of 8: the scalar product
        (1, 1, 1, 70000, 32, 128, 0.3),  # several threads in `scan`, each with a private top-k
        (2, 1, 2, 150, 8, 300, 0.5),  # fewer valid keys than k: (-inf, -1) padding
        (1, 1, 5, 40, 8, 1, 0.0),  # k = 1, blocks shorter than 16 keys
    ],
)
def test_kernel_matches_reference(kernel, mode, integer, B, H, R, n, D, k, padding):
    generator = torch.Generator().manual_seed(n + k)
    blocks = kernel_blocks(B, H, n, D, max(13, n // 3), padding, integer, generator)
    queries = (torch.randint(-2, 3, (B, H, R, D), generator=generator).float() if integer
               else torch.randn(B, H, R, D, generator=generator))
    top = search.KernelTopK(B * H * R, k, lib=kernel)
    top.threads = 2  # whatever the machine: the scan splits its keys when there are enough
    for i, (first, keys, valid) in enumerate(blocks):
        if mode == "scan" or (mode == "mixed" and i % 2):
            top.scan(queries, keys, first, valid)
        else:
            top.push((queries @ keys.transpose(-1, -2)).flatten(0, 2), first, valid, rows_per_valid=H * R)
    scores, ids = top.result()
    expected_scores, expected_ids = kernel_reference(blocks, queries, k)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, expected_ids)  # exact, and ties keep the earliest ids


@pytest.mark.parametrize("D", [16, 12])  # the SIMD product, and the scalar one
def test_kernel_scans_bfloat16_keys_as_stored(kernel, D):
    """bf16 memory is scanned in place (widened 16 keys at a time in the kernel): the results of its float32 copy."""
    generator = torch.Generator().manual_seed(D)
    blocks = kernel_blocks(2, 2, 700, D, 300, 0.2, False, generator)
    queries = torch.randn(2, 2, 3, D, generator=generator)
    top = search.KernelTopK(2 * 2 * 3, 20, lib=kernel)
    top.threads = 2
    for first, keys, valid in blocks:
        top.scan(queries, keys.bfloat16(), first, valid)
    expected = kernel_reference([(first, keys.bfloat16().float(), valid) for first, keys, valid in blocks], queries, 20)
    scores, ids = top.result()
    torch.testing.assert_close(scores, expected[0], rtol=1e-5, atol=1e-5)
    assert_same((scores.view(2, 2, 3, 20), ids.view(2, 2, 3, 20)), [x.view(2, 2, 3, 20) for x in expected])


def test_kernel_strided_inputs(kernel):
    """Valid masks and keys that are views with other strides give what contiguous ones give."""
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(3, 300, 2, 16, generator=generator).transpose(1, 2)  # [3, 2, 300, 16], key stride 32
    valid = (torch.rand(300, 3, generator=generator) > 0.3).T  # [3, 300] with column stride 3
    queries = torch.randn(3, 2, 4, 16, generator=generator)
    results = []
    for k_, v_ in [(keys, valid), (keys.contiguous(), valid.contiguous())]:
        for mode in ("scan", "push"):
            top = search.KernelTopK(3 * 2 * 4, 7, lib=kernel)
            if mode == "scan":
                top.scan(queries, k_, 0, v_)
            else:
                top.push((queries @ k_.transpose(-1, -2)).flatten(0, 2), 0, v_, rows_per_valid=2 * 4)
            results.append(top.result())
    expected = kernel_reference([(0, keys.contiguous(), valid.contiguous())], queries, 7)
    for scores, ids in results:
        torch.testing.assert_close(scores, expected[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(ids, expected[1])


def test_kernel_bad_arguments(kernel):
    with pytest.raises(ValueError, match="1 <= k"):
        search.KernelTopK(4, 0, lib=kernel)
    top = search.KernelTopK(4, 2, lib=kernel)
    with pytest.raises(ValueError, match="float32 scores"):
        top.push(torch.zeros(3, 10), 0)
    with pytest.raises(ValueError, match="valid bool"):
        top.push(torch.zeros(4, 10), 0, torch.ones(4, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="do not match"):
        top.scan(torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 10, 8), 0)
    with pytest.raises(ValueError, match="float32 or bfloat16 keys"):
        top.scan(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 10, 8, dtype=torch.float16), 0)


def test_kernel_not_installed_falls_back_with_a_warning(monkeypatch):
    """A package installed without a C compiler has no kernel: one warning that says what to do, and the torch path's
    (same) results."""
    real_import = builtins.__import__

    def no_kernel(name, globals=None, locals=None, fromlist=(), level=0):
        if {"_kernels", "_kernels_avx2"} & set(fromlist or ()) or name.startswith("longllama._kernels"):
            raise ImportError(f"no module named {name or fromlist[0]}")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_kernel)
    monkeypatch.setattr(kernels, "_module", kernels._UNLOADED)
    memory = Memory()
    index = memory.index("exact")
    queries = memory.queries()
    with pytest.warns(RuntimeWarning, match="installed with a C compiler"):
        assert_same(index.search(queries, 10), brute_force(memory, queries, 10))
    assert kernels._module is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert_same(index.search(queries, 10), brute_force(memory, queries, 10))


def test_kernel_switched_off(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    monkeypatch.setattr(kernels, "_module", kernels._UNLOADED)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.compiled() is None


# ---------------------------------------------------------------------------------------------------- approximate


@pytest.mark.parametrize("name", APPROXIMATE)
def test_approximate_recall(name):
    pytest.importorskip(name)
    memory = Memory(B=2, H=2, n=2000, D=16, block=512, clusters=20)
    index = memory.index(name)
    queries = memory.queries(r=8)
    scores, ids = index.search(queries, 10)
    exact = brute_force(memory, queries, 10)
    assert recall(ids, exact[1]) >= 0.9
    assert (ids >= 0).all() and returns_valid(memory, ids)
    assert (scores[..., :-1] >= scores[..., 1:]).all()
    keys = memory.keys[torch.arange(2)[:, None, None, None], torch.arange(2)[None, :, None, None], ids]
    torch.testing.assert_close(scores, (queries[..., None, :] * keys).sum(-1), rtol=1e-4, atol=1e-3)  # q . key
    assert index.ntotal == 2000


@pytest.mark.parametrize("name", APPROXIMATE)
def test_approximate_rows_and_missing_results(name):
    pytest.importorskip(name)
    memory = Memory(B=2, H=2, n=300, D=16, block=128, clusters=10)
    memory.valid[1] = False
    memory.valid[1, :5] = True  # row 1: five valid keys
    index = memory.index(name)
    rows = torch.tensor([1, 1, 0])
    queries = memory.queries(Bq=3)
    scores, ids = index.search(queries, 10, rows=rows)
    exact = brute_force(memory, queries, 10, rows=rows)
    assert recall(ids, exact[1]) >= 0.9
    assert torch.equal(ids[:2, ..., 5:], torch.full_like(ids[:2, ..., 5:], -1))
    assert (scores[:2, ..., 5:] == -math.inf).all() and returns_valid(memory, ids, rows)


@pytest.mark.parametrize("name", APPROXIMATE)
def test_approximate_evict(name):
    pytest.importorskip(name)
    memory = Memory(B=2, H=2, n=2000, D=16, block=512, clusters=20)
    index = memory.index(name)
    queries = memory.queries(r=8)
    live = torch.ones(2000, dtype=torch.bool)
    for lo, hi in [(0, 300), (700, 800), (300, 1300)]:  # the last one leaves more evicted keys than live ones
        index.evict(lo, hi)
        live[lo:hi] = False
        assert index.ntotal == live.sum().item()
        scores, ids = index.search(queries, 10)
        assert live[ids[ids >= 0]].all()
        assert recall(ids, brute_force(memory, queries, 10, live=live)[1]) >= 0.9
    more = Memory(B=2, H=2, n=500, D=16, clusters=20, seed=2)  # keys added after evictions reuse the freed room
    memory.keys, memory.valid = torch.cat([memory.keys, more.keys], 2), torch.cat([memory.valid, more.valid], 1)
    index.add(2000, more.keys, more.valid)
    live = torch.cat([live, torch.ones(500, dtype=torch.bool)])
    scores, ids = index.search(queries, 10)
    assert live[ids[ids >= 0]].all() and (ids >= 2000).any()
    assert recall(ids, brute_force(memory, queries, 10, live=live)[1]) >= 0.9
    peak = memory.valid[:, :2000].sum(1).max().item()  # the most valid keys a row held before evicting
    assert max(graph_sizes(index)) <= peak  # rebuilt (faiss) or reusing deleted slots (hnswlib): bounded
    index.reset()
    assert index.ntotal == 0 and (index.search(queries, 3)[1] == -1).all()


# ---------------------------------------------------------------------------------------------------- errors


def test_unknown_backend_and_options():
    memory = Memory()
    with pytest.raises(ValueError, match="exact, faiss, hnswlib"):
        make_index("annoy", memory.source)
    with pytest.raises(ValueError, match="accepted options: none"):
        make_index("exact", memory.source, ef_search=64)
    with pytest.raises(ValueError, match="accepted options: M, ef_construction, ef_search"):
        INDEX_BACKENDS["hnswlib"](memory.source, efSearch=64)
    with pytest.raises(ValueError, match="positive integer"):
        INDEX_BACKENDS["hnswlib"](memory.source, M=0)


@pytest.mark.parametrize("name", ["exact", *APPROXIMATE])
def test_bad_search_arguments(name):
    if name != "exact":
        pytest.importorskip(name)
    memory = Memory(n=100, block=100)
    index = memory.index(name)
    queries = memory.queries()
    for k in [0, -1]:
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            index.search(queries, k)
    with pytest.raises(ValueError, match="rows"):
        index.search(memory.queries(Bq=3), 5)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 2\)"):
        index.search(queries, 5, rows=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="do not match"):
        index.add(100, memory.keys[:1], memory.valid[:1])


@pytest.mark.parametrize("name", APPROXIMATE)
def test_missing_library_names_the_extra(monkeypatch, name):
    monkeypatch.setattr(hnsw, name, None)
    with pytest.raises(ImportError, match=rf'pip install "longllama\[{name}\]"'):
        make_index(name, Memory().source)
    assert isinstance(make_index("exact", Memory().source), ExactIndex)  # the exact backend needs nothing


@pytest.mark.parametrize("name", APPROXIMATE)
def test_checkpoint_code_alone_names_the_package(monkeypatch, name):
    """Remote code loaded without the package has the reference exact search only; the others say what to install."""
    monkeypatch.setattr(knn_longllama, "INDEX_BACKENDS", {"exact": knn_longllama.ExactIndex})
    with pytest.raises(ImportError, match=rf'provided by the longllama package: pip install "longllama\[{name}\]"'):
        make_index(name, Memory().source)
    assert type(make_index("exact", Memory().source)) is knn_longllama.ExactIndex
