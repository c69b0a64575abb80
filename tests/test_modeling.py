"""LongLlamaForCausalLM.forward against the float64 reference of docs/inference.md#inference (tests/reference.py),
against transformers' LlamaForCausalLM (the drop-in property), and its argument handling.

Tiny models (conftest.tiny_model): vocab 99, hidden 32, 4 layers, 4 heads, memory in layer 1, window W=8,
last_context_length L=4, mem_dtype float32 unless a test says otherwise.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import Terminal, left_pad, llama_config_like, max_err, tiny_model
from reference import RefConfig, reference_forward
from transformers import LlamaForCausalLM
from transformers.utils import logging

from longllama import LongLlamaCache
from longllama.modeling.attention_longllama import (
    blockwise_memory_attention_forward,
    eager_memory_attention_forward,
    sdpa_memory_attention_forward,
)

ATOL = 1e-4  # fp32 model vs float64 reference (docs/compatibility.md#tolerance: within 1e-4 on logits)
W, L = 8, 4  # window and last_context_length of tiny_config


# --------------------------------------------------------------------------- helpers


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = 99) -> torch.Tensor:
    """Token ids in [3, vocab): never pad (0), bos (1) or eos (2)."""
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def make_model(seed: int = 0, proj_std: float | None = None, **overrides):
    """tiny_model, optionally with the projection weights redrawn at `proj_std`. Wide models (hidden 200) at the
    fixture's std 0.3 have attention scores of size ~20 and are so ill-conditioned that fp32 rounding alone moves
    logits by ~1e-3; a std scaled like 1/sqrt(hidden) keeps them comparable to the hidden-32 model."""
    model = tiny_model(seed, **overrides)
    if proj_std is not None:
        torch.manual_seed(seed + 1000)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("proj.weight"):
                    param.normal_(0.0, proj_std)
    return model


def float64_state_dict(model):
    return {k: v.double() for k, v in model.state_dict().items()}


def reference(model, input_ids, **kwargs):
    """Reference logits [B, T, V] (float64) of a fresh session, for `model`'s weights and config."""
    logits, _ = reference_forward(float64_state_dict(model), RefConfig.from_hf(model.config), input_ids, **kwargs)
    return logits


