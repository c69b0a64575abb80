"""FoT crossbatch training (docs/training.md#crossbatch-rules).

1. The row-selection functions of `longllama.crossbatch`, checked by hand (the worked examples of
   docs/training.md#stepping) and by brute force.
2. The crossbatch forward `LongLlamaForCausalLM(..., cross_batch_rows=rows)`: against the ordinary forward (no extra
   rows), against windowed inference (positives-only packing), against a naive float64 reference written here, and
   its gradients, independence from unlisted rows, padding, gradient checkpointing and argument checks.
3. The memory bank (negatives beyond the batch): its retrieval against brute force, what it holds, the forward
   against listing the earlier rows, and where gradients go.

Tiny models (conftest.tiny_model): vocab 99, hidden 32, 4 layers, 4 heads, memory in layer 1, window W=8,
last_context_length 4, mem_dtype float32 unless a test says otherwise.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import max_err, tiny_model

from longllama.crossbatch import (
    MemoryBank,
    context_mix,
    cross_batch_ranges,
    cross_batch_rows,
    row_documents,
    set_memory_bank,
)

W = 8  # window (max_position_embeddings) of tiny_config
ATOL = 1e-4  # fp32 model vs float64 reference / vs windowed inference
IMPLEMENTATIONS = ["blockwise", "eager", "sdpa"]


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = 99) -> torch.Tensor:
    """Token ids in [3, vocab): never pad (0), bos (1) or eos (2)."""
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def rows_for(batch_size: int, d: int, k: int = 1, **kwargs) -> torch.Tensor:
    return cross_batch_rows(cross_batch_ranges(batch_size, d, k, **kwargs))


def logits_of(model, input_ids=None, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


def spec_range(b: int, d: int, k: int, stepping: bool, positives_only: bool) -> int:
    """docs/training.md#stepping in plain integers: extra rows seen by batch row b."""
    i = b % k
    if positives_only:
        r = min(i, d)
    elif stepping:
        r = min(i * math.ceil((d + 1) / max(k - 1, 1)) + 1, d + 1) - 1
    else:
        r = d
    return min(r, b)


# =========================================================================== 1. selection functions


def test_spec_table_8_rows_d6_k4():
    ranges = cross_batch_ranges(8, 6, pack_size=4)
    assert ranges.dtype == torch.long
    assert ranges.tolist() == [0, 1, 2, 3, 0, 3, 6, 6]
    rows = cross_batch_rows(ranges)
    assert rows.tolist() == [
        [-1, -1, -1, -1, -1, -1],
        [0, -1, -1, -1, -1, -1],
        [0, 1, -1, -1, -1, -1],
        [0, 1, 2, -1, -1, -1],
        [-1, -1, -1, -1, -1, -1],
        [2, 3, 4, -1, -1, -1],
        [0, 1, 2, 3, 4, 5],
        [1, 2, 3, 4, 5, 6],
    ]
    # stepping is the default with packs
    assert cross_batch_ranges(8, 6, pack_size=4, stepping=True).tolist() == [0, 1, 2, 3, 0, 3, 6, 6]


def test_3b_recipe_d3_k4_with_8_rows():
    ranges = cross_batch_ranges(8, 3, pack_size=4)
    assert ranges.tolist() == [0, 1, 2, 3, 0, 2, 3, 3]
    # first pack has no earlier pack: all its contexts are positives
    assert context_mix(ranges, 4).tolist() == [[0, 0], [1, 0], [2, 0], [3, 0], [0, 0], [1, 1], [2, 1], [3, 0]]
    assert cross_batch_rows(ranges)[4:].tolist() == [[-1, -1, -1], [3, 4, -1], [3, 4, 5], [4, 5, 6]]


def test_3b_recipe_d3_k4_with_16_rows():
    ranges = cross_batch_ranges(16, 3, pack_size=4)
    assert ranges.tolist() == [0, 1, 2, 3] + [0, 2, 3, 3] * 3
    mix = context_mix(ranges, 4)
    # docs/training.md#stepping: 1/4 each of (0,0) (1,1) (2,1) (3,0)
    assert mix[4:].tolist() == [[0, 0], [1, 1], [2, 1], [3, 0]] * 3
    rows = cross_batch_rows(ranges)
    assert rows.shape == (16, 3)
    assert rows[13].tolist() == [11, 12, -1]  # one negative (row 11, previous pack), one positive (row 12)
    assert rows[15].tolist() == [12, 13, 14]
    assert row_documents(16, 4).tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


@pytest.mark.parametrize("stepping", [None, False])
def test_pack_size_one_sees_min_d_b(stepping):
    for batch in range(1, 7):
        for d in range(batch):
            ranges = cross_batch_ranges(batch, d, stepping=stepping)
            assert ranges.tolist() == [min(d, b) for b in range(batch)], (batch, d)
            # every row is its own document: everything it sees is a negative
            assert context_mix(ranges, 1).tolist() == [[0, min(d, b)] for b in range(batch)]


def test_stepping_with_pack_size_one_is_row_zero_of_every_pack():
    # the formula with k = 1: every row is row 0 of its pack (i = 0), so it sees nothing
    assert cross_batch_ranges(5, 3, pack_size=1, stepping=True).tolist() == [0] * 5


