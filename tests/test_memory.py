"""The session memory (modeling/memory_longllama.py, modeling/cache_longllama.py): SequenceBuffer, LongLlamaCache and
its layers (docs/inference.md#inference, #beyond)."""

import math

import pytest
import torch

from longllama.modeling.cache_longllama import LocalCacheLayer, LongLlamaCache, MemoryCacheLayer
from longllama.modeling.memory_longllama import GROWTH, MIN_CAPACITY, SequenceBuffer

from conftest import tiny_config, tiny_model

# tiny_config: window W = 8, last_context_length L = 4, vocab 99, 4 layers, 4 heads of 8
W, L = 8, 4


def random_ids(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 99, (batch, tokens), generator=generator)


def prefill(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=True, **kwargs)


def filled_memory_bytes(cache: LongLlamaCache) -> int:
    """Bytes of the filled part of every memory layer's memory (keys, values, validity), not the capacity."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, MemoryCacheLayer) and layer.memory() is not None:
            total += sum(t.numel() * t.element_size() for t in layer.memory())
    return total


# --------------------------------------------------------------------------------------------------------------------
# SequenceBuffer
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim, shape", [(-2, (2, 3, 5, 4)), (-1, (2, 5)), (1, (3, 5, 2))])
def test_sequence_buffer_append_and_view(dim, shape):
    buffer = SequenceBuffer(dim=dim)
    assert buffer.view() is None and buffer.length == 0 and buffer.nbytes == 0
    generator = torch.Generator().manual_seed(0)
    pieces = []
    for n in [5, 1, 70, 3, 200, 0, 9]:
        piece_shape = list(shape)
        piece_shape[dim] = n
        piece = torch.randn(piece_shape, generator=generator)
        buffer.append(piece)
        pieces.append(piece)
        expected = torch.cat(pieces, dim=dim)
        assert buffer.length == expected.shape[dim]
        assert torch.equal(buffer.view(), expected)


def test_sequence_buffer_casts_to_requested_dtype():
    buffer = SequenceBuffer(dim=-2)
    x = torch.randn(1, 2, 3, 4)
    buffer.append(x, dtype=torch.bfloat16)
    buffer.append(x, dtype=torch.bfloat16)
    assert buffer.view().dtype == torch.bfloat16
    assert torch.equal(buffer.view(), torch.cat([x, x], dim=-2).to(torch.bfloat16))


def test_sequence_buffer_grows_geometrically_without_copying_on_every_append():
    buffer = SequenceBuffer(dim=-2)
    window, windows = 8, 1000
    reallocations, previous_ptr, capacity = 0, None, None
    for i in range(windows):
        buffer.append(torch.full((1, 2, window, 4), float(i)))
        ptr = buffer.data.data_ptr()
        if previous_ptr is not None and ptr != previous_ptr:
            reallocations += 1
            assert buffer.data.shape[-2] >= GROWTH * capacity  # grew by the factor, not by one window
        elif previous_ptr is not None:
            # appending into spare capacity must not move (i.e. copy) the content
            assert buffer.data.shape[-2] == capacity
        previous_ptr, capacity = ptr, buffer.data.shape[-2]
    total = window * windows
    assert buffer.length == total
    # O(log N) reallocations: 64 -> 128 -> ... -> 8192 is 7 of them
    assert reallocations <= math.ceil(math.log(total / MIN_CAPACITY, GROWTH)) + 1
    assert buffer.data.shape[-2] < GROWTH * total + MIN_CAPACITY  # capacity stays within a factor of the content
    assert torch.equal(buffer.view()[0, 0, ::window, 0], torch.arange(windows, dtype=torch.float32))


def test_sequence_buffer_clear_keeps_the_allocation():
    buffer = SequenceBuffer(dim=-2)
    buffer.append(torch.randn(2, 3, 100, 4))
    ptr, nbytes = buffer.data.data_ptr(), buffer.nbytes
    buffer.clear()
    assert buffer.length == 0 and buffer.view().shape == (2, 3, 0, 4)
    assert buffer.data.data_ptr() == ptr and buffer.nbytes == nbytes
    x = torch.randn(2, 3, 7, 4)
    buffer.append(x)
    assert buffer.data.data_ptr() == ptr
    assert torch.equal(buffer.view(), x)


def test_sequence_buffer_clear_then_append_of_another_batch_size():
    """After clear() the buffer holds nothing, so the next content may have any batch size (a new session)."""
    buffer = SequenceBuffer(dim=-2)
    buffer.append(torch.randn(2, 3, 5, 4))
    buffer.clear()
    x = torch.randn(1, 3, 6, 4)
    buffer.append(x)
    assert torch.equal(buffer.view(), x)


# --------------------------------------------------------------------------------------------------------------------
# LongLlamaCache after a long prompt
# --------------------------------------------------------------------------------------------------------------------


def test_cache_layer_types():
    cache = LongLlamaCache(tiny_config(mem_layers=[0, 2]))
    assert [type(layer) for layer in cache.layers] == [
        MemoryCacheLayer,
        LocalCacheLayer,
        MemoryCacheLayer,
        LocalCacheLayer,
    ]
    assert cache.get_seq_length() == 0 and cache.memory_length() == 0 and cache.local_length == 0
    assert LongLlamaCache(tiny_config(mem_layers=[])).memory_length() == 0


@pytest.mark.parametrize("tokens", [30, 13, 4])
def test_cache_lengths_after_prompt(tokens):
    model = tiny_model(0, mem_layers=[1, 2], mem_dtype="bfloat16")
    cache = prefill(model, random_ids(2, tokens)).cache
    assert isinstance(cache, LongLlamaCache)
    assert [type(layer) for layer in cache.layers] == [
        LocalCacheLayer,
        MemoryCacheLayer,
        MemoryCacheLayer,
        LocalCacheLayer,
    ]
    local = min(tokens, L)
    assert cache.get_seq_length() == tokens
    assert cache.local_length == local
    for idx, layer in enumerate(cache.layers):
        assert layer.get_seq_length() == local, idx
        assert layer.keys.shape == (2, 4, local, 8)
        assert cache.memory_length(idx) == (tokens - local if idx in (1, 2) else 0)
    assert cache.memory_length() == tokens - local
    if tokens <= L:
        assert cache.layers[1].memory() is None


def capture_projections(model, layer_idx):
    """Forward hooks recording the outputs of k_proj / v_proj of one layer, one entry per window."""
    captured = {"k": [], "v": []}
    attn = model.model.layers[layer_idx].self_attn
    handles = [
        attn.k_proj.register_forward_hook(lambda module, args, out: captured["k"].append(out.detach().clone())),
        attn.v_proj.register_forward_hook(lambda module, args, out: captured["v"].append(out.detach().clone())),
    ]
    return captured, handles


def as_heads(projection: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, t, Hkv * D] -> [B, Hkv, t, D]"""
    B, t, _ = projection.shape
    return projection.view(B, t, num_kv_heads, -1).transpose(1, 2)


