"""Exact top-k search, accelerated: the `"exact"` index backend the package registers (docs/architecture.md).

The checkpoint code (`longllama.modeling.knn_longllama`) has the reference exact search in plain torch. This module
gives the same results (up to float rounding of the scores), faster:

- on the CPU, a C kernel built when the package is installed (`longllama/csrc/topk.h`, `kernels.py`): each query keeps
  a running top-k (a buffer of `2k + 16` candidates and a floor they must beat, a quickselect when it fills). For a
  few queries per key set (decoding) the inner products are computed in the kernel too, in one pass over the keys.
  It runs on torch's own OpenMP threads. Two builds: AVX2 + FMA (imported on CPUs that have both) and portable.
- without the kernel (no C compiler at install time, k above `MAX_K`, memory on a GPU, or `LONGLLAMA_KERNELS=0`),
  `FilteredTopK`: a torch running top-k that only looks at the keys that beat each query's current k-th score.

Nothing is compiled or loaded from a writable location at run time: the kernel is an ordinary extension module of the
package. Without it, the first search says so once (`kernels.compiled`).
"""

import math

import torch

from . import kernels
from .kernels import reusable_buffer
from .modeling import knn_longllama

MAX_K = 4096  # larger k use the torch path: a row's candidates are copied onto the C stack (32 KiB) when selecting
NO_STATE = (0, 0, 0, 0, 0, 0)  # the kernel's NULL state
# FilteredTopK cuts a score tile into GROUP strided groups of keys and merges its pending candidates once they reach
# MERGE_FACTOR * k per query on average.
GROUP = 8
MERGE_FACTOR = 1
DENSE = 0.25
# With the kernel, up to this many queries per key set compute their products in the kernel, in one pass over the
# keys (faster than matmul tiles up to about 256 queries on 2 AVX2 cores); more go through torch's matmul tile by tile.
FUSED_QUERIES = 128
MATVEC_SPLIT = 8


def candidates(k: int) -> int:
    """Candidates a query keeps in the kernel for a top-k of `k` (`cap` in the C source): 2k + 16."""
    return 2 * k + 16