def test_stepping_false_with_packs():
    ranges = cross_batch_ranges(8, 3, pack_size=4, stepping=False)
    assert ranges.tolist() == [0, 1, 2, 3, 3, 3, 3, 3]
    assert context_mix(ranges, 4).tolist() == [[0, 0], [1, 0], [2, 0], [3, 0], [0, 3], [1, 2], [2, 1], [3, 0]]
    assert cross_batch_ranges(6, 5, pack_size=2, stepping=False).tolist() == [0, 1, 2, 3, 4, 5]


def test_positives_only():
    ranges = cross_batch_ranges(8, 2, pack_size=4, positives_only=True)
    assert ranges.tolist() == [0, 1, 2, 2, 0, 1, 2, 2]
    assert cross_batch_rows(ranges).tolist() == [
        [-1, -1], [0, -1], [0, 1], [1, 2], [-1, -1], [4, -1], [4, 5], [5, 6],
    ]
    assert context_mix(ranges, 4)[:, 1].tolist() == [0] * 8  # no negatives
    assert cross_batch_ranges(8, 3, pack_size=4, positives_only=True).tolist() == [0, 1, 2, 3] * 2
    # stepping plays no role
    for stepping in (None, False, True):
        assert cross_batch_ranges(6, 5, 3, stepping=stepping, positives_only=True).tolist() == [0, 1, 2] * 2


def test_cross_batch_rows_hand_written_cases():
    assert cross_batch_rows(torch.tensor([0, 1, 2])).tolist() == [[-1, -1], [0, -1], [0, 1]]
    assert cross_batch_rows([0, 1, 1, 3]).tolist() == [[-1, -1, -1], [0, -1, -1], [1, -1, -1], [0, 1, 2]]
    assert cross_batch_rows([0, 0, 2, 1]).tolist() == [[-1, -1], [-1, -1], [0, 1], [2, -1]]
    assert cross_batch_rows([0, 1, 2, 3, 1]).tolist()[4] == [3, -1, -1]
    rows = cross_batch_rows(torch.tensor([0, 1, 2], dtype=torch.int32))
    assert rows.dtype == torch.long
    # zero width when nobody sees anything
    none = cross_batch_rows(torch.zeros(4, dtype=torch.long))
    assert none.shape == (4, 0) and none.dtype == torch.long
    assert cross_batch_rows([0]).shape == (1, 0)


def test_brute_force_properties():
    for batch in range(1, 13):
        documents = row_documents(batch, 1)
        assert documents.tolist() == list(range(batch))
        for k in [k for k in range(1, batch + 1) if batch % k == 0]:
            documents = row_documents(batch, k).tolist()
            assert documents == [b // k for b in range(batch)]
            for d in range(batch):
                for stepping in (None, False, True):
                    for positives_only in (False, True):
                        ranges = cross_batch_ranges(batch, d, k, stepping=stepping, positives_only=positives_only)
                        step = (k > 1) if stepping is None else stepping
                        expected = [spec_range(b, d, k, step, positives_only) for b in range(batch)]
                        case = (batch, d, k, stepping, positives_only)
                        assert ranges.shape == (batch,) and ranges.dtype == torch.long, case
                        assert ranges.tolist() == expected, case
                        rows = cross_batch_rows(ranges)
                        assert rows.shape == (batch, max(expected)), case
                        mix = context_mix(ranges, k).tolist()
                        for b, row in enumerate(rows.tolist()):
                            listed = [r for r in row if r != -1]
                            assert all(r >= -1 for r in row), case
                            assert row == listed + [-1] * (len(row) - len(listed)), case  # -1 only at the end
                            assert listed == list(range(b - expected[b], b)), case
                            assert all(0 <= r < b for r in listed), case
                            assert len(listed) == ranges[b] <= d, case
                            same = sum(documents[r] == documents[b] for r in listed)
                            assert mix[b] == [same, len(listed) - same], case
                            if positives_only:
                                assert same == len(listed), case  # every listed row is in the same pack


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((4, 4), {}, "needs more rows"),
        ((4, 5), {}, "needs more rows"),
        ((1, 1), {}, "needs more rows"),
        ((4, 4, 4), dict(positives_only=True), "needs more rows"),
        ((4, -1), {}, ">= 0"),
        ((8, 2, 3), {}, "divide"),
        ((8, 2, 0), {}, "divide"),
        ((8, 2, -4), {}, "divide"),
        ((0, 0), {}, "at least 1"),
        ((-2, 0), {}, "at least 1"),
    ],
)
def test_cross_batch_ranges_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cross_batch_ranges(*args, **kwargs)


def test_cross_batch_ranges_edge_inputs_that_are_fine():
    assert cross_batch_ranges(1, 0).tolist() == [0]  # d = 0 is allowed whatever the batch
    assert cross_batch_ranges(3, 0, 3).tolist() == [0, 0, 0]
    assert cross_batch_ranges(4, 3).tolist() == [0, 1, 2, 3]  # d = B - 1 is the largest