@pytest.mark.parametrize("num_key_value_heads", [4, 2])
def test_memory_holds_unrotated_projections_in_mem_dtype(num_key_value_heads):
    model = tiny_model(1, mem_layers=[1, 3], mem_dtype="bfloat16", num_key_value_heads=num_key_value_heads)
    ids, tokens = random_ids(2, 30, seed=1), 30
    hooks = {idx: capture_projections(model, idx) for idx in (1, 3)}
    cache = prefill(model, ids).cache
    for captured, handles in hooks.values():
        for handle in handles:
            handle.remove()

    stored = tokens - L  # windows [0,8) [8,16) [16,24) [24,26) go to memory, [26,30) is the local context
    for idx, (captured, _) in hooks.items():
        keys = as_heads(torch.cat(captured["k"], dim=1), num_key_value_heads)  # [B, Hkv, T, D]
        values = as_heads(torch.cat(captured["v"], dim=1), num_key_value_heads)
        assert keys.shape[2] == tokens
        mem_keys, mem_values, mem_valid = cache.layers[idx].memory()
        assert mem_keys.dtype == mem_values.dtype == torch.bfloat16
        assert mem_keys.shape == (2, num_key_value_heads, stored, 8)
        assert torch.equal(mem_keys, keys[:, :, :stored].to(torch.bfloat16))
        assert torch.equal(mem_values, values[:, :, :stored].to(torch.bfloat16))
        assert mem_valid.dtype == torch.bool and mem_valid.shape == (2, stored) and bool(mem_valid.all())
        # the local context is the final window, keys rotated (not the raw projection), values as computed
        layer = cache.layers[idx]
        assert torch.equal(layer.values, values[:, :, stored:])
        assert not torch.allclose(layer.keys[:, :, 1:], keys[:, :, stored + 1 :])


