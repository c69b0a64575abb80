"""Memory-attention kernels of LongLLaMA: one softmax over `[local scores ; memory scores]`.

All kernels share one signature and return `(attn_output [B, t, H, D], attn_weights or None)`:

    query   [B, H, t, D]       rotated queries of the current window
    key     [B, Hkv, n, D]     rotated keys of the local context (the window is its last t entries)
    value   [B, Hkv, n, D]
    visible [B, 1, t, n] bool  causal mask and padding of the local context
    memory  a `LayerMemory` (the session's, read chunk by chunk), or a tuple
            (mem_key [B, Hkv, M, D], mem_value [B, Hkv, M, D], mem_valid [B, M] bool) (crossbatch training), or None;
            memory keys are unrotated and stored in `mem_dtype`, memory entries are never causally masked.

Masked scores are pushed to `MASK_VALUE` (-1e6, where the published code clamps them), never to -inf: a query row with
nothing visible (a padding token) stays finite. The eager kernel sets them to exactly -1e6 as published (such a row
becomes a uniform average); the others add -1e6, which gives the same result for every row that sees something.
Grouped-query attention groups the query heads of one KV head into rows, so memory is never repeated per query head.
"""

import torch
import torch.nn.functional as F

MASK_VALUE = -1e6
# Memory keys per block of the blockwise kernel: one block of keys (fp32, all KV heads) holds about this many floats.
MEMORY_BLOCK_ELEMENTS = 1 << 22
MIN_BLOCK = 256
# Top-k attention gathers the selected values of this many elements at a time ([rows, k, D] per KV head).
TOPK_GATHER_ELEMENTS = 1 << 23
FLASH_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def mask_value(dtype: torch.dtype) -> float:
    """-1e6, or the most negative finite value of `dtype` if that is larger (float16)."""
    return max(MASK_VALUE, torch.finfo(dtype).min)


