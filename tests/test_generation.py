"""Sessions and generation: LongLlamaCache, token-by-token decoding and generate() against the float64 reference of
docs/inference.md#inference (tests/reference.py).

Tiny models (conftest.tiny_model): vocab 99, hidden 32, 4 layers, 4 heads, memory in layer 1, window W=8,
last_context_length L=4, mem_dtype float32. After a prompt the local cache holds L=4 tokens, so while decoding the
local context overflows (docs/inference.md#flush, 2.7) at the 5th generated token fed back, then at every 8th.
"""

import pytest
import torch
from conftest import left_pad, llama_config_like, max_err, tiny_model
from reference import RefConfig, reference_forward, reference_greedy_generate
from transformers import GenerationConfig, LlamaForCausalLM

from longllama import LongLlamaCache

ATOL = 1e-4  # fp32 model vs float64 reference
W, L = 8, 4  # window and last_context_length of tiny_config
FLUSHING_STEPS = 22  # 21 tokens fed back: the local context overflows at the 5th, 13th and 21st


# --------------------------------------------------------------------------- helpers


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = 99) -> torch.Tensor:
    """Token ids in [3, vocab): never pad (0), bos (1) or eos (2)."""
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def make_model(seed: int = 0, **overrides):
    """tiny_model without an eos token, so that generate() always runs the requested number of steps (the
    reference never stops early)."""
    model = tiny_model(seed, **overrides)
    model.generation_config.eos_token_id = None
    return model


def float64_state_dict(model):
    return {k: v.double() for k, v in model.state_dict().items()}


