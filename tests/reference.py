"""A deliberately naive float64 reference of LongLLaMA (Focused Transformer) inference.

This file is test infrastructure: other tests compare the optimised model against it.
It favours obviousness over speed: plain loops over windows and layers, dense matrices,
float64 everywhere, no caching tricks. It implements docs/inference.md, sections 1 and 2 (#behaviour).

Semantics (W = max_position_embeddings, L = last_context_length):

* Llama decoder: h += o_proj(attn(rmsnorm_in(h))); h += down(silu(gate(x)) * up(x)),
  x = rmsnorm_post(h); then final RMSNorm and an untied lm_head.
* A session holds a LOCAL context (unrotated keys/values per layer, position ids and valid
  flags of the tokens in it) and, per memory layer, an append-only MEMORY (unrotated keys,
  values, valid flags), stored rounded to float32 then to ``mem_dtype``.
* A call with T tokens: P = max(T - L, 0); [0, P) is cut into windows of W, [P, T) is the
  final window.
  - Fresh session (nothing seen yet): each non-final window is processed in isolation
    (its local context is itself); memory layers append its keys/values to memory AFTER
    its attention. The final window becomes the local context.
  - Continuing session: every window is appended to the local context; if
    local_len + window_len > W and local_len > 0, the whole local context first leaves
    (into memory in memory layers, dropped elsewhere) before that window's attention.
* Rotary positions are relative to the local context: pos - origin, per batch row, where origin is
  the position of the first non-padding token of the local context (the minimum position if the
  context is all padding). For unpadded input this is the published min(pos over the context);
  with left padding it makes a padded row compute what the row alone computes.
  Memory keys are never rotated. With mem_positionals=False memory layers rotate nothing.
* Attention: one softmax over [local scores ; memory scores]; masked entries (future,
  padding, invalid memory) are exactly -1e6 and all scores are clamped from below at
  -1e6, so a fully masked row is uniform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

F64 = torch.float64
MASKED = -1e6  # the published code clamps scores from below at -1e6 (not -inf)
# A test sets a list here to receive the probabilities of every attention call, [B, H, n, c + m] over the local
# context then memory, in the order of the calls (window by window, layer by layer).
ATTENTION_LOG: list | None = None


# --------------------------------------------------------------------------- config


def _as_dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    name = str(d).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown mem_dtype {d!r}")
    return dtype


@dataclass
class RefConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: same as num_attention_heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    last_context_length: int = 1024
    mem_layers: list[int] = field(default_factory=list)
    mem_positionals: bool = True
    mem_dtype: torch.dtype = torch.bfloat16
    mem_top_k: int | None = None  # memory keys per query chosen by q . k (None: all)
    mem_max_tokens: int | None = None  # memory keeps its first mem_keep_first entries and its most recent ones
    mem_keep_first: int = 0

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.mem_dtype = _as_dtype(self.mem_dtype)
        self.mem_layers = [int(i) for i in self.mem_layers]
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2 != 0:
            raise ValueError("head_dim must be even for rotary embeddings")
        for i in self.mem_layers:
            if not 0 <= i < self.num_hidden_layers:
                raise ValueError(f"memory layer {i} out of range")

    @classmethod
    def from_hf(cls, config) -> "RefConfig":
        """Read a transformers config object (LlamaConfig or a LongLLaMA config)."""
        heads = config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise NotImplementedError(f"rope type {rope_type!r} is not supported by the reference")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        lcl = getattr(config, "last_context_length", None)
        mem_layers = getattr(config, "mem_layers", None)
        mem_positionals = getattr(config, "mem_positionals", None)
        mem_dtype = getattr(config, "mem_dtype", None)
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=float(theta),
            max_position_embeddings=config.max_position_embeddings,
            last_context_length=1024 if lcl is None else int(lcl),
            mem_layers=[] if mem_layers is None else list(mem_layers),
            mem_positionals=True if mem_positionals is None else bool(mem_positionals),
            mem_dtype=torch.bfloat16 if mem_dtype is None else mem_dtype,
            mem_top_k=getattr(config, "mem_top_k", None),
            mem_max_tokens=getattr(config, "mem_max_tokens", None),
            mem_keep_first=getattr(config, "mem_keep_first", 0),
        )


# --------------------------------------------------------------------------- session


@dataclass
class RefSession:
    """Everything a session remembers between calls. Tensors are never modified in place.

    local_k / local_v: per layer, [B, Hkv, n, d] float64, UNROTATED (k_proj / v_proj output).
    local_pos / local_valid: [B, n] position ids and valid flags of the local tokens
        (the same tokens in every layer).
    mem_k / mem_v: per memory layer index, [B, Hkv, m, d] float64, already rounded to mem_dtype.
    mem_valid: per memory layer index, [B, m] bool.
    seen: number of tokens fed to the session so far.
    """

    seen: int = 0
    local_k: dict[int, torch.Tensor] = field(default_factory=dict)
    local_v: dict[int, torch.Tensor] = field(default_factory=dict)
    local_pos: torch.Tensor | None = None
    local_valid: torch.Tensor | None = None
    mem_k: dict[int, torch.Tensor] = field(default_factory=dict)
    mem_v: dict[int, torch.Tensor] = field(default_factory=dict)
    mem_valid: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def local_len(self) -> int:
        return 0 if self.local_pos is None else self.local_pos.shape[1]

    def mem_len(self, layer: int) -> int:
        return 0 if layer not in self.mem_k else self.mem_k[layer].shape[2]

    def copy(self) -> "RefSession":
        return RefSession(
            seen=self.seen,
            local_k=dict(self.local_k),
            local_v=dict(self.local_v),
            local_pos=self.local_pos,
            local_valid=self.local_valid,
            mem_k=dict(self.mem_k),
            mem_v=dict(self.mem_v),
            mem_valid=dict(self.mem_valid),
        )


def _to_mem(x: torch.Tensor, cfg: RefConfig) -> torch.Tensor:
    """Round as an fp32 model storing into mem_dtype would, then read back as float64."""
    return x.to(torch.float32).to(cfg.mem_dtype).to(F64)


def _append_to_memory(sess: RefSession, layer: int, k, v, valid, cfg: RefConfig) -> None:
    k, v = _to_mem(k, cfg), _to_mem(v, cfg)
    if layer in sess.mem_k:
        k = torch.cat([sess.mem_k[layer], k], dim=2)
        v = torch.cat([sess.mem_v[layer], v], dim=2)
        valid = torch.cat([sess.mem_valid[layer], valid], dim=1)
    if cfg.mem_max_tokens is not None and k.shape[2] > cfg.mem_max_tokens:
        first, recent = cfg.mem_keep_first, cfg.mem_max_tokens - cfg.mem_keep_first
        k, v = (torch.cat([x[:, :, :first], x[:, :, -recent:]], dim=2) for x in (k, v))
        valid = torch.cat([valid[:, :first], valid[:, -recent:]], dim=1)
    sess.mem_k[layer], sess.mem_v[layer], sess.mem_valid[layer] = k, v, valid


# --------------------------------------------------------------------------- math


def _rms_norm(x, weight, eps):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rotate(x, rel_pos, cfg: RefConfig):
    """HF-Llama rotary embedding. x: [B, h, n, d]; rel_pos: [B, n] (integer positions)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=F64) / d))
    freqs = rel_pos.to(F64)[..., None] * inv_freq  # [B, n, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, n, d]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated_half = torch.cat([-x2, x1], dim=-1)
    return x * emb.cos() + rotated_half * emb.sin()


