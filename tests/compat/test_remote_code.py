"""Checkpoints written by the package load as remote code under other transformers versions (`.ci/compat`).

Run in an environment with only torch, transformers, safetensors, sentencepiece and pytest (not the package):

    LONGLLAMA_COMPAT_CHECKPOINTS=DIR python -m pytest -q -p no:cacheprovider tests/compat

where DIR was filled by `write_checkpoints.py` under the package's transformers. Each checkpoint must give the same
logits (1e-5) and the same greedy tokens as there, windows and memory included, and a second `generate()` must
continue the session held by the first one's cache.
"""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import BaseModelOutputWithPast

CHECKPOINTS = Path(os.environ.get("LONGLLAMA_COMPAT_CHECKPOINTS", "/nonexistent"))
CASES = sorted(p.name for p in CHECKPOINTS.iterdir() if (p / "config.json").is_file()) if CHECKPOINTS.is_dir() else []
ATOL = 1e-5
torch.set_num_threads(1)  # as write_checkpoints.py (tiny tensors; the same reduction order)
# the name of the cache in generate() and its outputs: `cache` from transformers 5.24, `past_key_values` before
CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def test_package_is_not_importable():
    with pytest.raises(ImportError):
        import longllama  # noqa: F401


def test_checkpoints_were_written():
    assert CASES, f"no checkpoints in {CHECKPOINTS} (set LONGLLAMA_COMPAT_CHECKPOINTS; see write_checkpoints.py)"


@pytest.fixture(scope="module", params=CASES)
def case(request):
    directory = CHECKPOINTS / request.param
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    return model, load_file(directory / "reference.safetensors")


@torch.no_grad()
def test_remote_code_is_loaded(case):
    model, _ = case
    assert type(model).__name__ == "LongLlamaForCausalLM"
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert model.config.mem_layers == [1, 3]


@torch.no_grad()
def test_logits_match(case):
    model, ref = case
    logits = model(ref["ids"]).logits
    assert logits.shape == ref["logits"].shape
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=ATOL)


@torch.no_grad()
def test_greedy_generation_matches(case):
    model, ref = case
    generated = model.generate(ref["ids"], max_new_tokens=12, do_sample=False)
    assert torch.equal(generated, ref["generated"]), (generated[:, -12:], ref["generated"][:, -12:])


@torch.no_grad()
def test_left_padded_generation_matches(case):
    model, ref = case
    generated = model.generate(
        ref["padded_ids"], attention_mask=ref["padded_mask"], max_new_tokens=12, do_sample=False
    )
    assert torch.equal(generated, ref["padded_generated"]), (generated[:, -12:], ref["padded_generated"][:, -12:])


@torch.no_grad()
def test_second_generate_continues_the_session(case):
    model, ref = case
    first = model.generate(ref["ids"], max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert type(getattr(first, CACHE)).__name__ == "LongLlamaCache"
    history = torch.cat([first.sequences, ref["prompt2"]], dim=1)
    continued = model.generate(history, **{CACHE: getattr(first, CACHE)}, max_new_tokens=8, do_sample=False)
    assert torch.equal(continued, ref["continued"]), (continued[:, -8:], ref["continued"][:, -8:])


def test_config_fields_are_validated_when_set(case, tmp_path):
    """The remote-code config validates a LongLLaMA field set after construction (the `__setattr__` of
    configuration_longllama.py, on strict dataclass configs and on the `__init__` shim of older versions alike), keeps
    the old value, and saves no flag of its own."""
    import json

    config = case[0].config
    with pytest.raises(ValueError, match="mem_max_tokens=5"):
        config.mem_max_tokens = 5
    with pytest.raises(ValueError, match="last_context_length=0"):
        config.last_context_length = 0
    assert config.mem_max_tokens is None
    config.save_pretrained(tmp_path)
    assert "_post_init_done" not in json.loads((tmp_path / "config.json").read_text())

