"""The FoT distraction measure: how much memory-layer attention lands on the query's own document.

For a document of several windows, the model reads `d` windows of *other* documents and then the document itself,
window by window (the inference path, `last_context_length = window`), so that when its last window is processed
the memory holds the `d` unrelated windows plus the document's own earlier windows. For every query token of that
last window and every memory layer and head we take the attention distribution (one softmax over the local window
and the memory, as the model computes it) and measure:

- `positive`: the share of attention on the document's own keys (its local window and its own memory entries),
  the *positive attention mass* of docs/training.md#distraction;
- `memory_positive`: the share of the attention *on memory* that falls on its own memory entries (with uniform
  attention over memory this is `own / (own + d)` windows: about 1/d).

Both are averaged over the non-padding query tokens, heads, memory layers and documents; `memory_positive` leaves out
the (query, head) pairs whose attention on memory underflows to exactly 0, for which it is undefined.
"""

from contextlib import contextmanager

import torch
from transformers.utils import logging

from .modeling.modeling_longllama import LongLlamaAttention


def distraction_prompt(document: list[int], distractors: list[list[int]], window: int) -> tuple[list[int], int]:
    """`(prompt, own_memory_tokens)`: the distractor windows, then the document cut to whole windows.

    Every distractor is cut (or must be at least) `window` tokens, so each one is exactly one memory window."""
    own = (len(document) // window) * window
    if own < 2 * window:
        raise ValueError(
            f"A document of {len(document)} tokens is shorter than two windows of {window}: it needs an earlier "
            "window in memory and a last window to query from."
        )
    prompt = []
    for distractor in distractors:
        if len(distractor) < window:
            raise ValueError(f"A distractor of {len(distractor)} tokens is shorter than one window of {window}.")
        prompt.extend(distractor[:window])
    prompt.extend(document[:own])
    return prompt, own - window


def _memory_attention_modules(model) -> list[LongLlamaAttention]:
    modules = [m for m in model.modules() if isinstance(m, LongLlamaAttention)]
    if not modules:
        raise ValueError("The model has no memory layers (mem_layers is empty): there is no memory attention.")
    return modules


@contextmanager
def _measuring(model):
    """The model in eval mode and transformers' progress bars off (one bar per prompt would drown the caller's own
    progress); both restored afterwards."""
    was_training, bars = model.training, logging.is_progress_bar_enabled()
    model.eval()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        model.train(was_training)
        if bars:
            logging.enable_progress_bar()


class _AttentionProbe:
    """Forward pre-hooks on the memory layers that compute, for the last window of a call, the attention shares."""

    def __init__(self, model):
        self.modules = _memory_attention_modules(model)
        self.own_memory_tokens = 0
        self.query_mask: torch.Tensor | None = None  # [t] queries of the last window that count (None: all)
        self.results: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self):
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    @torch.no_grad()
    def _hook(self, module, args, kwargs):
        probs = _query_window_attention(module, args, kwargs)
        if probs is None:
            return
        window = kwargs["window"]
        t = window.valid.shape[1]
        local_mass = probs[..., :t].sum(-1)
        mem_probs = probs[..., t:]
        own = mem_probs.shape[-1] - self.own_memory_tokens
        own_mass = mem_probs[..., own:].sum(-1)
        mem_mass = mem_probs.sum(-1)
        positive = local_mass + own_mass  # [B, H, t]
        memory_positive = own_mass / mem_mass  # undefined (NaN) where no attention reaches memory at all
        valid = window.valid[:, None, :].expand_as(positive)
        if self.query_mask is not None:
            valid = valid & self.query_mask.to(valid.device)[None, None, :]
        self.results.append((positive[valid].mean(), memory_positive[valid & (mem_mass > 0)].nanmean()))


def _query_window_attention(module, args, kwargs) -> torch.Tensor | None:
    """In a forward pre-hook of a `LongLlamaAttention`: the attention distribution `[B, H, t, t + M]` (local context
    of the window first, then memory) of a window that joins the local context and has memory to read, as the model
    computes it (one softmax); None for other windows. Assumes the window is its whole local context."""
    window, cache = kwargs.get("window"), kwargs.get("cache")
    hidden_states = args[0] if args else kwargs["hidden_states"]
    if window is None or cache is None or not window.stores_local:
        return None  # a window on its way to memory: not a query window
    memory = cache.layers[module.layer_idx].memory()
    if memory is None:
        return None
    q, k, _, _ = module._project(hidden_states, kwargs["position_embeddings"])
    q, k = q.float(), k.float()  # [B, H, t, D], [B, Hkv, t, D]
    mem_keys, _, mem_valid = memory  # [B, Hkv, M, D], [B, M]
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    mem_keys = mem_keys.float().repeat_interleave(groups, dim=1)
    local = (q @ k.transpose(2, 3)) * module.scaling  # [B, H, t, t]
    local = local.masked_fill(~window.visible, float("-inf"))
    mem = (q @ mem_keys.transpose(2, 3)) * module.scaling  # [B, H, t, M]
    mem = mem.masked_fill(~mem_valid[:, None, None, :], float("-inf"))
    return torch.softmax(torch.cat([local, mem], dim=-1), dim=-1)


