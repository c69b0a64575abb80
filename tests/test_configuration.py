"""LongLlamaConfig: the published defaults, validation, the published config.json files, and the checkpoint layout
(docs/inference.md#checkpoint)."""

import json

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

import longllama
from longllama import LongLlamaConfig, LongLlamaForCausalLM
from longllama.modeling import modeling_longllama

from conftest import tiny_config

# --------------------------------------------------------------------------------------------------------------------
# defaults
# --------------------------------------------------------------------------------------------------------------------

PUBLISHED_DEFAULTS = {
    "mem_layers": [],
    "mem_positionals": True,
    "mem_dtype": "bfloat16",
    "mem_attention_grouping": None,
    "last_context_length": 1024,
    "torch_attention": False,
    "gradient_checkpoint_every_ith": 1,
    "max_position_embeddings": 2048,
}


@pytest.mark.parametrize("name, default", PUBLISHED_DEFAULTS.items(), ids=list(PUBLISHED_DEFAULTS))
def test_spec_default(name, default):
    config = LongLlamaConfig()
    assert getattr(config, name) == default
    assert type(getattr(config, name)) is type(default)


def test_default_memory_kernel_is_blockwise():
    assert LongLlamaConfig().mem_attention_implementation == "blockwise"
    assert LongLlamaConfig().mem_torch_dtype is torch.bfloat16


def test_kernel_is_blockwise_unless_given():
    # torch_attention=True (published code-model configs) must not select a kernel that concatenates the memory
    assert LongLlamaConfig(torch_attention=True).mem_attention_implementation == "blockwise"
    assert LongLlamaConfig(torch_attention=False).mem_attention_implementation == "blockwise"
    explicit = LongLlamaConfig(torch_attention=True, mem_attention_implementation="eager")
    assert explicit.mem_attention_implementation == "eager"
    assert LongLlamaConfig(torch_attention=False, mem_attention_implementation="sdpa").mem_attention_implementation == "sdpa"


def test_default_is_plain_llama_layout():
    config = LongLlamaConfig()
    assert config.model_type == "longllama"
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.tie_word_embeddings is False


# --------------------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------------------

BAD_VALUES = [
    # (overrides of tiny_config, text that the error message must contain)
    pytest.param({"mem_layers": [4]}, "4", id="mem_layers-too-large"),
    pytest.param({"mem_layers": [1, 17]}, "17", id="mem_layers-far-too-large"),
    pytest.param({"mem_layers": [-1]}, "-1", id="mem_layers-negative"),
    pytest.param({"mem_layers": [2, 2]}, "[2, 2]", id="mem_layers-duplicate"),
    pytest.param({"mem_dtype": "bf16"}, "bf16", id="mem_dtype-unknown"),
    pytest.param({"mem_dtype": "int16"}, "int16", id="mem_dtype-int"),
    pytest.param({"mem_top_k": 0}, "mem_top_k", id="mem_top_k-0"),
    pytest.param({"mem_index": "annoy"}, "annoy", id="mem_index"),
    pytest.param({"mem_max_tokens": 7}, "mem_max_tokens=7", id="mem_max_tokens-below-window"),
    pytest.param({"mem_keep_first": -1}, "mem_keep_first", id="mem_keep_first"),
    pytest.param({"mem_attention_grouping": [1]}, "[1]", id="grouping-one-element"),
    pytest.param({"mem_attention_grouping": [0, 4]}, "[0, 4]", id="grouping-zero"),
    pytest.param({"mem_attention_grouping": [1, 2, 3]}, "[1, 2, 3]", id="grouping-three-elements"),
    pytest.param({"mem_attention_grouping": "x"}, "x", id="grouping-string"),
    pytest.param({"mem_attention_grouping": [1.5, 2]}, "1.5", id="grouping-float"),
    pytest.param({"mem_attention_grouping": 5}, "5", id="grouping-int"),
    pytest.param({"last_context_length": 0}, "0", id="last_context_length-zero"),
    pytest.param({"last_context_length": -5}, "-5", id="last_context_length-negative"),
    pytest.param({"mem_attention_implementation": "flash"}, "flash", id="kernel-unknown"),
    pytest.param({"num_attention_heads": 4, "num_key_value_heads": 3}, "3", id="heads-not-multiple-of-kv-heads"),
]