def greedy(model, input_ids, max_new_tokens, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


def reference_generate(model, input_ids, max_new_tokens, **kwargs) -> torch.Tensor:
    return reference_greedy_generate(
        float64_state_dict(model), RefConfig.from_hf(model.config), input_ids, max_new_tokens, **kwargs
    )


def reference_steps(model, new_ids, max_new_tokens, session=None, last_context_length=None):
    """Greedy decoding on the reference the way generate() does it: feed `new_ids` to `session` (None: fresh), then
    feed back each generated token except the last. Returns (new tokens [B, n], logits [B, n, V] that chose them,
    the session after the last token fed)."""
    state_dict, cfg = float64_state_dict(model), RefConfig.from_hf(model.config)
    tokens, step_logits, feed = [], [], new_ids
    for step in range(max_new_tokens):
        logits, session = reference_forward(
            state_dict, cfg, feed, session=session, last_context_length=last_context_length
        )
        step_logits.append(logits[:, -1])
        feed = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(feed)
    return torch.cat(tokens, dim=1), torch.stack(step_logits, dim=1), session


def generate_with_logits(model, input_ids, max_new_tokens, **kwargs):
    """generate() returning (new tokens [B, n], raw logits [B, n, V] of every step)."""
    out = greedy(model, input_ids, max_new_tokens, return_dict_in_generate=True, output_logits=True, **kwargs)
    return out.sequences[:, -max_new_tokens:], torch.stack(out.logits, dim=1)


# --------------------------------------------------------------------------- 1. generate() vs reference

GENERATE_CASES = {
    # name: (model overrides, batch, prompt length, new tokens)
    "tiny": (dict(), 1, 21, FLUSHING_STEPS),
    "gqa": (dict(num_key_value_heads=2), 1, 37, FLUSHING_STEPS),
    "three_memory_layers": (dict(mem_layers=[0, 2, 3]), 1, 13, FLUSHING_STEPS),
    "batch_2": (dict(num_key_value_heads=2, mem_layers=[1, 2]), 2, 29, FLUSHING_STEPS),
    "prompt_of_eleven_windows": (dict(), 1, L + 10 * W + 3, 14),
    "prompt_below_L": (dict(), 1, 3, 14),
    "no_mem_positionals": (dict(mem_positionals=False), 1, 21, 14),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_greedy_generate_matches_reference(memory_attention_path, case):
    overrides, batch, length, new = GENERATE_CASES[case]
    model = make_model(**overrides)
    ids = random_ids(batch, length, seed=1)
    assert torch.equal(greedy(model, ids, new), reference_generate(model, ids, new))


@pytest.mark.parametrize("case", ["tiny", "batch_2"])
def test_generate_step_logits_match_reference(memory_attention_path, case):
    """Stronger than equal tokens: the logits of every step of generate() equal the reference's."""
    overrides, batch, length, new = GENERATE_CASES[case]
    model = make_model(**overrides)
    ids = random_ids(batch, length, seed=1)
    _, logits = generate_with_logits(model, ids, new)
    _, expected, _ = reference_steps(model, ids, new)
    assert max_err(logits, expected) < ATOL


# --------------------------------------------------------------------------- 2. token-by-token decoding


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("spelling", ["cache", "past_key_values"])
def test_token_by_token_decode_matches_reference(memory_attention_path, spelling):
    """Prefill, then one token per call passing the returned cache back (also with the deprecated spelling).
    Fed tokens are fixed random ids, so both sides see the same session whatever they would predict."""
    model = make_model(num_key_value_heads=2)
    state_dict, cfg = float64_state_dict(model), RefConfig.from_hf(model.config)
    prompt, fed = random_ids(2, 21, seed=2), random_ids(2, FLUSHING_STEPS, seed=3)
    errors = []
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        expected, session = reference_forward(state_dict, cfg, prompt)
        errors.append(max_err(out.logits, expected))
        for step in range(fed.shape[1]):
            token = fed[:, step : step + 1]
            out = model(token, **{spelling: getattr(out, spelling)})
            expected, session = reference_forward(state_dict, cfg, token, session=session)
            errors.append(max_err(out.logits, expected))
    assert max(errors) < ATOL, f"per-step errors {errors}"


# --------------------------------------------------------------------------- 3. continuing calls

CONTINUATION_CASES = {
    "tiny": dict(),
    "gqa_two_memory_layers": dict(num_key_value_heads=2, mem_layers=[0, 2]),
    "L_above_window": dict(last_context_length=12),
}


@pytest.mark.parametrize("case", list(CONTINUATION_CASES))
def test_cached_continuation_of_many_tokens_matches_reference(case):
    """docs/inference.md#continuing-sessions (2.8): calls of 13, 3, 30 and 1 tokens on a cache append windows of W to
    the local context with the overflow rule; each call's logits equal the reference continuing the same session."""
    model = make_model(**CONTINUATION_CASES[case])
    state_dict, cfg = float64_state_dict(model), RefConfig.from_hf(model.config)
    errors = []
    with torch.no_grad():
        out = model(random_ids(1, 21, seed=4), use_cache=True)
        _, session = reference_forward(state_dict, cfg, random_ids(1, 21, seed=4))
        for seed, length in enumerate([13, 3, 30, 1]):
            chunk = random_ids(1, length, seed=10 + seed)
            out = model(chunk, cache=out.cache)
            expected, session = reference_forward(state_dict, cfg, chunk, session=session)
            errors.append(max_err(out.logits, expected))
    assert max(errors) < ATOL, f"per-call errors {errors}"


def test_continuation_sees_the_local_context():
    """A continuing call is not a fresh one: its tokens see the local cache (the same 13 tokens give other logits
    in a fresh session)."""
    model = make_model()
    chunk = random_ids(1, 13, seed=10)
    with torch.no_grad():
        cache = model(random_ids(1, 21, seed=4), use_cache=True).cache
        continued = model(chunk, cache=cache).logits
        fresh = model(chunk).logits
    assert max_err(continued, fresh) > 1e-2


# --------------------------------------------------------------------------- 4. sessions through generate()


@pytest.mark.parametrize("second_call", ["full_history", "new_ids_with_full_mask"])
def test_generate_continues_a_session(second_call):
    """generate(prompt1, cache=c), then a second generate on the same cache, either HF style (the whole history
    plus prompt2; generate slices what the cache has seen) or with only the unseen ids and a whole-session mask.
    The second call equals the reference continuing the session: the last token of the first call (never fed)
    followed by prompt2."""
    model = make_model(num_key_value_heads=2)
    prompt1, prompt2, n1, n2 = random_ids(1, 21, seed=5), random_ids(1, 5, seed=6), 6, 12
    cache = LongLlamaCache(model.config)
    history = greedy(model, prompt1, n1, cache=cache)
    unseen = torch.cat([history[:, -1:], prompt2], dim=1)
    if second_call == "full_history":
        tokens, logits = generate_with_logits(model, torch.cat([history, prompt2], dim=1), n2, cache=cache)
    else:
        mask = torch.ones(1, history.shape[1] + prompt2.shape[1], dtype=torch.long)
        tokens, logits = generate_with_logits(model, unseen, n2, attention_mask=mask, cache=cache)

    first_tokens, _, session = reference_steps(model, prompt1, n1)
    expected_tokens, expected_logits, _ = reference_steps(model, unseen, n2, session=session)
    assert torch.equal(history[:, -n1:], first_tokens)
    assert torch.equal(tokens, expected_tokens) and max_err(logits, expected_logits) < ATOL


def test_generate_continuation_processes_only_unseen_tokens():
    """The second generate of a session runs the model on the unseen tokens only, not on the history again."""
    model = make_model()
    cache = LongLlamaCache(model.config)
    history = greedy(model, random_ids(1, 21, seed=5), 6, cache=cache)
    counted = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, args, out: counted.append(args[0].shape[1]))
    try:
        greedy(model, torch.cat([history, random_ids(1, 5, seed=6)], dim=1), 7, cache=cache)
    finally:
        hook.remove()
    assert sum(counted) == (1 + 5) + 7 - 1


# --------------------------------------------------------------------------- 5. independent sessions


def test_interleaved_sessions_do_not_affect_each_other():
    """Two caches decoded in alternation give exactly what each gives alone."""
    model = make_model(num_key_value_heads=2)
    prompts = [random_ids(1, 21, seed=7), random_ids(1, 30, seed=8)]
    fed = [random_ids(1, FLUSHING_STEPS, seed=9), random_ids(1, FLUSHING_STEPS, seed=10)]

    def start(s):
        out = model(prompts[s], use_cache=True)
        return out.cache, [out.logits]

    def step(s, cache, logs, i):
        out = model(fed[s][:, i : i + 1], cache=cache)
        logs.append(out.logits)

    with torch.no_grad():
        solo = []
        for s in range(2):
            cache, logs = start(s)
            for i in range(FLUSHING_STEPS):
                step(s, cache, logs, i)
            solo.append(torch.cat(logs, dim=1))
        sessions = [start(0), start(1)]
        for i in range(FLUSHING_STEPS):
            for s in range(2):
                step(s, *sessions[s], i)
    interleaved = [torch.cat(logs, dim=1) for _, logs in sessions]
    assert max(max_err(interleaved[s], solo[s]) for s in range(2)) < 1e-6


# --------------------------------------------------------------------------- 6. no re-prefill


@pytest.mark.parametrize("prompt_length", [3, 21, L + 10 * W + 3])
def test_generate_feeds_each_token_once(prompt_length):
    """generate() prefills once, then feeds one token per step: prompt_len + n - 1 tokens in all."""
    model = make_model()
    counted = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, args, out: counted.append(args[0].shape[1]))
    try:
        greedy(model, random_ids(1, prompt_length, seed=11), 10)
    finally:
        hook.remove()
    assert sum(counted) == prompt_length + 10 - 1