@pytest.mark.parametrize(
    "ranges",
    [[0, 2], [1], [0, 1, 3], [0, -1], [-1], [[0, 1]], [[0], [1]]],
    ids=["above_b", "row0_sees_one", "above_b_last", "negative", "negative_row0", "2d_row", "2d_column"],
)
def test_cross_batch_rows_bad_input(ranges):
    with pytest.raises(ValueError, match="ranges"):
        cross_batch_rows(torch.tensor(ranges))


# =========================================================================== 2a. no extra rows = ordinary forward


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("length", [4, W])
def test_no_extra_rows_is_the_ordinary_forward(train, length):
    model = tiny_model(1).train(train)
    ids = random_ids(3, length, seed=1)
    with torch.set_grad_enabled(train):
        # one window per row: last_context_length covers the whole row
        expected = model(ids, use_cache=False, last_context_length=length).logits
        empty = rows_for(3, 0)
        assert empty.shape == (3, 0)
        for rows in (empty, torch.full((3, 2), -1)):
            actual = model(ids, cross_batch_rows=rows).logits
            assert actual.shape == expected.shape
            # masked memory keys get exactly zero weight, but the training kernel (SDPA) then sums over a longer key
            # axis in another order: fp32 rounding of ~1e-6 relative on logits of size ~3
            tol = 1e-5 if train and rows.shape[1] > 0 else 1e-6
            assert max_err(actual, expected) <= tol, rows.shape


# =========================================================================== 2b. positives-only packing = inference

PACKING_CASES = {
    "tiny": dict(),
    "two_memory_layers": dict(mem_layers=[0, 2]),
    "gqa": dict(num_key_value_heads=2),
    "no_mem_positionals": dict(mem_positionals=False),
    "blockwise": dict(mem_attention_implementation="blockwise"),
    "eager": dict(mem_attention_implementation="eager"),
    "sdpa": dict(mem_attention_implementation="sdpa"),
}


@pytest.mark.parametrize("case", list(PACKING_CASES))
def test_positives_only_packing_equals_windowed_inference(case):
    model = tiny_model(2, **PACKING_CASES[case])
    k = 3
    ids = random_ids(1, k * W, seed=2)
    # inference: final window = last W tokens, so the plan is k windows of W and memory holds all earlier windows
    expected = logits_of(model, ids, use_cache=True, last_context_length=W)
    rows = cross_batch_rows(cross_batch_ranges(k, k - 1, k, positives_only=True))
    assert rows.tolist() == [[-1, -1], [0, -1], [0, 1]]
    actual = logits_of(model, ids.view(k, W), cross_batch_rows=rows)
    assert max_err(actual.reshape(1, k * W, -1), expected) < ATOL
    # not vacuous: memory changes the later windows
    alone = logits_of(model, ids.view(k, W), cross_batch_rows=rows_for(k, 0))
    assert max_err(alone[1:], actual[1:]) > 1e-2


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_positives_only_packing_equals_inference_with_gradients(implementation):
    """The training path (gradients on, train mode: the blockwise kernel delegates to SDPA)."""
    model = tiny_model(3, mem_attention_implementation=implementation)
    k = 3
    ids = random_ids(1, k * W, seed=3)
    expected = logits_of(model, ids, use_cache=True, last_context_length=W)
    model.train()
    rows = rows_for(k, k - 1, k, positives_only=True)
    actual = model(ids.view(k, W), cross_batch_rows=rows).logits
    assert actual.requires_grad
    assert max_err(actual.detach().reshape(1, k * W, -1), expected) < ATOL


def test_several_packs_equal_batched_inference():
    model = tiny_model(4)
    k, docs = 3, 2
    ids = random_ids(docs, k * W, seed=4)
    expected = logits_of(model, ids, use_cache=True, last_context_length=W)  # [2, kW, V]
    rows = rows_for(docs * k, k - 1, k, positives_only=True)
    assert rows.tolist() == [[-1, -1], [0, -1], [0, 1], [-1, -1], [3, -1], [3, 4]]
    actual = logits_of(model, ids.view(docs * k, W), cross_batch_rows=rows)
    assert max_err(actual.reshape(docs, k * W, -1), expected) < ATOL
    # with negatives (the second document's rows also see the first one's) the second document changes
    mixed = logits_of(model, ids.view(docs * k, W), cross_batch_rows=rows_for(docs * k, k - 1, k))
    assert max_err(mixed[:k], actual[:k]) < 1e-5  # the first pack has no negatives
    assert max_err(mixed[k:], actual[k:]) > 1e-2


# =========================================================================== 2c. naive float64 reference


