"""Top-k (kNN) search by inner product over the memory of one LongLLaMA memory layer.

One index object serves one memory layer and holds one key set per (batch row, KV head). The interface follows
faiss: `add`, `search(queries, k) -> (scores, ids)`, `evict`, `reset`, `ntotal`, with torch tensors in and out and
`-1` as the "no result" id (its score is `-inf`). Ids are global memory positions (0, 1, 2, ...) that only grow;
padding entries (`valid` False) take an id but are never returned.

`source` is a zero-argument callable returning an iterator over the live memory of the layer, in id order:
`(first_id, keys [B, Hkv, n, D] float32, valid [B, n] bool)`, entry `j` of a block having id `first_id + j`.

Backends, built by `make_index(name, source, **options)`:

- `"exact"` (`ExactIndex`): the reference. It stores nothing; every search scans `source()` in fp32 with a running
  top-k, on the device where the memory lives: on the CPU with a small C kernel (`kernel_longllama`) where a compiler
  is found, otherwise (and on GPUs) in torch.
- `"faiss"` (`FaissIndex`) and `"hnswlib"` (`HnswlibIndex`): one HNSW graph per key set, on the CPU. They trade
  recall for speed: a search visits O(log n) keys instead of n and may miss some of the true top k. They read
  `source()` only to rebuild after evictions. The libraries are optional and imported on first use.
"""

import importlib
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch

from .kernel_longllama import MAX_K as KERNEL_MAX_K
from .kernel_longllama import KernelTopK, candidates, reusable_buffer, topk_kernel

Source = Callable[[], Iterator[tuple[int, torch.Tensor, torch.Tensor]]]

# The optional libraries, imported by `_library` on first use; None once an import has failed.
_NOT_IMPORTED = object()
faiss = _NOT_IMPORTED
hnswlib = _NOT_IMPORTED
_PIP_PACKAGES = {"faiss": "faiss-cpu", "hnswlib": "hnswlib"}

# One score tile of the exact search holds about this many fp32 scores (16 MiB): small enough to stay in the
# allocator's cache and mostly in L3, large enough for an efficient matmul.
SCORE_TILE = 2**22
MIN_TILE_KEYS = 256
TOPK_STATE = 2**22  # elements of running top-k state per pass (48 MiB of scores and ids): bounds memory for large k
# The exact search cuts a score tile into GROUP strided groups of keys (see _RunningTopK) and merges its pending
# candidates once they reach MERGE_FACTOR * k per query on average.
GROUP = 8
MERGE_FACTOR = 1
MATVEC_SPLIT = 8
DENSE = 0.25
# With the C kernel, up to this many queries per key set compute their products in the kernel, in one pass over the
# keys (faster than matmul tiles up to about 256 queries on 2 AVX2 cores); more go through torch's matmul tile by tile.
FUSED_QUERIES = 128
# The approximate backends' transform radius R is this many times the largest key norm seen (see `_HnswIndex`).
RADIUS_HEADROOM = 1.25


def _score_tile(numel: int, device: torch.device) -> torch.Tensor:
    """The exact search's fp32 score tile (about `SCORE_TILE` elements, 16 MiB), kept between searches: on the CPU a
    fresh tile costs page faults on every search, as much as a decode step's matrix-vector product."""
    return reusable_buffer("score_tile", numel, torch.float32, device)


def _library(name: str):
    """Import the optional library `name` once, or raise an ImportError that says how to install it."""
    module = globals()[name]
    if module is _NOT_IMPORTED:
        try:
            module = importlib.import_module(name)
        except ImportError:
            module = None
        globals()[name] = module
    if module is None:
        raise ImportError(
            f'the "{name}" index backend needs the {name} library: pip install "longllama[{name}]" '
            f"(or pip install {_PIP_PACKAGES[name]})"
        )
    return module