# --------------------------------------------------------------------------- 7. left-padded batches

# With padding the local context of a batch is as long as its longest row: the overflow (flush) comes at the same step
# for every row, counted with the padding. A short left-padded row therefore flushes earlier than it would alone, and
# from that step on it legitimately differs from the row alone (what it attends to locally is different). Padding by
# whole windows of a prompt longer than L does not move anything: the final window is the same L real tokens, the
# earlier real tokens are cut at the same places and the padding windows sit in memory as invalid entries.


def test_left_padded_short_prompts_generate_as_rows_alone():
    """Prompts <= L (W=16, L=6, real lengths 3 and 6): no flush before the 11th token fed back, so 11 new tokens
    of each row equal the row generated alone."""
    model = make_model(max_position_embeddings=16, last_context_length=6, num_key_value_heads=2)
    rows = [random_ids(1, 3, seed=12)[0], random_ids(1, 6, seed=13)[0]]
    ids, mask = left_pad(rows, 6)
    batched = greedy(model, ids, 11, attention_mask=mask)[:, -11:]
    alone = torch.cat([greedy(model, row[None], 11)[:, -11:] for row in rows])
    assert torch.equal(batched, alone)


def test_left_padded_long_prompts_padded_by_whole_windows_generate_as_rows_alone():
    """Prompts longer than L, the shorter one padded by exactly W tokens: equal to each row alone through three
    flushes."""
    model = make_model(mem_layers=[1, 2])
    rows = [random_ids(1, 21, seed=14)[0], random_ids(1, 21 + W, seed=15)[0]]
    ids, mask = left_pad(rows, 21 + W)
    batched = greedy(model, ids, FLUSHING_STEPS, attention_mask=mask)[:, -FLUSHING_STEPS:]
    alone = torch.cat([greedy(model, row[None], FLUSHING_STEPS)[:, -FLUSHING_STEPS:] for row in rows])
    assert torch.equal(batched, alone)


