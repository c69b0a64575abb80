"""Memory attention while decoding, accelerated: the `"blockwise"` memory-attention kernel the package registers
(`attention_longllama.MEMORY_ATTENTION_FUNCTIONS`, docs/architecture.md).

A decode step has a few queries per KV head and reads all of memory, so its speed is the speed at which memory is
read. The checkpoint code's blockwise kernel widens every memory chunk to the compute dtype (a float32 copy of bf16
memory, every step) and runs SDPA on the copy. Here the compiled kernel (`csrc/attend.h`) reads the chunks in place,
in their stored dtype, once: scores, a running softmax and the weighted sum of values in one pass, accumulated in
float32. The local context takes the checkpoint code's path, and the two parts are merged by log-sum-exp exactly as
the blockwise kernel merges its blocks: the same results up to float rounding (tests/test_attention.py).

The kernel runs when it is installed and the call is a decoding one: a session's memory on the CPU stored in float32
or bfloat16, at most `FUSED_QUERIES` queries per KV head, no gradients, not under `torch.compile`. Every other call
goes to the checkpoint code's kernel.
"""

import math

import torch

from . import kernels
from .modeling import attention_longllama as core
from .modeling.memory_longllama import LayerMemory

# Queries per KV head (query heads per KV head x new tokens) up to which the kernel runs: a decode step, a few draft
# tokens. Prefill windows have hundreds; SDPA over widened blocks (matrix products) is faster for them.
FUSED_QUERIES = 64
# When there are fewer (row, KV head) sets than threads, each set's memory is cut into ranges of at least this many
# entries, one per thread.
MIN_RANGE = 4096


def blockwise_memory_attention_forward(module, query, key, value, visible, memory=None, scaling=1.0, **kwargs):
    """`attention_longllama.blockwise_memory_attention_forward`, with memory read by the compiled kernel when the call
    is a decoding one (see the module docstring)."""
    lib = _kernel_for(query, key, value, memory)
    if lib is None:
        return core.blockwise_memory_attention_forward(
            module, query, key, value, visible, memory=memory, scaling=scaling, **kwargs
        )
    B, H, t, D = query.shape
    out, lse = core._local_attention(query, key, value, visible, scaling, kwargs.get("is_causal", False))
    q = core._group_queries(query, key.shape[1])  # [B, Hkv, g*t, D]: memory is read once per KV head
    mem_out, mem_lse = memory_attention(lib, q, memory, scaling)
    out, _ = core._merge(out, lse, mem_out.reshape(B, H, t, D), mem_lse.reshape(B, H, t))
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _kernel_for(query, key, value, memory):
    """The compiled kernels if this call is one they take, else None."""
    if not isinstance(memory, LayerMemory) or memory.length == 0 or memory.storage_dtype not in kernels.DTYPES:
        return None
    B, H, t, D = query.shape
    if query.device.type != "cpu" or D > kernels.MAX_D or (H // key.shape[1]) * t > FUSED_QUERIES:
        return None
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    ):
        return None
    if _chunk_table(memory, B) is None:  # memory (partly) off the CPU
        return None
    return kernels.compiled()


def memory_attention(lib, q: torch.Tensor, memory: LayerMemory, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of `q` `[B, Hkv, R, D]` over every valid entry of `memory` (stored float32 or bfloat16, on
    the CPU), by the compiled kernel `lib`, in one call over all chunks. Returns `(out [B, Hkv, R, D] float32,
    lse [B, Hkv, R])`: the attention output and the log-sum-exp of the scaled scores; out 0 and lse -inf for rows
    whose memory holds nothing valid."""
    B, Hkv, R, D = q.shape
    table = _chunk_table(memory, B)
    q = (q.float() * scaling).contiguous()
    # the kernel's running softmax (csrc/attend.h): largest score, sum of exp(score - largest), weighted sum of values
    top, total, acc = torch.full((B, Hkv, R), -math.inf), torch.zeros(B, Hkv, R), torch.zeros(B, Hkv, R, D)
    threads, sets = torch.get_num_threads(), B * Hkv
    splits = 1 if sets >= threads else max(1, min(-(-threads // sets), memory.length // MIN_RANGE))
    scratch = kernels.reusable_buffer("attend_scratch", sets * splits * R * (D + 2), torch.float32)
    lib.attend(
        top.data_ptr(), total.data_ptr(), acc.data_ptr(), q.data_ptr(), B, Hkv, R, D,
        kernels.DTYPES[memory.storage_dtype], table.data_ptr(), table.shape[0], scratch.data_ptr(), splits, threads,
    )
    out = acc / total.clamp(min=torch.finfo(torch.float32).tiny)[..., None]  # total 0: nothing valid, acc 0
    return out, top + total.log()


def _chunk_table(memory: LayerMemory, batch_size: int) -> torch.Tensor | None:
    """The kernel's description of `memory`: int64 `[chunks, 10]`, one row per chunk (csrc/attend.h, CHUNK_FIELDS:
    key, value, valid and row-map addresses, live entries, strides), or None if some chunk is not on the CPU.

    Built once per layout (`LayerMemory.version`: every write, eviction, beam reorder or reset changes it), so a
    decode step does no Python work per chunk. The addresses stay valid while the version does: the chunks' tensors
    are only replaced by writes. Row maps are checked here, since the kernel trusts them."""
    cached = getattr(memory, "_kernel_chunk_table", None)
    if cached is not None and cached[0] == (memory.version, batch_size):
        return cached[1]
    rows_kept, table = [], []
    for segment, chunk in memory.chunks():
        keys, values, valid = chunk.view("keys"), chunk.view("values"), chunk.view("valid")
        if keys.device.type != "cpu":
            return None
        rows = segment.rows
        if rows is None and keys.shape[0] != batch_size or rows is not None and rows.shape != (batch_size,):
            raise ValueError(f"memory holds {keys.shape[0]} rows but the session has {batch_size}")
        if rows is not None:
            rows = rows.to("cpu", torch.long).contiguous()
            if int(rows.min()) < 0 or int(rows.max()) >= keys.shape[0]:
                raise ValueError(f"memory rows {rows.tolist()} outside [0, {keys.shape[0]})")
            rows_kept.append(rows)
        for x in (keys, values):
            if x.stride(3) != 1 or x.stride(2) != x.shape[3]:
                raise ValueError(f"memory entries must be contiguous, got strides {x.stride()}")
        table.append([
            keys.data_ptr(), values.data_ptr(), valid.data_ptr(), 0 if rows is None else rows.data_ptr(),
            keys.shape[2], keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), valid.stride(0),
        ])
    table = torch.tensor(table, dtype=torch.int64).reshape(-1, 10)
    memory._kernel_chunk_table = ((memory.version, batch_size), table, rows_kept)
    return table


__all__ = ["FUSED_QUERIES", "blockwise_memory_attention_forward", "memory_attention"]
