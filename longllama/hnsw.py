"""Approximate top-k search: the `"faiss"` and `"hnswlib"` index backends the package registers (docs/memory.md).

One HNSW graph per key set (memory row, KV head), on the CPU. They trade recall for speed: a search visits O(log n)
keys instead of n and may miss some of the true top k. They read `source()` only to rebuild after evictions. The
libraries are optional extras (`pip install "longllama[faiss]"` or `"longllama[hnswlib]"`), imported on first use.
"""

import importlib
import math
from abc import abstractmethod

import torch

from .modeling.knn_longllama import MemoryIndex, Source

# The optional libraries, imported by `_library` on first use; None once an import has failed.
_NOT_IMPORTED = object()
faiss = _NOT_IMPORTED
hnswlib = _NOT_IMPORTED
_PIP_PACKAGES = {"faiss": "faiss-cpu", "hnswlib": "hnswlib"}
# The transform radius R is this many times the largest key norm seen (see `_HnswIndex`).
RADIUS_HEADROOM = 1.25


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


__all__ = ["FaissIndex", "HnswlibIndex"]
