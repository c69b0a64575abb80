"""The window schedule of a LongLLaMA forward call (docs/inference.md#windows, #flush, #continuing-sessions).

A call cuts its tokens into windows (`plan_windows`); each window runs some or all decoder layers (`assign_depths`);
rotary positions count from the first real token of the local context (`first_position`).
"""

from dataclasses import dataclass

import torch


@dataclass
class Window:
    """One step of the window schedule of a forward call: tokens `[start, end)` of the call."""

    start: int
    end: int
    stores_local: bool  # joins the local context (the final window, or any window of a continuing session)
    flush: bool  # the whole local context leaves before this window (to memory in memory layers)
    depth: int = 0  # decoder layers to run
    keep: bool = False  # some of its hidden states are returned


@dataclass
class WindowInputs:
    """What the memory layers need about the window being processed (shared by all layers)."""

    stores_local: bool
    visible: torch.Tensor  # [B, 1, t, n] bool: causal mask and padding of the local context
    valid: torch.Tensor  # [B, t] bool: the window's tokens that are not padding
    is_causal: bool = False  # `visible` is exactly the causal mask of a window that is its whole local context
    self_contained: bool = False  # the whole input is this one window and nothing is remembered: no cache needed
    cross_batch_rows: torch.Tensor | None = None  # [B, R] crossbatch training: rows whose keys each row also sees
    mem_top_k: int | None = None  # kNN retrieval from the session memory (None: dense)
    output_attentions: bool = False  # memory layers return their attention weights (the eager kernel)


def plan_windows(num_tokens: int, window: int, last_context_length: int, local_length: int, fresh: bool):
    """Cut `num_tokens` new tokens into windows (docs/inference.md#windows, #flush, #continuing-sessions).

    The last `last_context_length` tokens form the final window; the tokens before are cut into windows of `window`
    from the start. In a fresh session the non-final windows stand alone and only write memory; in a continuing
    session every window joins the local context, which is flushed whole when it would exceed `window`.
    """
    prefix = max(num_tokens - last_context_length, 0)
    bounds = [(start, min(start + window, prefix)) for start in range(0, prefix, window)]
    bounds.append((prefix, num_tokens))
    plan = []
    for start, end in bounds:
        stores_local = end == num_tokens or not fresh
        flush = stores_local and local_length > 0 and local_length + end - start > window
        if stores_local:
            local_length = end - start if flush else local_length + end - start
        plan.append(Window(start, end, stores_local, flush))
    return plan


def assign_depths(plan: list[Window], requested: range | torch.Tensor, num_layers: int, memory_depth: int) -> None:
    """Decide which windows run every layer; the rest stop after the top memory layer (exact; docs/inference.md#beyond).

    A window runs all layers if some of its hidden states are requested, if it is the final window (it fills the
    local cache of every layer), or if a later fully-run window shares its local context (no flush in between).
    """
    if isinstance(requested, range):  # plain Python: a decode step traces without graph breaks
        keeps = [requested.start < w.end and w.start < requested.stop for w in plan]
    else:
        is_requested = torch.zeros(plan[-1].end, dtype=torch.bool)
        is_requested[requested] = True
        keeps = [bool(is_requested[w.start : w.end].any()) for w in plan]
    needed_later = False
    for w, keep in zip(reversed(plan), reversed(keeps)):
        w.keep = keep
        full = w.keep or w is plan[-1] or (w.stores_local and needed_later)
        w.depth = num_layers if full else memory_depth
        needed_later = w.stores_local and full and not w.flush


def first_position(position_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`[B]` position id of the first non-padding token of each row (the row minimum if all is padding).

    Rotary positions count from there, so a left-padded row computes what the row alone computes. For unpadded
    input this is the published rule (positions relative to the minimum of the local context)."""
    first = position_ids.gather(1, valid.int().argmax(dim=1, keepdim=True)).squeeze(1)
    return torch.where(valid.any(dim=1), first, position_ids.min(dim=1).values)


def requested_positions(num_tokens: int, to_keep: int | torch.Tensor) -> range | torch.Tensor:
    """Positions whose hidden states are returned: `0` all, an int `k` the last k (as a `range`), a 1-D tensor those
    indices."""
    if isinstance(to_keep, int):
        return range(0 if to_keep == 0 else max(num_tokens - to_keep, 0), num_tokens)
    if to_keep.dim() != 1:
        raise ValueError("logits_to_keep must be an int or a 1-D tensor of positions for LongLLaMA.")
    return to_keep.detach().long().cpu() % num_tokens


def requests_all(requested: range | torch.Tensor, num_tokens: int) -> bool:
    """Whether `requested` is every position in order."""
    if isinstance(requested, range):
        return requested == range(num_tokens)
    return torch.equal(requested, torch.arange(num_tokens))


__all__ = [
    "Window",
    "WindowInputs",
    "assign_depths",
    "first_position",
    "plan_windows",
    "requested_positions",
    "requests_all",
]