LEFT_PADDED_REFERENCE_CASES = {
    # name: (model overrides, real lengths, new tokens)
    "long_prompts_pad_moves_window_cut": (dict(), [22, 25], FLUSHING_STEPS),
    "short_prompts_past_first_flush": (dict(num_key_value_heads=2), [2, 4], FLUSHING_STEPS),
    "gqa_three_rows": (dict(num_key_value_heads=2, mem_layers=[0, 2]), [9, 30, 17], 14),
}


@pytest.mark.parametrize("case", list(LEFT_PADDED_REFERENCE_CASES))
def test_left_padded_generate_matches_reference(memory_attention_path, case):
    """Where padding does change what a row computes (see above), batched generate equals the reference fed the same
    padded batch (HF position ids: cumsum of the mask)."""
    overrides, lengths, new = LEFT_PADDED_REFERENCE_CASES[case]
    model = make_model(**overrides)
    ids, mask = left_pad([random_ids(1, n, seed=16 + n)[0] for n in lengths], max(lengths))
    expected = reference_generate(model, ids, new, attention_mask=mask)
    assert torch.equal(greedy(model, ids, new, attention_mask=mask), expected)


# --------------------------------------------------------------------------- 8. unsupported generation modes


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_beams=3, num_return_sequences=2), dict(generation_config=GenerationConfig(num_beams=2, do_sample=False))],
    ids=["kwargs", "generation_config"],
)
def test_beam_search_on_a_short_prompt_is_llama_beam_search(kwargs):
    """While prompt and output fit in the last context (no memory), LongLLaMA is Llama: the same beams."""
    model = make_model(last_context_length=W)
    llama = LlamaForCausalLM(llama_config_like(model.config)).eval()
    llama.load_state_dict(model.state_dict())
    ids = random_ids(2, 3)
    generation = {"max_new_tokens": 4, "pad_token_id": 0, **kwargs}
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **generation), llama.generate(ids, **generation))


def test_caches_of_other_layouts_are_refused():
    """transformers' static caches hold a fixed number of positions and no memory; "static" is LongLLaMA's own
    (tests/test_decoding.py)."""
    model = make_model()
    with pytest.raises(ValueError, match="LongLlamaCache"):
        model.generate(random_ids(1, 5), max_new_tokens=3, cache_implementation="offloaded_static")


# --------------------------------------------------------------------------- 9. last_context_length in generate()