def naive_crossbatch_logits(model, ids, rows, attention_mask=None) -> torch.Tensor:
    """Float64 logits [B, t, V] of the crossbatch forward, written out with plain torch ops.

    Every row is one window. Rotary positions count from the row's first non-padding token. Non-memory layers:
    causal attention over the row's own valid tokens. Memory layers: queries rotated by local position, own keys
    rotated the same way, plus the keys (unrotated, k_proj of that row's own hidden states) and values of every valid
    token of the rows listed in rows[b]; one softmax with an additive mask (-1e6) for future and padding.
    """
    cfg = model.config
    p = {name: value.detach().double() for name, value in model.state_dict().items()}
    B, t = ids.shape
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    valid = torch.ones(B, t, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    first = valid.int().argmax(dim=1)
    positions = torch.arange(t)[None, :] - first[:, None]  # [B, t]
    inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    angles = positions.double()[:, None, :, None] * inv_freq  # [B, 1, t, D/2]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):
        return x * cos + torch.cat([-x[..., D // 2 :], x[..., : D // 2]], dim=-1) * sin

    def rms(x, weight):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    causal = torch.ones(t, t, dtype=torch.bool).tril()
    h = p["model.embed_tokens.weight"][ids]
    for layer in range(cfg.num_hidden_layers):
        pre = f"model.layers.{layer}."
        x = rms(h, p[pre + "input_layernorm.weight"])
        q = (x @ p[pre + "self_attn.q_proj.weight"].T).view(B, t, H, D).transpose(1, 2)
        k = (x @ p[pre + "self_attn.k_proj.weight"].T).view(B, t, Hkv, D).transpose(1, 2)
        v = (x @ p[pre + "self_attn.v_proj.weight"].T).view(B, t, Hkv, D).transpose(1, 2)
        memory_layer = layer in cfg.mem_layers
        if not memory_layer or cfg.mem_positionals:
            q_rot, k_rot = rope(q), rope(k)
        else:
            q_rot, k_rot = q, k
        out = torch.zeros(B, H, t, D, dtype=torch.float64)
        for b in range(B):
            for head in range(H):
                g = head // (H // Hkv)
                keys, values, visible = [k_rot[b, g]], [v[b, g]], [causal & valid[b][None, :]]
                if memory_layer:
                    for r in rows[b].tolist():
                        if r >= 0:
                            keys.append(k[r, g])  # unrotated: "as if at position 0"
                            values.append(v[r, g])
                            visible.append(valid[r][None, :].expand(t, t))
                scores = q_rot[b, head] @ torch.cat(keys).T / math.sqrt(D)
                mask = torch.zeros(scores.shape, dtype=torch.float64).masked_fill(~torch.cat(visible, dim=1), -1e6)
                out[b, head] = torch.softmax(scores + mask, dim=-1) @ torch.cat(values)
        h = h + out.transpose(1, 2).reshape(B, t, H * D) @ p[pre + "self_attn.o_proj.weight"].T
        x = rms(h, p[pre + "post_attention_layernorm.weight"])
        gate = F.silu(x @ p[pre + "mlp.gate_proj.weight"].T) * (x @ p[pre + "mlp.up_proj.weight"].T)
        h = h + gate @ p[pre + "mlp.down_proj.weight"].T
    return rms(h, p["model.norm.weight"]) @ p["lm_head.weight"].T


NAIVE_ROWS = torch.tensor([[-1, -1], [0, -1], [1, 0], [2, 0], [-1, 3]])  # any earlier rows, in any order, -1 anywhere

NAIVE_CASES = {
    "one_layer": dict(num_hidden_layers=1, mem_layers=[0]),
    "two_layers": dict(num_hidden_layers=2, mem_layers=[0]),
    "two_layers_memory_on_top": dict(num_hidden_layers=2, mem_layers=[1]),
    "two_memory_layers": dict(num_hidden_layers=2, mem_layers=[0, 1]),
    "gqa": dict(num_hidden_layers=2, mem_layers=[0], num_key_value_heads=2),
    "no_mem_positionals": dict(num_hidden_layers=2, mem_layers=[0], mem_positionals=False),
    "eager": dict(num_hidden_layers=2, mem_layers=[0], mem_attention_implementation="eager"),
    "sdpa": dict(num_hidden_layers=2, mem_layers=[0], mem_attention_implementation="sdpa"),
}


@pytest.mark.parametrize("case", list(NAIVE_CASES))
def test_matches_naive_reference(case):
    model = tiny_model(5, **NAIVE_CASES[case])
    ids = random_ids(5, W, seed=5)
    expected = naive_crossbatch_logits(model, ids, NAIVE_ROWS)
    assert max_err(logits_of(model, ids, cross_batch_rows=NAIVE_ROWS), expected) < ATOL
    # gradients on (training kernels)
    actual = model.train()(ids, cross_batch_rows=NAIVE_ROWS).logits
    assert max_err(actual.detach(), expected) < ATOL
    # not vacuous: the reference depends on the rows
    assert max_err(naive_crossbatch_logits(model, ids, torch.full((5, 2), -1)), expected) > 1e-2


def test_matches_naive_reference_with_padding():
    model = tiny_model(6, num_hidden_layers=2, mem_layers=[0])
    ids = random_ids(5, W, seed=6)
    mask = torch.ones(5, W, dtype=torch.long)
    mask[0, :3] = 0  # left padding of a listed row
    mask[2, [1, 4, 5]] = 0  # holes in a listed row
    mask[3, :2] = 0  # left padding of a row that sees others
    expected = naive_crossbatch_logits(model, ids, NAIVE_ROWS, mask)
    actual = logits_of(model, ids, attention_mask=mask, cross_batch_rows=NAIVE_ROWS)
    real = mask.bool()
    assert max_err(actual[real], expected[real]) < ATOL
    # not vacuous: without the mask the result differs
    unmasked = naive_crossbatch_logits(model, ids, NAIVE_ROWS)
    assert max_err(unmasked[real], expected[real]) > 1e-2


# =========================================================================== 2d. gradients


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradients_flow_only_into_listed_rows(implementation):
    model = tiny_model(7, mem_attention_implementation=implementation).train()
    B, b = 6, 4
    rows = torch.tensor([[-1, -1], [0, -1], [-1, -1], [2, -1], [1, 3], [4, -1]])  # row 4 sees 1 and 3, not 0, 2, 5
    ids = random_ids(B, W, seed=7)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds, cross_batch_rows=rows).logits
    F.cross_entropy(logits[b, :-1], ids[b, 1:]).backward()
    per_token = embeds.grad.abs().sum(dim=-1)  # [B, t]
    for r in (1, 3):
        assert bool((per_token[r] > 0).all()), f"row {r} is listed: every one of its tokens is a key"
    assert bool((per_token[b, :-1] > 0).all())
    for r in (0, 2, 5):
        assert bool((per_token[r] == 0).all()), f"row {r} is not listed by row {b}: {per_token[r]}"


def test_gradient_reaches_another_row_only_when_it_is_listed():
    """Row 1's loss with rows[1] = [0]: the gradient into row 0's tokens vanishes if the memory layer is skipped."""
    model = tiny_model(8).train()
    ids = random_ids(2, W, seed=8)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    for rows, expect_grad in ((torch.tensor([[-1], [0]]), True), (torch.tensor([[-1], [-1]]), False)):
        embeds.grad = None
        logits = model(inputs_embeds=embeds, cross_batch_rows=rows).logits
        logits[1].logsumexp(-1).sum().backward()
        assert bool((embeds.grad[0].abs().sum(-1) > 0).all()) == expect_grad
        assert bool((embeds.grad[0] == 0).all()) != expect_grad


# =========================================================================== 2e. unlisted rows do not matter


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_unlisted_rows_do_not_change_a_row(implementation):
    model = tiny_model(9, mem_attention_implementation=implementation)
    rows = torch.tensor([[-1, -1], [0, -1], [-1, -1], [2, -1], [1, 3], [4, -1]])
    ids = random_ids(6, W, seed=9)
    base = logits_of(model, ids, cross_batch_rows=rows)
    for changed, listed in ((0, False), (2, False), (5, False), (1, True), (3, True)):
        other = ids.clone()
        other[changed] = random_ids(1, W, seed=100 + changed)[0]
        logits = logits_of(model, other, cross_batch_rows=rows)
        if listed:
            assert max_err(logits[4], base[4]) > 1e-3, changed
        else:
            assert torch.equal(logits[4], base[4]), changed
        # row 0 lists nothing: only its own tokens matter
        assert torch.equal(logits[0], base[0]) == (changed != 0)


def test_order_of_listed_rows_and_batch_layout_do_not_matter():
    model = tiny_model(10)
    x = random_ids(4, W, seed=10)
    base = logits_of(model, x, cross_batch_rows=torch.tensor([[-1, -1], [-1, -1], [-1, -1], [0, 2]]))
    swapped = logits_of(model, x, cross_batch_rows=torch.tensor([[-1, -1], [-1, -1], [-1, -1], [2, 0]]))
    assert max_err(swapped[3], base[3]) < 1e-5  # the same keys summed in another order
    padded = logits_of(model, x, cross_batch_rows=torch.tensor([[-1, -1, -1], [-1, -1, -1], [-1, -1, -1], [-1, 2, 0]]))
    assert max_err(padded[3], base[3]) < 1e-5
    # the same rows at other batch positions: x1, x2, x0, x3 with row 3 seeing x0 (now 2) and x2 (now 1)
    permuted = x[[1, 2, 0, 3]]
    moved = logits_of(model, permuted, cross_batch_rows=torch.tensor([[-1, -1], [-1, -1], [-1, -1], [2, 1]]))
    assert max_err(moved[3], base[3]) < 1e-5
    assert max_err(moved[[2, 0, 1]], base[:3]) < 1e-5
    # not vacuous: seeing x1 instead of x2 changes row 3
    wrong = logits_of(model, permuted, cross_batch_rows=torch.tensor([[-1, -1], [-1, -1], [-1, -1], [2, 0]]))
    assert max_err(wrong[3], base[3]) > 1e-3


# =========================================================================== 2f. padding


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("holes", [[0, 1, 2], [2, 5, 6]], ids=["left_padding", "holes"])
def test_padding_of_a_listed_row_is_invisible(implementation, holes):
    model = tiny_model(11, mem_attention_implementation=implementation)
    rows = torch.tensor([[-1], [0], [1]])  # row 2 sees row 1, which has padding
    ids = random_ids(3, W, seed=11)
    mask = torch.ones(3, W, dtype=torch.long)
    mask[1, holes] = 0
    other = ids.clone()
    other[1, holes] = torch.tensor([5, 6, 7])
    padded = ids.clone()
    padded[1, holes] = 0  # pad id
    results = [logits_of(model, x, attention_mask=mask, cross_batch_rows=rows) for x in (ids, other, padded)]
    for result in results[1:]:
        assert max_err(result[2], results[0][2]) <= 1e-6
        assert max_err(result[1][mask[1].bool()], results[0][1][mask[1].bool()]) <= 1e-6
    # not vacuous: without the mask those tokens are seen
    seen = [logits_of(model, x, cross_batch_rows=rows) for x in (ids, other)]
    assert max_err(seen[0][2], seen[1][2]) > 1e-3


def test_fully_padded_rows_stay_finite_and_invisible():
    model = tiny_model(11)
    rows = torch.tensor([[-1], [0], [1]])
    ids = random_ids(3, W, seed=11)
    mask = torch.ones(3, W, dtype=torch.long)
    mask[1] = 0  # row 2 sees only padding: exactly as if it saw nothing
    logits = logits_of(model, ids, attention_mask=mask, cross_batch_rows=rows)
    assert bool(torch.isfinite(logits).all())
    alone = logits_of(model, ids, attention_mask=mask, cross_batch_rows=torch.tensor([[-1], [0], [-1]]))
    assert max_err(logits[2], alone[2]) <= 1e-6


def test_padding_of_a_listed_row_gets_no_gradient():
    model = tiny_model(12).train()
    rows = torch.tensor([[-1], [0]])
    ids = random_ids(2, W, seed=12)
    mask = torch.ones(2, W, dtype=torch.long)
    mask[0, :3] = 0
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds, attention_mask=mask, cross_batch_rows=rows).logits
    logits[1].logsumexp(-1).sum().backward()
    per_token = embeds.grad.abs().sum(-1)
    assert bool((per_token[0, :3] == 0).all())
    assert bool((per_token[0, 3:] > 0).all())


# =========================================================================== 2g. gradient checkpointing


def _loss_and_grads(checkpointing: bool, use_reentrant: bool):
    model = tiny_model(13, mem_layers=[0, 2]).train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(use_reentrant=use_reentrant))
    calls = []
    model.model.layers[2].self_attn.register_forward_hook(lambda *args: calls.append(1))
    ids = random_ids(6, W, seed=13)
    out = model(ids, labels=ids, cross_batch_rows=rows_for(6, 2, 3))
    out.loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return out.loss.detach(), grads, len(calls)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(use_reentrant):
    loss, grads, calls = _loss_and_grads(False, use_reentrant)
    loss_ckpt, grads_ckpt, calls_ckpt = _loss_and_grads(True, use_reentrant)
    assert (calls, calls_ckpt) == (1, 2)  # checkpointing really recomputed the memory layer in the backward
    assert max_err(loss_ckpt, loss) < 1e-5
    assert grads.keys() == grads_ckpt.keys()
    assert len(grads) == len(list(tiny_model(13, mem_layers=[0, 2]).parameters()))
    for name in grads:
        assert max_err(grads_ckpt[name], grads[name]) < 1e-5, name
    assert grads["model.layers.0.self_attn.k_proj.weight"].abs().sum() > 0


def test_gradient_checkpointing_with_deprecated_alias():
    model = tiny_model(13, mem_layers=[0, 2]).train()
    with pytest.warns(FutureWarning):
        model.gradient_checkpointing_enable()
    ids = random_ids(6, W, seed=13)
    out = model(ids, labels=ids, cross_batch_rows=rows_for(6, 2, 3))
    out.loss.backward()
    loss, grads, _ = _loss_and_grads(False, True)
    assert max_err(out.loss.detach(), loss) < 1e-5
    for name, param in model.named_parameters():
        assert max_err(param.grad, grads[name]) < 1e-5, name


# =========================================================================== 2h-j. argument checks, outputs


def _cache_of(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=True).cache


BAD_MODEL_INPUTS = {
    # name: (ids shape, rows or callable(model, ids) -> kwargs, message fragment)
    "names_itself": ((3, W), torch.tensor([[-1], [1], [0]]), "earlier rows"),
    "names_later_row": ((3, W), torch.tensor([[-1], [2], [0]]), "earlier rows"),
    "row0_names_row0": ((2, W), torch.tensor([[0], [-1]]), "earlier rows"),
    "below_minus_one": ((3, W), torch.tensor([[-1], [0], [-2]]), "earlier rows"),
    "one_dimensional": ((3, W), torch.tensor([-1, 0, 1]), "shape"),
    "wrong_batch": ((3, W), torch.tensor([[-1], [0]]), "shape"),
    "three_dimensional": ((2, W), torch.full((2, 1, 1), -1), "shape"),
    "float": ((2, W), torch.tensor([[-1.0], [0.0]]), "integer"),
    "bool": ((2, W), torch.tensor([[False], [True]]), "integer"),
    "longer_than_window": ((2, W + 1), torch.tensor([[-1], [0]]), "max_position_embeddings"),
}


@pytest.mark.parametrize("case", list(BAD_MODEL_INPUTS))
def test_bad_cross_batch_rows_raise(case):
    model = tiny_model()
    shape, rows, match = BAD_MODEL_INPUTS[case]
    with pytest.raises(ValueError, match=match) as info:
        model(random_ids(*shape), cross_batch_rows=rows)
    assert "cross_batch_rows" in str(info.value)


def test_cache_with_cross_batch_rows_raises():
    model = tiny_model()
    ids = random_ids(2, W)
    cache = _cache_of(model, ids)
    with pytest.raises(ValueError, match="cache") as info:
        model(ids, cache=cache, cross_batch_rows=torch.tensor([[-1], [0]]))
    assert "cross_batch_rows" in str(info.value)
    with pytest.warns(FutureWarning, match="past_key_values"), pytest.raises(ValueError, match="cache"):
        model(ids, past_key_values=cache, cross_batch_rows=torch.tensor([[-1], [0]]))


def test_int32_rows_equal_int64_rows():
    model = tiny_model()
    ids = random_ids(3, W)
    rows = rows_for(3, 2)
    assert torch.equal(
        logits_of(model, ids, cross_batch_rows=rows.to(torch.int32)), logits_of(model, ids, cross_batch_rows=rows)
    )


def test_rows_of_window_length_and_shorter_are_fine():
    model = tiny_model()
    for length in (1, 3, W):
        logits = logits_of(model, random_ids(2, length), cross_batch_rows=torch.tensor([[-1], [0]]))
        assert logits.shape == (2, length, 99)
        assert bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("use_cache", [None, True, False])
def test_output_has_no_cache(use_cache):
    model = tiny_model()
    out = model(random_ids(3, W), use_cache=use_cache, cross_batch_rows=rows_for(3, 2))
    assert out.cache is None
    assert out.logits.shape == (3, W, 99)


def test_multi_window_training_under_checkpointing_asks_for_cross_batch_rows():
    model = tiny_model().train()
    ids = random_ids(1, 2 * W)  # longer than last_context_length (4): several windows
    loss = model(ids, labels=ids, use_cache=False).loss  # fine without checkpointing
    assert torch.isfinite(loss)
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="cross_batch_rows"):
        model(ids, labels=ids, use_cache=False)
    # one window (at most last_context_length tokens) is fine under checkpointing, as is no gradient
    short = ids[:, :4]
    assert torch.isfinite(model(short, labels=short, use_cache=False).loss)
    with torch.no_grad():
        assert torch.isfinite(model(ids, labels=ids, use_cache=False).loss)