def _group_queries(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, H, t, D] -> [B, Hkv, g * t, D]: the g query heads sharing a KV head become rows."""
    B, H, t, D = query.shape
    return query.reshape(B, num_kv_heads, (H // num_kv_heads) * t, D)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, n, D] -> [B, Hkv * groups, n, D] (query head h reads KV head h // groups)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def memory_blocks(memory, batch_size: int, dtype: torch.dtype, device: torch.device, block: int | None = None):
    """`(keys, values [B, Hkv, n, D] in dtype on device, valid [B, n])` blocks of `memory` (tuple or `LayerMemory`);
    a tuple is cut into blocks of `block` keys (default: all)."""
    if not isinstance(memory, tuple):
        yield from memory.blocks(dtype, device, batch_size)
        return
    mem_key, mem_value, mem_valid = memory
    block = block or mem_key.shape[2]
    for m0 in range(0, mem_key.shape[2], block):
        yield (
            mem_key[:, :, m0 : m0 + block].to(device, dtype),
            mem_value[:, :, m0 : m0 + block].to(device, dtype),
            mem_valid[:, m0 : m0 + block].to(device),
        )


def materialize_memory(memory, batch_size: int, dtype: torch.dtype, device: torch.device):
    """All of `memory` as one `(keys, values, valid)` tuple (the dense kernels concatenate it anyway)."""
    if memory is None or isinstance(memory, tuple):
        return memory
    keys, values, valid = zip(*memory_blocks(memory, batch_size, dtype, device))
    return torch.cat(keys, dim=-2), torch.cat(values, dim=-2), torch.cat(valid, dim=-1)


def eager_memory_attention_forward(
    module, query, key, value, visible, memory=None, scaling=1.0, grouping=None, output_attentions=False, **kwargs
):
    """The published computation: dense scores over local and memory keys, optionally in groups of
    `grouping = [heads_per_group, queries_per_group]` to bound peak memory (a no-op on the result). With
    `output_attentions` the weights `[B, H, t, n + M]` over `[local ; memory]` keys come back too."""
    B, H, t, D = query.shape
    groups = H // key.shape[1]
    keys, values = _repeat_kv(key, groups), _repeat_kv(value, groups)
    fill = mask_value(query.dtype)
    memory = materialize_memory(memory, B, query.dtype, query.device)
    if memory is not None:
        mem_key, mem_value, mem_valid = memory
        keys = torch.cat([keys, _repeat_kv(mem_key.to(query.dtype), groups)], dim=-2)
        values = torch.cat([values, _repeat_kv(mem_value.to(value.dtype), groups)], dim=-2)
        mem_visible = mem_valid[:, None, None, :].expand(B, 1, t, mem_valid.shape[-1])
        visible = torch.cat([visible, mem_visible], dim=-1)

    heads_per_group, queries_per_group = grouping if grouping is not None else (H, t)
    out = query.new_empty(B, H, t, D)
    weights = query.new_empty(B, H, t, keys.shape[-2]) if output_attentions else None
    for h0 in range(0, H, heads_per_group):
        for q0 in range(0, t, queries_per_group):
            q = query[:, h0 : h0 + heads_per_group, q0 : q0 + queries_per_group]
            scores = torch.matmul(q, keys[:, h0 : h0 + heads_per_group].transpose(2, 3)) * scaling
            scores = scores.masked_fill(~visible[:, :, q0 : q0 + queries_per_group], fill)
            probs = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)
            rows = (slice(None), slice(h0, h0 + heads_per_group), slice(q0, q0 + queries_per_group))
            out[rows] = probs @ values[:, h0 : h0 + heads_per_group]
            if weights is not None:
                weights[rows] = probs
    return out.transpose(1, 2).contiguous(), weights


def sdpa_memory_attention_forward(module, query, key, value, visible, memory=None, scaling=1.0, **kwargs):
    """Local and memory keys concatenated, one `scaled_dot_product_attention` call with an additive mask."""
    B, H, t, D = query.shape
    memory = materialize_memory(memory, B, query.dtype, query.device)
    if memory is not None:
        mem_key, mem_value, mem_valid = memory
        key = torch.cat([key, mem_key.to(key.dtype)], dim=-2)
        value = torch.cat([value, mem_value.to(value.dtype)], dim=-2)
        visible = torch.cat([visible, mem_valid[:, None, None, :].expand(B, 1, t, mem_valid.shape[-1])], dim=-1)
    bias = torch.zeros(visible.shape, dtype=query.dtype, device=query.device)
    bias.masked_fill_(~visible, mask_value(query.dtype))
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=bias, scale=scaling, enable_gqa=key.shape[1] != H
    )
    return out.transpose(1, 2).contiguous(), None


def _attend(query, key, value, bias, scaling, is_causal=False):
    """Softmax attention of `query` [B, h, r, D] over `key`/`value` [B, h, m, D] with an additive `bias`
    (broadcastable to [B, h, r, m], or None; `is_causal` instead: r == m and query i sees keys <= i).
    Returns `(out [B, h, r, D], lse [B, h, r])`, lse = log-sum-exp of the scores, so that blocks merge exactly."""
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    if query.device.type == "cpu" and query.dtype in FLASH_CPU_DTYPES and not grad:
        # the fused CPU flash kernel returns the log-sum-exp too (its lse has no gradient, hence not when training)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=bias, scale=scaling
        )
    acc_dtype = torch.promote_types(query.dtype, torch.float32)
    scores = torch.matmul(query * scaling, key.transpose(2, 3)).to(acc_dtype)  # [B, h, r, m]
    if is_causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        bias = torch.zeros(future.shape, dtype=acc_dtype, device=scores.device).masked_fill_(future, MASK_VALUE)
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.matmul(torch.exp(scores - lse).to(value.dtype), value)
    return out, lse.squeeze(-1)


def _merge(out, lse, block_out, block_lse):
    """Combine two partial softmax results over disjoint key sets (outputs [..., r, D], log-sum-exps [..., r])."""
    total = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - total)[..., None] + block_out * torch.exp(block_lse - total)[..., None]
    return out, total


def _local_attention(query, key, value, visible, scaling, is_causal):
    """The local-context part of memory attention: `(out [B, H, t, D] float32 or wider, lse [B, H, t])`."""
    acc_dtype = torch.promote_types(query.dtype, torch.float32)
    bias = None
    if not is_causal:
        bias = torch.zeros(visible.shape, dtype=acc_dtype, device=query.device)
        bias.masked_fill_(~visible.to(query.device), MASK_VALUE)  # [B, 1, t, n]
    groups = query.shape[1] // key.shape[1]
    out, lse = _attend(query, _repeat_kv(key, groups), _repeat_kv(value, groups), bias, scaling, is_causal)
    return out.to(acc_dtype), lse


def blockwise_memory_attention_forward(
    module, query, key, value, visible, memory=None, scaling=1.0, block_size=None, is_causal=False, **kwargs
):
    """One softmax computed block by block and merged by log-sum-exp: the local context is the first block, then
    memory in blocks of `block_size` keys. Never materialises `[t x M]` scores; same result as the eager kernel.
    `is_causal=True` promises that `visible` is exactly the causal mask (t == n, no padding): a faster path.
    When gradients are needed it delegates to `sdpa_memory_attention_forward` (same result)."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)):
        # training (e.g. crossbatch, whose memory is a few windows): the fused SDPA backward is ~3x faster than
        # differentiating the block merge, and never stores [t x M] probabilities either
        return sdpa_memory_attention_forward(module, query, key, value, visible, memory=memory, scaling=scaling)
    B, H, t, D = query.shape
    Hkv = key.shape[1]
    acc_dtype = torch.promote_types(query.dtype, torch.float32)
    out, lse = _local_attention(query, key, value, visible, scaling, is_causal)
    if memory is not None:
        q = _group_queries(query, Hkv)  # [B, Hkv, g*t, D]: memory is read once per KV head
        block = block_size or max(MIN_BLOCK, MEMORY_BLOCK_ELEMENTS // max(1, B * Hkv * D))
        for k, v, valid in memory_blocks(memory, B, query.dtype, query.device, block):
            block_bias = None
            if torch.compiler.is_compiling() or not bool(valid.all()):  # compiled: no data-dependent branch
                block_bias = torch.zeros(valid.shape, dtype=acc_dtype, device=query.device)
                block_bias = block_bias.masked_fill_(~valid, MASK_VALUE)[:, None, None, :]
            block_out, block_lse = _attend(q, k, v.to(value.dtype), block_bias, scaling)
            block_out = block_out.reshape(B, H, t, D).to(acc_dtype)
            out, lse = _merge(out, lse, block_out, block_lse.reshape(B, H, t))

    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def topk_memory_attention_forward(module, query, key, value, visible, memory=None, scaling=1.0, top_k=None, **kwargs):
    """kNN memory attention: each query attends to its local context plus its `top_k` memory entries of highest
    `q . k` (searched per KV head by `memory.search`, a `LayerMemory`), all in one softmax. With `top_k` at least the
    memory size this is the dense result; callers then use a dense kernel, which gives it exactly."""
    B, H, t, D = query.shape
    Hkv = key.shape[1]
    out, local_lse = _local_attention(query, key, value, visible, scaling, kwargs.get("is_causal", False))
    q = _group_queries(query, Hkv)  # [B, Hkv, g*t, D]
    scores, ids = memory.search(q, top_k)  # [B, Hkv, g*t, k]: unscaled q . k, ids -1 where nothing was found
    rows = max(1, TOPK_GATHER_ELEMENTS // max(1, B * Hkv * top_k * D))
    parts = []
    for r0 in range(0, q.shape[2], rows):  # queries in slices: the gathered values are [.., rows, k, D]
        chunk_ids = ids[:, :, r0 : r0 + rows]
        values = memory.gather_values(chunk_ids, torch.float32).to(query.device)
        chunk_scores = (scores[:, :, r0 : r0 + rows] * scaling).to(query.device)
        chunk_scores = chunk_scores.masked_fill(chunk_ids.to(query.device) < 0, MASK_VALUE)
        chunk_lse = torch.logsumexp(chunk_scores, dim=-1)
        probs = torch.exp(chunk_scores - chunk_lse[..., None])
        parts.append((torch.einsum("bhrk,bhrkd->bhrd", probs, values), chunk_lse))
    mem_out = torch.cat([p[0] for p in parts], dim=2).reshape(B, H, t, D)
    mem_lse = torch.cat([p[1] for p in parts], dim=2).reshape(B, H, t)
    out, _ = _merge(out, local_lse, mem_out, mem_lse)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


MEMORY_ATTENTION_FUNCTIONS = {
    "blockwise": blockwise_memory_attention_forward,
    "eager": eager_memory_attention_forward,
    "sdpa": sdpa_memory_attention_forward,
}

__all__ = [
    "MASK_VALUE",
    "MEMORY_ATTENTION_FUNCTIONS",
    "blockwise_memory_attention_forward",
    "eager_memory_attention_forward",
    "mask_value",
    "materialize_memory",
    "memory_blocks",
    "sdpa_memory_attention_forward",
    "topk_memory_attention_forward",
]