@pytest.mark.parametrize("last_context_length", [2, 6, 12])
def test_generate_honours_last_context_length(last_context_length):
    model = make_model()
    ids = random_ids(1, 29, seed=17)
    tokens, logits = generate_with_logits(model, ids, 14, last_context_length=last_context_length)
    expected_tokens, expected_logits, _ = reference_steps(model, ids, 14, last_context_length=last_context_length)
    assert torch.equal(tokens, expected_tokens) and max_err(logits, expected_logits) < ATOL


# --------------------------------------------------------------------------- 10. cache contents


@pytest.mark.parametrize("prompt_length", [3, L, 25, 37])
def test_cache_lengths_after_prompt(prompt_length):
    """After a prompt of T tokens: memory layers hold T - L entries, other layers none; every layer's local context
    holds the last min(T, L) tokens."""
    model = make_model(mem_layers=[0, 2])
    cache = LongLlamaCache(model.config)
    greedy(model, random_ids(1, prompt_length, seed=18), 1, cache=cache)
    lengths = {i: (cache.memory_length(i), cache.layers[i].get_seq_length()) for i in range(4)}
    memory, local = max(prompt_length - L, 0), min(prompt_length, L)
    assert (lengths, cache.local_length, cache.get_seq_length()) == (
        {0: (memory, local), 1: (0, local), 2: (memory, local), 3: (0, local)},
        local,
        prompt_length,
    )


@pytest.mark.parametrize(
    "fed,memory,local", [(4, 21, 8), (5, 29, 1), (12, 29, 8), (13, 37, 1), (20, 37, 8)], ids=lambda v: str(v)
)
def test_cache_lengths_while_decoding(fed, memory, local):
    """docs/inference.md#flush (2.7) after a 25-token prompt: the whole local context (L=4 plus fed tokens) moves to
    memory at the 5th token fed back, when it would exceed W=8, then every 8 tokens."""
    model = make_model()
    cache = LongLlamaCache(model.config)
    greedy(model, random_ids(1, 25, seed=19), fed + 1, cache=cache)
    assert (cache.memory_length(1), cache.local_length, cache.layers[3].get_seq_length()) == (memory, local, local)


# --------------------------------------------------------------------------- outputs as transformers returns them


@pytest.mark.parametrize("kwargs", [dict(num_beams=2), dict(num_return_sequences=2, do_sample=True)])
def test_beams_and_return_sequences_without_cache(kwargs):
    """use_cache=False re-reads the whole sequence every step. Within the final window that is what the session cache
    computes (the same tokens); beyond it every step is a fresh long input (docs/inference.md#windows), which differs
    from decoding into a session (#flush), so there only the shapes are compared."""
    model = make_model()
    rows = 2 * kwargs.get("num_return_sequences", 1)
    for prompt, new in [(2, 2), (3 * W + 3, 5)]:
        ids = random_ids(2, prompt)
        results = []
        for use_cache in (True, False):
            torch.manual_seed(0)
            results.append(model.generate(ids, max_new_tokens=new, use_cache=use_cache, **kwargs))
        assert results[0].shape == results[1].shape == (rows, prompt + new)
        assert prompt > L or torch.equal(results[0], results[1])


@pytest.mark.parametrize("tokens", [L, 3 * W + 3])  # one window, several windows
def test_hidden_states_cover_every_position_whatever_logits_to_keep(tokens):
    model, ids = make_model(), random_ids(2, tokens)
    full = model(ids, output_hidden_states=True).hidden_states
    last = model(ids, output_hidden_states=True, logits_to_keep=1).hidden_states
    assert len(full) == len(last) == model.config.num_hidden_layers + 1
    for a, b in zip(full, last):
        assert a.shape == (2, tokens, model.config.hidden_size) and torch.equal(a, b)


