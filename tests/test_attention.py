"""The package's memory attention for decoding (longllama/attention.py, csrc/attend.h) against a float64 reference
and against the checkpoint code's blockwise kernel, on memories built the way sessions build them: several chunks,
padding, evicted entries, beam rows that share memory, bf16 and float32 storage."""

import math
from contextlib import nullcontext

import pytest
import torch
from conftest import checkpoint_kernels_only, max_err, tiny_model

from longllama import attention, kernels
from longllama.modeling import attention_longllama, memory_longllama
from longllama.modeling.memory_longllama import LayerMemory


@pytest.fixture(params=["native", "generic"])
def lib(request):
    """The compiled kernels `kernels.compiled` picks (AVX2 where the CPU has it) and the portable build."""
    native = kernels.compiled()
    if native is None:
        pytest.skip("the package was installed without a C compiler: no compiled kernels")
    if request.param == "native":
        return native
    from longllama import _kernels

    return _kernels


def make_memory(B, Hkv, D, n, dtype="float32", padding=0.2, seed=0, writes=3, **options) -> LayerMemory:
    """A LayerMemory filled by `writes` appends of random keys and values with `padding` of the entries invalid."""
    generator = torch.Generator().manual_seed(seed)
    memory = LayerMemory(dtype, **options)
    for part in torch.tensor_split(torch.arange(n), writes):
        keys = torch.randn(B, Hkv, len(part), D, generator=generator) * 2
        values = torch.randn(B, Hkv, len(part), D, generator=generator)
        memory.add(keys, values, torch.rand(B, len(part), generator=generator) >= padding)
    return memory


def reference(q: torch.Tensor, memory: LayerMemory, scaling: float):
    """`(out, lse)` of softmax attention over the valid entries, in float64 (out 0, lse -inf where none is valid)."""
    keys, values, valid = (torch.cat(x, dim=-1 if x[0].dim() == 2 else -2)
                           for x in zip(*memory.blocks(torch.float64, q.device, q.shape[0])))
    scores = (q.double() @ keys.transpose(-1, -2)) * scaling  # [B, Hkv, R, M]
    scores = scores.masked_fill(~valid[:, None, None, :], -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.nan_to_num(torch.exp(scores - lse[..., None])) @ values
    return out, lse


def check(lib, q, memory, scaling=0.3, atol=1e-5):
    out, lse = attention.memory_attention(lib, q, memory, scaling)
    expected_out, expected_lse = reference(q, memory, scaling)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))
    finite = torch.isfinite(expected_lse)
    assert max_err(lse[finite], expected_lse[finite]) < atol
    assert max_err(out, expected_out) < atol


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "B,Hkv,R,D,n",
    [
        (1, 4, 1, 64, 3000),  # a decode step of the benchmark model's shape
        (2, 2, 3, 8, 500),  # grouped queries (3 query rows per KV head)
        (1, 1, 2, 12, 777),  # head_dim not a multiple of 8: the scalar product; blocks shorter than 16 entries
        (3, 1, 1, 16, 40),
        (1, 2, 2, 48, 300),  # bf16 read 16 at a time (D a multiple of 16): a last group of 48 values
        (1, 1, 1, 128, 200),  # two groups of 64
        (1, 1, 1, 24, 100),  # a multiple of 8, not of 16
    ],
)
def test_kernel_matches_float64_reference(lib, dtype, B, Hkv, R, D, n):
    memory = make_memory(B, Hkv, D, n, dtype)
    check(lib, torch.randn(B, Hkv, R, D, generator=torch.Generator().manual_seed(1)), memory)


def test_several_chunks_and_threads_splitting_each_set(lib, monkeypatch):
    """Memory in many chunks (each a separate kernel call carrying the softmax state), and one set's entries cut into
    ranges for several threads whose partial states are merged."""
    monkeypatch.setattr(memory_longllama, "CHUNK_ELEMENTS", 1 << 10)  # 64 entries of 16 floats per chunk
    monkeypatch.setattr(memory_longllama, "MIN_CHUNK", 16)
    monkeypatch.setattr(attention, "MIN_RANGE", 8)
    memory = make_memory(1, 1, 16, 1000, "bfloat16", writes=7)
    assert len(list(memory.chunks())) > 10
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        check(lib, torch.randn(1, 1, 2, 16), memory)
    finally:
        torch.set_num_threads(threads)


def test_rows_with_nothing_valid_and_evicted_entries(lib):
    """A row whose memory is all padding gets out 0 and lse -inf (the local context alone then decides); evicted
    entries are never read."""
    memory = make_memory(2, 2, 8, 300, padding=0.0, max_tokens=200)
    assert memory.length == 200 and memory.next_id == 300
    memory.add(torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8), torch.tensor([[False] * 10, [True] * 10]))
    check(lib, torch.randn(2, 2, 1, 8), memory)
    empty = make_memory(1, 1, 8, 20, padding=1.0)
    out, lse = attention.memory_attention(lib, torch.randn(1, 1, 1, 8), empty, 0.3)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_beam_rows_share_memory(lib):
    """After beam reordering, session row b reads memory row `rows[b]` without a copy: the kernel follows the map."""
    memory = make_memory(2, 2, 8, 200)
    memory.select_rows(torch.tensor([1, 1, 0, 1]))  # 4 beams reading 2 memory rows
    check(lib, torch.randn(4, 2, 1, 8), memory)


