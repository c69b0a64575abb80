"""Top-k (kNN) search by inner product over the memory of one LongLLaMA memory layer (docs/memory.md).

One index object serves one memory layer and holds one key set per (batch row, KV head). The interface follows
faiss: `add`, `search(queries, k) -> (scores, ids)`, `evict`, `reset`, `ntotal`, with torch tensors in and out and
`-1` as the "no result" id (its score is `-inf`). Ids are global memory positions (0, 1, 2, ...) that only grow;
padding entries (`valid` False) take an id but are never returned.

`source` is a zero-argument callable returning an iterator over the live memory of the layer, in id order:
`(first_id, keys [B, Hkv, n, D], valid [B, n] bool)`, entry `j` of a block having id `first_id + j`; keys are floats
of any precision (memory's stored dtype).

Backends are looked up by name in `INDEX_BACKENDS`. This file, which ships in every checkpoint, has the reference
`"exact"` backend in plain torch. The longllama package fills the registry when it is imported (docs/architecture.md):
a faster `"exact"` (a compiled C kernel on the CPU) with the same results, and the approximate `"faiss"` and
`"hnswlib"` backends.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch

Source = Callable[[], Iterator[tuple[int, torch.Tensor, torch.Tensor]]]

# One score tile of the exact search holds about this many fp32 scores (16 MiB): small enough to stay in the
# allocator's cache and mostly in L3, large enough for an efficient matmul.
SCORE_TILE = 2**22
MIN_TILE_KEYS = 256
TOPK_STATE = 2**22  # elements of running top-k state per pass (48 MiB of scores and ids): bounds memory for large k


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


class MemoryIndex(ABC):
    """Top-k inner-product search over the key sets of one memory layer, one per (batch row, KV head).

    Ids are global memory positions that only grow. Subclasses implement `_search` and the hooks `_add`, `_evict`,
    `_reset`; this class validates arguments and keeps the ranges of ids added and not evicted.

    Args:
        source: zero-argument callable returning an iterator over the live memory in id order, as blocks
            `(first_id, keys [B, Hkv, n, D] float, valid [B, n] bool)` on any device.
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
            scores, ids = RunningTopK(Bq * H * r, k, queries.device).result()
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


class RunningTopK:
    """The best k (score, id) pairs of each of `rows` rows over a stream of score tiles, in plain torch.

    `push(scores [rows, n], first_id, valid=None, rows_per_valid=1)` offers a tile whose column j has id
    `first_id + j`; `valid` `[rows // rows_per_valid, n]` bool marks the columns each group of rows may return.
    `result()` gives scores `[rows, k]` float32 sorted descending and ids int64, padded with (-inf, -1). The package's
    faster implementations (longllama/search.py) have the same interface and the same results.
    """

    def __init__(self, rows: int, k: int, device: torch.device | str = "cpu"):
        self.k = k
        self.scores = torch.full((rows, k), -math.inf, device=device)
        self.ids = torch.full((rows, k), -1, dtype=torch.long, device=device)

    def push(self, scores: torch.Tensor, first_id: int, valid: torch.Tensor | None = None, rows_per_valid: int = 1):
        rows, n = scores.shape
        scores = scores.to(self.scores.device).nan_to_num(-math.inf, math.inf, -math.inf)  # NaN never wins (= kernel)
        if valid is not None:
            hidden = ~valid.to(scores.device).repeat_interleave(rows_per_valid, 0)
            scores = scores.masked_fill(hidden, -math.inf)
        ids = torch.arange(first_id, first_id + n, device=scores.device).expand(rows, n)
        self.scores, best = torch.cat([self.scores, scores], 1).topk(self.k, dim=1)
        self.ids = torch.cat([self.ids, ids], 1).gather(1, best)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scores, self.ids.masked_fill(self.scores == -math.inf, -1)


