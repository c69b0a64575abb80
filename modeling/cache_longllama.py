"""The per-session cache of LongLLaMA (docs/inference.md, "The cache"): a `transformers` `Cache` built from one layer
object per decoder layer.

Every layer keeps its *local context* (`LocalCacheLayer`: the rotated keys and values of the current window, at most
`max_position_embeddings` tokens in steady state). The layers of `mem_layers` also keep the layer's memory
(`MemoryCacheLayer`, holding a `LayerMemory`).
"""

import weakref

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .memory_longllama import LayerMemory, SequenceBuffer


class LocalCacheLayer(DynamicLayer):
    """Local context of one decoder layer: `keys`/`values` `[B, Hkv, n, D]`, keys already rotated.

    The model decides when the local context leaves (`flush`); this layer only stores and returns it.
    """

    is_sliding = False
    is_croppable = True  # the newest tokens of the local context (LongLlamaCache.crop)
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
        """Forget the newest `tokens_to_remove` tokens of the local context (`LongLlamaCache.crop` checks the count)."""
        for buffer in self._buffers():
            buffer.clear(keep=buffer.length - tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

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


class MemoryCacheLayer(LocalCacheLayer):
    """Local context plus memory of one memory layer.

    Memory (`self.memory_store`, a `LayerMemory`) holds unrotated keys (as if at position 0) and values in
    `mem_dtype`, with a validity flag per entry (False for padding). The layer also keeps the unrotated keys of its
    local context (`update(..., raw_keys=)`) so that a flush moves exactly those into memory.
    """

    def __init__(self, mem_dtype: str = "bfloat16", **memory_options):
        super().__init__()
        self.memory_store = LayerMemory(mem_dtype, **memory_options)
        self.mem_dtype = self.memory_store.storage_dtype
        # local keys wait for a flush unrotated, already rounded to the memory dtype (int8 is quantized at the flush)
        self._raw_dtype = None if self.mem_dtype == torch.int8 else self.mem_dtype
        self._raw_keys = SequenceBuffer(dim=-2)

    def update(self, key_states, value_states, *args, raw_keys: torch.Tensor | None = None, **kwargs):
        """Like the local layer; `raw_keys` `[B, Hkv, t, D]` are the same keys before rotation."""
        self._raw_keys.append(key_states if raw_keys is None else raw_keys, dtype=self._raw_dtype)
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
        self.memory_store.add(keys, values, valid)

    def memory(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """`(mem_keys, mem_values, mem_valid)` `[B, Hkv, M, D]`, `[B, M]` of the kept memory, or None while it is
        empty: a copy, for inspection (kernels read `memory_store` chunk by chunk). Keys and values are in `dtype`,
        by default the stored dtype (float32 for int8 memory)."""
        if self.memory_store.length == 0:
            return None
        dtype = dtype or (torch.float32 if self.mem_dtype == torch.int8 else self.mem_dtype)
        device = next(self.memory_store.chunks())[1].keys.data.device
        blocks = list(self.memory_store.blocks(dtype, device, self._batch_size()))
        return tuple(torch.cat(parts, dim=-1 if parts[0].dim() == 2 else -2) for parts in zip(*blocks))

    def _batch_size(self) -> int:
        for segment, chunk in self.memory_store.chunks():
            return chunk.keys.data.shape[0] if segment.rows is None else segment.rows.shape[0]
        return 0

    @property
    def memory_length(self) -> int:
        return self.memory_store.length

    def reset(self) -> None:
        super().reset()
        self.memory_store.reset()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.memory_store.segments:
            self.memory_store.select_rows(torch.arange(self._batch_size()).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.memory_store.select_rows(indices)

    def _buffers(self) -> list[SequenceBuffer]:
        return super()._buffers() + [self._raw_keys]

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.memory_store.nbytes


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
        static (`bool`, defaults to `False`): decode steps keep the local contexts in preallocated buffers of one
            window and run as one compiled graph (the longllama package's `decoding.py`,
            docs/inference.md#static-decoding); `generate(..., cache_implementation="static")` makes such a cache.
    """

    def __init__(self, config, static: bool = False):
        mem_layers = set(config.mem_layers)
        options = memory_options(config)
        layers = [
            MemoryCacheLayer(**options) if idx in mem_layers else LocalCacheLayer()
            for idx in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)
        self.fingerprint = cache_fingerprint(config)
        self.mem_layers = sorted(mem_layers)
        self.static = static
        self.seen_tokens = 0
        self.local_valid: torch.Tensor | None = None
        self.position_origin: torch.Tensor | None = None
        self.batch_size_: int | None = None
        self.interrupted = False  # a call was interrupted half way: the session must be reset
        self.model_ref = None  # weak reference to the model that fills the cache (`save` fingerprints it)
        self.model_fingerprint = None  # or the identity of that model (a loaded session; `longllama.identity`)

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
        return layer.memory_length if isinstance(layer, MemoryCacheLayer) else 0

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

    def crop(self, max_length: int) -> None:
        """Forget the newest tokens of the session: `crop(-n)` the last n, `crop(m)` all but the first m (the older
        transformers spelling). Assisted and prompt-lookup decoding drop rejected drafts this way. Only the local
        context can be cropped: tokens that left it are in memory, which is never cropped."""
        remove = -max_length if max_length <= 0 else self.seen_tokens - max_length
        if remove <= 0:
            return
        if remove > self.local_length:
            raise ValueError(
                f"Cannot remove the last {remove} tokens of this session: only its {self.local_length} newest tokens "
                "are in the local context, the earlier ones are in memory, which is never cropped. With assisted "
                "decoding, draft fewer tokens than the window (max_position_embeddings) holds."
            )
        for layer in self.layers:
            layer.crop(remove)
        self.seen_tokens -= remove
        self.local_valid = self.local_valid[:, :-remove] if remove < self.local_length else None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b continues beam `beam_idx[b]`. Local contexts are copied, memory is shared (remapped)."""
        self.batch_select_indices(beam_idx)

    def _map_shared(self, fn) -> None:
        if self.local_valid is not None:
            self.local_valid = fn(self.local_valid)
            self.position_origin = fn(self.position_origin)
            self.batch_size_ = self.local_valid.shape[0]

    def bind(self, model) -> None:
        """Called by `model` before it first uses this cache: a session filled by another model object is continued
        only by a model of the same weights (the package compares identities; without it, refused)."""
        if SESSION_STORE is not None:
            SESSION_STORE.bind_model(self, model)
        elif self.seen_tokens > 0:
            raise ValueError("This LongLlamaCache was filled by another model: continue it with that model, or start "
                             "a new session with cache=None.")
        self.model_ref = weakref.ref(model)

    def save(self, path, model=None) -> None:
        """Save the session to the directory `path` (a tensors file + `session.json`) to reuse it later with
        `LongLlamaCache.load(path, model)`: ingest a document once, ask many questions. `model` defaults to the model
        that filled the cache; its identity is saved so that the session never loads into another model."""
        _session_store().save_session(self, path, model if model is not None else self.model_ref and self.model_ref())

    @classmethod
    def load(cls, path, model) -> "LongLlamaCache":
        """The session saved in `path`, for `model` (which must be the model that saved it: same configuration and
        weights). Each layer's tensors go to that layer's device. Pass it as `cache=` / `past_key_values=`."""
        return _session_store().load_session(path, model)

    @property
    def nbytes(self) -> int:
        """Bytes held by all buffers (allocated capacity, not just the filled part)."""
        return sum(layer.nbytes for layer in self.layers)


# Saved sessions are files: the longllama package plugs in the module that writes and reads them on import
# (`longllama.session`, docs/architecture.md).
SESSION_STORE = None


def _session_store():
    if SESSION_STORE is None:
        raise ImportError("saving and loading sessions needs the longllama package: pip install longllama, and "
                          "`import longllama` before loading the model")
    return SESSION_STORE


def memory_options(config) -> dict:
    """`LayerMemory` arguments from a `LongLlamaConfig`."""
    return dict(
        mem_dtype=config.mem_dtype,
        max_tokens=config.mem_max_tokens,
        keep_first=config.mem_keep_first,
        device=config.mem_device,
        index=config.mem_index,
        index_options=config.mem_index_options,
    )


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


__all__ = ["LocalCacheLayer", "LongLlamaCache", "MemoryCacheLayer", "cache_fingerprint", "memory_options"]