def _attention(q, k, v, ctx_valid, mem_k, mem_v, mem_valid, cfg: RefConfig):
    """Dense attention of n queries (the last n tokens of the local context).

    q: [B, H, n, d] (already rotated), k/v: [B, Hkv, c, d] local (k already rotated),
    ctx_valid: [B, c] bool, mem_*: [B, Hkv, m, d] / [B, m] or None.
    """
    _, H, n, d = q.shape
    c = k.shape[2]
    group = H // cfg.num_key_value_heads  # query head h uses kv head h // group
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # [B, H, n, c]
    q_index = torch.arange(c - n, c)[:, None]  # local index of each query
    k_index = torch.arange(c)[None, :]
    allowed = (k_index <= q_index)[None, None] & ctx_valid[:, None, None, :]
    scores = torch.where(allowed, scores.clamp(min=MASKED), torch.full_like(scores, MASKED))
    values = v
    if mem_k is not None and mem_k.shape[2] > 0:
        mk, mv = mem_k.repeat_interleave(group, dim=1), mem_v.repeat_interleave(group, dim=1)
        mem_scores = q @ mk.transpose(-1, -2) / math.sqrt(d)  # [B, H, n, m]
        mem_allowed = mem_valid[:, None, None, :].expand_as(mem_scores)
        mem_scores = torch.where(
            mem_allowed, mem_scores.clamp(min=MASKED), torch.full_like(mem_scores, MASKED)
        )
        if cfg.mem_top_k is not None and cfg.mem_top_k < mem_scores.shape[-1]:
            # kNN: only the top-k memory keys of each query take part (padding is never among them)
            kth = mem_scores.topk(cfg.mem_top_k, dim=-1).values[..., -1:]
            mem_scores = torch.where(mem_scores >= kth, mem_scores, torch.full_like(mem_scores, -math.inf))
        scores = torch.cat([scores, mem_scores], dim=-1)
        values = torch.cat([v, mv], dim=2)
    probs = torch.softmax(scores, dim=-1)
    if ATTENTION_LOG is not None:
        ATTENTION_LOG.append(probs)
    return probs @ values  # [B, H, n, d]