# =========================================================================== 3. memory bank


def test_bank_retrieves_the_union_of_each_valid_querys_top_k():
    """Brute force: per row, the set of bank entries among the top_k q . k of any valid query of any head."""
    torch.manual_seed(0)
    B, H, Hkv, t, D, M, k = 3, 4, 2, 5, 8, 50, 3
    bank = MemoryBank(capacity=M, top_k=k, block=7)  # blocks of 7: the running top-k across blocks is exercised
    bank_keys, bank_values = torch.randn(Hkv, M, D), torch.randn(Hkv, M, D)
    bank.load_state_dict({"layer1.keys": bank_keys, "layer1.values": bank_values})
    queries = torch.randn(B, H, t, D)
    valid = torch.ones(B, t, dtype=torch.bool)
    valid[0, :2] = False
    valid[2] = False  # a fully padded row retrieves nothing
    keys, values, hits = bank.retrieve(1, queries, valid)
    for b in range(B):
        expected = set()
        for head in range(H):
            g = head // (H // Hkv)
            for i in range(t):
                if valid[b, i]:
                    expected |= set((bank_keys[g] @ queries[b, head, i]).topk(k).indices.tolist())
        assert int(hits[b].sum()) == len(expected)
        got = {int(torch.nonzero((bank_keys[0] == keys[b, 0, j]).all(-1))) for j in range(len(expected))}
        assert got == expected and bool(hits[b, : len(expected)].all()) and not bool(hits[b, len(expected) :].any())
    order = [int(torch.nonzero((bank_keys[0] == keys[0, 0, j]).all(-1))) for j in range(int(hits[0].sum()))]
    assert torch.equal(values[0, :, : len(order)], bank_values[:, order])  # the values of the same entries
    assert not keys.requires_grad and not values.requires_grad