class _IdRanges:
    """Sorted, disjoint half-open ranges `[lo, hi)` of ids: those added and not evicted."""

    def __init__(self):
        self.ranges: list[tuple[int, int]] = []

    def add(self, lo: int, hi: int) -> None:
        if self.ranges and self.ranges[-1][1] == lo:
            lo = self.ranges.pop()[0]
        self.ranges.append((lo, hi))

    def remove(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Remove `[lo, hi)` and return the parts of it that were present."""
        removed = self.intersect(lo, hi)
        kept = []
        for a, b in self.ranges:
            kept += [(a, min(b, lo))] if a < lo else []
            kept += [(max(a, hi), b)] if b > hi else []
        self.ranges = kept
        return removed

    def intersect(self, lo: int, hi: int) -> list[tuple[int, int]]:
        return [(max(a, lo), min(b, hi)) for a, b in self.ranges if a < hi and b > lo]

    def count(self) -> int:
        return sum(b - a for a, b in self.ranges)


def _topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores.topk(k)` over the last axis (sorted, exact), faster for long rows.

    `torch.topk` is slow for large k on long rows, so split the row into `g` strided groups of `G = n // g` keys
    (group c = keys c, c + G, c + 2G, ...): the top k keys lie in the k groups with the largest maxima, because at
    most k groups can have a maximum at or above the k-th score. One vectorised max, a top-k over G group maxima and
    a top-k over the `g * k` keys of the chosen groups replace the top-k over n.
    """
    n = scores.shape[-1]
    g = math.isqrt(n // k)
    G = n // max(g, 1) // 16 * 16  # a multiple of 16: unaligned rows make the strided max several times slower
    if g < 4 or G < k:
        return scores.topk(k)
    body = scores[..., : g * G].unflatten(-1, (g, G))  # [..., g, G]
    groups = body.amax(-2).topk(k, sorted=False).indices  # [..., k]
    candidates = body.gather(-1, groups.unsqueeze(-2).expand(*groups.shape[:-1], g, k))  # [..., g, k]
    positions = groups.unsqueeze(-2) + G * torch.arange(g, device=scores.device)[:, None]  # [..., g, k]
    tail = torch.arange(g * G, n, device=scores.device).expand(*scores.shape[:-1], n - g * G)
    candidates = torch.cat([candidates.flatten(-2), scores[..., g * G :]], -1)
    positions = torch.cat([positions.flatten(-2), tail], -1)
    values, best = candidates.topk(k)
    return values, positions.gather(-1, best)


class _RunningTopK:
    """The best k (score, id) pairs per row over a stream of score tiles `[rows, n]`, column j having id first_id + j.

    `torch.topk` is slow on the CPU, so once the running top-k is known (`floor`: each row's k-th best score so far)
    a tile only yields its keys that beat the floor, as faiss's per-key heap test does: the tile is cut into `GROUP`
    strided groups of keys, and only the groups whose maximum beats the floor are looked at (when more than `DENSE`
    of the groups pass, every key is compared instead). After the first tiles a few keys per row pass; they wait as
    flat (row, slot, score, id) candidates and are merged with `_topk` once they reach `MERGE_FACTOR * k` per row on
    average. The first tile, and every tile on GPUs, goes through `_topk`.
    """

    def __init__(self, k: int):
        self.k = k
        self.scores: torch.Tensor | None = None  # [rows, <= k] the best so far, sorted descending
        self.ids: torch.Tensor | None = None
        self.floor: torch.Tensor | None = None  # [rows] the k-th best score so far (-inf before k results)
        self.pending: list[tuple[torch.Tensor, ...]] = []  # (row, slot, score, id), 1-D, slot = rank within the row
        self.counts: torch.Tensor | None = None  # [rows] pending candidates per row

    def push(self, scores: torch.Tensor, first_id: int) -> None:
        if self.scores is not None and scores.device != self.scores.device:  # memory blocks on several devices
            scores = scores.to(self.scores.device)
        rows, n = scores.shape
        G = n // GROUP // 16 * 16  # keys per group, a multiple of 16: unaligned rows slow the strided max down
        if scores.device.type != "cpu" or self.floor is None or G == 0:
            return self._push_top(scores, first_id)
        body = scores[:, : GROUP * G].view(rows, GROUP, G)  # group c holds keys c, c + G, c + 2G, ...
        row, group = (body.amax(1) > self.floor[:, None]).nonzero(as_tuple=True)  # sorted by row
        if row.numel() > rows * G * DENSE:  # many groups pass: one comparison of every key is cheaper
            return self._add(scores, *(scores > self.floor[:, None]).nonzero(as_tuple=True), first_id)
        values = body[row, :, group]  # [passing groups, GROUP]: the members' scores
        keep, member = (values > self.floor[row, None]).nonzero(as_tuple=True)  # still sorted by row
        self._queue(row[keep], group[keep] + member * G, values[keep, member], first_id)
        if GROUP * G < n:  # the tail left out of the groups, < 16 * GROUP keys
            row, column = (scores[:, GROUP * G :] > self.floor[:, None]).nonzero(as_tuple=True)
            self._add(scores, row, column + GROUP * G, first_id)

    def _push_top(self, scores: torch.Tensor, first_id: int) -> None:
        values, positions = _topk(scores, min(self.k, scores.shape[1]))
        if self.scores is None and not self.pending and values.shape[1] == self.k:  # the first tile: nothing to merge
            self.scores, self.ids, self.floor = values, positions + first_id, values[:, -1]
            self.counts = torch.zeros(values.shape[0], dtype=torch.long, device=values.device)
        else:
            self._merge(values, positions + first_id)

    def _add(self, scores: torch.Tensor, row: torch.Tensor, column: torch.Tensor, first_id: int) -> None:
        """Queue the keys `(row, column)` of the tile `scores` `[rows, n]` (sorted by row), which beat the floor."""
        self._queue(row, column, scores.reshape(-1)[row * scores.shape[1] + column], first_id)

    def _queue(self, row: torch.Tensor, column: torch.Tensor, values: torch.Tensor, first_id: int) -> None:
        """Add candidates (row, tile column, score), sorted by row, to the pending ones; merge when there are enough."""
        ids = column + first_id
        counts = torch.bincount(row, minlength=self.counts.numel())
        slot = torch.arange(row.numel()) - (counts.cumsum(0) - counts)[row] + self.counts[row]
        self.pending.append((row, slot, values, ids))
        self.counts += counts
        if sum(piece[0].numel() for piece in self.pending) >= MERGE_FACTOR * self.k * self.counts.numel():
            self._merge()

    def _merge(self, scores: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> None:
        """Merge the best so far, the pending candidates and `scores`/`ids` `[rows, m]` into the best k."""
        parts = [(self.scores, self.ids)] if self.scores is not None else []
        if self.pending:
            row, slot, pending_scores, pending_ids = (torch.cat(x) for x in zip(*self.pending))
            width = int(self.counts.max())
            padded = torch.full((self.counts.numel(), width), -math.inf), torch.full((self.counts.numel(), width), -1)
            padded[0][row, slot], padded[1][row, slot] = pending_scores, pending_ids
            parts.append(padded)
        if scores is not None:
            parts.append((scores, ids))
        scores, ids = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
        self.scores, best = _topk(scores, min(self.k, scores.shape[1]))
        self.ids = ids.gather(1, best)
        full = self.scores.shape[1] == self.k
        self.floor = self.scores[:, -1] if full else torch.full_like(self.scores[:, 0], -math.inf)
        self.pending, self.counts = [], torch.zeros(self.scores.shape[0], dtype=torch.long, device=self.scores.device)

    def result(self, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores `[rows, k]` float32 sorted descending and ids int64, padded with (-inf, -1)."""
        if self.pending:
            self._merge()
        scores = torch.full((rows, self.k), -math.inf, device=device)
        ids = torch.full((rows, self.k), -1, dtype=torch.long, device=device)
        if self.scores is not None:
            scores[:, : self.scores.shape[1]] = self.scores
            ids[:, : self.ids.shape[1]] = self.ids
            ids.masked_fill_(scores == -math.inf, -1)  # padding, when fewer than k keys are valid
        return scores, ids


class MemoryIndex(ABC):
    """Top-k inner-product search over the key sets of one memory layer, one per (batch row, KV head).

    Ids are global memory positions that only grow. Subclasses implement `_search` and the hooks `_add`, `_evict`,
    `_reset`; this class validates arguments and keeps the ranges of ids added and not evicted.

    Args:
        source: zero-argument callable returning an iterator over the live memory in id order, as blocks
            `(first_id, keys [B, Hkv, n, D] float32, valid [B, n] bool)` on any device.
        **options: backend options, see `defaults` of each backend.
    """

    name: str
    defaults: dict[str, int] = {}

    def __init__(self, source: Source, **options):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            accepted = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(f"unknown option(s) {unknown} for the {self.name!r} index; accepted options: {accepted}")
        for key, value in options.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"option {key} of the {self.name!r} index must be a positive integer, got {value!r}")
        self.source = source
        self.options = {**self.defaults, **options}
        self._live = _IdRanges()
        self._next_id = 0
        self._shape: tuple[int, int, int] | None = None  # (B, Hkv, D) of the key sets, fixed by the first add

    @property
    def ntotal(self) -> int:
        """Number of ids added and not evicted, per key set (padding counted)."""
        return self._live.count()

    def add(self, first_id: int, keys: torch.Tensor, valid: torch.Tensor) -> None:
        """Add memory entries with ids `first_id .. first_id + n - 1`, after all previous ids.

        Args:
            first_id: id of entry 0.
            keys: `[B, Hkv, n, D]` float32.
            valid: `[B, n]` bool; False marks padding, which takes an id but is never returned.
        """
        if keys.dim() != 4 or tuple(valid.shape) != (keys.shape[0], keys.shape[2]):
            raise ValueError(
                f"expected keys [B, Hkv, n, D] and valid [B, n], got {tuple(keys.shape)} and {tuple(valid.shape)}"
            )
        B, H, n, D = keys.shape
        if self._shape not in (None, (B, H, D)):
            raise ValueError(f"keys [B, Hkv, n, D] = {tuple(keys.shape)} do not match (B, Hkv, D) = {self._shape}")
        if first_id < self._next_id:
            raise ValueError(f"ids must grow: first_id {first_id} < {self._next_id}; call reset() for a new session")
        if n == 0:
            return
        self._shape = (B, H, D)
        self._live.add(first_id, first_id + n)
        self._next_id = first_id + n
        self._add(first_id, keys, valid.bool())

    def search(
        self, queries: torch.Tensor, k: int, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top k keys by inner product `q . key` (not scaled) for every query, per (row, KV head).

        Args:
            queries: `[Bq, Hkv, r, D]`.
            k: number of results per query, >= 1.
            rows: `[Bq]` int64, the memory row each query row searches; None means `arange(Bq)` (then Bq == B).

        Returns:
            scores: `[Bq, Hkv, r, k]` float32, sorted descending, on the queries' device.
            ids: `[Bq, Hkv, r, k]` int64; -1 (score -inf) where fewer than k valid entries are live.
        """
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if queries.dim() != 4:
            raise ValueError(f"expected queries [Bq, Hkv, r, D], got shape {tuple(queries.shape)}")
        Bq, H, r, D = queries.shape
        if self._shape is None or not self._live.ranges:
            scores, ids = _RunningTopK(k).result(Bq * H * r, queries.device)
            return scores.view(Bq, H, r, k), ids.view(Bq, H, r, k)
        B = self._shape[0]
        if (H, D) != self._shape[1:]:
            raise ValueError(f"queries [Bq, Hkv, r, D] {list(queries.shape)} do not match (Hkv, D) = {self._shape[1:]}")
        if rows is None and Bq != B:
            raise ValueError(f"{Bq} query rows for {B} memory rows: pass rows [Bq], the memory row each one searches")
        if rows is not None:
            if rows.shape != (Bq,) or rows.dtype.is_floating_point:
                raise ValueError(f"rows must be an integer tensor of shape [{Bq}], got {rows.dtype} {list(rows.shape)}")
            rows = rows.long()
            if Bq and (int(rows.min()) < 0 or int(rows.max()) >= B):
                raise ValueError(f"rows must lie in [0, {B}), got {rows.tolist()}")
        return self._search(queries, k, rows)

    def evict(self, lo: int, hi: int) -> None:
        """Ids in `[lo, hi)` have left memory: they are never returned again."""
        removed = self._live.remove(lo, hi)
        if removed:
            self._evict(removed)

    def reset(self) -> None:
        """Forget everything (a new session)."""
        self._live = _IdRanges()
        self._next_id = 0
        self._shape = None
        self._reset()

    @abstractmethod
    def _search(self, queries: torch.Tensor, k: int, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def _add(self, first_id: int, keys: torch.Tensor, valid: torch.Tensor) -> None:
        pass

    def _evict(self, removed: list[tuple[int, int]]) -> None:
        pass

    def _reset(self) -> None:
        pass


def _beam_group(rows: torch.Tensor | None, B: int) -> int | None:
    """G when `rows` is `arange(B).repeat_interleave(G)` (None counts as G = 1), else None."""
    if rows is None:
        return 1
    if rows.shape[0] % B:
        return None
    G = rows.shape[0] // B
    return G if torch.equal(rows, torch.arange(B, device=rows.device).repeat_interleave(G)) else None


def _inner_products(q: torch.Tensor, keys: torch.Tensor, out: torch.Tensor) -> None:
    """`out [Bm, H, R, n] = q [Bm, H, R, D] @ keys [Bm, H, n, D]^T`, in fp32.

    With one key set, `torch.mm` runs faster than a batched matmul of one batch, and a single query (a matrix-vector
    product, bound by memory) is split into MATVEC_SPLIT batches so that every thread streams part of the keys.
    """
    Bm, H, R, D = q.shape
    n = keys.shape[2]
    if Bm * H > 1:
        torch.matmul(q, keys.transpose(-1, -2), out=out)
    elif R == 1 and n % MATVEC_SPLIT == 0 and keys[0, 0].is_contiguous():
        parts = keys[0, 0].view(MATVEC_SPLIT, n // MATVEC_SPLIT, D)
        torch.bmm(q[0].expand(MATVEC_SPLIT, 1, D), parts.transpose(1, 2), out=out.view(MATVEC_SPLIT, 1, -1))
    else:
        torch.mm(q[0, 0], keys[0, 0].T, out=out[0, 0])


class ExactIndex(MemoryIndex):
    """Exact top-k, the reference backend. Stores nothing: each search scans `source()`.

    Memory on the CPU, with the C kernel available (`kernel_longllama.topk_kernel()`): `_scan_kernel`. Otherwise
    scores are fp32 matmul tiles of about `SCORE_TILE` entries, computed on the memory's device; padding is masked to
    -inf and every tile is merged into a running top-k (`_RunningTopK`). Both give the same results up to float
    rounding. Beam-search rows (`arange(B).repeat_interleave(G)`) are folded into the query axis, so keys are never
    copied; other `rows` gather the keys of each tile. Options: none.
    """

    name = "exact"

    def _search(self, queries, k, rows):
        B = self._shape[0]
        Bq, H, r, D = queries.shape
        G = _beam_group(rows, B)
        if G is not None and G > 1:
            q = queries.unflatten(0, (B, G)).transpose(1, 2).reshape(B, H, G * r, D)  # [B, H, G*r, D]
        else:
            q = queries
        gather = None if G is not None else rows
        Bm, R = q.shape[0], q.shape[2]
        # queries per pass over the memory: a score tile of MIN_TILE_KEYS keys at least, and running top-k state
        # (scores and ids, `candidates(k)` per query in the kernel) of at most TOPK_STATE elements
        chunk = max(1, min(SCORE_TILE // (Bm * H * MIN_TILE_KEYS), TOPK_STATE // (Bm * H * candidates(k))))
        results = [self._scan(q[:, :, i : i + chunk], k, gather) for i in range(0, R, chunk)]
        scores, ids = results[0] if len(results) == 1 else (torch.cat(x, 2) for x in zip(*results))  # [Bm, H, R, k]
        if G is not None and G > 1:
            scores, ids = (x.unflatten(2, (G, r)).transpose(1, 2).reshape(Bq, H, r, k) for x in (scores, ids))
        return scores.to(queries.device), ids.to(queries.device)

    def _scan(self, q: torch.Tensor, k: int, gather: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Running top-k of `q` `[Bm, H, R, D]` over every live key of `source()` (of memory rows `gather`)."""
        Bm, H, R, D = q.shape
        step = max(MIN_TILE_KEYS, SCORE_TILE // max(1, Bm * H * R)) // MIN_TILE_KEYS * MIN_TILE_KEYS
        tiles = self._tiles(step)
        first = next(tiles, None)
        tiles = tiles if first is None else itertools.chain([first], tiles)
        on_cpu = first is None or first[1].device.type == "cpu"  # search where the memory lives
        lib = topk_kernel() if on_cpu and k <= KERNEL_MAX_K else None
        if lib is not None:
            return self._scan_kernel(KernelTopK(lib, Bm * H * R, k), q.to("cpu", torch.float32), tiles, gather)
        top = _RunningTopK(k)
        device = q.device
        for first_id, keys, valid in tiles:
            if gather is not None:
                index = gather.to(keys.device)
                keys, valid = keys[index], None if valid is None else valid[index]
            device, n = keys.device, keys.shape[2]
            scores = _score_tile(Bm * H * R * n, device).view(Bm, H, R, n)
            _inner_products(q.to(device, torch.float32), keys.float(), out=scores)
            if valid is not None:
                scores.masked_fill_(~valid[:, None, None, :], -math.inf)
            top.push(scores.view(Bm * H * R, n), first_id)
        scores, ids = top.result(Bm * H * R, device)
        return scores.view(Bm, H, R, k), ids.view(Bm, H, R, k)

    def _scan_kernel(self, top, q, tiles, gather):
        """`_scan` of memory on the CPU with the C kernel (`kernel_longllama`): a few queries per key set
        (`FUSED_QUERIES`) have their products computed with the selection, in one pass over the keys; more go through
        torch's matmul tile by tile, and the kernel selects from each tile."""
        Bm, H, R, D = q.shape
        fused = R <= FUSED_QUERIES and D % 8 == 0  # the kernel's SIMD product takes 8 floats at a time
        for first_id, keys, valid in tiles:
            keys = keys.to("cpu", torch.float32)  # memory split between the CPU and another device: rare
            valid = None if valid is None else valid.cpu()
            if gather is not None:
                keys, valid = keys[gather], None if valid is None else valid[gather]
            if fused:
                top.scan(q, keys, first_id, valid)
                continue
            scores = _score_tile(Bm * H * R * keys.shape[2], q.device).view(Bm, H, R, keys.shape[2])
            _inner_products(q, keys, out=scores)
            top.push(scores.view(Bm * H * R, -1), first_id, valid, rows_per_valid=H * R)
        scores, ids = top.result()
        return scores.view(Bm, H, R, -1), ids.view(Bm, H, R, -1)

    def _tiles(self, step: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """The live part of `source()` as views `(first_id, keys [B, H, n, D], valid [B, n] bool)`, n <= step.

        `valid` is None for a block without padding on the CPU, where checking once saves a pass over every tile.
        """
        for first_id, keys, valid in self.source():
            valid = valid.bool()
            if valid.device.type == "cpu" and (valid.numel() == 0 or bool(valid.view(torch.uint8).min())):
                valid = None  # bool reductions are slow on the CPU; the same bytes as uint8 are not
            for lo, hi in self._live.intersect(first_id, first_id + keys.shape[2]):
                for start in range(lo, hi, step):
                    offset, n = start - first_id, min(step, hi - start)
                    yield start, keys.narrow(2, offset, n), None if valid is None else valid.narrow(1, offset, n)


class _HnswIndex(MemoryIndex):
    """Shared by the approximate backends: one HNSW graph per (memory row, KV head), float32 on the CPU.

    The graphs search by Euclidean distance, on keys with one extra coordinate: `key' = [key, sqrt(R^2 - |key|^2)]`,
    `query' = [query, 0]`, so that `|query' - key'|^2 = |query|^2 + R^2 - 2 query . key` orders keys exactly as the
    inner product does (the transform of Bachrach et al. 2014). HNSW graphs built on the inner product directly leave
    keys of small norm almost unreachable: on the demo model's keys their recall@128 fell to 0.44 at 1M keys.
    `R` is `RADIUS_HEADROOM` times the largest key norm seen; a key beyond it rebuilds the graphs with a new `R`.

    Options: `M` (graph degree, default 32), `ef_search` (candidate list of a search, default 8192, raised to k:
    recall@128 on the demo model's keys at 1M keys was 0.98-0.99 with 8192 in two runs, 0.90-0.93 with 4096,
    0.82-0.88 with 2048; graphs built by several threads differ from run to run),
    `ef_construction` (candidate list while inserting, default 100). Threads: `torch.get_num_threads()`.
    """

    defaults = {"M": 32, "ef_search": 8192, "ef_construction": 100}

    def __init__(self, source: Source, **options):
        super().__init__(source, **options)
        self._lib = _library(self.name)
        self._rows: list = []  # per memory row: the backend's state, with a `live` count
        self._radius = 0.0  # R of the transform (0: no key yet)

    def _add(self, first_id, keys, valid):
        B, H, n, D = keys.shape
        norms = keys.detach().float().norm(dim=-1).masked_fill(~valid.to(keys.device)[:, None, :], 0)
        largest = float(norms.max())
        if not self._rows or largest > self._radius:
            self._radius = RADIUS_HEADROOM * max(largest, self._radius, 1e-6)
            self._rebuild(range(B), upto=first_id)  # earlier entries (if any) with the new R
        self._add_rows(range(B), first_id, keys, valid)

    def _rebuild(self, rows, upto: int | None = None) -> None:
        """New graphs for memory `rows`, filled from `source()` with the live ids below `upto` (default: all)."""
        H, D = self._shape[1:]
        if not self._rows:
            self._rows = [None] * self._shape[0]
        for b in rows:
            self._rows[b] = self._new_row(H, D + 1)
        if upto == 0:
            return
        for first_id, keys, valid in self.source():
            end = first_id + keys.shape[2] if upto is None else min(first_id + keys.shape[2], upto)
            for lo, hi in self._live.intersect(first_id, end):
                part = (keys.narrow(2, lo - first_id, hi - lo), valid.narrow(1, lo - first_id, hi - lo))
                self._add_rows(rows, lo, *part)

    def _add_rows(self, rows, first_id: int, keys: torch.Tensor, valid: torch.Tensor) -> None:
        keys, valid = keys.detach().to("cpu", torch.float32), valid.cpu()
        lift = (self._radius**2 - keys.pow(2).sum(-1, keepdim=True)).clamp(min=0).sqrt()
        keys = torch.cat([keys, lift], dim=-1)  # [B, H, n, D + 1]: the inner product becomes a distance
        for b in rows:
            positions = valid[b].nonzero().squeeze(1)  # padding never enters the graphs
            if positions.numel():
                self._add_row(self._rows[b], positions + first_id, keys[b][:, positions].contiguous())  # [H, m, D+1]

    def _reset(self):
        self._rows = []
        self._radius = 0.0

    def _search(self, queries, k, rows):
        Bq, H, r, D = queries.shape
        q = queries.detach().to("cpu", torch.float32)
        rows = torch.arange(Bq) if rows is None else rows.cpu()
        scores = torch.full((Bq, H, r, k), -math.inf)
        ids = torch.full((Bq, H, r, k), -1, dtype=torch.long)
        for m in rows.unique().tolist():
            members = (rows == m).nonzero().squeeze(1)  # the query rows that search memory row m
            if self._rows[m].live == 0:
                continue
            for h in range(H):
                x = q[members, h].reshape(-1, D)  # [len(members) * r, D]
                lifted = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=-1)
                distance, i = self._search_graph(self._rows[m], h, lifted, k)  # [len(members) * r, k'], k' <= k
                # |q' - k'|^2 = |q|^2 + R^2 - 2 q . k
                s = (x.pow(2).sum(-1, keepdim=True) + self._radius**2 - distance) / 2
                s = s.masked_fill(i < 0, -math.inf)
                scores[members, h, :, : s.shape[1]] = s.view(-1, r, s.shape[1])
                ids[members, h, :, : s.shape[1]] = i.view(-1, r, s.shape[1])
        return scores.to(queries.device), ids.to(queries.device)

    @abstractmethod
    def _new_row(self, H: int, D: int): ...

    @abstractmethod
    def _add_row(self, row, ids: torch.Tensor, keys: torch.Tensor) -> None: ...

    @abstractmethod
    def _search_graph(self, row, h: int, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared Euclidean distances and ids `[n, k']` of the nearest entries of graph `h` (ids -1: none)."""


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort `ranges` `[(lo, hi), ...]` and join those that overlap or touch."""
    merged: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


class _FaissRow:
    """The graphs of one memory row, one per KV head, and the global id of each of their entries."""

    def __init__(self, indexes: list):
        self.indexes = indexes
        self.ids = torch.empty(0, dtype=torch.long)  # [ntotal of each graph], sorted
        self.evicted: list[tuple[int, int]] = []  # ranges of graph positions evicted since the last rebuild

    @property
    def live(self) -> int:
        return self.ids.numel() - sum(b - a for a, b in self.evicted)


class FaissIndex(_HnswIndex):
    """Approximate top-k with `faiss.IndexHNSWFlat` (on the transformed keys), one graph per (memory row, KV head).

    Evicted entries stay in the graphs and are filtered at search time by an `IDSelector`; a row is rebuilt from
    `source()` once its evicted entries outnumber its live ones, so a graph holds at most twice the live memory.
    """

    name = "faiss"

    def _new_row(self, H, D):
        indexes = []
        for _ in range(H):
            index = self._lib.IndexHNSWFlat(D, self.options["M"], self._lib.METRIC_L2)
            index.hnsw.efConstruction = self.options["ef_construction"]
            indexes.append(index)
        return _FaissRow(indexes)

    def _add_row(self, row, ids, keys):
        self._lib.omp_set_num_threads(torch.get_num_threads())
        for index, x in zip(row.indexes, keys):
            index.add(x.numpy())
        row.ids = torch.cat([row.ids, ids])

    def _evict(self, removed):
        stale = []
        for b, row in enumerate(self._rows):
            for lo, hi in removed:
                a, z = torch.searchsorted(row.ids, torch.tensor([lo, hi])).tolist()
                if z > a:
                    row.evicted = _merge_ranges(row.evicted + [(a, z)])
            if row.ids.numel() - row.live > row.live:
                stale.append(b)
        if stale:
            self._rebuild(stale)

    def _search_graph(self, row, h, x, k):
        lib = self._lib
        lib.omp_set_num_threads(torch.get_num_threads())
        params = lib.SearchParametersHNSW(efSearch=max(self.options["ef_search"], k))
        if row.evicted:  # faiss keeps the selectors alive through their referenced_objects
            ranges = [lib.IDSelectorRange(a, b) for a, b in row.evicted]
            union = ranges[0]
            for other in ranges[1:]:
                union = lib.IDSelectorOr(union, other)
            params.sel = lib.IDSelectorNot(union)
        distances, positions = row.indexes[h].search(x.numpy(), k, params=params)
        distances, positions = torch.from_numpy(distances), torch.from_numpy(positions)
        return distances, row.ids[positions.clamp(min=0)].masked_fill(positions < 0, -1)


class _HnswlibRow:
    """The graphs of one memory row, one per KV head, with their live labels (global ids) and free slots."""

    def __init__(self, indexes: list):
        self.indexes = indexes
        self.labels = torch.empty(0, dtype=torch.long)  # live labels, sorted
        self.deleted = 0  # slots marked deleted and not yet reused

    @property
    def live(self) -> int:
        return self.labels.numel()


class HnswlibIndex(_HnswIndex):
    """Approximate top-k with `hnswlib.Index(space="l2")` (on the transformed keys), one per (memory row, KV head).

    Labels are the global ids. Evicted entries are marked deleted and their slots reused by later adds
    (`allow_replace_deleted`), so a graph holds at most the largest live memory.
    """

    name = "hnswlib"

    def _new_row(self, H, D):
        indexes = []
        for _ in range(H):
            index = self._lib.Index(space="l2", dim=D)
            index.init_index(
                max_elements=1024,
                ef_construction=self.options["ef_construction"],
                M=self.options["M"],
                allow_replace_deleted=True,
            )
            indexes.append(index)
        return _HnswlibRow(indexes)

    def _add_row(self, row, ids, keys):
        needed = row.indexes[0].get_current_count() + max(0, ids.numel() - row.deleted)
        for index, x in zip(row.indexes, keys):
            if index.get_max_elements() < needed:
                index.resize_index(max(needed, 2 * index.get_max_elements()))
            index.add_items(x.numpy(), ids.numpy(), num_threads=torch.get_num_threads(), replace_deleted=True)
        row.deleted = max(0, row.deleted - ids.numel())
        row.labels = torch.cat([row.labels, ids])

    def _evict(self, removed):
        for row in self._rows:
            for lo, hi in removed:
                a, z = torch.searchsorted(row.labels, torch.tensor([lo, hi])).tolist()
                for index in row.indexes:
                    for label in row.labels[a:z].tolist():
                        index.mark_deleted(label)
                row.labels = torch.cat([row.labels[:a], row.labels[z:]])
                row.deleted += z - a

    def _search_graph(self, row, h, x, k):
        k = min(k, row.live)  # hnswlib raises when it cannot return k results
        index = row.indexes[h]
        index.set_ef(max(self.options["ef_search"], k))
        try:
            labels, distances = index.knn_query(x.numpy(), k=k, num_threads=torch.get_num_threads())
        except RuntimeError:  # too few found among deleted entries: search the whole live graph
            index.set_ef(max(row.live, k))
            labels, distances = index.knn_query(x.numpy(), k=k, num_threads=torch.get_num_threads())
        return torch.from_numpy(distances), torch.from_numpy(labels.view("int64"))


INDEX_BACKENDS: dict[str, type[MemoryIndex]] = {"exact": ExactIndex, "faiss": FaissIndex, "hnswlib": HnswlibIndex}


def make_index(name: str, source: Source, **options) -> MemoryIndex:
    """Build the index backend `name` ("exact", "faiss" or "hnswlib") over `source` with backend `options`."""
    if name not in INDEX_BACKENDS:
        raise ValueError(f"unknown index backend {name!r}; choose one of: {', '.join(INDEX_BACKENDS)}")
    return INDEX_BACKENDS[name](source, **options)


__all__ = ["INDEX_BACKENDS", "ExactIndex", "FaissIndex", "HnswlibIndex", "MemoryIndex", "make_index"]
