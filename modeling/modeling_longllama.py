"""LongLLaMA: a Llama decoder whose memory layers attend to their local window plus an external memory.

Implements the inference of the Focused Transformer (Tworkowski et al., "Focused Transformer: Contrastive Training
for Context Scaling", arXiv 2307.03170) on top of `transformers.models.llama` (5.x): non-memory layers are the stock
`LlamaDecoderLayer`; memory layers replace only the attention. A long input is processed window by window
(`windows_longllama.py`); the memory travels inside a `LongLlamaCache` (`cache` / `past_key_values`).

This folder is copied into every checkpoint directory, so it imports only torch, transformers and its own files.
"""

import weakref

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationConfig, GenerationMixin, MaxLengthCriteria
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.utils import logging

from .attention_longllama import (
    MEMORY_ATTENTION_FUNCTIONS,
    eager_memory_attention_forward,
    mask_value,
    topk_memory_attention_forward,
)
from .cache_longllama import LongLlamaCache, cache_fingerprint
from .compat_longllama import CACHE_NAME, accepts_past_key_values, with_cache
from .configuration_longllama import LongLlamaConfig, check_top_k
from .windows_longllama import (
    Window,
    WindowInputs,
    assign_depths,
    first_position,
    plan_windows,
    requested_positions,
    requests_all,
)

# transformers 4.57 and 5.0 copy to their module cache only the files that an auto_map module imports itself
from .knn_longllama import make_index  # noqa: F401
from .memory_longllama import LayerMemory

# Inputs of at least this many windows get a progress bar (a decode step never builds one: torch.compile traces it),
# drawn only when stderr is a terminal and once the call has run PROGRESS_DELAY seconds, so that logs stay clean and
# short calls of any model size stay quiet; `show_progress=False` or transformers' `disable_progress_bar()` hide it.
PROGRESS_WINDOWS = 16
PROGRESS_DELAY = 2.0
# FoT crossbatch training (`cross_batch_rows`, docs/training.md) is the package's: `import longllama` plugs in
# `longllama.crossbatch`, which checks the rows (`check_rows`) and builds the other rows' memory (`memory`).
CROSS_BATCH = None
# Static decoding (a `LongLlamaCache(config, static=True)`, or `generate(..., cache_implementation="static")`) is the
# package's too: `longllama.decoding.decode_step` runs a decode step's layers as one compiled graph over preallocated
# local windows (docs/inference.md#static-decoding), or returns None to leave the step to the layers below.
DECODE_STEP = None


def _cross_batch():
    if CROSS_BATCH is None:
        raise ImportError("crossbatch training (cross_batch_rows) needs the longllama package: pip install longllama, "
                          "and `import longllama` before loading the model")
    return CROSS_BATCH