def test_bank_holds_committed_entries_only_and_drops_the_oldest():
    bank = MemoryBank(capacity=5, top_k=2)
    q = torch.randn(1, 2, 3, 4)
    assert bank.retrieve(0, q, torch.ones(1, 3, dtype=torch.bool)) is None and len(bank) == 0

    def tokens(first: int, n: int) -> torch.Tensor:  # [1, 2, n, 4] whose entries count first, first + 1, ...
        return torch.arange(first, first + n, dtype=torch.float32)[None, None, :, None].expand(1, 2, n, 4)

    valid = torch.tensor([[True, False, True]])
    bank.stage(0, tokens(0, 3), tokens(0, 3) + 100, valid)
    assert len(bank) == 0  # staged: not yet retrievable
    bank.stage(0, tokens(0, 3), tokens(0, 3) + 100, valid)  # a recomputed forward replaces, never adds twice
    bank.commit()
    assert bank.keys[0][0, :, 0].tolist() == [0, 2] and bank.values[0][0, :, 0].tolist() == [100, 102]
    bank.stage(0, tokens(10, 3).requires_grad_(), tokens(10, 3), torch.ones(1, 3, dtype=torch.bool))
    bank.commit()
    bank.stage(0, tokens(20, 1), tokens(20, 1), torch.ones(1, 1, dtype=torch.bool))
    bank.commit()
    assert bank.keys[0][0, :, 0].tolist() == [2, 10, 11, 12, 20]  # capacity 5: the oldest (0) left
    assert not bank.keys[0].requires_grad
    restored = MemoryBank(capacity=5, top_k=2)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.keys[0], bank.keys[0]) and torch.equal(restored.values[0], bank.values[0])
    with pytest.raises(ValueError, match="capacity >= 1 and top_k >= 1"):
        MemoryBank(capacity=0, top_k=1)


