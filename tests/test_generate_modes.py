"""Every generate() mode and output a transformers user relies on, in the spirit of transformers' own
GenerationTesterMixin (checks written for this project, not vendored), in two configurations:

- `one_window`: prompt and generated tokens fit the final window, so LongLLaMA must *be* Llama: the same tokens,
  scores, logits, hidden states and attention weights as `LlamaForCausalLM` with the same weights;
- `windows`: a window of 8 tokens and a final window of 4, so the prompt goes through memory and the local context
  overflows while decoding (docs/inference.md#flush): the outputs must have transformers' structure and agree with
  each other (scores with tokens, one mode with another).
"""

import pytest
import torch
from conftest import llama_config_like, max_err, tiny_model
from transformers import LlamaForCausalLM

from longllama import LongLlamaCache

NEW = 6
CONFIGS = {
    # name: (model overrides, prompt length)
    "one_window": (dict(max_position_embeddings=32, last_context_length=32), 5),
    "windows": (dict(), 19),
}
MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=5),
    "beam": dict(num_beams=2, do_sample=False),
    "beam_sample": dict(num_beams=2, do_sample=True),
    "return_sequences": dict(num_return_sequences=2, do_sample=True),
    "prompt_lookup": dict(do_sample=False, prompt_lookup_num_tokens=2),
}
OUTPUTS = dict(
    return_dict_in_generate=True, output_scores=True, output_logits=True, output_hidden_states=True,
    output_attentions=True,
)


def models(config: str):
    overrides, prompt = CONFIGS[config]
    model = tiny_model(0, mem_layers=[1, 3], **overrides)
    model.generation_config.eos_token_id = None  # always NEW tokens
    llama = LlamaForCausalLM(llama_config_like(model.config, tie_word_embeddings=False)).eval()
    llama.load_state_dict(model.state_dict())
    llama.config._attn_implementation = "eager"  # the implementation that returns attention weights
    llama.generation_config.eos_token_id = None
    ids = torch.randint(3, 99, (2, prompt), generator=torch.Generator().manual_seed(7))
    return model, llama, ids


def generate(model, ids, mode, **kwargs):
    torch.manual_seed(0)
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, pad_token_id=0, **MODES[mode], **kwargs)


def rows(mode: str) -> int:
    return 2 * MODES[mode].get("num_return_sequences", 1)


@pytest.mark.parametrize("mode", list(MODES))
def test_one_window_is_llama(mode):
    model, llama, ids = models("one_window")
    ids = ids[:1] if mode == "prompt_lookup" else ids  # transformers' assisted decoding takes one row
    ours, theirs = generate(model, ids, mode, **OUTPUTS), generate(llama, ids, mode, **OUTPUTS)
    assert torch.equal(ours.sequences, theirs.sequences)
    for name in ("scores", "logits"):
        assert len(getattr(ours, name)) == len(getattr(theirs, name)) == NEW
        for a, b in zip(getattr(ours, name), getattr(theirs, name)):
            finite = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), finite) and max_err(a[finite], b[finite]) < 1e-4
    for name in ("hidden_states", "attentions"):  # per step, per layer
        for step_a, step_b in zip(getattr(ours, name), getattr(theirs, name), strict=True):
            for a, b in zip(step_a, step_b, strict=True):
                assert a.shape == b.shape and max_err(a, b) < 1e-4, name


@pytest.mark.parametrize("mode", [m for m in MODES if m != "prompt_lookup"])
def test_outputs_have_the_transformers_structure(mode):
    """Across windows and flushes: transformers' shapes for every output of every step, and the session cache."""
    model, _, ids = models("windows")
    out = generate(model, ids, mode, **OUTPUTS)
    B, T, H, L = rows(mode), ids.shape[1], model.config.num_attention_heads, model.config.num_hidden_layers
    expanded = 2 * max(MODES[mode].get("num_beams", 1), MODES[mode].get("num_return_sequences", 1))  # rows decoded
    assert out.sequences.shape == (B, T + NEW) and torch.equal(out.sequences[:, :T], ids.repeat_interleave(B // 2, 0))
    assert len(out.scores) == len(out.logits) == len(out.hidden_states) == len(out.attentions) == NEW
    assert all(s.shape == (expanded, 99) for s in out.scores + out.logits)
    for step, (states, weights) in enumerate(zip(out.hidden_states, out.attentions)):
        queries, positions = (T, T) if step == 0 else (1, T + step)
        assert len(states) == L + 1 and len(weights) == L
        assert all(s.shape == (expanded, queries, model.config.hidden_size) for s in states)
        assert all(w.shape == (expanded, H, queries, positions) for w in weights)
        for w in weights:
            torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    assert isinstance(out.past_key_values, LongLlamaCache)
    assert out.past_key_values.get_seq_length() == T + NEW - 1  # the last token is never fed back


def test_greedy_scores_and_logits_give_the_tokens():
    model, _, ids = models("windows")
    out = generate(model, ids, "greedy", **OUTPUTS)
    chosen = torch.stack([s.argmax(-1) for s in out.scores], 1)
    assert torch.equal(chosen, out.sequences[:, ids.shape[1]:])
    assert all(torch.equal(score, logit) for score, logit in zip(out.scores, out.logits))  # no logits processor in greedy


@pytest.mark.parametrize("config", list(CONFIGS))
def test_modes_agree_with_each_other(config):
    """One beam is greedy; sampling is reproducible under a seed; outputs do not change the tokens."""
    model, _, ids = models(config)
    greedy = generate(model, ids, "greedy")
    assert torch.equal(generate(model, ids, "greedy", num_beams=1), greedy)
    assert torch.equal(generate(model, ids, "greedy", **OUTPUTS).sequences, greedy)
    assert torch.equal(generate(model, ids, "sample"), generate(model, ids, "sample"))
    assert torch.equal(generate(model, ids, "beam", **OUTPUTS).sequences, generate(model, ids, "beam"))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_generate_from_inputs_embeds(config):
    """inputs_embeds instead of input_ids: the same new tokens (transformers returns only those)."""
    model, _, ids = models(config)
    embeds = model.get_input_embeddings()(ids)
    assert torch.equal(generate(model, None, "greedy", inputs_embeds=embeds), generate(model, ids, "greedy")[:, -NEW:])