class LongLlamaAttention(LlamaAttention):
    """Attention of a memory layer: one softmax over the local context and the layer's memory.

    Queries `[B, H, t, D]` are rotated by their position in the local context; local keys are rotated the same way;
    memory keys are stored unrotated (rotation "as if at position 0" is the identity). With `mem_positionals=False`
    nothing is rotated in this layer. The kernel is chosen by `config.mem_attention_implementation`.
    """

    def __init__(self, config: LongLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.use_rotary = config.mem_positionals
        self.grouping = config.mem_attention_grouping
        self.attention_implementation = config.mem_attention_implementation

    # diff vs Llama: memory read/write around the kernel; the mask is boolean (`window.visible`)
    def _project(self, hidden_states, position_embeddings, queries: bool = True):
        """`(queries or None, keys, values, raw keys)`: `[B, H or Hkv, t, D]`, rotated where this layer rotates; the
        raw keys are the unrotated ones memory stores."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, Hkv, t, D]
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        raw_key_states = key_states
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2) if queries else None
        if self.use_rotary:
            cos, sin = position_embeddings
            if queries:
                query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
            else:
                key_states = apply_rotary_pos_emb(key_states, key_states, cos, sin)[1]
        return query_states, key_states, value_states, raw_key_states

    def write(self, hidden_states, position_embeddings, cache, window) -> None:
        """Only store this window's keys and values (local context or memory), without attending: what a window
        needs from the top memory layer when no layer above it runs (exact; docs/inference.md#beyond)."""
        _, key_states, value_states, raw_key_states = self._project(hidden_states, position_embeddings, queries=False)
        if window.stores_local:
            # the layer's own update: Cache.update of transformers 4.57 and 5.0 drops keyword arguments (raw_keys)
            cache.layers[self.layer_idx].update(key_states, value_states, raw_keys=raw_key_states)
        else:
            cache.layers[self.layer_idx].add_to_memory(raw_key_states, value_states, window.valid)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, window=None, **kwargs):
        cache = kwargs.get(CACHE_NAME, cache)  # transformers < 5.24: the decoder layer passes `past_key_values`
        input_shape = hidden_states.shape[:-1]
        query_states, key_states, value_states, raw_key_states = self._project(hidden_states, position_embeddings)

        if cache is None:
            if not window.self_contained:
                raise ValueError(
                    "This input spans several windows, so memory layers need the session cache, which gradient "
                    "checkpointing removes. To train through memory with gradient checkpointing, put the windows "
                    "in batch rows and pass cross_batch_rows (longllama.crossbatch, longllama-train's memory "
                    "fine-tuning mode); or disable it (model.gradient_checkpointing_disable())."
                )
            # a single window and no session (training): the only memory is the crossbatch one
            memory = None
            if window.cross_batch_rows is not None:
                memory = _cross_batch().memory(raw_key_states, value_states, window.valid, window.cross_batch_rows,
                                               query_states, self.layer_idx)
        else:
            layer_cache = cache.layers[self.layer_idx]
            if window.stores_local:
                key_states, value_states = layer_cache.update(key_states, value_states, raw_keys=raw_key_states)
            memory = layer_cache.memory_store if layer_cache.memory_length > 0 else None
        attn_output, attn_weights = self.attend(
            query_states, key_states, value_states, window.visible.to(query_states.device), memory,
            top_k=window.mem_top_k if cache is not None else None, is_causal=window.is_causal,
            output_attentions=window.output_attentions,
        )
        if cache is not None and not window.stores_local:
            # a stand-alone window of a long prompt goes to memory after its own attention (it never sees itself)
            layer_cache.add_to_memory(raw_key_states, value_states, window.valid)

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    def attend(self, query, key, value, visible, memory, top_k=None, is_causal=False, output_attentions=False):
        """The memory-attention kernel call: `(output [B, t, H, D], weights or None)` over the local `key`, `value`
        `[B, Hkv, n, D]` (`visible` `[B, 1, t, n]`) and `memory` (a session's `LayerMemory`, crossbatch rows, or
        None). `top_k` below the memory's length retrieves that many memory keys per query (kNN)."""
        # looked up per call: `import longllama` may replace a kernel by a faster one (docs/architecture.md)
        attention_function = MEMORY_ATTENTION_FUNCTIONS[self.attention_implementation]
        if isinstance(memory, LayerMemory) and top_k is not None and top_k < memory.length:
            # kNN retrieval from the session memory (with k >= memory it would select everything: dense, exactly);
            # crossbatch training attends densely, as in the paper
            if output_attentions:
                raise ValueError("output_attentions is not available with kNN retrieval: pass mem_top_k=None.")
            attention_function = topk_memory_attention_forward
        elif output_attentions:  # the weights come from the eager kernel, as in transformers
            attention_function = eager_memory_attention_forward
        return attention_function(
            self, query, key, value, visible, memory=memory, scaling=self.scaling, grouping=self.grouping,
            is_causal=is_causal, top_k=top_k, output_attentions=output_attentions,
        )


class LongLlamaDecoderLayer(LlamaDecoderLayer):
    """A memory layer: `LlamaDecoderLayer` with `LongLlamaAttention`; no extra parameters."""

    def __init__(self, config: LongLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = LongLlamaAttention(config, layer_idx)  # diff vs Llama: memory attention

    def write(self, hidden_states, position_embeddings, cache, window) -> None:
        """Store the window's keys and values for later windows, skipping attention and MLP (their output is unused
        when no layer above runs)."""
        self.self_attn.write(self.input_layernorm(hidden_states), position_embeddings, cache, window)


class AttentionRecorder:
    """The attention weights of every layer in one forward call (`output_attentions`), as Llama returns them:
    `[B, H, T, S]` per layer for the T tokens of the call over the S positions of the session so far, memory entries
    and local context at their positions, zeros where a query does not attend (docs/inference.md#outputs).

    While it records, the stock layers run their eager kernel (the only one that returns weights, as in transformers)
    and memory layers theirs (`WindowInputs.output_attentions`)."""

    def __init__(self, model, num_tokens: int, seen_tokens: int):
        self.model, self.num_tokens, self.seen_tokens = model, num_tokens, seen_tokens
        self.weights = [None] * len(model.layers)
        self.latest = {}
        self.hooks = [
            layer.self_attn.register_forward_hook(lambda module, args, out, idx=idx: self.latest.update({idx: out[1]}))
            for idx, layer in enumerate(model.layers)
        ]
        self.attn_implementation = model.config._attn_implementation
        model.config._attn_implementation = "eager"

    def record(self, idx: int, window: Window, seen: int, memory_ids: torch.Tensor | None) -> None:
        """Place layer `idx`'s weights `[B, H, t, n (+ M)]` for `window` (over its local context, whose last token is
        session position `seen + t - 1`, then the memory entries `memory_ids`) at their session positions."""
        weights = self.latest.pop(idx)
        memory_ids = torch.zeros(0, dtype=torch.long) if memory_ids is None else memory_ids
        t, n = window.end - window.start, weights.shape[-1] - len(memory_ids)
        columns = torch.cat([torch.arange(seen + t - n, seen + t), memory_ids]).to(weights.device)
        if self.weights[idx] is None:  # [B, H, T, S]
            shape = (*weights.shape[:2], self.num_tokens, self.seen_tokens + self.num_tokens)
            self.weights[idx] = weights.new_zeros(shape)
        self.weights[idx][:, :, window.start : window.end].index_copy_(-1, columns, weights)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.model.config._attn_implementation = self.attn_implementation


class LongLlamaPreTrainedModel(PreTrainedModel):
    config: LongLlamaConfig
    config_class = LongLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "LongLlamaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    # published checkpoints store the rotary buffers of every layer; they are recomputed from the config
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]


class LongLlamaModel(LongLlamaPreTrainedModel):
    """The LongLLaMA decoder (no head). Returns `BaseModelOutputWithPast` whose `cache` is the session's
    `LongLlamaCache`. `last_hidden_state` is `[B, T, hidden]`, or only the positions named by
    `hidden_states_to_keep` (the windows that nothing requested may skip the layers above the top memory layer).
    """

    def __init__(self, config: LongLlamaConfig):
        super().__init__(config)
        config.validate_longllama()
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        mem_layers = set(config.mem_layers)
        self.layers = nn.ModuleList(
            [
                LongLlamaDecoderLayer(config, idx) if idx in mem_layers else LlamaDecoderLayer(config, idx)
                for idx in range(config.num_hidden_layers)
            ]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.mem_layers = sorted(mem_layers)
        self.memory_depth = self.mem_layers[-1] + 1 if self.mem_layers else 0
        self.window_size = config.max_position_embeddings
        self.gradient_checkpointing = False
        self.post_init()

    @accepts_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        last_context_length: int | None = None,
        hidden_states_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        cross_batch_rows: torch.LongTensor | None = None,
        mem_top_k: int | None = None,
        return_dict: bool | None = None,
        show_progress: bool = True,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        r"""
        last_context_length (`int`, *optional*):
            Tokens at the end of the input that form the final local window (default: `config.last_context_length`).
        hidden_states_to_keep (`int` or 1-D `torch.Tensor`, defaults to 0):
            `0` returns every position; `k` the last k; a tensor the listed positions.
        cross_batch_rows (`torch.LongTensor` of shape `[B, R]`, *optional*):
            FoT crossbatch training (`longllama.crossbatch` builds it): every row is one local window, and the memory
            layers of row b also attend to all tokens of rows `cross_batch_rows[b]` (earlier rows only, `-1` for
            none), their keys unrotated, in the same softmax, with gradients. No cache is used or returned.
        mem_top_k (`int`, *optional*):
            Memory keys each memory-layer query attends to, chosen by inner product (default: `config.mem_top_k`;
            `None` there means all of memory). Crossbatch training always attends densely.
        show_progress (`bool`, defaults to `True`):
            `False` hides the progress bar of long inputs (see `PROGRESS_WINDOWS`); also accepted by `generate()`.
        """
        # inputs
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if output_attentions and cross_batch_rows is not None:
            raise ValueError("output_attentions is not available in crossbatch training (cross_batch_rows).")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = output_hidden_states or self.config.output_hidden_states
        last_context_length = self.config.last_context_length if last_context_length is None else last_context_length
        mem_top_k = self.config.mem_top_k if mem_top_k is None else mem_top_k
        check_top_k(mem_top_k)
        if last_context_length < 1:
            raise ValueError(f"last_context_length={last_context_length} must be a positive number of tokens.")
        inputs = input_ids if input_ids is not None else inputs_embeds
        batch_size, num_tokens = inputs.shape[:2]
        if num_tokens == 0 or batch_size == 0:
            raise ValueError(f"The input is empty (shape {list(inputs.shape[:2])}): pass at least one row and token.")
        if cross_batch_rows is not None:
            _cross_batch().check_rows(cross_batch_rows, cache, batch_size, num_tokens, self.window_size)
            use_cache, last_context_length = False, num_tokens  # each row is one window; nothing is remembered
        session = self._session(cache, batch_size, use_cache)
        valid = self._token_validity(attention_mask, session, batch_size, num_tokens, inputs.device)
        position_ids = self._position_ids(position_ids, session, batch_size, num_tokens, inputs.device)

        # schedule
        plan = plan_windows(
            num_tokens, self.window_size, last_context_length, session.local_length, fresh=session.seen_tokens == 0
        )
        # one window and nothing to remember (training): layers run without a cache, so checkpointing works
        self_contained = len(plan) == 1 and session.seen_tokens == 0 and not use_cache
        requested = requested_positions(num_tokens, hidden_states_to_keep)
        # every layer's states or attention weights need every window
        needed = range(num_tokens) if output_hidden_states or output_attentions else requested
        assign_depths(plan, needed, len(self.layers), self.memory_depth)

        # windows (a progress bar for long inputs; an interrupted call marks the session unusable, not half-valid)
        kept, layer_states = [], []
        recorder = AttentionRecorder(self, num_tokens, session.seen_tokens) if output_attentions else None
        quiet = len(plan) < PROGRESS_WINDOWS or self.training or not show_progress
        progress = plan if quiet else logging.tqdm(
            plan, desc="LongLLaMA windows", unit="window", disable=None, delay=PROGRESS_DELAY
        )
        try:
            for w in progress:
                # embedded window by window: a 100k-token prompt never holds all its embeddings at once
                window_states = self.embed_tokens(input_ids[:, w.start : w.end]) if inputs_embeds is None else None
                if window_states is None:
                    window_states = inputs_embeds[:, w.start : w.end]
                states = self._process_window(
                    window_states, valid, position_ids, w, None if self_contained else session,
                    output_hidden_states, cross_batch_rows, mem_top_k, recorder,
                )
                if w.keep:
                    kept.append(states[-1])
                if output_hidden_states:
                    layer_states.append(states)
        except BaseException:
            session.interrupted = True
            raise
        finally:
            if recorder is not None:
                recorder.close()

        # outputs: hidden states of every position, as Llama returns them (one window: the tensors themselves)
        hidden_states = self.norm(self._select_kept(kept, plan, requested, num_tokens))
        all_hidden_states = None
        if output_hidden_states:
            all_hidden_states = tuple(x[0] if len(x) == 1 else torch.cat(x, dim=1) for x in zip(*layer_states))
            last = hidden_states if requests_all(requested, num_tokens) else self.norm(all_hidden_states[-1])
            all_hidden_states = all_hidden_states[:-1] + (last,)
        output = with_cache(
            BaseModelOutputWithPast, session if use_cache else None,
            last_hidden_state=hidden_states, hidden_states=all_hidden_states,
            attentions=None if recorder is None else tuple(recorder.weights),
        )
        return output if self._return_dict(return_dict) else output.to_tuple()

    def _return_dict(self, return_dict: bool | None) -> bool:
        return self.config.return_dict if return_dict is None else return_dict

    def _process_window(
        self, hidden_states, valid, position_ids, window: Window, session, all_states=False, cross_batch_rows=None,
        mem_top_k=None, recorder=None,
    ):
        """Run `window.depth` layers on one window `[B, t, hidden]`. Returns `[final hidden states]`, or with
        `all_states` the input and the output of every layer. `session` is None for a self-contained window;
        `recorder` (an `AttentionRecorder`) collects the layers' attention weights."""
        valid = valid[:, window.start : window.end]  # [B, t]
        positions = position_ids[:, window.start : window.end]
        if session is not None and window.stores_local:
            self._enter_local_context(session, window, valid, positions)
            origin, local_valid = session.position_origin, session.local_valid
        else:
            origin, local_valid = first_position(positions, valid), valid
        t, n = valid.shape[1], local_valid.shape[1]
        causal = torch.arange(n, device=valid.device)[None, :] <= torch.arange(n - t, n, device=valid.device)[:, None]
        visible = causal[None, None] & local_valid[:, None, None, :]  # [B, 1, t, n]
        # a window that is its whole local context, without padding: plain causal attention, which kernels can skip
        is_causal = t == n and t > 1 and bool(local_valid.all())
        inputs = WindowInputs(
            window.stores_local, visible, valid, is_causal, session is None, cross_batch_rows, mem_top_k,
            output_attentions=recorder is not None,
        )
        position_embeddings = self.rotary_emb(hidden_states, position_ids=positions - origin[:, None])
        # a decode step of a static session: the package runs it as one compiled graph (DECODE_STEP)
        decoding = t == 1 and window.stores_local and window.depth == len(self.layers)
        if session is not None and session.static and decoding and not (all_states or recorder is not None):
            if DECODE_STEP is None:
                raise ImportError("static decoding needs the longllama package: pip install longllama, and `import "
                                  "longllama` before loading the model")
            decoded = DECODE_STEP(self, hidden_states, position_embeddings, session, inputs)
            if decoded is not None:
                session.seen_tokens += t
                return [decoded]
        bias = None  # SDPA in the stock layers then runs causally (eager needs the mask)
        if not (is_causal and self.config._attn_implementation == "sdpa"):
            bias = torch.zeros(visible.shape, dtype=hidden_states.dtype, device=visible.device)
            bias.masked_fill_(~visible, mask_value(hidden_states.dtype))  # additive mask of the stock layers

        states = [hidden_states]
        for idx, layer in enumerate(self.layers[: window.depth]):
            is_memory_layer = isinstance(layer, LongLlamaDecoderLayer)
            if session is not None and not all_states and idx == window.depth - 1 < len(self.layers) - 1:
                # the top memory layer of a window whose output nobody reads: only its keys and values are needed
                layer.write(hidden_states, position_embeddings, session, inputs)
                break
            memory_ids = None  # the memory the layer reads, before a stand-alone window adds itself
            if recorder is not None and is_memory_layer and session is not None:
                memory_ids = session.layers[idx].memory_store.live_ids()
            hidden_states = layer(
                hidden_states,
                attention_mask=bias,
                position_embeddings=position_embeddings,
                window=inputs,
                **{CACHE_NAME: session if window.stores_local or is_memory_layer else None},
            )
            if recorder is not None:
                recorder.record(idx, window, session.seen_tokens if session is not None else 0, memory_ids)
            if all_states:
                states.append(hidden_states)
        if session is not None:
            session.seen_tokens += t
        return states if all_states else [hidden_states]

    def _enter_local_context(self, session: LongLlamaCache, window: Window, valid, positions) -> None:
        """Before a window joins the local context: flush it if it would overflow, then record the new tokens."""
        if window.flush:
            for layer_cache in session.layers[: window.depth]:
                layer_cache.flush(session.local_valid)
            session.local_valid = None
        if session.local_valid is None:
            session.position_origin = first_position(positions, valid)  # rotary positions restart here
            session.local_valid = valid
        else:
            # rows whose local context is only padding so far start counting at their first real token
            has_token = session.local_valid.any(dim=1)
            session.position_origin = torch.where(has_token, session.position_origin, first_position(positions, valid))
            session.local_valid = torch.cat([session.local_valid, valid], dim=1)

    def _session(self, cache, batch_size: int, use_cache: bool) -> LongLlamaCache:
        """The cache that holds this call's session: the one passed in, or a new one."""
        if cache is None or (isinstance(cache, DynamicCache) and cache.get_seq_length() == 0):
            # `generate()` passes an empty DynamicCache: the session memory needs our own cache type
            session = LongLlamaCache(self.config)
            session.model_ref = weakref.ref(self)
        elif not isinstance(cache, LongLlamaCache):
            raise ValueError(
                f"LongLLaMA keeps its session in a LongLlamaCache, got a {type(cache).__name__}. Pass cache=None to "
                "start a session (generate() does this; the only cache_implementation it takes is \"static\") or "
                "the cache returned by an earlier call to continue one."
            )
        elif not use_cache:
            raise ValueError("A cache was passed with use_cache=False: pass use_cache=True to continue the session.")
        else:
            session = cache
            if session.interrupted:
                raise ValueError(
                    "An earlier call on this LongLlamaCache was interrupted, so its session is incomplete: call "
                    "cache.reset() and process the session again, or start a new one with cache=None."
                )
            if session.fingerprint != cache_fingerprint(self.config):
                raise ValueError(
                    "This LongLlamaCache was made for a model with a different layout "
                    f"{session.fingerprint} than this one {cache_fingerprint(self.config)} "
                    "(layers, mem_layers, kv heads, head_dim, window, mem_dtype): start a new session with cache=None."
                )
            if session.model_ref is None or session.model_ref() is not self:  # whose session is it? (identity)
                session.bind(self)
        if session.batch_size_ is None:
            session.batch_size_ = batch_size
        elif session.batch_size_ != batch_size:
            raise ValueError(
                f"The cache holds a session of batch size {session.batch_size_} but the input has batch size "
                f"{batch_size}: continue each session with the same rows, or start a new one with cache=None."
            )
        return session

    @staticmethod
    def _token_validity(attention_mask, session, batch_size, num_tokens, device) -> torch.Tensor:
        """`[B, T]` bool, False for padding. The mask covers the whole session (HF style) or just the new tokens."""
        if attention_mask is None:
            return torch.ones(batch_size, num_tokens, dtype=torch.bool, device=device)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size:
            raise ValueError(
                f"attention_mask must be 2-D [batch, tokens] with 1 for tokens and 0 for padding; got shape "
                f"{tuple(attention_mask.shape)} for a batch of {batch_size}."
            )
        length, seen = attention_mask.shape[1], session.seen_tokens
        if length not in (num_tokens, seen + num_tokens):
            raise ValueError(
                f"attention_mask has {length} columns but the input has {num_tokens} new tokens after {seen} earlier "
                f"ones in this session: pass a mask of length {seen + num_tokens} (the whole session) or "
                f"{num_tokens} (the new tokens)."
            )
        return attention_mask[:, -num_tokens:].to(device=device, dtype=torch.bool)

    @staticmethod
    def _position_ids(position_ids, session, batch_size, num_tokens, device) -> torch.Tensor:
        """`[B, T]` position ids; only differences within a local context matter (positions are rebased)."""
        if position_ids is None:
            position_ids = torch.arange(session.seen_tokens, session.seen_tokens + num_tokens, device=device)[None]
        if position_ids.dim() != 2 or position_ids.shape[1] != num_tokens or position_ids.shape[0] not in (1, batch_size):
            raise ValueError(
                f"position_ids must have shape [batch, {num_tokens}] or [1, {num_tokens}], got {tuple(position_ids.shape)}."
            )
        return position_ids.to(device).expand(batch_size, num_tokens)

    @staticmethod
    def _select_kept(kept, plan, requested, num_tokens) -> torch.Tensor:
        """Concatenate the kept windows and pick the requested positions, in the requested order."""
        hidden_states = kept[0] if len(kept) == 1 else torch.cat(kept, dim=1)
        if hidden_states.shape[1] == num_tokens and requests_all(requested, num_tokens):
            return hidden_states
        if isinstance(requested, range):
            requested = torch.arange(requested.start, requested.stop)
        row_of_position = torch.full((num_tokens,), -1, dtype=torch.long)
        starts = torch.cat([torch.arange(w.start, w.end) for w in plan if w.keep])
        row_of_position[starts] = torch.arange(len(starts))
        return hidden_states[:, row_of_position[requested].to(hidden_states.device)]


class LongLlamaForCausalLM(LongLlamaPreTrainedModel, GenerationMixin):
    """LongLLaMA with a language-modelling head. Logits cover every input position unless `logits_to_keep` is set;
    `generate()` processes the prompt window by window and decodes with the session memory in `LongLlamaCache`.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LongLlamaConfig):
        super().__init__(config)
        self.model = LongLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @accepts_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        last_context_length: int | None = None,
        output_hidden_states: bool | None = None,
        cross_batch_rows: torch.LongTensor | None = None,
        mem_top_k: int | None = None,
        return_dict: bool | None = None,
        show_progress: bool = True,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        r"""
        last_context_length (`int`, *optional*):
            Tokens at the end of the input that form the final local window (default: `config.last_context_length`).
            Also accepted by `generate()`.
        cross_batch_rows (`torch.LongTensor` of shape `[B, R]`, *optional*):
            FoT crossbatch training: see `LongLlamaModel.forward`.
        mem_top_k (`int`, *optional*):
            kNN retrieval from memory (default: `config.mem_top_k`); also accepted by `generate()`.
        show_progress (`bool`, defaults to `True`):
            `False` hides the progress bar of long inputs (`LongLlamaModel.forward`); also accepted by `generate()`.
        """
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("labels need the logits of every position: leave logits_to_keep at 0.")
        repeats = self._shared_prefill_repeats(input_ids, inputs_embeds, attention_mask, position_ids, cache)
        if repeats > 1:
            # generate() repeated every prompt for its beams / return sequences: read each prompt once and let the
            # copies share its memory (exactly what every copy would compute on its own)
            input_ids, inputs_embeds, attention_mask, position_ids = (
                None if x is None or x.shape[0] == 1 else x[::repeats]
                for x in (input_ids, inputs_embeds, attention_mask, position_ids)
            )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            last_context_length=last_context_length,
            hidden_states_to_keep=logits_to_keep,
            output_hidden_states=output_hidden_states,
            cross_batch_rows=cross_batch_rows,
            mem_top_k=mem_top_k,
            return_dict=True,
            show_progress=show_progress,
            **kwargs,
        )
        hidden_states, session = outputs[0], getattr(outputs, CACHE_NAME)
        all_hidden_states, attentions = outputs.hidden_states, outputs.attentions
        if repeats > 1:  # every copy gets the outputs of its prompt
            if session is not None:
                session.batch_repeat_interleave(repeats)
            hidden_states = hidden_states.repeat_interleave(repeats, dim=0)
            all_hidden_states, attentions = (
                None if x is None else tuple(y.repeat_interleave(repeats, dim=0) for y in x)
                for x in (all_hidden_states, attentions)
            )
        logits = self._head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = with_cache(
            CausalLMOutputWithPast, session, loss=loss, logits=logits, hidden_states=all_hidden_states,
            attentions=attentions,
        )
        return output if self.model._return_dict(return_dict) else output.to_tuple()

    def _head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`lm_head(hidden_states)`. diff vs Llama: for the one row of a decode step on the CPU, where torch's
        matrix-vector product runs on one thread, the head is cut into one slice per thread and applied as a batched
        product (the same dot products): the head is the largest weight a decode step reads."""
        head = self.lm_head
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or hidden_states.shape[:-1].numel() != 1:
            return head(hidden_states)
        weight, threads = head.weight, torch.get_num_threads()
        if (
            weight.device.type != "cpu" or threads < 2 or weight.shape[0] % threads or type(head) is not nn.Linear
            or head.bias is not None or head._forward_hooks or head._forward_pre_hooks
        ):
            return head(hidden_states)
        rows = hidden_states.reshape(1, 1, -1).expand(threads, 1, -1).to(weight.dtype)
        logits = torch.bmm(rows, weight.view(threads, -1, weight.shape[1]).transpose(1, 2))  # [threads, 1, V / threads]
        return logits.reshape(*hidden_states.shape[:-1], -1)

    def _shared_prefill_repeats(self, input_ids, inputs_embeds, attention_mask, position_ids, cache) -> int:
        """How many identical copies of each prompt `generate()` passed (beams, return sequences), or 1.

        Only inside `generate()`, only for the first call of a session (or of a continued session of the prompts'
        own batch size), and only if the rows really are repeated in groups."""
        repeats = getattr(self, "_generation_repeats", 1)
        inputs = input_ids if input_ids is not None else inputs_embeds
        if repeats <= 1 or inputs is None or inputs.shape[0] % repeats:
            return 1
        batch = inputs.shape[0] // repeats
        if isinstance(cache, LongLlamaCache):
            if cache.batch_size_ not in (None, batch):
                return 1
        elif cache is not None and cache.get_seq_length() > 0:
            return 1
        for x in (inputs, attention_mask, position_ids):
            if x is not None and x.shape[0] != 1:
                grouped = x.reshape(batch, repeats, *x.shape[1:])
                if not torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
                    return 1
        return repeats

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """`GenerationMixin.generate`; with beams or `num_return_sequences`, the prompt is read once per row and its
        copies share one memory (they only copy their local contexts). `cache_implementation="static"` decodes with a
        static `LongLlamaCache` (one compiled graph per step, docs/inference.md#static-decoding)."""
        config = generation_config or self.generation_config
        static = (kwargs.get("cache_implementation") or config.cache_implementation) == "static"
        if static:
            # the session memory needs our own cache type; "static" makes one whose decode steps are compiled
            kwargs.pop("cache_implementation", None)
            if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
                kwargs[CACHE_NAME] = LongLlamaCache(self.config, static=True)
        beams = kwargs.get("num_beams") or config.num_beams or 1
        repeats = max(beams, kwargs.get("num_return_sequences") or config.num_return_sequences or 1)
        if (
            kwargs.get("max_length") is None
            and kwargs.get("max_new_tokens") is None
            and config.max_new_tokens is None
            and config.max_length == GenerationConfig().max_length
        ):
            # transformers' default: 20 new tokens, capped at max_position_embeddings in total; here that is only the
            # window size, not a length limit, so keep the 20 new tokens
            kwargs["max_new_tokens"] = config.max_length
        self._generation_repeats = repeats
        configs = [c for c in (generation_config, self.generation_config) if static and c is not None]
        implementations = [c.cache_implementation for c in configs]
        try:
            for c in configs:  # generate() refuses a cache together with a cache_implementation
                c.cache_implementation = None
            return super().generate(inputs, generation_config=generation_config, **kwargs)
        finally:
            self._generation_repeats = 1
            for c, implementation in zip(configs, implementations):
                c.cache_implementation = implementation

    def _get_stopping_criteria(self, *args, **kwargs):
        criteria = super()._get_stopping_criteria(*args, **kwargs)
        for criterion in criteria:
            if isinstance(criterion, MaxLengthCriteria):
                criterion.max_position_embeddings = None  # the window is not a length limit: no "exceeded" warning
        return criteria


LongLlamaConfig.register_for_auto_class()
LongLlamaModel.register_for_auto_class("AutoModel")
LongLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["LongLlamaCache", "LongLlamaForCausalLM", "LongLlamaModel", "LongLlamaPreTrainedModel"]
