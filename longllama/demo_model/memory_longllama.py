"""The per-session memory of LongLLaMA: a `transformers` `Cache` built from one object per decoder layer.

Every layer keeps its *local context* (the rotated keys and values of the current window, at most
`max_position_embeddings` tokens in steady state). Memory layers also keep an append-only *memory* of unrotated keys
and values in `mem_dtype`, with a validity flag per entry (padding is stored but never attended to).

All tensors live in `SequenceBuffer`s: preallocated along the sequence axis and grown geometrically, so appending a
window costs O(window) and never copies the whole memory again (the published code re-concatenated it every time).
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer

# Geometric growth factor of the buffers: appending n tokens costs amortised O(n).
GROWTH = 2
MIN_CAPACITY = 64


class SequenceBuffer:
    """A tensor that grows along one axis. `view()` returns the filled part `[..., :length, ...]` without copying.

    Shape of the stored tensor: `prefix_shape + (capacity,) + suffix_shape`, with the sequence axis at `dim`.
    """

    def __init__(self, dim: int):
        self.dim = dim
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
            shape[self.dim] = max(n, MIN_CAPACITY)
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
        shape[self.dim] = max(needed, GROWTH * shape[self.dim])
        data = torch.empty(shape, dtype=self.data.dtype, device=self.data.device)
        data.narrow(self.dim, 0, self.length).copy_(self.view())
        self.data = data

    def view(self) -> torch.Tensor | None:
        return None if self.data is None else self.data.narrow(self.dim, 0, self.length)

    def clear(self) -> None:
        """Forget the content but keep the allocation (a session's next window reuses it)."""
        self.length = 0

    def map_batch(self, fn) -> None:
        """Apply `fn` (e.g. an index select) to the batch axis 0 of the filled part."""
        if self.data is not None:
            self.data = fn(self.view()).contiguous()

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


class LongLlamaLocalLayer(DynamicLayer):
    """Local context of one decoder layer: `keys`/`values` `[B, Hkv, n, D]`, keys already rotated.

    The model decides when the local context leaves (`flush`); this layer only stores and returns it.
    """

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._keys = SequenceBuffer(dim=-2)
        self._values = SequenceBuffer(dim=-2)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a window `[B, Hkv, t, D]` and return the whole local context `[B, Hkv, n, D]`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._keys.append(key_states)
        self._values.append(value_states)
        return self.keys, self.values

    def flush(self, valid: torch.Tensor | None = None) -> None:
        """The whole local context leaves before the next window. `valid` `[B, n]` is used by memory layers."""
        self._keys.clear()
        self._values.clear()

    @property
    def keys(self) -> torch.Tensor | None:
        return self._keys.view()

    @keys.setter
    def keys(self, value):  # DynamicLayer.__init__ assigns None
        pass

    @property
    def values(self) -> torch.Tensor | None:
        return self._values.view()

    @values.setter
    def values(self, value):
        pass

    def get_seq_length(self) -> int:
        return self._keys.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._keys.length + query_length, 0

    def reset(self) -> None:
        for buffer in self._buffers():
            buffer.clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "LongLlamaCache cannot be cropped: tokens that left the local context are already in memory. "
            "Assisted decoding and other rollbacks are not supported."
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("Beam search is not supported by LongLLaMA yet: use greedy decoding or sampling (num_beams=1).")

    def batch_repeat_interleave(self, repeats: int) -> None:
        for buffer in self._buffers():
            buffer.map_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for buffer in self._buffers():
            buffer.map_batch(lambda x: x[indices.to(x.device)])

    def _buffers(self) -> list[SequenceBuffer]:
        return [self._keys, self._values]

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self._buffers())