def test_memory_validity_is_false_at_padding():
    model = tiny_model(2, mem_layers=[1], mem_dtype="bfloat16")
    ids = random_ids(2, 30, seed=2)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :5] = 0  # left padding of row 1
    ids[1, :5] = 0
    cache = prefill(model, ids, attention_mask=mask).cache
    _, _, valid = cache.layers[1].memory()
    expected = mask[:, :26].bool()
    assert torch.equal(valid, expected)
    assert torch.equal(cache.local_valid, mask[:, 26:].bool())


def test_memory_validity_of_padding_moved_from_local_context():
    """A flushed local context carries its padding flags into memory."""
    model = tiny_model(2, mem_layers=[1], mem_dtype="float32")
    ids = random_ids(2, 3, seed=3)
    mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    cache = prefill(model, ids, attention_mask=mask).cache
    assert cache.memory_length() == 0
    more = random_ids(2, 8, seed=4)
    with torch.no_grad():
        model(more, cache=cache, use_cache=True, attention_mask=torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], 1))
    _, _, valid = cache.layers[1].memory()
    assert valid[:, :3].tolist() == [[True, True, True], [False, False, True]]
    assert bool(valid[:, 3:].all())


# --------------------------------------------------------------------------------------------------------------------
# reset, batch operations, unsupported operations
# --------------------------------------------------------------------------------------------------------------------


def test_reset_behaves_like_a_fresh_cache():
    model = tiny_model(3, mem_layers=[1, 2], mem_dtype="bfloat16")
    cache = prefill(model, random_ids(2, 30, seed=5)).cache
    nbytes = cache.nbytes
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.local_length == 0 and cache.memory_length() == 0
    assert all(layer.get_seq_length() == 0 for layer in cache.layers)
    assert cache.layers[1].memory() is None
    assert 0 < cache.nbytes < nbytes  # local contexts keep their allocations; memory is freed
    assert all(layer.memory_store.nbytes == 0 for layer in cache.layers if isinstance(layer, MemoryCacheLayer))

    ids = random_ids(2, 21, seed=6)
    with torch.no_grad():
        reused = model(ids, cache=cache, use_cache=True)
        fresh = model(ids, use_cache=True)
    torch.testing.assert_close(reused.logits, fresh.logits, rtol=0, atol=0)
    assert cache.memory_length() == fresh.cache.memory_length() == 21 - L
    # and continuing both sessions agrees too
    more = random_ids(2, 11, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(
            model(more, cache=cache, use_cache=True).logits,
            model(more, cache=fresh.cache, use_cache=True).logits,
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize("batch", [1, 3])
def test_reset_then_new_session_of_another_batch_size(batch):
    """reset() empties the session, so the next call may start a session with any batch size (like a new cache)."""
    model = tiny_model(3, mem_layers=[1], mem_dtype="bfloat16")
    cache = prefill(model, random_ids(2, 30, seed=5)).cache
    cache.reset()
    ids = random_ids(batch, 21, seed=6)
    with torch.no_grad():
        reused = model(ids, cache=cache, use_cache=True).logits
        fresh = model(ids, use_cache=True).logits
    torch.testing.assert_close(reused, fresh, rtol=0, atol=0)


def continued_logits(model, cache, ids):
    """Continue a session by 11 tokens in one call, then 9 one at a time (crossing local-context flushes)."""
    with torch.no_grad():
        chunk = model(ids[:, :11], cache=cache, use_cache=True).logits
        steps = [model(ids[:, j : j + 1], cache=cache, use_cache=True).logits for j in range(11, ids.shape[1])]
    return torch.cat([chunk, *steps], dim=1)


def test_batch_select_indices_keeps_rows_consistent():
    # float32 memory: batch-size-dependent matmul noise must not be amplified by bf16 rounding
    model = tiny_model(4, mem_layers=[1, 3], mem_dtype="float32")
    prompt, more = random_ids(3, 30, seed=8), random_ids(3, 20, seed=9)
    reference_cache = prefill(model, prompt).cache
    reference = continued_logits(model, reference_cache, more)

    cache = prefill(model, prompt).cache
    indices = torch.tensor([2, 0])
    cache.batch_select_indices(indices)
    assert cache.layers[1].memory()[0].shape[0] == 2 and cache.local_valid.shape[0] == 2
    selected = continued_logits(model, cache, more[indices])
    torch.testing.assert_close(selected, reference[indices], rtol=1e-5, atol=1e-4)
    assert cache.memory_length() == reference_cache.memory_length()
    assert cache.get_seq_length() == reference_cache.get_seq_length() == 50


def test_batch_repeat_interleave_keeps_rows_consistent():
    model = tiny_model(4, mem_layers=[1, 3], mem_dtype="float32")
    prompt, more = random_ids(2, 30, seed=10), random_ids(2, 20, seed=11)
    reference = continued_logits(model, prefill(model, prompt).cache, more)

    cache = prefill(model, prompt).cache
    cache.batch_repeat_interleave(2)
    assert cache.layers[1].memory()[0].shape[0] == 4
    repeated = continued_logits(model, cache, more.repeat_interleave(2, dim=0))
    torch.testing.assert_close(repeated, reference.repeat_interleave(2, dim=0), rtol=1e-5, atol=1e-4)


def test_crop_into_memory_is_refused():
    """Keeping 1 token of 20 would crop into memory (tests/test_generation.py crops the local context)."""
    model = tiny_model(0)
    cache = prefill(model, random_ids(1, 20)).cache
    with pytest.raises(ValueError, match="never cropped"):
        cache.crop(1)
    assert cache.get_seq_length() == 20


def test_reorder_cache_swaps_rows_and_shares_memory():
    model = tiny_model(0)
    ids = random_ids(2, 20)
    cache = prefill(model, ids).cache
    memory = [chunk.keys.data for layer in cache.layers if isinstance(layer, MemoryCacheLayer)
              for _, chunk in layer.memory_store.chunks()]
    cache.reorder_cache(torch.tensor([1, 0]))
    # memory is remapped, not copied
    assert [chunk.keys.data for layer in cache.layers if isinstance(layer, MemoryCacheLayer)
            for _, chunk in layer.memory_store.chunks()] == memory
    swapped = prefill(model, ids.flip(0)).cache
    step = random_ids(2, 9, seed=1)  # crosses the window: the local context of each row moves to (its) memory
    with torch.no_grad():
        out = model(step, cache=cache, use_cache=True)
        expected = model(step, cache=swapped, use_cache=True)
    # memory is in two segments (shared, then written after the reorder): blocks merge in another order
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=1e-5)
    for got, want in zip(cache.layers[1].memory(), swapped.layers[1].memory()):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)  # bf16 memory