# --------------------------------------------------------------------------- forward


def _float64_state_dict(state_dict):
    return {
        name: t.detach().to(device="cpu", dtype=F64)
        for name, t in state_dict.items()
        if not name.endswith("rotary_emb.inv_freq")
    }


def _origin(pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, 1] position of the first valid token of each row (row minimum if none is valid)."""
    origin = pos.min(dim=1, keepdim=True).values.clone()
    for b in range(pos.shape[0]):
        idx = valid[b].nonzero()
        if len(idx) > 0:
            origin[b, 0] = pos[b, idx[0, 0]]
    return origin


def _windows(T: int, W: int, L: int) -> list[tuple[int, int]]:
    P = max(T - L, 0)
    bounds = [(s, min(s + W, P)) for s in range(0, P, W)]
    if T > P:
        bounds.append((P, T))
    return bounds


def _flush_local_to_memory(sess: RefSession, cfg: RefConfig) -> None:
    """Overflow: the whole local context leaves (to memory in memory layers, dropped elsewhere)."""
    for layer in cfg.mem_layers:
        _append_to_memory(sess, layer, sess.local_k[layer], sess.local_v[layer], sess.local_valid, cfg)
    sess.local_k, sess.local_v = {}, {}
    sess.local_pos, sess.local_valid = None, None


def _decoder_layer(p, cfg: RefConfig, sess: RefSession, layer, h, rel, ctx_valid, isolated):
    """One decoder layer on a window h [B, n, hidden]; updates sess (local context or memory)."""
    B, n, _ = h.shape
    H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    pre = f"model.layers.{layer}."
    is_mem = layer in cfg.mem_layers
    x = _rms_norm(h, p[pre + "input_layernorm.weight"], cfg.rms_norm_eps)
    q = (x @ p[pre + "self_attn.q_proj.weight"].T).view(B, n, H, d).transpose(1, 2)
    k = (x @ p[pre + "self_attn.k_proj.weight"].T).view(B, n, Hkv, d).transpose(1, 2)
    v = (x @ p[pre + "self_attn.v_proj.weight"].T).view(B, n, Hkv, d).transpose(1, 2)

    if isolated or layer not in sess.local_k:
        ctx_k, ctx_v = k, v  # [B, Hkv, c, d], unrotated
    else:
        ctx_k = torch.cat([sess.local_k[layer], k], dim=2)
        ctx_v = torch.cat([sess.local_v[layer], v], dim=2)

    if is_mem and not cfg.mem_positionals:
        q_rot, k_rot = q, ctx_k
    else:
        q_rot, k_rot = _rotate(q, rel[:, -n:], cfg), _rotate(ctx_k, rel, cfg)

    mem = (sess.mem_k.get(layer), sess.mem_v.get(layer), sess.mem_valid.get(layer))
    a = _attention(q_rot, k_rot, ctx_v, ctx_valid, *mem, cfg)
    h = h + a.transpose(1, 2).reshape(B, n, H * d) @ p[pre + "self_attn.o_proj.weight"].T

    x = _rms_norm(h, p[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    gate = x @ p[pre + "mlp.gate_proj.weight"].T
    up = x @ p[pre + "mlp.up_proj.weight"].T
    h = h + (torch.nn.functional.silu(gate) * up) @ p[pre + "mlp.down_proj.weight"].T

    if isolated:
        if is_mem:  # after the window's attention, the window goes to memory
            _append_to_memory(sess, layer, k, v, ctx_valid, cfg)
    else:
        sess.local_k[layer], sess.local_v[layer] = ctx_k, ctx_v
    return h


def reference_forward(
    state_dict,
    cfg: RefConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    session: RefSession | None = None,
    last_context_length: int | None = None,
) -> tuple[torch.Tensor, RefSession]:
    """Logits [B, T, V] (float64) for all T new tokens, and the updated session.

    The given session is not modified; a new one is returned.
    attention_mask: [B, seen + T] (full history) or [B, T]; None means all valid.
    position_ids: [B, T]; None means arange(T) + session.seen.
    """
    p = _float64_state_dict(state_dict)
    B, T = input_ids.shape
    W = cfg.max_position_embeddings
    L = cfg.last_context_length if last_context_length is None else last_context_length
    sess = RefSession() if session is None else session.copy()
    fresh = sess.seen == 0

    if attention_mask is None:
        valid_all = torch.ones(B, T, dtype=torch.bool)
    elif attention_mask.shape[1] == sess.seen + T:
        valid_all = attention_mask[:, sess.seen :] != 0
    elif attention_mask.shape[1] == T:
        valid_all = attention_mask != 0
    else:
        raise ValueError(f"attention_mask width {attention_mask.shape[1]} fits neither T nor seen+T")
    if position_ids is None:
        pos_all = (torch.arange(T) + sess.seen)[None].expand(B, T)
    else:
        pos_all = position_ids.reshape(B, T).long()

    lm_head = p.get("lm_head.weight", p["model.embed_tokens.weight"])
    outputs = []
    bounds = _windows(T, W, L)
    for wi, (s, e) in enumerate(bounds):
        isolated = fresh and wi < len(bounds) - 1  # non-final window of a fresh call
        win_pos, win_valid = pos_all[:, s:e], valid_all[:, s:e]
        if not isolated and sess.local_len > 0 and sess.local_len + (e - s) > W:
            _flush_local_to_memory(sess, cfg)  # before this window's attention

        if isolated or sess.local_len == 0:
            ctx_pos, ctx_valid = win_pos, win_valid
        else:
            ctx_pos = torch.cat([sess.local_pos, win_pos], dim=1)
            ctx_valid = torch.cat([sess.local_valid, win_valid], dim=1)
        rel = ctx_pos - _origin(ctx_pos, ctx_valid)  # [B, c] relative positions

        h = p["model.embed_tokens.weight"][input_ids[:, s:e]]  # [B, n, hidden]
        for layer in range(cfg.num_hidden_layers):
            h = _decoder_layer(p, cfg, sess, layer, h, rel, ctx_valid, isolated)
        if not isolated:
            sess.local_pos, sess.local_valid = ctx_pos, ctx_valid
        h = _rms_norm(h, p["model.norm.weight"], cfg.rms_norm_eps)
        outputs.append(h @ lm_head.T)

    sess.seen += T
    if not outputs:
        return torch.zeros(B, 0, cfg.vocab_size, dtype=F64), sess
    return torch.cat(outputs, dim=1), sess


def reference_greedy_generate(
    state_dict,
    cfg: RefConfig,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    last_context_length: int | None = None,
) -> torch.Tensor:
    """Greedy decoding: prefill on a fresh session, then one token at a time.

    With an attention_mask, position ids are cumsum(mask) - 1 clamped at 0 over the full
    history (HF generate style) and the mask is extended with ones; otherwise defaults.
    Returns [B, T + max_new_tokens].
    """
    p = _float64_state_dict(state_dict)
    mask = attention_mask

    def positions(m):
        return None if m is None else (m.long().cumsum(-1) - 1).clamp(min=0)

    pos = positions(mask)
    logits, sess = reference_forward(
        p, cfg, input_ids, mask, pos, None, last_context_length=last_context_length
    )
    ids = input_ids
    for step in range(max_new_tokens):
        next_token = logits[:, -1].argmax(-1)[:, None]
        ids = torch.cat([ids, next_token], dim=1)
        if step == max_new_tokens - 1:
            break
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = positions(mask)
        logits, sess = reference_forward(
            p, cfg, next_token, mask, None if pos is None else pos[:, -1:], sess,
            last_context_length=last_context_length,
        )
    return ids


__all__ = ["RefConfig", "RefSession", "reference_forward", "reference_greedy_generate"]