@pytest.mark.parametrize("overrides, named", BAD_VALUES)
def test_validation_raises_value_error_naming_the_value(overrides, named):
    with pytest.raises(ValueError) as info:
        tiny_config(**overrides)
    assert named in str(info.value)


SET_AFTER_CONSTRUCTION = [
    ("mem_max_tokens", 5, "mem_max_tokens=5"),
    ("mem_layers", [7], "mem_layers contains 7"),
    ("mem_dtype", "bf16", "bf16"),
    ("mem_top_k", 0, "mem_top_k=0"),
    ("mem_keep_first", 20, "mem_keep_first=20"),
    ("last_context_length", 0, "last_context_length=0"),
    ("max_position_embeddings", 20, "mem_max_tokens=16"),  # a bounded memory must hold a window
]


@pytest.mark.parametrize("name, value, named", SET_AFTER_CONSTRUCTION, ids=[c[0] for c in SET_AFTER_CONSTRUCTION])
def test_a_field_set_after_construction_is_validated_and_left_unchanged(tmp_path, name, value, named):
    """On a new config and on one loaded from config.json: the bad value raises and the config keeps its old one."""
    config = tiny_config(mem_max_tokens=16)
    config.save_pretrained(tmp_path)
    for target in (config, LongLlamaConfig.from_pretrained(tmp_path)):
        before = getattr(target, name)
        with pytest.raises(ValueError, match=named):
            setattr(target, name, value)
        assert getattr(target, name) == before
        target.validate_longllama()
    config.mem_max_tokens = None  # a good value is taken
    config.last_context_length = 8
    assert (config.mem_max_tokens, config.last_context_length) == (None, 8)
    assert "_post_init_done" not in json.loads(config.to_json_string())


def test_valid_non_default_values_are_accepted():
    config = tiny_config(
        mem_layers=[3, 0],
        mem_dtype="float16",
        mem_attention_grouping=[2, 3],
        last_context_length=1,
        num_key_value_heads=2,
        mem_positionals=False,
    )
    assert config.mem_layers == [0, 3]
    assert config.mem_attention_grouping == [2, 3]
    assert config.mem_torch_dtype is torch.float16
    assert config.head_dim == 8


# --------------------------------------------------------------------------------------------------------------------
# published config.json files (docs/inference.md#checkpoint)
# --------------------------------------------------------------------------------------------------------------------

PUBLISHED_AUTO_MAP = {
    "AutoConfig": "configuration_longllama.LongLlamaConfig",
    "AutoModel": "modeling_longllama.LongLlamaModel",
    "AutoModelForCausalLM": "modeling_longllama.LongLlamaForCausalLM",
    "AutoModelForSequenceClassification": "modeling_longllama.LongLlamaForSequenceClassification",
}


def published_config(name: str) -> dict:
    """A config.json in the format of the published checkpoints (transformers 4.30, no GQA field)."""
    config = {
        "architectures": ["LongLlamaForCausalLM"],
        "auto_map": dict(PUBLISHED_AUTO_MAP),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "gradient_checkpoint_every_ith": 1,
        "hidden_act": "silu",
        "hidden_size": 3200,
        "initializer_range": 0.02,
        "intermediate_size": 8640,
        "last_context_length": 1024,
        "max_position_embeddings": 2048,
        "mem_attention_grouping": [4, 2048],
        "mem_dtype": "bfloat16",
        "mem_layers": [6, 12, 18],
        "mem_positionals": True,
        "model_type": "longllama",
        "num_attention_heads": 32,
        "num_hidden_layers": 26,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_attention": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.30.0",
        "use_cache": True,
        "vocab_size": 32000,
    }
    if name == "long_llama_code_7b":
        config.update(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            vocab_size=32016,
            max_position_embeddings=4096,
            mem_layers=[8, 16, 24],
            last_context_length=3072,
            rope_theta=1000000.0,
        )
    else:
        assert name == "long_llama_3b"
    return config


PUBLISHED = ["long_llama_3b", "long_llama_code_7b"]
HEAD_DIM = {"long_llama_3b": 100, "long_llama_code_7b": 128}