class KernelTopK:
    """The running top-k (score, id) of `rows` result rows, kept by the compiled kernel `lib` (`kernels.compiled()`).

    The interface of `RunningTopK` (`push` a tile of scores, `result`), plus `scan`: queries and keys, the products
    computed in the kernel. Ids may come in any order. Uses `torch.get_num_threads()` threads. CPU only; float32
    scores and queries, keys in float32 or bfloat16 (read as stored)."""

    def __init__(self, rows: int, k: int, lib=None):
        if not 1 <= k <= MAX_K:
            raise ValueError(f"the top-k kernel takes 1 <= k <= {MAX_K}, got {k}")
        lib = lib or kernels.compiled()
        if lib is None:
            raise RuntimeError("the compiled top-k kernel is not available (see the warning of kernels.compiled())")
        self.lib, self.rows, self.k, self.cap = lib, rows, k, candidates(k)
        self.threads = torch.get_num_threads()
        self.v = reusable_buffer("v", rows * self.cap, torch.float32).view(rows, self.cap)
        self.ids = reusable_buffer("ids", rows * self.cap, torch.int64).view(rows, self.cap)
        self.count = reusable_buffer("count", rows, torch.int64).zero_()
        self.floor = reusable_buffer("floor", rows, torch.float32).fill_(-math.inf)
        self.state = self._state(self.v, self.ids, self.count, self.floor)
        self.scratch = None  # per-thread states of `scan`, made on first use

    def _state(self, v, ids, count, floor) -> tuple[int, ...]:
        """The kernel's `topk_state`: pointers to the buffers (kept alive by `self`) and sizes."""
        return v.data_ptr(), ids.data_ptr(), count.data_ptr(), floor.data_ptr(), self.cap, self.k

    def push(self, scores: torch.Tensor, first_id: int, valid: torch.Tensor | None = None, rows_per_valid: int = 1):
        """Offer `scores` `[rows, n]` (column c has id `first_id + c`); `valid` `[rows // rows_per_valid, n]` bool
        marks the columns each group of `rows_per_valid` rows may return (None: all)."""
        rows, n = scores.shape
        if rows != self.rows or scores.dtype != torch.float32 or scores.stride(1) != 1:
            raise ValueError(f"expected float32 scores [{self.rows}, n] with unit column stride, got {scores.dtype} "
                             f"{list(scores.shape)}")
        valid = self._valid(valid, rows // rows_per_valid, n)
        self.lib.push(
            self.state, rows, scores.data_ptr(), n, scores.stride(0), first_id,
            0 if valid is None else valid.data_ptr(), 0 if valid is None else valid.stride(0), rows_per_valid,
            self.threads,
        )

    def scan(self, queries: torch.Tensor, keys: torch.Tensor, first_id: int, valid: torch.Tensor | None = None):
        """Offer the inner products of `queries` `[B, H, R, D]` float32 with `keys` `[B, H, n, D]` float32 or bfloat16
        (key c has id `first_id + c`; rows are `(b, h, r)` flattened); `valid` `[B, n]` bool, None for all."""
        B, H, R, D = queries.shape
        n = keys.shape[2]
        if B * H * R != self.rows or keys.shape[:2] != queries.shape[:2] or keys.shape[3] != D:
            raise ValueError(f"queries {list(queries.shape)} and keys {list(keys.shape)} do not match {self.rows} rows")
        queries = queries.contiguous()
        if keys.stride(3) != 1 or keys.stride(2) != D:
            keys = keys.contiguous()
        if queries.dtype != torch.float32 or keys.dtype not in kernels.DTYPES or D > kernels.MAX_D:
            raise ValueError(f"expected float32 queries and float32 or bfloat16 keys with head_dim <= {kernels.MAX_D}, "
                             f"got {queries.dtype} and {keys.dtype} {list(keys.shape)}")
        if self.scratch is None and self.threads > 1:
            copies = self.threads - 1
            self.scratch_tensors = [
                reusable_buffer("scratch_v", copies * self.rows * self.cap, torch.float32),
                reusable_buffer("scratch_ids", copies * self.rows * self.cap, torch.int64),
                reusable_buffer("scratch_count", copies * self.rows, torch.int64),
                reusable_buffer("scratch_floor", copies * self.rows, torch.float32),
            ]
            self.scratch = self._state(*self.scratch_tensors)
        valid = self._valid(valid, B, n)
        self.lib.scan(
            self.state, queries.data_ptr(), H, B * H, R, D, keys.data_ptr(), kernels.DTYPES[keys.dtype], keys.stride(0),
            keys.stride(1), n,
            first_id, 0 if valid is None else valid.data_ptr(), 0 if valid is None else valid.stride(0),
            self.scratch or NO_STATE, self.threads,
        )

    @staticmethod
    def _valid(valid: torch.Tensor | None, rows: int, n: int) -> torch.Tensor | None:
        """`valid` checked, with unit column stride (the caller keeps the returned tensor alive during the call)."""
        if valid is None:
            return None
        if valid.shape != (rows, n) or valid.dtype != torch.bool:
            raise ValueError(f"expected valid bool [{rows}, {n}], got {valid.dtype} {list(valid.shape)}")
        return valid if valid.stride(1) == 1 else valid.contiguous()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores `[rows, k]` float32 sorted descending (ties: earliest id first) and ids int64, padded with
        (-inf, -1) where fewer than k were offered."""
        self.lib.finish(self.state, self.rows)
        scores, order = self.v[:, : self.k].sort(dim=1, descending=True, stable=True)
        return scores, self.ids[:, : self.k].gather(1, order)


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


class FilteredTopK(knn_longllama.RunningTopK):
    """The best k (score, id) pairs per row over a stream of score tiles `[rows, n]`, column j having id first_id + j.

    `torch.topk` is slow on the CPU, so once the running top-k is known (`floor`: each row's k-th best score so far)
    a tile only yields its keys that beat the floor, as faiss's per-key heap test does: the tile is cut into `GROUP`
    strided groups of keys, and only the groups whose maximum beats the floor are looked at (when more than `DENSE`
    of the groups pass, every key is compared instead). After the first tiles a few keys per row pass; they wait as
    flat (row, slot, score, id) candidates and are merged with `_topk` once they reach `MERGE_FACTOR * k` per row on
    average. The first tile, and every tile on GPUs, goes through `_topk`.
    """

    def __init__(self, rows: int, k: int, device: torch.device | str = "cpu"):
        self.k, self.rows, self.device = k, rows, torch.device(device)
        self.scores: torch.Tensor | None = None  # [rows, <= k] the best so far, sorted descending
        self.ids: torch.Tensor | None = None
        self.floor: torch.Tensor | None = None  # [rows] the k-th best score so far (-inf before k results)
        self.pending: list[tuple[torch.Tensor, ...]] = []  # (row, slot, score, id), 1-D, slot = rank within the row
        self.counts: torch.Tensor | None = None  # [rows] pending candidates per row

    def push(self, scores: torch.Tensor, first_id: int, valid: torch.Tensor | None = None, rows_per_valid: int = 1):
        if self.scores is not None and scores.device != self.scores.device:  # memory blocks on several devices
            scores = scores.to(self.scores.device)
        rows, n = scores.shape
        torch.nan_to_num(scores, -math.inf, math.inf, -math.inf, out=scores)  # NaN scores count as -inf (as in C)
        if valid is not None:  # padding: masked in place (the tile is the caller's scratch)
            scores.view(-1, rows_per_valid, n).masked_fill_(~valid.to(scores.device)[:, None, :], -math.inf)
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

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pending:
            self._merge()
        device = self.device if self.scores is None else self.scores.device
        scores = torch.full((self.rows, self.k), -math.inf, device=device)
        ids = torch.full((self.rows, self.k), -1, dtype=torch.long, device=device)
        if self.scores is not None:
            scores[:, : self.scores.shape[1]] = self.scores
            ids[:, : self.ids.shape[1]] = self.ids
            ids.masked_fill_(scores == -math.inf, -1)  # padding, when fewer than k keys are valid
        return scores, ids


def _inner_products(q: torch.Tensor, keys: torch.Tensor, out: torch.Tensor) -> None:
    """`out [Bm, H, R, n] = q [Bm, H, R, D] @ keys [Bm, H, n, D]^T`, in fp32, faster than one matmul on the CPU.

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


class ExactIndex(knn_longllama.ExactIndex):
    """The `"exact"` backend of the package: the reference `ExactIndex` with the compiled kernel on the CPU (fused
    products for up to `FUSED_QUERIES` queries per key set when head_dim % 8 == 0, else matmul tiles that the kernel
    selects from) and `FilteredTopK` elsewhere; score tiles are reused between searches."""

    def _running_top_k(self, rows, k, device):
        if device.type == "cpu" and k <= MAX_K and kernels.compiled() is not None:
            return KernelTopK(rows, k)
        return FilteredTopK(rows, k, device)

    def _offer(self, top, q, keys, first_id, valid):
        Bm, H, R, D = q.shape
        if isinstance(top, KernelTopK):
            q, keys = q.to("cpu", torch.float32), keys.to("cpu")  # memory split between devices: rare
            valid = None if valid is None else valid.cpu()
            if R <= FUSED_QUERIES and D % 8 == 0 and keys.dtype in kernels.DTYPES and D <= kernels.MAX_D:
                return top.scan(q, keys, first_id, valid)  # bf16 keys are read as stored, widened in the kernel
        super()._offer(top, q, keys, first_id, valid)  # a score tile (`_products`), then the running top-k

    def _products(self, q, keys, out):
        _inner_products(q, keys, out)

    def _score_tile(self, numel, device):
        # on the CPU a fresh tile costs page faults on every search, as much as a decode step's matrix-vector product
        return reusable_buffer("score_tile", numel, torch.float32, device)


__all__ = ["ExactIndex", "FilteredTopK", "KernelTopK", "MAX_K", "candidates"]
