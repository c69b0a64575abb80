"""Memory-attention kernels of LongLLaMA: one softmax over `[local scores ; memory scores]`.

All kernels share one signature and return `(attn_output [B, t, H, D], attn_weights or None)`:

    query   [B, H, t, D]       rotated queries of the current window
    key     [B, Hkv, n, D]     rotated keys of the local context (the window is its last t entries)
    value   [B, Hkv, n, D]
    visible [B, 1, t, n] bool  causal mask and padding of the local context
    memory  (mem_key [B, Hkv, M, D], mem_value [B, Hkv, M, D], mem_valid [B, M] bool) or None;
            memory keys are unrotated and stored in `mem_dtype`, memory entries are never causally masked.

Masked scores are set to `MASK_VALUE` (the published code clamps them there), so a row with nothing visible becomes a
uniform average instead of NaN. Grouped-query attention groups the query heads of one KV head into rows, so memory is
never repeated per query head.
"""

import torch
import torch.nn.functional as F

MASK_VALUE = -1e6
# Memory keys per block in the blockwise kernel are chosen so that one block of scores holds about this many floats.
BLOCK_SCORE_ELEMENTS = 1 << 23
MIN_BLOCK = 256


def mask_value(dtype: torch.dtype) -> float:
    """-1e6, or the most negative finite value of `dtype` if that is larger (float16)."""
    return max(MASK_VALUE, torch.finfo(dtype).min)


def _group_queries(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, H, t, D] -> [B, Hkv, g * t, D]: the g query heads sharing a KV head become rows."""
    B, H, t, D = query.shape
    return query.reshape(B, num_kv_heads, (H // num_kv_heads) * t, D)


def _ungroup_output(out: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, Hkv, g * t, D] -> [B, t, H, D]."""
    B, _, rows, D = out.shape
    return out.reshape(B, num_heads, rows * out.shape[1] // num_heads, D).transpose(1, 2).contiguous()


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, n, D] -> [B, Hkv * groups, n, D] (query head h reads KV head h // groups)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def eager_memory_attention_forward(
    module, query, key, value, visible, memory=None, scaling=1.0, grouping=None, **kwargs
):
    """The published computation: dense scores over local and memory keys, optionally in groups of
    `grouping = [heads_per_group, queries_per_group]` to bound peak memory (a no-op on the result)."""
    B, H, t, D = query.shape
    groups = H // key.shape[1]
    keys, values = _repeat_kv(key, groups), _repeat_kv(value, groups)
    fill = mask_value(query.dtype)
    if memory is not None:
        mem_key, mem_value, mem_valid = memory
        keys = torch.cat([keys, _repeat_kv(mem_key.to(query.dtype), groups)], dim=-2)
        values = torch.cat([values, _repeat_kv(mem_value.to(value.dtype), groups)], dim=-2)
        mem_visible = mem_valid[:, None, None, :].expand(B, 1, t, mem_valid.shape[-1])
        visible = torch.cat([visible, mem_visible], dim=-1)

    heads_per_group, queries_per_group = grouping if grouping is not None else (H, t)
    out = query.new_empty(B, H, t, D)
    for h0 in range(0, H, heads_per_group):
        for q0 in range(0, t, queries_per_group):
            q = query[:, h0 : h0 + heads_per_group, q0 : q0 + queries_per_group]
            scores = torch.matmul(q, keys[:, h0 : h0 + heads_per_group].transpose(2, 3)) * scaling
            scores = scores.masked_fill(~visible[:, :, q0 : q0 + queries_per_group], fill)
            probs = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)
            out[:, h0 : h0 + heads_per_group, q0 : q0 + queries_per_group] = probs @ values[:, h0 : h0 + heads_per_group]
    return out.transpose(1, 2).contiguous(), None


def sdpa_memory_attention_forward(module, query, key, value, visible, memory=None, scaling=1.0, **kwargs):
    """Local and memory keys concatenated, one `scaled_dot_product_attention` call with an additive mask."""
    B, H, t, D = query.shape
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


def blockwise_memory_attention_forward(
    module, query, key, value, visible, memory=None, scaling=1.0, block_size=None, **kwargs
):
    """One softmax computed block by block with a running log-sum-exp: the local context is the first block, then
    memory in blocks of `block_size` keys. Never materialises `[t x M]` scores; same result as the eager kernel."""
    B, H, t, D = query.shape
    Hkv = key.shape[1]
    q = _group_queries(query * scaling, Hkv)  # [B, Hkv, g*t, D]
    rows = q.shape[2]
    acc_dtype = torch.promote_types(query.dtype, torch.float32)  # softmax statistics in fp32 (or fp64)

    # local block: causal + padding mask, shared by the g query heads of a KV head
    scores = torch.matmul(q, key.transpose(2, 3)).to(acc_dtype)  # [B, Hkv, g*t, n]
    scores.view(B, Hkv, rows // t, t, -1).masked_fill_(~visible[:, :, None], MASK_VALUE)
    running_max = scores.amax(dim=-1, keepdim=True)  # [B, Hkv, g*t, 1]
    probs = torch.exp(scores - running_max)
    denominator = probs.sum(dim=-1, keepdim=True)
    acc = torch.matmul(probs.to(value.dtype), value).to(acc_dtype)  # [B, Hkv, g*t, D]

    if memory is not None:
        mem_key, mem_value, mem_valid = memory
        block = block_size or max(MIN_BLOCK, BLOCK_SCORE_ELEMENTS // max(1, B * Hkv * rows))
        for m0 in range(0, mem_key.shape[2], block):
            scores = torch.matmul(q, mem_key[:, :, m0 : m0 + block].to(q.dtype).transpose(2, 3)).to(acc_dtype)
            valid = mem_valid[:, m0 : m0 + block]
            if not bool(valid.all()):
                scores.masked_fill_(~valid[:, None, None, :], MASK_VALUE)
            block_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
            correction = torch.exp(running_max - block_max)
            probs = torch.exp(scores - block_max)  # [B, Hkv, g*t, block]
            denominator = denominator * correction + probs.sum(dim=-1, keepdim=True)
            v = mem_value[:, :, m0 : m0 + block].to(value.dtype)
            acc = acc * correction + torch.matmul(probs.to(value.dtype), v).to(acc_dtype)
            running_max = block_max

    out = (acc / denominator).to(query.dtype)
    return _ungroup_output(out, H), None


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
    "sdpa_memory_attention_forward",
]
