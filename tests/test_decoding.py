"""Static decoding (longllama/decoding.py, docs/inference.md#static-decoding): a static session decodes exactly as a
plain one, across flushes, padding, beams and top-k, and every decode step runs one graph compiled once.

Most tests compile with the "aot_eager" backend (dynamo's tracing, the graph and the opaque memory operator, without
inductor's code generation, which takes tens of seconds); one runs inductor end to end.
"""

import pytest
import torch
from conftest import tiny_model
from torch._dynamo.utils import counters

from longllama import LongLlamaCache, decoding
from longllama.modeling import modeling_longllama


@pytest.fixture
def backend(monkeypatch):
    """Compile with `aot_eager`, from a clean dynamo state; returns a function that counts the graphs compiled."""
    monkeypatch.setitem(decoding.COMPILE_OPTIONS, "backend", "aot_eager")
    torch._dynamo.reset()
    decoding._compiled.clear()
    counters.clear()
    yield lambda: counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    decoding._compiled.clear()


def make_model(**overrides):
    model = tiny_model(**overrides)
    model.generation_config.eos_token_id = None  # always the requested number of steps
    return model


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 99, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate_both(model, ids, **kwargs):
    """(plain, static) `generate()` outputs with scores."""
    kwargs = dict(max_new_tokens=21, do_sample=False, output_scores=True, return_dict_in_generate=True, **kwargs)
    with torch.no_grad():
        return model.generate(ids, **kwargs), model.generate(ids, cache_implementation="static", **kwargs)


def assert_same_generation(plain, static):
    assert torch.equal(plain.sequences, static.sequences)
    for expected, actual in zip(plain.scores, static.scores):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"mem_dtype": "bfloat16"}, {"mem_dtype": "int8"}, {"mem_positionals": False}, {"num_key_value_heads": 2},
     {"mem_layers": [0, 3]}, {"mem_top_k": 3}],
    ids=["fp32-memory", "bf16-memory", "int8-memory", "no-rotary-in-memory", "gqa", "two-memory-layers", "top-k"],
)
def test_static_generation_equals_plain_generation(backend, overrides):
    """Window 8, last_context_length 4: 21 decoded tokens cross several flushes into memory."""
    model = make_model(**overrides)
    assert_same_generation(*generate_both(model, random_ids(2, 13)))
    assert backend() == 1


def test_static_generation_with_left_padding(backend):
    model = make_model()
    ids = random_ids(2, 11)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    assert_same_generation(*generate_both(model, ids, attention_mask=mask, pad_token_id=0))


def test_static_beam_search_and_return_sequences(backend):
    model = make_model()
    plain, static = generate_both(model, random_ids(2, 13), num_beams=3, num_return_sequences=2)
    assert torch.equal(plain.sequences, static.sequences)


def test_one_graph_for_every_step_session_and_flush(backend):
    """Steps before and after flushes, a second session, a session continued by a multi-token call."""
    model = make_model()
    with torch.no_grad():
        for seed in range(2):
            cache = LongLlamaCache(model.config, static=True)
            logits = model(random_ids(1, 6, seed), cache=cache).logits
            for _ in range(12):
                logits = model(logits[:, -1:].argmax(-1), cache=cache).logits
            logits = model(random_ids(1, 5, seed + 7), cache=cache).logits  # eager: several tokens
            for _ in range(5):
                logits = model(logits[:, -1:].argmax(-1), cache=cache).logits
    assert backend() == 1


def test_static_steps_equal_plain_steps_logit_by_logit(backend):
    model = make_model(mem_top_k=2)
    prompt = random_ids(2, 10)
    with torch.no_grad():
        plain, static = LongLlamaCache(model.config), LongLlamaCache(model.config, static=True)
        expected, actual = model(prompt, cache=plain).logits, model(prompt, cache=static).logits
        for _ in range(15):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)
            token = expected[:, -1:].argmax(-1)
            expected, actual = model(token, cache=plain).logits, model(token, cache=static).logits
    assert static.seen_tokens == plain.seen_tokens and static.local_length == plain.local_length
    torch.testing.assert_close(static.layers[1].memory(), plain.layers[1].memory())


def test_outputs_that_need_every_layer_and_gradients_run_eagerly(backend):
    model = make_model()
    cache = LongLlamaCache(model.config, static=True)
    with torch.no_grad():
        model(random_ids(1, 6), cache=cache)
        out = model(random_ids(1, 1, 3), cache=cache, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 5 and len(out.attentions) == 4
    model(random_ids(1, 1, 4), cache=cache).logits.sum().backward()  # gradients: the eager layers
    assert model.lm_head.weight.grad is not None
    assert counters["stats"]["unique_graphs"] == 0


def test_static_decoding_without_the_package_says_what_to_do(backend, monkeypatch):
    monkeypatch.setattr(modeling_longllama, "DECODE_STEP", None)
    model = make_model()
    with pytest.raises(ImportError, match="pip install longllama"):
        model.generate(random_ids(1, 5), max_new_tokens=2, cache_implementation="static")


def test_static_from_the_generation_config(backend):
    model = make_model()
    model.generation_config.cache_implementation = "static"
    with torch.no_grad():
        model.generate(random_ids(1, 5), max_new_tokens=3)
    assert counters["stats"]["unique_graphs"] == 1
    assert model.generation_config.cache_implementation == "static"  # the model's config is left as it was


def test_inductor_compiles_one_graph_with_the_same_tokens():
    torch._dynamo.reset()
    decoding._compiled.clear()
    counters.clear()
    model = make_model(mem_dtype="bfloat16")
    assert_same_generation(*generate_both(model, random_ids(2, 13)))
    assert counters["stats"]["unique_graphs"] == 1