def _query_mask(positions: list[int], document: list[int], window: int) -> torch.Tensor:
    """The queries of the document's last whole window (as `distraction_prompt` cuts it) at `positions`."""
    start = (len(document) // window - 1) * window
    if not positions or not all(start <= p < start + window for p in positions):
        raise ValueError(
            f"Query positions {positions} must be non-empty and lie in the document's last whole window "
            f"[{start}, {start + window}): only its queries see the document's earlier windows in memory."
        )
    mask = torch.zeros(window, dtype=torch.bool)
    mask[[p - start for p in positions]] = True
    return mask


def pick_distractors(documents: list[list[int]], index: int, count: int, window: int) -> list[list[int]]:
    """`count` windows of documents other than `documents[index]`, round-robin from all their full windows."""
    pool = [doc for j, doc in enumerate(documents) if j != index]
    windows = [doc[i : i + window] for doc in pool for i in range(0, len(doc) - window + 1, window)]
    if count and not windows:
        raise ValueError("Distractors come from other documents: give documents with at least one full window.")
    return [windows[(index + n) % len(windows)] for n in range(count)]


@torch.no_grad()
def positive_attention_mass(
    model, documents: list[list[int]], num_distractors: int, window: int | None = None,
    distractors: list[list[list[int]]] | None = None, positions: list[list[int]] | None = None,
):
    """The positive attention mass of `model` (a `LongLlamaForCausalLM`) with `num_distractors` unrelated windows in
    memory, averaged over `documents` (token id lists of at least two windows each).

    The distractors are windows of the *other* documents, taken round-robin (`pick_distractors`), or given
    explicitly: `distractors[i]` is the list of windows put in memory before `documents[i]`.
    `positions[i]`, when given, restricts the average to the queries at those token positions of `documents[i]`
    (0 = its first token; they must lie in its last whole window), e.g. the tokens that predict an answer.
    Returns `{"positive": float, "memory_positive": float}` (module docstring).
    """
    window = window or model.config.max_position_embeddings
    positives, memory_positives = [], []
    with _measuring(model), _AttentionProbe(model) as probe:
        for index, document in enumerate(documents):
            if distractors is None:
                before = pick_distractors(documents, index, num_distractors, window)
            else:
                before = distractors[index][:num_distractors]
            prompt, probe.own_memory_tokens = distraction_prompt(document, before, window)
            probe.query_mask = None if positions is None else _query_mask(positions[index], document, window)
            probe.results.clear()
            ids = torch.tensor([prompt], device=model.device)
            model(ids, use_cache=True, last_context_length=window, logits_to_keep=1)
            positives.append(torch.stack([r[0] for r in probe.results]).mean())
            memory_positives.append(torch.stack([r[1] for r in probe.results]).nanmean())
    return {
        "positive": torch.stack(positives).mean().item(),
        "memory_positive": torch.stack(memory_positives).nanmean().item(),
    }


@torch.no_grad()
def span_attention_mass(model, input_ids: list[int], span: tuple[int, int], last_context_length: int | None = None
                        ) -> float:
    """The share of memory-layer attention that the last token of `input_ids` (one prompt, read as `generate()` reads
    it: the last `last_context_length` tokens, default the config's, form the final window) puts on its tokens
    `span[0]:span[1]`, averaged over memory layers and heads.

    For a passkey prompt with `span` the key line, this is the positive attention mass of the query that asks for the
    key: the key line sits among up to hundreds of windows of filler in memory (or in the final window, when it is
    that late)."""
    final = last_context_length or model.config.last_context_length
    if not 0 <= span[0] < span[1] <= len(input_ids):
        raise ValueError(f"span {span} is not a non-empty range of the prompt's {len(input_ids)} tokens.")
    if len(input_ids) <= final:
        raise ValueError(f"A prompt of {len(input_ids)} tokens fits its final window of {final}: there is no memory.")
    modules = _memory_attention_modules(model)
    masses = []

    def hook(module, args, kwargs):
        probs = _query_window_attention(module, args, kwargs)
        if probs is not None:
            last = probs[0, :, -1]  # [H, final + M]: the final window's tokens, then memory = tokens 0..M-1 in order
            by_token = torch.cat([last[:, final:], last[:, :final]], dim=-1)  # [H, prompt tokens]
            masses.append(by_token[:, span[0] : span[1]].sum(-1).mean())

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        with _measuring(model):
            model(torch.tensor([input_ids], device=model.device), use_cache=True, last_context_length=final,
                  logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    if len(masses) != len(modules):
        raise RuntimeError(f"measured {len(masses)} of {len(modules)} memory layers")
    return torch.stack(masses).mean().item()


__all__ = ["distraction_prompt", "pick_distractors", "positive_attention_mass", "span_attention_mass"]
