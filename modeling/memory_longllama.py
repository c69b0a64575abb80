"""The memory of a LongLLaMA memory layer (docs/inference.md, "The cache"): unrotated keys and values of earlier
windows in `mem_dtype`, with a validity flag per entry (padding is stored but never attended to).

Memory lives in chunks of `SequenceBuffer`s: preallocated along the sequence axis and grown geometrically, so appending
a window costs O(window) and never copies the whole memory again (the published code re-concatenated it every time).
Chunks are also the blocks the attention kernels read and the unit in which evicted memory is freed.
"""

import torch

from .knn_longllama import make_index

# Geometric growth factor of the buffers: appending n tokens costs amortised O(n).
GROWTH = 2
MIN_CAPACITY = 64


class SequenceBuffer:
    """A tensor that grows along one axis. `view()` returns the filled part `[..., :length, ...]` without copying.

    Shape of the stored tensor: `prefix_shape + (capacity,) + suffix_shape`, with the sequence axis at `dim`.
    """

    def __init__(self, dim: int, limit: int | None = None, page: int | None = None):
        self.dim = dim
        self.limit = limit  # the most entries it will ever hold (growth stops there)
        self.page = page  # grow in steps of this many entries instead of geometrically (bounded waste)
        self.data: torch.Tensor | None = None
        self.length = 0

    def append(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        dtype = dtype or x.dtype
        n = x.shape[self.dim]
        if self.data is not None and self._other_dims(self.data) != self._other_dims(x):
            if self.length > 0:
                raise ValueError(
                    f"cannot append a tensor of shape {tuple(x.shape)} to a buffer of shape {tuple(self.view().shape)}: "
                    "the batch size or head layout of a session cannot change"
                )
            self.data = None  # emptied by clear(): a new session may have another batch size
        if self.data is None or self.data.dtype != dtype or self.data.device != x.device:
            if self.length > 0 and self.data is not None:
                raise ValueError("the dtype or device of a non-empty buffer cannot change")
            shape = list(x.shape)
            shape[self.dim] = self._capped(max(n, MIN_CAPACITY), n)
            self.data = torch.empty(shape, dtype=dtype, device=x.device)
        elif self.length + n > self.data.shape[self.dim]:
            self._grow(self.length + n)
        self.data.narrow(self.dim, self.length, n).copy_(x)
        self.length += n

    def _other_dims(self, x: torch.Tensor) -> tuple:
        shape = list(x.shape)
        del shape[self.dim]
        return tuple(shape)

    def _grow(self, needed: int) -> None:
        shape = list(self.data.shape)
        shape[self.dim] = self._capped(max(needed, GROWTH * shape[self.dim]), needed)
        data = torch.empty(shape, dtype=self.data.dtype, device=self.data.device)
        data.narrow(self.dim, 0, self.length).copy_(self.view())
        self.data = data

    def _capped(self, capacity: int, needed: int) -> int:
        if self.limit is not None and needed > self.limit:
            raise ValueError(f"a buffer limited to {self.limit} entries cannot hold {needed}")
        if self.page is not None:  # geometric while small, then page by page
            capacity = min(capacity, -(-needed // self.page) * self.page)
        return capacity if self.limit is None else min(capacity, self.limit)

    def view(self) -> torch.Tensor | None:
        return None if self.data is None else self.data.narrow(self.dim, 0, self.length)

    def clear(self, keep: int = 0) -> None:
        """Forget the content after the first `keep` entries, but keep the allocation (the next window reuses it)."""
        self.length = min(keep, self.length)

    def map_batch(self, fn) -> None:
        """Apply `fn` (e.g. an index select) to the batch axis 0 of the filled part."""
        if self.data is not None:
            self.data = fn(self.view()).contiguous()

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


STORAGE_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,  # per-vector absmax scale stored in float16 next to each key and value
}
# Entries per chunk: one chunk (all rows and KV heads) holds about this many elements. Chunks are the blocks of the
# blockwise kernel and the unit in which evicted memory is freed.
CHUNK_ELEMENTS = 1 << 22
MIN_CHUNK = 256
CHUNK_PAGES = 8


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [..., D]` -> `(int8 [..., D], float16 scale [..., 1])` with `x ~= int8 * scale` (absmax per vector)."""
    scale = (x.detach().abs().amax(dim=-1, keepdim=True).float() / 127).clamp(min=2.0**-24).half()
    return (x.float() / scale.float()).round().clamp(-127, 127).to(torch.int8), scale


def dequantize(data: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Decode stored memory to `dtype` (a cast for float storage)."""
    if scale is None:
        return data.to(dtype)
    return (data.to(torch.float32) * scale.to(torch.float32)).to(dtype)


class MemoryChunk:
    """Memory entries with ids `[first_id, first_id + length)` stored in one allocation (at most `limit` entries).

    Entries before `start` were evicted; `keys`/`values` `[B, Hkv, n, D]` are encoded (`STORAGE_DTYPES`), `valid`
    `[B, n]` is False for padding.
    """

    BUFFERS = ("keys", "values", "key_scale", "value_scale", "valid")  # the order of `append`'s arguments

    def __init__(self, first_id: int, limit: int, quantized: bool):
        self.first_id, self.limit, self.start = first_id, limit, 0
        page = max(1, limit // CHUNK_PAGES)  # a chunk grows page by page: at most one page is allocated unused

        def buffer(dim):
            return SequenceBuffer(dim, limit, page)

        self.keys, self.values, self.valid = buffer(-2), buffer(-2), buffer(-1)
        self.key_scale = buffer(-2) if quantized else None
        self.value_scale = buffer(-2) if quantized else None

    @property
    def length(self) -> int:
        return self.keys.length

    @property
    def live(self) -> int:
        return self.length - self.start

    @property
    def room(self) -> int:
        return self.limit - self.length

    def append(self, keys, values, key_scale, value_scale, valid) -> None:
        for buffer, x in zip(self._buffers(), (keys, values, key_scale, value_scale, valid)):
            if buffer is not None:
                buffer.append(x)

    def view(self, name: str) -> torch.Tensor | None:
        """The live part of one buffer (`keys`, `values`, `key_scale`, `value_scale`, `valid`)."""
        buffer = getattr(self, name)
        return None if buffer is None else buffer.view().narrow(buffer.dim, self.start, self.live)

    def decoded(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Live keys or values decoded to `dtype`."""
        scale = "key_scale" if name == "keys" else "value_scale"
        return dequantize(self.view(name), self.view(scale), dtype)

    def _buffers(self) -> list:
        return [getattr(self, name) for name in self.BUFFERS]

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self._buffers() if buffer is not None)


class MemorySegment:
    """Consecutive chunks stored with one batch layout: session row b reads memory row `rows[b]` (None: row b).

    Beam search and `num_return_sequences` expand a session by remapping `rows`, so beams share one memory instead of
    copying it; what they write afterwards goes to a new segment. The kNN index of the segment is built lazily.
    """

    def __init__(self, rows: torch.Tensor | None = None):
        self.chunks: list[MemoryChunk] = []
        self.rows = rows
        self.index = None
        self.indexed_upto = 0  # ids below this are in the index (or were evicted)

    def key_blocks(self):
        """`(first_id, keys [Bm, Hkv, n, D], valid [Bm, n])` per chunk, in memory-row layout: an index's source. Float
        keys are the stored ones (searches read them in place), int8 keys are decoded to float32."""
        for chunk in self.chunks:
            if chunk.live > 0:
                keys = chunk.view("keys") if chunk.key_scale is None else chunk.decoded("keys", torch.float32)
                yield chunk.first_id + chunk.start, keys, chunk.view("valid")

    def select_rows(self, indices: torch.Tensor) -> None:
        """Session row b now reads what row `indices[b]` read (no copy)."""
        rows = self.rows
        if rows is None:
            rows = torch.arange(self.chunks[0].keys.data.shape[0], device=indices.device) if self.chunks else None
        self.rows = None if rows is None else rows.to(indices.device)[indices].contiguous()


class LayerMemory:
    """The memory of one memory layer: unrotated keys and values in `dtype`, with ids that count every entry ever
    written (evicted ones included).

    Args:
        dtype (`str`): a key of `STORAGE_DTYPES`.
        max_tokens (`int`, *optional*): bound on the entries kept (padding included); older entries are evicted
            first-in first-out, except the first `keep_first` entries of the session, which stay.
        device (`str`, *optional*): where memory lives (e.g. `"cpu"` to offload a GPU model's memory); default: the
            device of the keys written.
        index (`str`): kNN backend for top-k retrieval (`knn_longllama.INDEX_BACKENDS`); `index_options` its options.
    """

    def __init__(self, dtype="bfloat16", max_tokens=None, keep_first=0, device=None, index="exact", index_options=None):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"memory dtype {dtype!r} is not supported; use one of {list(STORAGE_DTYPES)}.")
        self.dtype, self.storage_dtype = dtype, STORAGE_DTYPES[dtype]
        self.max_tokens, self.keep_first = max_tokens, keep_first
        self.device = None if device is None else torch.device(device)
        self.index_name, self.index_options = index, dict(index_options or {})
        self.segments: list[MemorySegment] = []
        self.next_id = 0  # entries ever written
        self.length = 0  # entries kept
        self.version = 0  # changes whenever the layout of the stored tensors may have (what readers may cache)

    # writing

    def add(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Append `keys`, `values` `[B, Hkv, t, D]` (unrotated) and `valid` `[B, t]`, then evict beyond `max_tokens`."""
        self.version += 1
        device = self.device or keys.device
        keys, values = keys.detach().to(device), values.detach().to(device)
        valid = valid.to(device=device, dtype=torch.bool)
        if self.storage_dtype == torch.int8:
            (keys, key_scale), (values, value_scale) = quantize_int8(keys), quantize_int8(values)
        else:
            keys, values = keys.to(self.storage_dtype), values.to(self.storage_dtype)
            key_scale = value_scale = None
        segment = self._writable_segment(keys)
        done, total = 0, keys.shape[-2]
        while done < total:
            chunk = segment.chunks[-1] if segment.chunks and segment.chunks[-1].room > 0 else None
            if chunk is None:
                chunk = MemoryChunk(self.next_id, self._chunk_limit(keys), key_scale is not None)
                segment.chunks.append(chunk)
            n = min(chunk.room, total - done)
            part = [None if x is None else x.narrow(-2, done, n) for x in (keys, values, key_scale, value_scale)]
            chunk.append(*part, valid.narrow(-1, done, n))
            done, self.next_id, self.length = done + n, self.next_id + n, self.length + n
        self._evict()

    def _writable_segment(self, keys: torch.Tensor) -> MemorySegment:
        last = self.segments[-1] if self.segments else None
        if last is None or last.rows is not None:  # memory shared by remapped rows is never written to
            last = MemorySegment()
            self.segments.append(last)
        elif last.chunks and last.chunks[-1].keys.data.shape[0] != keys.shape[0]:
            raise ValueError("the batch size of a session cannot change")
        return last

    def _chunk_limit(self, keys: torch.Tensor) -> int:
        B, Hkv, _, D = keys.shape
        limit = max(MIN_CHUNK, CHUNK_ELEMENTS // max(1, B * Hkv * D))
        if self.max_tokens is not None:  # small enough that evicted chunks are freed while the memory is bounded
            limit = min(limit, max(1, (self.max_tokens - self.keep_first) // 4))
        if self.next_id < self.keep_first:  # the kept first entries fill chunks of their own, never evicted
            limit = min(limit, self.keep_first - self.next_id)
        return limit

    def _evict(self) -> None:
        excess = 0 if self.max_tokens is None else self.length - self.max_tokens
        for segment in self.segments:
            for chunk in segment.chunks:
                if excess <= 0:
                    break
                if chunk.first_id < self.keep_first or chunk.live == 0:
                    continue
                n = min(excess, chunk.live)
                lo = chunk.first_id + chunk.start
                chunk.start += n
                excess, self.length = excess - n, self.length - n
                if segment.index is not None:
                    segment.index.evict(lo, lo + n)
        last = self.segments[-1].chunks[-1] if self.segments and self.segments[-1].chunks else None
        for segment in self.segments:  # free chunks that hold nothing and will not be written again
            segment.chunks = [c for c in segment.chunks if c.live > 0 or (c is last and c.room > 0)]
        self.segments = [s for s in self.segments if s.chunks or s is self.segments[-1]]

    # reading

    def chunks(self):
        """`(segment, chunk)` for every chunk with live entries, in id order."""
        for segment in self.segments:
            for chunk in segment.chunks:
                if chunk.live > 0:
                    yield segment, chunk

    def blocks(self, dtype: torch.dtype, device: torch.device, batch_size: int):
        """`(keys, values [B, Hkv, n, D] in dtype on device, valid [B, n])` per chunk, in the session's row layout."""
        for segment, chunk in self.chunks():
            parts = chunk.decoded("keys", dtype), chunk.decoded("values", dtype), chunk.view("valid")
            if segment.rows is not None:
                parts = [x[segment.rows.to(x.device)] for x in parts]
            keys, values, valid = (x.to(device, non_blocking=True) for x in parts)
            if keys.shape[0] != batch_size:
                raise ValueError(f"memory holds {keys.shape[0]} rows but the session has {batch_size}")
            yield keys, values, valid

    def live_ids(self) -> torch.Tensor:
        """`[M]` int64: the ids (session positions) of the kept entries, in the order `blocks` yields them."""
        ranges = [torch.arange(c.first_id + c.start, c.first_id + c.length) for _, c in self.chunks()]
        return torch.cat(ranges) if ranges else torch.zeros(0, dtype=torch.long)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k memory entries by inner product for `queries [B, Hkv, r, D]`: `(scores float32, ids)`
        `[B, Hkv, r, k]` on the memory's device, ids -1 (score -inf) where memory has fewer than k valid entries."""
        results = []
        for segment in self.segments:
            index = self._synced_index(segment)
            if index is None:
                continue
            device = segment.chunks[-1].keys.data.device
            results.append(index.search(queries.to(device, torch.float32), k, rows=segment.rows))
        scores, ids = (torch.cat(parts, dim=-1) for parts in zip(*results))
        if len(results) > 1:
            scores, order = scores.topk(k, dim=-1)
            ids = ids.gather(-1, order)
        return scores, ids

    def _synced_index(self, segment: MemorySegment):
        """The segment's index with every live entry added (built on first use: writing never pays for it)."""
        if not any(chunk.live > 0 for chunk in segment.chunks):
            return None
        if segment.index is None:
            segment.index = make_index(self.index_name, segment.key_blocks, **self.index_options)
            segment.indexed_upto = 0
        for chunk in segment.chunks:
            start = max(chunk.start, segment.indexed_upto - chunk.first_id)
            if start < chunk.length:
                keys = chunk.keys.view()[:, :, start:]
                if segment.index.name != "exact":  # the exact index reads its source; it only counts what is added
                    scale = None if chunk.key_scale is None else chunk.key_scale.view()[:, :, start:]
                    keys = dequantize(keys, scale, torch.float32)
                segment.index.add(chunk.first_id + start, keys, chunk.valid.view()[:, start:])
                segment.indexed_upto = chunk.first_id + chunk.length
        return segment.index

    def gather_values(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Values `[B, Hkv, r, k, D]` in `dtype` of the entries `ids [B, Hkv, r, k]` (zeros where ids is -1)."""
        B, Hkv = ids.shape[:2]
        out = None
        for segment, chunk in self.chunks():
            lo, hi = chunk.first_id + chunk.start, chunk.first_id + chunk.length
            b, h, r, j = ((ids >= lo) & (ids < hi)).nonzero(as_tuple=True)
            data = chunk.values.view()
            if out is None:
                out = torch.zeros(*ids.shape, data.shape[-1], dtype=dtype, device=ids.device)
            if b.numel() == 0:
                continue
            rows = b if segment.rows is None else segment.rows.to(b.device)[b]
            position = ids[b, h, r, j] - chunk.first_id
            scale = None if chunk.value_scale is None else chunk.value_scale.view()[rows, h, position]
            out[b, h, r, j] = dequantize(data[rows, h, position], scale, dtype)
        return out

    def use_index(self, name: str, **options) -> None:
        """Search with another kNN backend from now on (its index is built from memory at the next search)."""
        self.index_name, self.index_options = name, options
        for segment in self.segments:
            segment.index, segment.indexed_upto = None, 0

    # bookkeeping

    def select_rows(self, indices: torch.Tensor) -> None:
        """Session row b continues what row `indices[b]` had (beam reordering, expansion): memory is not copied."""
        self.version += 1
        for segment in self.segments:
            segment.select_rows(indices)

    def reset(self) -> None:
        self.segments, self.next_id, self.length = [], 0, 0
        self.version += 1

    @property
    def nbytes(self) -> int:
        """Bytes allocated for memory content (capacity; the kNN index of an approximate backend not included)."""
        return sum(chunk.nbytes for segment in self.segments for chunk in segment.chunks)


__all__ = ["LayerMemory", "MemoryChunk", "MemorySegment", "SequenceBuffer", "dequantize", "quantize_int8"]