# --------------------------------------------------------------------------------------------------------------------
# size
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mem_layers, num_key_value_heads, mem_dtype",
    [([1, 3], 2, "bfloat16"), ([0, 1, 2], 4, "float32"), ([2], 1, "float16")],
)
def test_memory_bytes_per_token(mem_layers, num_key_value_heads, mem_dtype):
    batch, head_dim = 2, 8
    model = tiny_model(5, mem_layers=mem_layers, mem_dtype=mem_dtype, num_key_value_heads=num_key_value_heads)
    element = torch.empty((), dtype=getattr(torch, mem_dtype)).element_size()
    expected_per_token = 2 * len(mem_layers) * num_key_value_heads * head_dim * element * batch

    short = prefill(model, random_ids(batch, L)).cache  # nothing in memory
    assert filled_memory_bytes(short) == 0
    previous = None
    for tokens in (100, 400):
        cache = prefill(model, random_ids(batch, tokens)).cache
        memory_tokens = cache.memory_length()
        assert memory_tokens == tokens - L
        filled = filled_memory_bytes(cache)
        assert abs(filled / memory_tokens - expected_per_token) <= 0.1 * expected_per_token
        # nbytes counts capacity: at least the filled memory, at most a growth factor of it over the short session
        assert cache.nbytes >= short.nbytes + filled
        assert cache.nbytes <= short.nbytes + GROWTH * filled + MIN_CAPACITY * expected_per_token
        if previous is not None:  # linear in memory length
            slope = (filled - previous[1]) / (memory_tokens - previous[0])
            assert abs(slope - expected_per_token) <= 0.1 * expected_per_token
        previous = (memory_tokens, filled)