def test_beam_search_hidden_states_are_per_beam():
    model, ids = make_model(), random_ids(2, 3 * W + 3)
    out = model.generate(ids, max_new_tokens=2, num_beams=2, output_hidden_states=True, return_dict_in_generate=True)
    prompt_step = out.hidden_states[0]
    assert all(h.shape == (4, ids.shape[1], model.config.hidden_size) for h in prompt_step)
    assert torch.equal(prompt_step[-1][0], prompt_step[-1][1])  # the beams of one prompt start from its states


def test_return_dict_false_returns_a_tuple():
    model, ids = make_model(), random_ids(2, 3 * W + 3)
    expected = model(ids, output_hidden_states=True)
    output = model(ids, output_hidden_states=True, return_dict=False)
    assert isinstance(output, tuple) and torch.equal(output[0], expected.logits)
    assert isinstance(output[1], LongLlamaCache) and len(output[2]) == len(expected.hidden_states)
    assert isinstance(model.model(ids, return_dict=False), tuple)
    model.config.return_dict = False
    assert isinstance(model(ids), tuple)


def test_hidden_states_of_one_window_are_part_of_the_graph():
    """As in Llama, the returned states are the tensors the logits were computed from (one window: no copies)."""
    model, ids = make_model(), random_ids(2, L)
    out = model(ids, output_hidden_states=True)
    for state in out.hidden_states:
        state.retain_grad()
    out.logits.sum().backward()
    assert all(state.grad is not None for state in out.hidden_states)


# --------------------------------------------------------------------------- attention weights


def reference_attentions(model, ids) -> list[torch.Tensor]:
    """Per layer `[B, H, T, T]`: the float64 reference's probabilities of a fresh forward over `ids`, placed at the
    positions of their keys (the local context is the window itself, memory entries are positions 0..m-1)."""
    import reference

    cfg, layers = RefConfig.from_hf(model.config), model.config.num_hidden_layers
    reference.ATTENTION_LOG = log = []
    try:
        reference_forward(float64_state_dict(model), cfg, ids)
    finally:
        reference.ATTENTION_LOG = None
    B, T = ids.shape
    expected = [torch.zeros(B, model.config.num_attention_heads, T, T, dtype=torch.float64) for _ in range(layers)]
    prompt = max(T - L, 0)
    windows = [(s, min(s + W, prompt)) for s in range(0, prompt, W)] + [(prompt, T)]
    for i, (start, end) in enumerate(windows):
        for layer in range(layers):
            probs = log[i * layers + layer]
            memory = probs.shape[-1] - (end - start)
            columns = torch.cat([torch.arange(start, end), torch.arange(memory)])
            expected[layer][:, :, start:end, columns] = probs
    return expected


@pytest.mark.parametrize("implementation", ["blockwise", "eager", "sdpa"])
def test_attention_weights_match_the_reference(implementation):
    """Every layer's weights over the session's positions: memory layers over memory and their window in one
    softmax, the others within their window (the reference's probabilities, docs/inference.md#one-softmax)."""
    model = make_model(mem_layers=[1, 3], mem_attention_implementation=implementation)
    ids = random_ids(2, 3 * W + 6)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    assert model.config._attn_implementation == "sdpa"  # the eager kernels were for that call only
    for actual, expected in zip(attentions, reference_attentions(model, ids), strict=True):
        assert actual.shape == expected.shape
        assert max_err(actual, expected) < ATOL


def test_attention_weights_within_one_window_are_llama_eager_weights():
    model, ids = make_model(), random_ids(2, L)
    llama = LlamaForCausalLM(llama_config_like(model.config, tie_word_embeddings=False)).eval()
    llama.load_state_dict(model.state_dict())
    llama.config._attn_implementation = "eager"
    with torch.no_grad():
        ours, theirs = model(ids, output_attentions=True).attentions, llama(ids, output_attentions=True).attentions
    for a, b in zip(ours, theirs, strict=True):
        assert max_err(a, b) < 1e-6