def logits_of(model, input_ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


def llama_twin(model, attn_implementation: str) -> LlamaForCausalLM:
    """A transformers LlamaForCausalLM with the same fields and the same state dict (strict load)."""
    llama_config = llama_config_like(model.config, attn_implementation=attn_implementation)
    llama = LlamaForCausalLM(llama_config).eval()
    llama.load_state_dict(model.state_dict(), strict=True)
    return llama


# --------------------------------------------------------------------------- 1. forward vs reference

FORWARD_CASES = {
    # name: (model overrides, batch, T, extra forward kwargs)
    "tiny": (dict(), 1, 37, {}),
    "gqa": (dict(num_key_value_heads=2), 1, 37, {}),
    "head_dim_100": (dict(hidden_size=200, num_attention_heads=2, num_key_value_heads=2, proj_std=0.1), 1, 29, {}),
    "three_memory_layers": (dict(mem_layers=[0, 2, 3]), 1, 37, {}),
    "no_mem_positionals": (dict(mem_positionals=False), 1, 37, {}),
    "no_memory_layers": (dict(mem_layers=[]), 1, 29, {}),
    "eleven_windows": (dict(), 1, L + 10 * W + 3, {}),  # 11 windows of W then the final window of L
    "T_below_L": (dict(), 1, 3, {}),
    "T_equals_L": (dict(), 1, L, {}),
    "T_not_multiple_of_window": (dict(), 1, L + 2 * W + 5, {}),
    "batch_3": (dict(num_key_value_heads=2), 3, 29, {}),
    "L_above_window_config": (dict(last_context_length=12), 2, 30, {}),
    "L_above_window_per_call": (dict(), 1, 30, dict(last_context_length=20)),
    "L_per_call_overrides_config": (dict(last_context_length=12), 1, 30, dict(last_context_length=6)),
}


@pytest.mark.parametrize("case", list(FORWARD_CASES), ids=list(FORWARD_CASES))
def test_forward_matches_reference(case):
    overrides, batch, length, call = FORWARD_CASES[case]
    model = make_model(**overrides)
    ids = random_ids(batch, length, seed=1)
    err = max_err(logits_of(model, ids, **call), reference(model, ids, **call))
    assert err < ATOL, f"{case}: max |logits - reference| = {err:.3g}"


def test_per_call_last_context_length_changes_the_result():
    """The override of the previous test is not vacuous: another L gives other logits (other windows)."""
    model = make_model()
    ids = random_ids(1, 30, seed=1)
    assert max_err(logits_of(model, ids, last_context_length=6), logits_of(model, ids)) > 1e-2


def test_memory_changes_logits_beyond_last_context_length():
    """Sanity for the whole file: beyond L the memory model is not a plain Llama (the reference tests have teeth)."""
    model = make_model()
    ids = random_ids(1, 29, seed=1)
    llama_logits = logits_of(llama_twin(model, "eager"), ids)
    assert max_err(logits_of(model, ids)[:, -L:], llama_logits[:, -L:]) > 1e-2


def test_without_memory_layers_the_final_window_ignores_earlier_tokens():
    """mem_layers=[]: nothing crosses a window boundary (docs/inference.md#non-memory-layers, 2.2), so the final window
    equals a forward of its L tokens alone."""
    model = make_model(mem_layers=[])
    ids = random_ids(2, 29, seed=1)
    err = max_err(logits_of(model, ids)[:, -L:], logits_of(model, ids[:, -L:]))
    assert err < 1e-5


def test_bfloat16_memory_matches_reference():
    """mem_dtype bfloat16 (the published default): the reference rounds memory the same way."""
    model = make_model(mem_dtype="bfloat16")
    ids = random_ids(1, 37, seed=1)
    err = max_err(logits_of(model, ids), reference(model, ids))
    assert err < 2e-3


def test_bfloat16_memory_rounding_is_applied():
    """The same weights with float32 memory give visibly different logits: bf16 rounding really happens."""
    bf16 = make_model(mem_dtype="bfloat16")
    fp32 = make_model(mem_dtype="float32")
    fp32.load_state_dict(bf16.state_dict())
    ids = random_ids(1, 37, seed=1)
    assert max_err(logits_of(bf16, ids), logits_of(fp32, ids)) > 1e-3


# --------------------------------------------------------------------------- 2. memory kernels


@pytest.mark.parametrize("implementation", ["blockwise", "eager", "sdpa"])
def test_memory_kernel_matches_reference(implementation):
    model = make_model(mem_attention_implementation=implementation, num_key_value_heads=2, mem_layers=[0, 2])
    ids = random_ids(2, 61, seed=2)
    err = max_err(logits_of(model, ids), reference(model, ids))
    assert err < ATOL, f"{implementation}: {err:.3g}"


@pytest.mark.parametrize("grouping", [[1, 3], [2, 1], [4, 5]])
def test_eager_grouping_is_a_no_op(grouping):
    """mem_attention_grouping only splits the computation: same logits as ungrouped eager."""
    grouped = make_model(mem_attention_implementation="eager", mem_attention_grouping=grouping, num_key_value_heads=2)
    plain = make_model(mem_attention_implementation="eager", num_key_value_heads=2)
    plain.load_state_dict(grouped.state_dict())
    ids = random_ids(1, 45, seed=2)
    assert max_err(logits_of(grouped, ids), logits_of(plain, ids)) < 1e-5


def _kernel_inputs(heads, kv_heads, memory_length, seed=0):
    """Random kernel inputs with left padding in the local context and invalid entries in memory."""
    g = torch.Generator().manual_seed(seed)
    B, t, n, D = 2, 5, 9, 8
    query = torch.randn(B, heads, t, D, generator=g) * 2
    key = torch.randn(B, kv_heads, n, D, generator=g) * 2
    value = torch.randn(B, kv_heads, n, D, generator=g)
    local_valid = torch.ones(B, n, dtype=torch.bool)
    local_valid[0, :6] = False  # row 0 left-padded: its first query (local index 4) sees nothing locally
    causal = torch.arange(n)[None, :] <= torch.arange(n - t, n)[:, None]
    visible = causal[None, None] & local_valid[:, None, None, :]
    memory = None
    if memory_length:
        mem_key = torch.randn(B, kv_heads, memory_length, D, generator=g) * 2
        mem_value = torch.randn(B, kv_heads, memory_length, D, generator=g)
        mem_valid = torch.ones(B, memory_length, dtype=torch.bool)
        mem_valid[0, : memory_length // 2] = False  # padding stored in memory
        mem_valid[1, -1] = False
        memory = (mem_key, mem_value, mem_valid)
    return query, key, value, visible, memory


KERNELS = {
    "blockwise_block2": lambda *a, **k: blockwise_memory_attention_forward(*a, block_size=2, **k),
    "blockwise_block3": lambda *a, **k: blockwise_memory_attention_forward(*a, block_size=3, **k),
    "sdpa": sdpa_memory_attention_forward,
    "eager_grouped": lambda *a, **k: eager_memory_attention_forward(*a, grouping=[1, 2], **k),
}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize(
    "heads,kv_heads,memory_length", [(4, 4, 7), (4, 2, 7), (6, 2, 5), (4, 1, 9), (4, 2, 0)], ids=str
)
def test_kernel_matches_eager_kernel(kernel, heads, kv_heads, memory_length):
    """Each kernel on the same random tensors (GQA, padding locally and in memory, memory of odd length so the last
    block is partial) equals the published eager computation."""
    query, key, value, visible, memory = _kernel_inputs(heads, kv_heads, memory_length)
    scaling = query.shape[-1] ** -0.5
    expected, _ = eager_memory_attention_forward(None, query, key, value, visible, memory=memory, scaling=scaling)
    actual, _ = KERNELS[kernel](None, query, key, value, visible, memory=memory, scaling=scaling)
    assert actual.shape == expected.shape == (2, 5, heads, 8)
    # Only queries that are real tokens: a padding query of row 0 sees nothing at all without memory, and the
    # kernels are free to differ there (sdpa adds the mask instead of replacing scores); nothing reads it.
    real_query = visible[:, 0].any(-1)  # [B, t]
    assert max_err(actual[real_query], expected[real_query]) < 1e-5


@pytest.mark.parametrize("grad", [False, True], ids=["fused", "autograd"])
@pytest.mark.parametrize("heads,kv_heads,memory_length", [(4, 4, 7), (4, 2, 0)], ids=str)
def test_blockwise_causal_fast_path_matches_eager(grad, heads, kv_heads, memory_length):
    """is_causal=True (a window that is its whole local context, no padding) gives what the explicit mask gives,
    on the fused path and on the autograd path."""
    g = torch.Generator().manual_seed(3)
    B, t, D = 2, 6, 8
    query = torch.randn(B, heads, t, D, generator=g, requires_grad=grad)
    key, value = torch.randn(2, B, kv_heads, t, D, generator=g)
    visible = torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(B, 1, t, t)
    memory = None
    if memory_length:
        memory = (*torch.randn(2, B, kv_heads, memory_length, D, generator=g), torch.ones(B, memory_length).bool())
    scaling = D**-0.5
    expected, _ = eager_memory_attention_forward(None, query, key, value, visible, memory=memory, scaling=scaling)
    with torch.set_grad_enabled(grad):
        actual, _ = blockwise_memory_attention_forward(
            None, query, key, value, visible, memory=memory, scaling=scaling, is_causal=True
        )
    assert max_err(actual, expected) < 1e-5


# --------------------------------------------------------------------------- 3. drop-in for LlamaForCausalLM

DROP_IN_CASES = {
    # name: (model overrides, T); T <= last_context_length in every case
    "T_equals_L": (dict(), L),
    "single_token": (dict(), 1),
    "gqa": (dict(num_key_value_heads=2, mem_layers=[0, 3]), L),
    "no_memory_layers": (dict(mem_layers=[]), 3),
    "L_above_window": (dict(mem_layers=[1, 2], last_context_length=12), 12),
    "L_above_window_no_memory": (dict(mem_layers=[], last_context_length=12), 10),
}


@pytest.mark.parametrize("memory_kernel", ["blockwise", "same_as_llama"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(DROP_IN_CASES), ids=list(DROP_IN_CASES))
def test_drop_in_for_llama(case, attn_implementation, memory_kernel):
    """Both models load the same config (attn_implementation included: Llama's eager and sdpa themselves differ by
    ~1e-5 in fp32, more than the tolerance) and the same state dict."""
    overrides, length = DROP_IN_CASES[case]
    kernel = attn_implementation if memory_kernel == "same_as_llama" else memory_kernel
    model = make_model(attn_implementation=attn_implementation, mem_attention_implementation=kernel, **overrides)
    llama = llama_twin(model, attn_implementation)
    ids = random_ids(2, length, seed=3)
    assert max_err(logits_of(model, ids), logits_of(llama, ids)) < 1e-5


# --------------------------------------------------------------------------- 4. left padding


def _padded_batch(real_length, pad, seed=4):
    """Row 0: `real_length` tokens left-padded by `pad`; row 1: `real_length + pad` unpadded tokens."""
    row0 = random_ids(1, real_length, seed=seed)[0]
    row1 = random_ids(1, real_length + pad, seed=seed + 1)[0]
    ids, mask = left_pad([row0, row1], real_length + pad)
    return ids, mask, row0


PADDING_CASES = {
    # name: (model overrides, real length of row 0, padding of row 0)
    "T_below_L": (dict(), 2, 2),
    "T_below_L_above_window": (dict(last_context_length=12), 7, 5),
    "pad_one_window": (dict(), 21, W),  # whole windows of padding: the window cut of the real tokens is unchanged
    "pad_two_windows_gqa": (dict(num_key_value_heads=2, mem_layers=[0, 2]), 13, 2 * W),
}


@pytest.mark.parametrize("case", list(PADDING_CASES) + ["pad_changes_window_cut"])
def test_left_padded_batch_matches_reference(case):
    overrides, real_length, pad = PADDING_CASES.get(case, (dict(), 22, 3))
    model = make_model(**overrides)
    ids, mask, _ = _padded_batch(real_length, pad)
    logits = logits_of(model, ids, attention_mask=mask)
    expected = reference(model, ids, attention_mask=mask)
    real = mask.bool()
    assert max_err(logits[real], expected[real]) < ATOL


@pytest.mark.parametrize("case", list(PADDING_CASES))
def test_left_padded_row_equals_row_alone(case):
    """When padding leaves the window cut of the real tokens unchanged (T <= L, or whole windows of padding), a
    left-padded row computes exactly what the row computes alone (positions count from its first real token)."""
    overrides, real_length, pad = PADDING_CASES[case]
    model = make_model(**overrides)
    ids, mask, row0 = _padded_batch(real_length, pad)
    padded = logits_of(model, ids, attention_mask=mask)[0, pad:]
    alone = logits_of(model, row0[None])[0]
    assert max_err(padded, alone) < ATOL


def test_left_padded_continuation_equals_row_alone():
    """A continuing session (memory already written) gets new tokens with row 0 left-padded; HF-style position ids
    (cumsum of the whole-session mask). Row 0's real tokens equal row 0's session continued alone."""
    model = make_model(num_key_value_heads=2)
    history = random_ids(2, 21, seed=5)
    new0, new1 = random_ids(1, 2, seed=6)[0], random_ids(1, 4, seed=7)[0]
    new_ids, new_mask = left_pad([new0, new1], 4)
    full_mask = torch.cat([torch.ones(2, 21, dtype=torch.long), new_mask], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, -4:]
    with torch.no_grad():
        batch_cache = model(history, use_cache=True).cache
        padded = model(new_ids, attention_mask=full_mask, position_ids=positions, cache=batch_cache).logits[0, 2:]
        alone_cache = model(history[:1], use_cache=True).cache
        alone = model(new0[None], cache=alone_cache).logits[0]
    assert max_err(padded, alone) < ATOL


def test_left_padded_continuation_after_flush_matches_reference():
    """Session: 21 tokens (local context 4), 3 more (local 7), then 4 new tokens with row 0 left-padded by 2: the
    local context overflows (7 + 4 > W) and is flushed, so the new local context starts with row 0's padding while
    memory is non-empty. Rotary positions must count from row 0's first real token (memory keys sit at position 0,
    so the absolute local position of a query matters); the reference defines exactly that."""
    model = make_model(num_key_value_heads=2)
    history, middle = random_ids(2, 21, seed=5), random_ids(2, 3, seed=6)
    new_ids, new_mask = left_pad([random_ids(1, 2, seed=7)[0], random_ids(1, 4, seed=8)[0]], 4)
    full_mask = torch.cat([torch.ones(2, 24, dtype=torch.long), new_mask], dim=1)
    state_dict, cfg = float64_state_dict(model), RefConfig.from_hf(model.config)
    with torch.no_grad():
        cache = model(history, use_cache=True).cache
        model(middle, cache=cache)
        logits = model(new_ids, attention_mask=full_mask, cache=cache).logits
    _, session = reference_forward(state_dict, cfg, history)
    _, session = reference_forward(state_dict, cfg, middle, session=session)
    expected, _ = reference_forward(state_dict, cfg, new_ids, attention_mask=full_mask, session=session)
    real = new_mask.bool()
    assert max_err(logits[real], expected[real]) < ATOL


# --------------------------------------------------------------------------- 5. logits_to_keep

PROMPT = L + 5 * W  # 6 windows


@pytest.mark.parametrize(
    "to_keep",
    [1, 5, 13, PROMPT, torch.tensor([0, 7, 20, PROMPT - 1]), torch.tensor([PROMPT - 1, 3, 3]), torch.tensor([-1, 9])],
    ids=["k1", "k5", "k13", "kT", "positions", "unsorted_repeated", "negative"],
)
def test_logits_to_keep_is_a_slice_of_full_logits(to_keep):
    model = make_model()
    ids = random_ids(2, PROMPT, seed=8)
    full = logits_of(model, ids)
    expected = full[:, -to_keep:] if isinstance(to_keep, int) else full[:, to_keep]
    kept = logits_of(model, ids, logits_to_keep=to_keep)
    assert kept.shape == expected.shape
    assert max_err(kept, expected) < 1e-6


def test_logits_to_keep_with_output_hidden_states_is_still_a_slice():
    """As in LlamaForCausalLM, logits_to_keep slices the logits even when all hidden states are returned."""
    model = make_model()
    ids = random_ids(1, 21, seed=8)
    with torch.no_grad():
        out = model(ids, logits_to_keep=1, output_hidden_states=True)
    assert out.logits.shape == (1, 1, 99)


@pytest.mark.parametrize("to_keep,upper_calls", [(1, 1), (0, PROMPT // W + 1)], ids=["keep1", "keep_all"])
def test_layers_above_top_memory_layer_are_skipped(to_keep, upper_calls):
    """docs/inference.md#beyond: with only the last logits requested, non-final windows stop at the top memory layer
    (layer 1), which only writes their keys and values (no attention, no MLP); the layers below still run once per
    window (6 windows). The logits are unchanged (test_logits_to_keep_is_a_slice_of_full_logits)."""
    model = make_model()
    calls = {i: 0 for i in range(4)}
    hooks = [
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(model.model.layers)
    ]
    top = model.model.layers[1]
    writes = []
    top.write = lambda *args, write=top.write: (writes.append(1), write(*args))[1]
    try:
        logits_of(model, random_ids(1, PROMPT, seed=8), logits_to_keep=to_keep)
    finally:
        for hook in hooks:
            hook.remove()
        del top.write
    windows = PROMPT // W + 1
    assert calls == {0: windows, 1: upper_calls, 2: upper_calls, 3: upper_calls}
    assert len(writes) == windows - upper_calls


# --------------------------------------------------------------------------- 6. labels


def test_loss_is_shifted_cross_entropy():
    model = make_model()
    ids = random_ids(2, 21, seed=9)
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    V = out.logits.shape[-1]
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(out.loss.item() - expected.item()) < 1e-5


@pytest.mark.parametrize("to_keep", [1, torch.tensor([0, 1])], ids=["int", "tensor"])
def test_labels_with_logits_to_keep_raise(to_keep):
    model = make_model()
    ids = random_ids(1, 6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=to_keep)


# --------------------------------------------------------------------------- 7. hidden states


def test_output_hidden_states_shapes():
    model = make_model()
    ids = random_ids(2, 29, seed=10)
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
    assert [tuple(s.shape) for s in states] == [(2, 29, 32)] * 5


def test_output_hidden_states_first_is_the_embeddings():
    model = make_model()
    ids = random_ids(2, 29, seed=10)
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        embeddings = model.model.embed_tokens(ids)
    assert max_err(states[0], embeddings) == 0


def test_output_hidden_states_last_is_the_final_hidden_state():
    """The last entry is the model's last_hidden_state (after the final norm, as in Llama)."""
    model = make_model()
    ids = random_ids(2, 29, seed=10)
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        last = model.model(ids).last_hidden_state
    assert max_err(states[-1], last) < 1e-6


# --------------------------------------------------------------------------- 8. bad input


def _other_layout_cache():
    other = make_model(mem_layers=[2])
    with torch.no_grad():
        return other(random_ids(1, 5), use_cache=True).cache


def _batch_two_cache(model):
    with torch.no_grad():
        return model(random_ids(2, 5), use_cache=True).cache


def _llama_dynamic_cache(model):
    with torch.no_grad():
        return llama_twin(model, "eager")(random_ids(1, 5), use_cache=True).cache


BAD_INPUTS = {
    # name: (call(model, ids) -> None, message regex)
    "mask_wrong_length": (lambda m, ids: m(ids, attention_mask=torch.ones(1, 7)), "attention_mask has 7 columns"),
    "mask_3d": (lambda m, ids: m(ids, attention_mask=torch.ones(1, 1, 5)), "2-D"),
    "cache_of_other_layout": (lambda m, ids: m(ids, cache=_other_layout_cache()), "different layout"),
    "cache_other_batch_size": (lambda m, ids: m(ids, cache=_batch_two_cache(m)), "batch size 2"),
    "cache_without_use_cache": (lambda m, ids: m(ids, cache=_batch_two_cache(m), use_cache=False), "use_cache"),
    "last_context_length_zero": (lambda m, ids: m(ids, last_context_length=0), "last_context_length=0"),
    "empty_batch": (lambda m, ids: m(ids[:0]), r"input is empty \(shape \[0, 5\]\)"),
    "ids_and_embeds": (lambda m, ids: m(ids, inputs_embeds=m.model.embed_tokens(ids)), "exactly one"),
    "no_ids_no_embeds": (lambda m, ids: m(attention_mask=torch.ones(1, 5)), "exactly one"),
    "dynamic_cache": (lambda m, ids: m(ids, cache=_llama_dynamic_cache(m)), "LongLlamaCache"),
    "position_ids_wrong_shape": (lambda m, ids: m(ids, position_ids=torch.arange(4)[None]), "position_ids"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error(case):
    call, message = BAD_INPUTS[case]
    model = make_model()
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        call(model, random_ids(1, 5, seed=11))


def test_cache_type_check_is_meaningful():
    """The DynamicCache above is really non-empty (the error is not about an empty cache)."""
    cache = _llama_dynamic_cache(make_model())
    assert cache.get_seq_length() == 5 and not isinstance(cache, LongLlamaCache)


# --------------------------------------------------------------------------- 9. inputs_embeds


@pytest.mark.parametrize("length", [3, 37])
def test_inputs_embeds_equals_input_ids(length):
    model = make_model()
    ids = random_ids(2, length, seed=12)
    with torch.no_grad():
        from_embeds = model(inputs_embeds=model.model.embed_tokens(ids)).logits
    assert max_err(from_embeds, logits_of(model, ids)) < 1e-6


# --------------------------------------------------------------------------- long work: progress and interruption


def test_interrupted_call_makes_the_session_unusable_until_reset():
    """Ctrl-C in the middle of a long input must not leave a half-extended session that silently continues."""
    model = tiny_model()
    ids = torch.randint(3, 99, (1, 60), generator=torch.Generator().manual_seed(1))
    cache = model(ids[:, :10], use_cache=True).cache
    calls = []

    def interrupt_on_third_call(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    handle = model.model.layers[0].register_forward_pre_hook(interrupt_on_third_call)
    with pytest.raises(KeyboardInterrupt):
        model(ids[:, 10:], cache=cache, use_cache=True)
    handle.remove()
    with pytest.raises(ValueError, match="interrupted"):
        model(ids[:, 10:], cache=cache, use_cache=True)

    cache.reset()
    again = model(ids, cache=cache, use_cache=True).logits
    assert max_err(again, model(ids).logits) < 1e-6


def test_long_inputs_show_a_progress_bar_on_a_terminal_only(progress_bars, tmp_path):
    model, long_ids, short_ids = tiny_model(), random_ids(1, W * 20), random_ids(1, W * 3)  # 20 and 3 windows

    def on_terminal(call) -> str:
        terminal = Terminal()
        with contextlib.redirect_stderr(terminal):
            call()
        return terminal.getvalue()

    assert "LongLLaMA windows" in on_terminal(lambda: model(long_ids))
    assert on_terminal(lambda: model(short_ids)) == ""
    assert on_terminal(lambda: model(long_ids, show_progress=False)) == ""
    assert on_terminal(lambda: model.generate(long_ids, max_new_tokens=2, do_sample=False, show_progress=False)) == ""
    log = tmp_path / "stderr.log"
    with open(log, "w") as file, contextlib.redirect_stderr(file):  # stderr redirected to a file: no bar
        model(long_ids)
    assert log.read_text() == ""
    logging.disable_progress_bar()  # transformers' switch (the fixture turns it back on)
    assert on_terminal(lambda: model(long_ids)) == ""


def test_dynamic_rope_scaling_never_takes_effect():
    """Rotary positions restart in every window and stay below W = max_position_embeddings, and dynamic NTK scaling
    only acts beyond it: a checkpoint that asks for it computes what the default RoPE computes, over prompt windows
    and decoding across flushes (docs/inference.md#positions). Llama, whose positions do pass W, is changed by it."""
    theta = tiny_model().config.rope_parameters["rope_theta"]
    dynamic_rope = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": theta}
    default, dynamic = tiny_model(), tiny_model(rope_parameters=dynamic_rope)
    ids = random_ids(1, 5 * W + 3)
    assert max_err(logits_of(dynamic, ids), logits_of(default, ids)) == 0.0
    generation = dict(max_new_tokens=3 * W, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected, got = default.generate(ids, **generation), dynamic.generate(ids, **generation)
    assert torch.equal(got.sequences, expected.sequences)
    assert max(max_err(a, b) for a, b in zip(got.scores, expected.scores)) == 0.0

    llama, llama_dynamic = llama_twin(default, "eager"), llama_twin(dynamic, "eager")
    assert max_err(logits_of(llama_dynamic, ids), logits_of(llama, ids)) > 1e-3