@pytest.mark.parametrize("case", ["one_memory_layer", "two_memory_layers_gqa"])
def test_bank_with_top_k_of_its_size_equals_listing_the_earlier_rows(case):
    """A batch retrieves, with top_k at least the bank's size, every valid token an earlier batch wrote: the same
    logits as one crossbatch forward in which its rows also list all rows of the earlier batch."""
    overrides = {"one_memory_layer": {}, "two_memory_layers_gqa": dict(mem_layers=[1, 2], num_key_value_heads=2)}
    model = tiny_model(21, **overrides[case])
    earlier, later = random_ids(3, W, seed=21), random_ids(2, W, seed=22)
    earlier_mask = torch.ones(3, W, dtype=torch.long)
    earlier_mask[1, :3] = 0  # padding never enters the bank
    later_rows = torch.tensor([[-1], [0]])
    bank = MemoryBank(capacity=100, top_k=100)
    previous = set_memory_bank(bank)
    try:
        logits_of(model, earlier, attention_mask=earlier_mask, cross_batch_rows=torch.full((3, 0), -1))
        bank.commit()
        assert len(bank) == 3 * W - 3
        with_bank = logits_of(model, later, cross_batch_rows=later_rows)
    finally:
        set_memory_bank(previous)
    together = torch.cat([earlier, later])
    rows = torch.tensor([[-1, -1, -1, -1], [-1, -1, -1, -1], [-1, -1, -1, -1], [0, 1, 2, -1], [0, 1, 2, 3]])
    mask = torch.cat([earlier_mask, torch.ones(2, W, dtype=torch.long)])
    expected = logits_of(model, together, attention_mask=mask, cross_batch_rows=rows)[3:]
    assert max_err(with_bank, expected) < 1e-5
    assert max_err(logits_of(model, later, cross_batch_rows=later_rows), expected) > 1e-2  # not vacuous


