"""What transformers' ModelTesterMixin checks of every causal LM, written for this project (not vendored), in two
configurations: `one_window` (the input fits the final window: LongLLaMA must equal `LlamaForCausalLM`) and `windows`
(a window of 8 tokens and a final window of 4: the input goes through memory). Generation modes and outputs are in
tests/test_generate_modes.py; save/load, dtype and device maps in tests/test_checkpoints.py.
"""

import pytest
import torch
from conftest import llama_config_like, max_err, tiny_model
from transformers import LlamaForCausalLM

CONFIGS = {
    # name: (model overrides, tokens)
    "one_window": (dict(max_position_embeddings=32, last_context_length=32), 9),
    "windows": (dict(), 19),
}


def model_and_ids(config: str, **overrides):
    options, tokens = CONFIGS[config]
    model = tiny_model(0, mem_layers=[1, 3], **options, **overrides)
    return model, torch.randint(3, 99, (2, tokens), generator=torch.Generator().manual_seed(5))


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("config", list(CONFIGS))
def test_batch_rows_are_independent(config):
    model, ids = model_and_ids(config)
    rows = torch.cat([logits(model, ids[i : i + 1]) for i in range(len(ids))])
    assert max_err(logits(model, ids), rows) < 1e-5


@pytest.mark.parametrize("config", list(CONFIGS))
def test_full_attention_mask_and_inputs_embeds_change_nothing(config):
    model, ids = model_and_ids(config)
    expected = logits(model, ids)
    assert torch.equal(logits(model, ids, attention_mask=torch.ones_like(ids)), expected)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        assert torch.equal(model(inputs_embeds=embeds).logits, expected)


def test_one_window_is_llama_forward_and_backward():
    """Logits, loss and every parameter's gradient equal Llama's with the same weights."""
    model, ids = model_and_ids("one_window")
    llama = LlamaForCausalLM(llama_config_like(model.config, tie_word_embeddings=False))
    llama.load_state_dict(model.state_dict())
    losses = []
    for m in (model, llama):
        m.train()
        out = m(ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss)
    assert max_err(losses[0], losses[1]) < 1e-6
    theirs = dict(llama.named_parameters())
    for name, param in model.named_parameters():
        assert max_err(param.grad, theirs[name].grad) < 1e-5, name
    assert model.num_parameters() == llama.num_parameters()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_training_step_reaches_every_parameter(config):
    """A loss over several windows trains the layers through memory: every weight gets a gradient."""
    model, ids = model_and_ids(config)
    model.train()
    model(ids, labels=ids).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_gradient_checkpointing_changes_no_gradient():
    model, ids = model_and_ids("one_window")
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        model(ids, labels=ids, use_cache=False).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name in grads[0]:
        assert max_err(grads[0][name], grads[1][name]) < 1e-6, name


@pytest.mark.parametrize("config", list(CONFIGS))
def test_resize_token_embeddings(config):
    model, ids = model_and_ids(config)
    expected = logits(model, ids)
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == 120 and model.get_output_embeddings().weight.shape[0] == 120
    resized = logits(model, ids)
    assert resized.shape[-1] == 120 and max_err(resized[..., :99], expected) < 1e-5


@pytest.mark.parametrize("config", list(CONFIGS))
def test_tied_embeddings(config):
    model, ids = model_and_ids(config, tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert logits(model, ids).shape == (2, ids.shape[1], 99)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_config_switches_are_honoured(config):
    """config.output_hidden_states and config.return_dict act like the call arguments."""
    model, ids = model_and_ids(config)
    model.config.output_hidden_states = True
    with torch.no_grad():
        assert len(model(ids).hidden_states) == model.config.num_hidden_layers + 1
        model.config.return_dict = False
        assert isinstance(model(ids), tuple)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_bfloat16_model(config):
    model, ids = model_and_ids(config)
    expected = logits(model, ids)
    model = model.to(torch.bfloat16)
    actual = logits(model, ids)
    assert actual.dtype == torch.bfloat16 and max_err(actual, expected) < 0.1 * expected.abs().max()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_torch_compile_gives_the_same_logits(config, checkpoint_kernels):
    """torch.compile of the whole model (the eager backend: Dynamo's tracing, without a C++ compiler)."""
    model, ids = model_and_ids(config)
    expected = logits(model, ids)
    compiled = torch.compile(model, backend="eager")
    assert max_err(logits(compiled, ids), expected) < 1e-6


def test_decode_step_traces_without_graph_breaks():
    """A token-by-token decode step (memory, local context, windows) is one graph for torch.compile: no tensor-valued
    branch, progress bar or `.item()` on the way (docs/inference.md, "Compiling the decode step")."""
    import torch._dynamo

    model, ids = model_and_ids("windows")
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        step = lambda token: model(token, cache=cache, logits_to_keep=1).logits  # noqa: E731
        explanation = torch._dynamo.explain(step)(ids[:, -1:])
    assert explanation.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explanation.break_reasons]


@pytest.mark.slow
def test_compiled_decoding_equals_eager_decoding(checkpoint_kernels):
    """torch.compile(model.forward, dynamic=True) over 20 greedy steps with two flushes: the same tokens and logits,
    recompiled a bounded number of times (the flush step and the first steps after it specialise)."""
    from torch._dynamo.utils import counters

    counters.clear()
    model, ids = model_and_ids("windows")
    compiled = torch.compile(model.forward, dynamic=True)
    with torch.no_grad():
        eager_cache, compiled_cache = model(ids, use_cache=True).cache, model(ids, use_cache=True).cache
        token = compiled_token = ids[:, -1:]
        for _ in range(20):
            expected = model(token, cache=eager_cache, logits_to_keep=1).logits
            actual = compiled(compiled_token, cache=compiled_cache, logits_to_keep=1).logits
            assert max_err(actual, expected) < 1e-5
            token, compiled_token = expected.argmax(-1), actual.argmax(-1)
    assert counters["stats"]["unique_graphs"] <= 4