def test_attention_weights_while_decoding():
    """generate(output_attentions=True): the prompt step covers the prompt, each later step one query over every
    position so far (the local context overflows twice on the way, docs/inference.md#flush)."""
    model, ids = make_model(), random_ids(2, 3 * W + 3)
    out = model.generate(ids, max_new_tokens=FLUSHING_STEPS // 2, output_attentions=True, return_dict_in_generate=True)
    T = ids.shape[1]
    assert len(out.attentions) == FLUSHING_STEPS // 2
    for step, attentions in enumerate(out.attentions):
        queries, positions = (T, T) if step == 0 else (1, T + step)
        for a in attentions:
            assert a.shape == (2, model.config.num_attention_heads, queries, positions)
            torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))


def test_config_output_attentions_is_honoured():
    """transformers allows config.output_attentions with eager attention only; then every call returns weights."""
    model, ids = make_model(), random_ids(2, 3 * W + 3)
    model.config._attn_implementation = "eager"
    model.config.output_attentions = True
    assert len(model(ids).attentions) == model.config.num_hidden_layers


def test_attention_weights_refused_with_top_k_and_crossbatch():
    model, ids = make_model(mem_top_k=2), random_ids(1, 3 * W + 3)
    with pytest.raises(ValueError, match="mem_top_k=None"):
        model(ids, output_attentions=True)
    assert model.config._attn_implementation == "sdpa"  # restored after the refused call
    with pytest.raises(ValueError, match="crossbatch"):
        model(random_ids(2, W), output_attentions=True, cross_batch_rows=torch.tensor([[-1], [0]]))


# --------------------------------------------------------------------------- cropping: assisted decoding


def test_cropping_the_local_context_restores_the_session():
    """Feeding tokens and cropping them again leaves the session that never saw them: the same next logits."""
    model, prompt, tail = make_model(), random_ids(1, 3 * W + 3), random_ids(1, 3, seed=1)
    with torch.no_grad():
        cropped = model(prompt, use_cache=True).cache
        model(tail, cache=cropped)  # 4 + 3 tokens: the local context does not overflow
        cropped.crop(-2)  # transformers >= 5.24 spelling: remove the last 2
        clean = model(prompt, use_cache=True).cache
        model(tail[:, :1], cache=clean)
        assert cropped.get_seq_length() == clean.get_seq_length() == prompt.shape[1] + 1
        assert cropped.local_length == clean.local_length and cropped.memory_length() == clean.memory_length()
        nxt = random_ids(1, 2, seed=2)
        # the kept token's keys came from a 3-token call here and a 1-token call there: equal up to float rounding
        assert max_err(model(nxt, cache=cropped).logits, model(nxt, cache=clean).logits) < 1e-5
        cropped.crop(cropped.get_seq_length() - 1)  # the older spelling: keep all but the last token
        assert cropped.get_seq_length() == prompt.shape[1] + 2


def test_cropping_into_memory_is_a_clear_error():
    model, prompt = make_model(), random_ids(1, 3 * W + 3)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).cache
    with pytest.raises(ValueError, match="only its 4 newest tokens are in the local context"):
        cache.crop(-5)
    assert cache.get_seq_length() == prompt.shape[1] and cache.local_length == L  # nothing was removed


@pytest.mark.parametrize("prompt", [2, 3 * W + 3])
def test_prompt_lookup_decoding(prompt):
    """Prompt-lookup (assisted) decoding runs, its rejected drafts cropped from the local context. Within the final
    window it gives greedy decoding's tokens; beyond it a draft is read in the same call as the tokens before it (the
    prompt, or a continuing session, docs/inference.md#continuing-sessions), so the tokens may differ."""
    model, ids = make_model(), torch.randint(3, 12, (1, prompt), generator=torch.Generator().manual_seed(3))
    new = 2 if prompt + 2 <= L else 12
    greedy = model.generate(ids, max_new_tokens=new, do_sample=False)
    assisted = model.generate(ids, max_new_tokens=new, do_sample=False, prompt_lookup_num_tokens=2)
    assert assisted.shape == greedy.shape == (1, prompt + new)
    assert prompt + new > L or torch.equal(assisted, greedy)