def write_config(directory, config: dict):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_loads_unchanged(tmp_path, name):
    published = published_config(name)
    config = AutoConfig.from_pretrained(write_config(tmp_path / name, published))

    assert isinstance(config, LongLlamaConfig)
    for field in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "max_position_embeddings",
        "mem_layers",
        "mem_dtype",
        "mem_attention_grouping",
        "mem_positionals",
        "last_context_length",
        "torch_attention",
        "gradient_checkpoint_every_ith",
        "rms_norm_eps",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "hidden_act",
    ]:
        assert getattr(config, field) == published[field], field
    assert config.num_key_value_heads == config.num_attention_heads == 32
    assert config.head_dim == HEAD_DIM[name]
    assert config.rope_parameters["rope_theta"] == published["rope_theta"]
    assert config.rope_parameters.get("rope_type", "default") == "default"
    assert config.dtype == torch.bfloat16
    assert config.mem_attention_implementation == "blockwise"
    assert config.architectures == ["LongLlamaForCausalLM"]


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_round_trip(tmp_path, name):
    config = AutoConfig.from_pretrained(write_config(tmp_path / "published", published_config(name)))
    config.save_pretrained(tmp_path / "saved")
    reloaded = AutoConfig.from_pretrained(tmp_path / "saved")

    assert type(reloaded) is type(config)
    original, again = config.to_dict(), reloaded.to_dict()
    for d in (original, again):
        d.pop("_name_or_path", None)
        d.pop("transformers_version", None)
    assert again == original

    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == "longllama"
    assert saved["mem_layers"] == published_config(name)["mem_layers"]
    auto_map = saved["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_longllama.LongLlamaConfig"
    assert auto_map["AutoModel"] == "modeling_longllama.LongLlamaModel"
    assert auto_map["AutoModelForCausalLM"] == "modeling_longllama.LongLlamaForCausalLM"
    # everything the saved auto_map names must exist in the code files that ship with a checkpoint
    for reference in auto_map.values():
        module, cls = reference.split(".")
        assert module in ("configuration_longllama", "modeling_longllama")
        shipped = longllama.modeling.configuration_longllama if module == "configuration_longllama" else modeling_longllama
        assert hasattr(shipped, cls), f"auto_map names {reference}, which is not shipped"


def test_tiny_config_round_trip(tmp_path):
    config = tiny_config(
        mem_layers=[0, 2], mem_dtype="float16", mem_attention_grouping=[2, 5], torch_attention=True,
        mem_attention_implementation="sdpa",
    )
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    original, again = config.to_dict(), reloaded.to_dict()
    for d in (original, again):
        d.pop("_name_or_path", None)
    assert again == original
    assert reloaded.mem_attention_implementation == "sdpa"
    assert reloaded.torch_attention is True


# --------------------------------------------------------------------------------------------------------------------
# full-size layouts on the meta device: exactly Llama's parameters
# --------------------------------------------------------------------------------------------------------------------


def llama_equivalent(published: dict) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=published["hidden_size"],
        intermediate_size=published["intermediate_size"],
        num_hidden_layers=published["num_hidden_layers"],
        num_attention_heads=published["num_attention_heads"],
        num_key_value_heads=published["num_attention_heads"],
        vocab_size=published["vocab_size"],
        max_position_embeddings=published["max_position_embeddings"],
        rms_norm_eps=published["rms_norm_eps"],
        tie_word_embeddings=False,
    )


@pytest.mark.parametrize("name", PUBLISHED)
def test_full_size_model_has_exactly_llama_parameters(tmp_path, name):
    published = published_config(name)
    config = AutoConfig.from_pretrained(write_config(tmp_path, published))
    with torch.device("meta"):
        model = LongLlamaForCausalLM(config)
        llama = LlamaForCausalLM(llama_equivalent(published))

    ours = {n: tuple(p.shape) for n, p in model.named_parameters()}
    theirs = {n: tuple(p.shape) for n, p in llama.named_parameters()}
    assert sorted(ours) == sorted(theirs)
    assert ours == theirs
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == {
        n: tuple(t.shape) for n, t in llama.state_dict().items()
    }
    # memory layers are LongLLaMA layers, the others stock Llama layers, and they hold the same parameters
    for idx, layer in enumerate(model.model.layers):
        is_memory = idx in published["mem_layers"]
        assert isinstance(layer, modeling_longllama.LongLlamaDecoderLayer) == is_memory
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    total = sum(p.numel() for p in model.parameters())
    assert total == sum(p.numel() for p in llama.parameters())
