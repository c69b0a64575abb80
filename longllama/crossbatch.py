"""Which other batch rows each row's memory layers see in FoT crossbatch training (docs/training.md#crossbatch-rules).

Pure functions from ints and tensors to tensors: no model, no I/O. The model consumes the result as
`cross_batch_rows` (`LongLlamaForCausalLM.forward`): row b attends to its own window plus all tokens of the rows
listed for it, in one softmax, with gradients into those rows' keys and values. The model's memory layers build that
memory with `memory` (and check the rows with `check_rows`): `import longllama` plugs this module into the checkpoint
code (docs/architecture.md).

Layout: the batch is made of packs of `pack_size` (k) consecutive rows; the rows of one pack are consecutive segments
of one document stream (`longllama.data`). For row i of a pack, the rows before it inside the pack are earlier
segments of its own document (positives) and rows of earlier packs are other documents (negatives).

A `MemoryBank` (`longllama-train --memory-bank`) adds negatives beyond the batch: the detached keys and values that
earlier batches wrote, of which each row retrieves its hardest ones (docs/training.md#memory-bank).
"""


import math

import torch


def _check(batch_size: int, cross_batch_range: int, pack_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    if cross_batch_range < 0:
        raise ValueError(f"cross_batch_range={cross_batch_range} must be >= 0 (0 turns crossbatch off).")
    if cross_batch_range >= batch_size and cross_batch_range > 0:
        raise ValueError(
            f"cross_batch_range={cross_batch_range} needs more rows than the batch has ({batch_size}): a row can only "
            f"see the {batch_size - 1} rows before it. Use a larger batch (per device) or a smaller range."
        )
    if pack_size < 1 or batch_size % pack_size != 0:
        raise ValueError(f"pack_size={pack_size} must be at least 1 and divide batch_size={batch_size}.")


def cross_batch_ranges(
    batch_size: int, cross_batch_range: int, pack_size: int = 1, stepping: bool | None = None,
    positives_only: bool = False,
) -> torch.Tensor:
    """How many rows before it each row sees: `[batch_size]` long, never more than the row's index.

    Args:
        batch_size: rows in the batch (on one device).
        cross_batch_range: `d`, the most rows a row may see.
        pack_size: `k`, consecutive rows holding consecutive segments of one document stream.
        stepping: the FoT stepping rule for k-packed batches (default: on when `pack_size > 1`). Row i of each
            pack sees `min(i * ceil((d+1) / max(k-1, 1)) + 1, d+1) - 1` rows, so a pack mixes rows with few and
            many extra contexts. Off: every row sees `d` rows.
        positives_only: see only the earlier rows of the same pack (earlier segments of the same document), at most
            `d` of them: memory without negatives (the ablation of the paper, and memory fine-tuning).

    Example (docs/training.md#stepping): `cross_batch_ranges(8, 6, pack_size=4)` is `[0, 1, 2, 3, 0, 3, 6, 6]`.
    """
    _check(batch_size, cross_batch_range, pack_size)
    rows = torch.arange(batch_size)
    in_pack = rows % pack_size
    if positives_only:
        ranges = in_pack.clamp(max=cross_batch_range)
    else:
        if stepping is None:
            stepping = pack_size > 1
        if stepping:
            step = math.ceil((cross_batch_range + 1) / max(pack_size - 1, 1))
            ranges = (in_pack * step + 1).clamp(max=cross_batch_range + 1) - 1
        else:
            ranges = torch.full((batch_size,), cross_batch_range)
    return torch.minimum(ranges, rows)  # never wrap around: row b has only b rows before it


def cross_batch_rows(ranges: torch.Tensor) -> torch.Tensor:
    """The rows each row sees: `[B, R]` long, `R = max(ranges)`; row b lists `b - ranges[b], ..., b - 1` in that
    (chronological) order, then `-1` ("no row") up to R.

    Example: ranges `[0, 1, 2]` gives `[[-1, -1], [0, -1], [0, 1]]`.
    """
    ranges = torch.as_tensor(ranges)
    if ranges.is_floating_point() or ranges.dtype == torch.bool:
        raise ValueError(f"ranges must be integers, got {ranges.dtype}.")
    ranges = ranges.long()
    if ranges.dim() != 1:
        raise ValueError(f"ranges must be 1-D [batch], got shape {tuple(ranges.shape)}.")
    rows = torch.arange(len(ranges))
    if bool(((ranges < 0) | (ranges > rows)).any()):
        raise ValueError("ranges[b] must be between 0 and b (a row sees only rows before it).")
    width = int(ranges.max()) if len(ranges) else 0
    offsets = torch.arange(width)[None, :]  # [1, R]
    seen = rows[:, None] - ranges[:, None] + offsets  # [B, R]
    return torch.where(offsets < ranges[:, None], seen, torch.full_like(seen, -1))


def context_mix(ranges: torch.Tensor, pack_size: int) -> torch.Tensor:
    """`[B, 2]` long: (positives, negatives) each row sees, i.e. rows of its own pack and rows of other packs.

    Example: d=3, k=4 (the 3B recipe) gives per pack (0, 0), (1, 1), (2, 1), (3, 0) once row index >= 4.
    """
    ranges = torch.as_tensor(ranges, dtype=torch.long)
    in_pack = torch.arange(len(ranges)) % pack_size
    positives = torch.minimum(ranges, in_pack)
    return torch.stack([positives, ranges - positives], dim=1)


def row_documents(batch_size: int, pack_size: int) -> torch.Tensor:
    """`[B]` long: the document stream (pack) each row belongs to; rows of one pack are positives of each other."""
    return torch.arange(batch_size) // pack_size


# ---------------------------------------------------------------------------------------------------------------------
# What the model calls (plugged into the checkpoint code as `modeling_longllama.CROSS_BATCH` by `import longllama`)
# ---------------------------------------------------------------------------------------------------------------------


def check_rows(rows: torch.Tensor, cache, batch_size: int, num_tokens: int, window: int) -> None:
    """Check a forward's `cross_batch_rows` `[B, R]`: integer rows, each `-1` or an earlier row; one window per row."""
    if cache is not None:
        raise ValueError("cross_batch_rows is a training forward without a session: do not pass a cache.")
    if rows.dim() != 2 or rows.shape[0] != batch_size or rows.dtype.is_floating_point or rows.dtype == torch.bool:
        raise ValueError(
            f"cross_batch_rows must be an integer tensor of shape [batch={batch_size}, R], got "
            f"{rows.dtype} {tuple(rows.shape)}; build it with longllama.crossbatch.cross_batch_rows()."
        )
    earlier = torch.arange(batch_size, device=rows.device)[:, None]
    if bool(((rows < -1) | (rows >= earlier)).any()):
        raise ValueError(
            "cross_batch_rows[b] may only name earlier rows (0 <= row < b) or -1: a row must never see itself or "
            "a later row, whose tokens it is predicting or has not seen."
        )
    ordered = rows.sort(dim=1).values
    if bool(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any()):
        raise ValueError("cross_batch_rows names a row twice for the same row: its keys would count twice.")
    if num_tokens > window:
        raise ValueError(
            f"With cross_batch_rows every row is one local window, but the rows have {num_tokens} tokens and the "
            f"window (max_position_embeddings) is {window}: cut the rows into windows (longllama.data does this)."
        )


def memory(key_states, value_states, valid, rows, queries=None, layer_idx=None):
    """The crossbatch memory of every row: the unrotated keys and values of the rows it may see, then (while a
    `MemoryBank` is in use and the caller names its `queries` and `layer_idx`) the bank entries it retrieves.

    key_states, value_states `[B, Hkv, t, D]` (keys unrotated, i.e. as if at position 0), valid `[B, t]` bool,
    rows `[B, R]` long: row b sees all tokens of rows `rows[b]`, `-1` for none (`cross_batch_rows`); queries
    `[B, H, t, D]` as the layer attends with them.
    Returns `(mem_keys [B, Hkv, M, D], mem_values, mem_valid [B, M])`, or None if there is nothing to attend to.
    Gradients flow into the other rows' keys and values, never into the bank's.
    """
    B, Hkv, t, D = key_states.shape
    R = rows.shape[1]
    found = None
    if R > 0:
        index = rows.long().clamp(min=0)
        found = (
            key_states[index].permute(0, 2, 1, 3, 4).reshape(B, Hkv, R * t, D),  # [B, R, Hkv, t, D] -> ...
            value_states[index].permute(0, 2, 1, 3, 4).reshape(B, Hkv, R * t, D),
            (valid[index] & (rows >= 0)[:, :, None]).reshape(B, R * t),
        )
    bank = _BANK
    if bank is None or queries is None or layer_idx is None:
        return found
    retrieved = bank.retrieve(layer_idx, queries, valid)
    bank.stage(layer_idx, key_states, value_states, valid)  # joins the bank at commit(), after this step
    if retrieved is None:
        return found
    keys, values, hits = retrieved
    keys, values = keys.to(key_states.dtype), values.to(value_states.dtype)
    if found is None:
        return keys, values, hits
    return torch.cat([found[0], keys], dim=2), torch.cat([found[1], values], dim=2), torch.cat([found[2], hits], dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# Negatives beyond the batch


class MemoryBank:
    """The detached keys and values of the last `capacity` tokens that earlier batches wrote, per memory layer: each
    row's memory also holds, for every one of its queries, the `top_k` bank entries of highest `q . k` (the union over
    the row's valid queries and heads), the way kNN retrieval picks entries from a memory of 100k+ tokens at
    inference. No gradient flows into them: they teach the queries to pass over hard negatives. What a batch writes
    joins the bank at `commit()`, called after its backward, so a row never retrieves its own batch and a recomputed
    forward (gradient checkpointing) retrieves the same entries. docs/training.md#memory-bank.
    """

    def __init__(self, capacity: int, top_k: int, block: int = 8192):
        if capacity < 1 or top_k < 1:
            raise ValueError(f"A memory bank needs capacity >= 1 and top_k >= 1, got {capacity} and {top_k}.")
        self.capacity, self.top_k, self.block = capacity, top_k, block
        self.keys: dict[int, torch.Tensor] = {}  # layer_idx -> [Hkv, n, D], oldest first
        self.values: dict[int, torch.Tensor] = {}
        self.staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        """Tokens in the bank (of its first layer)."""
        return next(iter(self.keys.values())).shape[1] if self.keys else 0

    def retrieve(self, layer_idx: int, queries: torch.Tensor, valid: torch.Tensor):
        """`(keys [B, Hkv, K, D], values, hits [B, K])` detached: per row, the union of every valid query's `top_k`
        entries (K: the largest union, `hits` False beyond a row's own); None while the layer's bank is empty."""
        bank_keys = self.keys.get(layer_idx)
        if bank_keys is None:
            return None
        Hkv, M, D = bank_keys.shape
        B, H, t, _ = queries.shape
        g = H // Hkv  # query heads per KV head
        # the valid queries only (padding asks nothing), the query heads of one KV head side by side: [Hkv, n * g, D]
        q = queries.detach().reshape(B, Hkv, g, t, D).permute(1, 0, 3, 2, 4)[:, valid].reshape(Hkv, -1, D)
        asker = torch.arange(B, device=q.device)[:, None].expand(B, t)[valid]  # [n]: the row of each valid query
        with torch.no_grad():
            best_scores = best_ids = None
            for start in range(0, M, self.block):
                scores = torch.einsum("hqd,hmd->hqm", q, bank_keys[:, start : start + self.block].to(q.dtype))
                scores, ids = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1)  # [Hkv, n * g, k]
                if best_ids is not None:
                    scores, ids = torch.cat([best_scores, scores], -1), torch.cat([best_ids, ids + start], -1)
                    scores, picked = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1)
                    ids = ids.gather(-1, picked)
                best_scores, best_ids = scores, ids
            chosen = torch.zeros(B, M, dtype=torch.bool, device=q.device)
            if best_ids is not None and best_ids.numel():
                rows = asker[None, :, None, None].expand(Hkv, len(asker), g, best_ids.shape[-1])
                chosen[rows.reshape(-1), best_ids.reshape(-1)] = True
            K = max(int(chosen.sum(1).max()), 1)
            order = chosen.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :K]  # chosen first
            hits = chosen.gather(1, order)  # [B, K]
            keys = bank_keys[:, order].permute(1, 0, 2, 3)  # [Hkv, B, K, D] -> [B, Hkv, K, D]
            values = self.values[layer_idx][:, order].permute(1, 0, 2, 3)
        return keys, values, hits

    def stage(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor, valid: torch.Tensor):
        """Hold this batch's valid keys and values `[B, Hkv, t, D]` (detached) for `commit()`; a recomputed forward
        replaces them."""
        def flat(x):  # [B, Hkv, t, D] -> [Hkv, valid tokens, D]
            return x.detach().permute(1, 0, 2, 3)[:, valid]

        self.staged[layer_idx] = (flat(key_states), flat(value_states))

    def commit(self) -> None:
        """Add the staged entries, dropping the oldest beyond `capacity`."""
        for layer_idx, (keys, values) in self.staged.items():
            if layer_idx in self.keys:
                keys = torch.cat([self.keys[layer_idx], keys], dim=1)
                values = torch.cat([self.values[layer_idx], values], dim=1)
            self.keys[layer_idx] = keys[:, -self.capacity :].contiguous()
            self.values[layer_idx] = values[:, -self.capacity :].contiguous()
        self.staged.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (a resumable checkpoint stores them as safetensors)."""
        state = {}
        for layer_idx in self.keys:
            state[f"layer{layer_idx}.keys"] = self.keys[layer_idx]
            state[f"layer{layer_idx}.values"] = self.values[layer_idx]
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """What `state_dict` returned; ValueError (or KeyError) for anything else."""
        layers = sorted({int(name.split(".")[0].removeprefix("layer")) for name in state})
        keys = {i: state[f"layer{i}.keys"] for i in layers}
        values = {i: state[f"layer{i}.values"] for i in layers}
        if any(keys[i].dim() != 3 or keys[i].shape != values[i].shape for i in layers):
            raise ValueError("a memory bank holds [KV heads, tokens, head_dim] keys and values of one shape per layer")
        self.keys, self.values = keys, values
        self.staged.clear()


_BANK: MemoryBank | None = None


def set_memory_bank(bank: MemoryBank | None) -> MemoryBank | None:
    """From now on the crossbatch `memory` of every forward also retrieves from `bank` (None: no bank); returns the
    bank in use before, to restore."""
    global _BANK
    previous, _BANK = _BANK, bank
    return previous


__all__ = [
    "MemoryBank",
    "check_rows",
    "context_mix",
    "cross_batch_ranges",
    "cross_batch_rows",
    "memory",
    "row_documents",
    "set_memory_bank",
]
