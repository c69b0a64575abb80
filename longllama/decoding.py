"""Static decoding: every decode step of a session as one compiled graph (docs/inference.md#static-decoding).

A session started with `generate(..., cache_implementation="static")` (or `cache=LongLlamaCache(config, static=True)`)
decodes token by token through `decode_step`, which the package plugs into the checkpoint code
(`modeling_longllama.DECODE_STEP`). The checkpoint code still does each step's bookkeeping (inputs, the window schedule,
a flush when the local context is full: all in Python, before the step); `decode_step` then runs the decoder layers:

- every layer's local context lives in a preallocated buffer of one window (`[B, Hkv, window, D]`, the cache layer's
  own `SequenceBuffer`, kept at that capacity), the new token's keys and values are written into slot `n` in place,
  and attention reads all slots under a mask (slots after `n` are masked out), so every step has the same shapes;
- the memory layers' kernel call (memory of any length, dense or top-k, the C kernel or torch) is one opaque operator,
  `longllama::memory_layer_attention`, which reads the session from this module's `_STEP` while the step runs, as
  transformers' attention functions read their cache;
- on the CPU the projections read their weights on every thread (`DecodeLayers.linear`), as the model's head does;
- `torch.compile(fullgraph=True, dynamic=False)` compiles the layers once per model and batch shape, and every later
  step, flush or session reuses the graph.

Same computation as the eager layers (tests/test_decoding.py: logits to float rounding, same greedy tokens, across
flushes, padding, beams and top-k). Steps that need more than the final hidden states (hidden states of every layer,
attention weights) or gradients run eagerly.
"""

import threading
import weakref

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .modeling.attention_longllama import mask_value
from .modeling.modeling_longllama import LongLlamaDecoderLayer

# How the step is compiled (tests may pass another backend, e.g. "aot_eager").
COMPILE_OPTIONS = {"backend": "inductor", "fullgraph": True, "dynamic": False}

_STEP = threading.local()  # `current`: (model, session, mem_top_k) of the step running on this thread
_compiled = weakref.WeakKeyDictionary()  # model -> its compiled `DecodeLayers`


@torch.library.custom_op("longllama::memory_layer_attention", mutates_args=())
def memory_layer_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor, layer_idx: int
) -> torch.Tensor:
    """Attention of memory layer `layer_idx` of the running step over its local window (`key`, `value`
    `[B, Hkv, window, D]`, `visible` `[B, 1, 1, window]`) and the session's memory: `[B, 1, H, D]`."""
    model, session, mem_top_k = _STEP.current
    memory = session.layers[layer_idx].memory_store
    attention = model.layers[layer_idx].self_attn
    output, _ = attention.attend(query, key, value, visible, memory if memory.length > 0 else None, top_k=mem_top_k)
    return output.contiguous()


@memory_layer_attention.register_fake
def _(query, key, value, visible, layer_idx):
    batch_size, heads, tokens, head_dim = query.shape
    return query.new_empty(batch_size, tokens, heads, head_dim)