class LongLlamaMemoryLayer(LongLlamaLocalLayer):
    """Local context plus memory of one memory layer.

    Memory: `mem_keys`/`mem_values` `[B, Hkv, M, D]` in `mem_dtype` (keys unrotated, as if at position 0) and
    `mem_valid` `[B, M]` (False for padding). The layer also keeps the unrotated keys of its local context
    (`update(..., raw_keys=)`) so that a flush moves exactly those into memory.
    """

    def __init__(self, mem_dtype: torch.dtype, **kwargs):
        super().__init__(**kwargs)
        self.mem_dtype = mem_dtype
        self._raw_keys = SequenceBuffer(dim=-2)
        self._mem_keys = SequenceBuffer(dim=-2)
        self._mem_values = SequenceBuffer(dim=-2)
        self._mem_valid = SequenceBuffer(dim=-1)

    def update(self, key_states, value_states, *args, raw_keys: torch.Tensor | None = None, **kwargs):
        """Like the local layer; `raw_keys` `[B, Hkv, t, D]` are the same keys before rotation."""
        self._raw_keys.append(key_states if raw_keys is None else raw_keys, dtype=self.mem_dtype)
        return super().update(key_states, value_states)

    def flush(self, valid: torch.Tensor | None = None) -> None:
        """Move the whole local context into memory (unrotated keys, `mem_dtype`), then empty it."""
        if self._keys.length > 0:
            if valid is None:
                raise ValueError("flushing a memory layer needs the validity flags of its local context")
            self.add_to_memory(self._raw_keys.view(), self._values.view(), valid)
        self._raw_keys.clear()
        super().flush()

    def add_to_memory(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Append `keys`, `values` `[B, Hkv, t, D]` (unrotated) and `valid` `[B, t]` bool to memory."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self._mem_keys.append(keys.detach(), dtype=self.mem_dtype)
        self._mem_values.append(values.detach(), dtype=self.mem_dtype)
        self._mem_valid.append(valid.to(device=keys.device, dtype=torch.bool))

    def memory(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """`(mem_keys, mem_values, mem_valid)` views, or None while memory is empty."""
        if self._mem_keys.length == 0:
            return None
        return self._mem_keys.view(), self._mem_values.view(), self._mem_valid.view()

    @property
    def memory_length(self) -> int:
        return self._mem_keys.length

    def _buffers(self) -> list[SequenceBuffer]:
        return super()._buffers() + [self._raw_keys, self._mem_keys, self._mem_values, self._mem_valid]


class LongLlamaCache(Cache):
    """The memory of one LongLLaMA session: local contexts of all layers plus the memory of the memory layers.

    Pass it back to `forward` / `generate` (`cache=` or the deprecated `past_key_values=`) to continue a session;
    each session needs its own cache object. Besides the per-layer objects it keeps what all layers share:

    - `seen_tokens`: tokens processed so far (what `generate` reads through `get_seq_length()`);
    - `local_valid` `[B, n]`: validity (non-padding) of the tokens in the local context;
    - `position_origin` `[B]`: position id of the first token of the local context (rotary positions are relative to
      it).

    Args:
        config (`LongLlamaConfig`): the model's configuration (layer layout, window, `mem_dtype`).
    """

    def __init__(self, config):
        mem_layers = set(config.mem_layers)
        layers = [
            LongLlamaMemoryLayer(config.mem_torch_dtype) if idx in mem_layers else LongLlamaLocalLayer()
            for idx in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)
        self.fingerprint = cache_fingerprint(config)
        self.mem_layers = sorted(mem_layers)
        self.seen_tokens = 0
        self.local_valid: torch.Tensor | None = None
        self.position_origin: torch.Tensor | None = None
        self.batch_size_: int | None = None
        self.interrupted = False  # a call was interrupted half way: the session must be reset

    @property
    def local_length(self) -> int:
        return 0 if self.local_valid is None else self.local_valid.shape[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens this session has processed (not the local length): `generate` slices prompts with it."""
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.local_length + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def memory_length(self, layer_idx: int | None = None) -> int:
        """Entries in the memory of `layer_idx` (default: the first memory layer; 0 without memory layers)."""
        if layer_idx is None:
            if not self.mem_layers:
                return 0
            layer_idx = self.mem_layers[0]
        layer = self.layers[layer_idx]
        return layer.memory_length if isinstance(layer, LongLlamaMemoryLayer) else 0

    def reset(self) -> None:
        """Forget the session (local contexts and memory) but keep the allocations."""
        super().reset()
        self.seen_tokens = 0
        self.local_valid = None
        self.position_origin = None
        self.batch_size_ = None
        self.interrupted = False

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_shared(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_shared(lambda x: x[indices.to(x.device)])

    def _map_shared(self, fn) -> None:
        if self.local_valid is not None:
            self.local_valid = fn(self.local_valid)
            self.position_origin = fn(self.position_origin)
            self.batch_size_ = self.local_valid.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by all buffers (allocated capacity, not just the filled part)."""
        return sum(layer.nbytes for layer in self.layers)


def cache_fingerprint(config) -> tuple:
    """What a cache must agree on with the model that uses it."""
    return (
        config.num_hidden_layers,
        tuple(sorted(config.mem_layers)),
        config.num_key_value_heads,
        config.head_dim,
        config.max_position_embeddings,
        config.mem_dtype,
    )


__all__ = ["LongLlamaCache", "LongLlamaLocalLayer", "LongLlamaMemoryLayer", "SequenceBuffer", "cache_fingerprint"]