def test_the_cached_chunk_table_follows_every_change(lib):
    """The kernel's table of chunk addresses is kept between steps and rebuilt after writes (which may move a chunk's
    tensors), beam reorders and resets."""
    memory = make_memory(2, 2, 8, 100)
    q = torch.randn(2, 2, 1, 8)
    check(lib, q, memory)
    table = memory._kernel_chunk_table[1]
    check(lib, q, memory)
    assert memory._kernel_chunk_table[1] is table  # reused
    memory.add(torch.randn(2, 2, 500, 8), torch.randn(2, 2, 500, 8), torch.ones(2, 500, dtype=torch.bool))
    check(lib, q, memory)  # the chunk grew into a new allocation
    memory.select_rows(torch.tensor([1, 0]))
    check(lib, q, memory)
    memory.reset()
    memory.add(torch.randn(2, 2, 30, 8), torch.randn(2, 2, 30, 8), torch.ones(2, 30, dtype=torch.bool))
    check(lib, q, memory)


def test_package_kernel_matches_checkpoint_kernel(lib, monkeypatch):
    """The registered `"blockwise"` function with the compiled kernel equals the checkpoint code's blockwise kernel
    on a decode step: local context with padding, memory in bf16, grouped-query attention."""
    monkeypatch.setattr(kernels, "_module", lib)
    g = torch.Generator().manual_seed(2)
    B, H, Hkv, t, n, D = 2, 4, 2, 1, 6, 8
    query, key, value = torch.randn(B, H, t, D, generator=g), *torch.randn(2, B, Hkv, n, D, generator=g)
    visible = torch.ones(B, 1, t, n, dtype=torch.bool)
    visible[0, :, :, :2] = False
    memory = make_memory(B, Hkv, D, 400, "bfloat16")
    kwargs = dict(memory=memory, scaling=D**-0.5)
    expected, _ = attention_longllama.blockwise_memory_attention_forward(None, query, key, value, visible, **kwargs)
    calls = []
    real = attention.memory_attention
    monkeypatch.setattr(attention, "memory_attention", lambda *args: calls.append(1) or real(*args))
    actual, _ = attention.blockwise_memory_attention_forward(None, query, key, value, visible, **kwargs)
    assert calls and max_err(actual, expected) < 1e-5


@pytest.mark.parametrize(
    "case", ["int8 memory", "gradients", "a prefill window", "kernels switched off", "crossbatch memory"]
)
def test_other_calls_take_the_checkpoint_kernel(case, monkeypatch):
    """Calls the compiled kernel does not take go to the checkpoint code's kernel, with its results."""
    g = torch.Generator().manual_seed(4)
    t = attention.FUSED_QUERIES + 1 if case == "a prefill window" else 1
    query, key, value = torch.randn(1, 2, t, 8, generator=g), *torch.randn(2, 1, 2, t + 3, 8, generator=g)
    query.requires_grad_(case == "gradients")
    visible = torch.ones(1, 1, t, t + 3, dtype=torch.bool)
    memory = make_memory(1, 2, 8, 50, "int8" if case == "int8 memory" else "float32")
    if case == "crossbatch memory":
        memory = (torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.ones(1, 5, dtype=torch.bool))
    if case == "kernels switched off":
        monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(attention, "memory_attention", lambda *args: pytest.fail("the compiled kernel was used"))
    kwargs = dict(memory=memory, scaling=0.3)
    expected, _ = attention_longllama.blockwise_memory_attention_forward(None, query, key, value, visible, **kwargs)
    actual, _ = attention.blockwise_memory_attention_forward(None, query, key, value, visible, **kwargs)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("mem_dtype,tolerance", [("float32", 1e-5), ("bfloat16", 1e-4)])
def test_decoding_with_the_kernel_matches_the_checkpoint_kernel(mem_dtype, tolerance):
    """A whole session: prompt, then 20 decode steps through several flushes, beams that share memory."""
    if kernels.compiled() is None:
        pytest.skip("the package was installed without a C compiler: no compiled kernels")
    model = tiny_model(mem_dtype=mem_dtype, num_key_value_heads=2, mem_layers=[1, 2])
    model.generation_config.eos_token_id = None
    prompt = torch.randint(3, 99, (2, 37), generator=torch.Generator().manual_seed(5))
    results = {}
    for path, kernels_used in (("kernel", nullcontext), ("reference", checkpoint_kernels_only)):
        with torch.no_grad(), kernels_used():
            results[path] = model.generate(prompt, max_new_tokens=20, num_beams=2, do_sample=False,
                                           output_scores=True, return_dict_in_generate=True)
    assert torch.equal(results["kernel"].sequences, results["reference"].sequences)
    for a, b in zip(results["kernel"].scores, results["reference"].scores):
        assert max_err(a, b) < tolerance


@pytest.mark.parametrize("threads", [2, 4])
def test_decode_step_head_on_several_threads(threads):
    """The logits of a one-row step go through the head cut into one slice per thread (torch's CPU matrix-vector
    product uses one): the same logits as the head itself, and the head itself wherever the cut does not apply."""
    model = tiny_model(vocab_size=100)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for hidden in (torch.randn(1, 1, 32), torch.randn(2, 1, 32), torch.randn(1, 3, 32)):
                assert max_err(model._head(hidden), model.lm_head(hidden)) < 1e-6
            one_row = torch.randn(1, 1, 32)
            model.lm_head.register_forward_hook(lambda module, args, out: out * 0)
            assert torch.equal(model._head(one_row), torch.zeros(1, 1, 100))  # a hooked head is called as a module
    finally:
        torch.set_num_threads(previous)