class ExactIndex(MemoryIndex):
    """Exact top-k, the reference backend. Stores nothing: each search scans `source()`.

    Scores are fp32 matmul tiles of about `SCORE_TILE` entries, computed on the memory's device; each tile is offered
    to a running top-k. Beam-search rows (`arange(B).repeat_interleave(G)`) are folded into the query axis, so keys
    are never copied; other `rows` gather the keys of each tile. Options: none. The package's subclass
    (longllama/search.py) overrides the hooks `_running_top_k`, `_offer`, `_products` and `_score_tile` to go faster.
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
        # (scores and ids: at most 2k + 16 per query in every implementation) of at most TOPK_STATE elements
        chunk = max(1, min(SCORE_TILE // (Bm * H * MIN_TILE_KEYS), TOPK_STATE // (Bm * H * (2 * k + 16))))
        results = [self._scan(q[:, :, i : i + chunk], k, gather) for i in range(0, R, chunk)]
        scores, ids = results[0] if len(results) == 1 else (torch.cat(x, 2) for x in zip(*results))  # [Bm, H, R, k]
        if G is not None and G > 1:
            scores, ids = (x.unflatten(2, (G, r)).transpose(1, 2).reshape(Bq, H, r, k) for x in (scores, ids))
        return scores.to(queries.device), ids.to(queries.device)

    def _scan(self, q: torch.Tensor, k: int, gather: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Running top-k of `q` `[Bm, H, R, D]` over every live key of `source()` (of memory rows `gather`)."""
        Bm, H, R, D = q.shape
        step = max(MIN_TILE_KEYS, SCORE_TILE // max(1, Bm * H * R)) // MIN_TILE_KEYS * MIN_TILE_KEYS
        top = None
        for first_id, keys, valid in self._tiles(step):
            if gather is not None:
                index = gather.to(keys.device)
                keys, valid = keys[index], None if valid is None else valid[index]
            if top is None:  # search where the memory lives
                top = self._running_top_k(Bm * H * R, k, keys.device)
            self._offer(top, q, keys, first_id, valid)
        scores, ids = (top or RunningTopK(Bm * H * R, k, q.device)).result()
        return scores.view(Bm, H, R, k), ids.view(Bm, H, R, k)

    def _offer(self, top, q: torch.Tensor, keys: torch.Tensor, first_id: int, valid: torch.Tensor | None) -> None:
        """Offer the inner products of `q` `[Bm, H, R, D]` and `keys` `[Bm, H, n, D]` (ids from `first_id`; `valid`
        `[Bm, n]` bool or None for all) to the running top-k `top`."""
        Bm, H, R, _ = q.shape
        scores = self._score_tile(Bm * H * R * keys.shape[2], keys.device).view(Bm, H, R, keys.shape[2])
        self._products(q.to(keys.device, torch.float32), keys.float(), scores)
        top.push(scores.view(Bm * H * R, -1), first_id, valid, rows_per_valid=H * R)

    def _products(self, q: torch.Tensor, keys: torch.Tensor, out: torch.Tensor) -> None:
        """`out [Bm, H, R, n] = q [Bm, H, R, D] @ keys [Bm, H, n, D]^T`, all float32."""
        torch.matmul(q, keys.transpose(-1, -2), out=out)

    def _running_top_k(self, rows: int, k: int, device: torch.device) -> RunningTopK:
        return RunningTopK(rows, k, device)

    def _score_tile(self, numel: int, device: torch.device) -> torch.Tensor:
        return torch.empty(numel, device=device)

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


# The index backends by name (config `mem_index`). The longllama package adds and replaces entries on import.
INDEX_BACKENDS: dict[str, type[MemoryIndex]] = {"exact": ExactIndex}
PACKAGE_BACKENDS = ("faiss", "hnswlib")  # provided by the package, each with a pip extra of its name


def make_index(name: str, source: Source, **options) -> MemoryIndex:
    """Build the index backend `name` (a key of `INDEX_BACKENDS`) over `source` with backend `options`."""
    if name in PACKAGE_BACKENDS and name not in INDEX_BACKENDS:
        raise ImportError(
            f'mem_index="{name}" is provided by the longllama package: pip install "longllama[{name}]" and '
            "`import longllama` before loading the model"
        )
    if name not in INDEX_BACKENDS:
        raise ValueError(f"unknown index backend {name!r}; choose one of: {', '.join(INDEX_BACKENDS)}")
    return INDEX_BACKENDS[name](source, **options)


__all__ = ["INDEX_BACKENDS", "ExactIndex", "MemoryIndex", "RunningTopK", "make_index"]