class DecodeLayers(nn.Module):
    """The decoder layers of `model` (a `LongLlamaModel`) for one token, over local windows in fixed-size buffers."""

    def __init__(self, model):
        super().__init__()
        self.layers = model.layers
        self.rotates = [
            not isinstance(layer, LongLlamaDecoderLayer) or layer.self_attn.use_rotary for layer in self.layers
        ]
        self.threads = torch.get_num_threads() if model.device.type == "cpu" else 1

    def forward(self, hidden_states, cos, sin, slot, visible, bias, buffers):
        """`hidden_states` `[B, 1, hidden]`; `slot` `[1]` the new token's slot; `visible` `[B, 1, 1, window]` the slots
        it sees (`bias` the same as an additive mask); `buffers[i]` layer i's `(keys, values, raw keys or None)`."""
        for idx, layer in enumerate(self.layers):
            attention = layer.self_attn
            residual = hidden_states
            hidden_states = layer.input_layernorm(hidden_states)
            shape = (*hidden_states.shape[:-1], -1, attention.head_dim)
            query = self.linear(attention.q_proj, hidden_states).view(shape).transpose(1, 2)  # [B, H, 1, D]
            key = self.linear(attention.k_proj, hidden_states).view(shape).transpose(1, 2)  # [B, Hkv, 1, D]
            value = self.linear(attention.v_proj, hidden_states).view(shape).transpose(1, 2)
            keys, values, raw_keys = buffers[idx]
            if raw_keys is not None:  # a memory layer: its memory stores the unrotated keys at the next flush
                raw_keys.index_copy_(2, slot, key.to(raw_keys.dtype))
            if self.rotates[idx]:
                query, key = apply_rotary_pos_emb(query, key, cos, sin)
            keys.index_copy_(2, slot, key)
            values.index_copy_(2, slot, value)
            if raw_keys is not None:
                output = torch.ops.longllama.memory_layer_attention(query, keys, values, visible, idx)
            else:
                output = nn.functional.scaled_dot_product_attention(
                    query, keys, values, attn_mask=bias, scale=attention.scaling,
                    enable_gqa=query.shape[1] != keys.shape[1],
                ).transpose(1, 2)
            hidden_states = residual + self.linear(attention.o_proj, output.reshape(*residual.shape[:-1], -1))
            mlp, x = layer.mlp, layer.post_attention_layernorm(hidden_states)
            x = mlp.act_fn(self.linear(mlp.gate_proj, x)) * self.linear(mlp.up_proj, x)
            hidden_states = hidden_states + self.linear(mlp.down_proj, x)
        return hidden_states

    def linear(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """`module(x)` for the few rows of a decode step. On the CPU torch computes a product with one row on one
        thread, and a step's time is mostly reading weights: the weight is cut into one slice of output features per
        thread and applied as a batched product (the same dot products, threads reading in parallel)."""
        weight, threads = module.weight, self.threads
        if threads < 2 or module.bias is not None or weight.shape[0] % threads or x.shape[:-1].numel() > 16:
            return module(x)
        rows = x.reshape(1, -1, x.shape[-1]).expand(threads, -1, -1)  # [threads, rows, in]
        out = torch.bmm(rows, weight.view(threads, -1, weight.shape[1]).transpose(1, 2))  # [threads, rows, out/threads]
        return out.transpose(0, 1).reshape(*x.shape[:-1], -1)


def decode_step(model, hidden_states, position_embeddings, session, window):
    """`modeling_longllama.DECODE_STEP`: run the layers of `model` (a `LongLlamaModel`) on one new token of a static
    session whose local context the model has already updated (flushed if full; `session.local_valid` includes the
    new token). Returns the final hidden states `[B, 1, hidden]`, or None to leave the step to the eager layers."""
    slot = session.local_length - 1  # local tokens before this one
    capacity = model.window_size  # a flush keeps the local context within one window
    if model.training or torch.is_grad_enabled() and hidden_states.requires_grad or slot >= capacity:
        return None
    dtype, device = hidden_states.dtype, hidden_states.device
    buffers = []
    for layer_cache, layer in zip(session.layers, model.layers):
        attention = layer.self_attn
        shape = (hidden_states.shape[0], attention.config.num_key_value_heads, capacity, attention.head_dim)
        raw = getattr(layer_cache, "_raw_keys", None)
        buffers.append((
            _window(layer_cache._keys, shape, dtype, device),
            _window(layer_cache._values, shape, dtype, device),
            None if raw is None else _window(raw, shape, layer_cache._raw_dtype or dtype, device),
        ))
        layer_cache.device, layer_cache.is_initialized = device, True
    visible = nn.functional.pad(session.local_valid, (0, capacity - slot - 1))[:, None, None, :]
    bias = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, mask_value(dtype))
    step = _compiled.get(model)
    if step is None:
        step = _compiled[model] = torch.compile(DecodeLayers(model), **COMPILE_OPTIONS)
    _STEP.current = (model, session, window.mem_top_k)
    try:
        cos, sin = position_embeddings
        slots = torch.tensor([slot], device=device)
        hidden_states = step(hidden_states, cos, sin, slots, visible, bias, buffers)
    finally:
        _STEP.current = None
    for layer_cache in session.layers:
        for buffer in layer_cache._buffers():
            buffer.length = slot + 1
    return hidden_states


def _window(buffer, shape, dtype, device) -> torch.Tensor:
    """`buffer.data` as a `shape` tensor (capacity one window), keeping the filled part. A buffer allocated elsewhere
    (prefill, beam reordering) is copied once into zeros: slots after the filled part must hold finite numbers, since
    masked attention still multiplies them by zero."""
    data = buffer.data
    if data is not None and data is getattr(buffer, "static_data", None) and data.shape == shape:
        return data
    window = torch.zeros(shape, dtype=dtype, device=device)
    if buffer.length:
        window[:, :, : buffer.length] = buffer.view()
    buffer.data = buffer.static_data = window
    return window


__all__ = ["COMPILE_OPTIONS", "decode_step", "memory_layer_attention"]