def test_bank_entries_get_no_gradient_but_the_queries_do():
    model = tiny_model(23).train()
    bank = MemoryBank(capacity=64, top_k=2)
    ids, rows = random_ids(2, W, seed=23), torch.tensor([[-1], [0]])
    previous = set_memory_bank(bank)
    try:
        model(random_ids(2, W, seed=24), cross_batch_rows=rows)
        bank.commit()
        loss = model(ids, labels=ids, cross_batch_rows=rows).loss
        loss.backward()
    finally:
        set_memory_bank(previous)
    assert not bank.keys[1].requires_grad and len(bank) == 2 * W
    with_bank = model.model.layers[1].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    model(ids, labels=ids, cross_batch_rows=rows).loss.backward()
    assert max_err(with_bank, model.model.layers[1].self_attn.q_proj.weight.grad) > 1e-4  # retrieval changed it


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_bank_under_gradient_checkpointing_gives_the_same_loss_and_gradients(use_reentrant):
    """The replayed forward retrieves what the first one did (the batch's own keys join only at commit) and stages
    its keys once."""
    results = []
    for checkpointing in (False, True):
        model = tiny_model(25, mem_layers=[0, 2]).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(use_reentrant=use_reentrant))
        bank = MemoryBank(capacity=8 * W, top_k=2)  # room for both batches: a second copy would show
        previous = set_memory_bank(bank)
        try:
            with torch.no_grad():
                model(random_ids(4, W, seed=26), cross_batch_rows=rows_for(4, 1))
            bank.commit()
            ids = random_ids(4, W, seed=27)
            out = model(ids, labels=ids, cross_batch_rows=rows_for(4, 1))
            out.loss.backward()
            bank.commit()
        finally:
            set_memory_bank(previous)
        assert len(bank) == 8 * W and sorted(bank.keys) == [0, 2]
        grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
        results.append((out.loss.detach(), grads, bank.state_dict()))
    (loss, grads, state), (loss_ckpt, grads_ckpt, state_ckpt) = results
    assert max_err(loss_ckpt, loss) < 1e-5
    for name in grads:
        assert max_err(grads_ckpt[name], grads[name]) < 1e-5, name
    for name in state:
        assert max_err(state_ckpt[name], state[name]) < 1e-4, name  # the replay's keys, float32 noise apart
