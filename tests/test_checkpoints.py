"""Checkpoint directories (docs/inference.md#checkpoint, #beyond): save/load round trips, remote code without the
package, the drop-in Llama property, the published format (pytorch_model.bin with rotary buffers) and dtype /
meta-device loading."""

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import longllama  # noqa: F401  (registers the longllama model type)
from longllama import LongLlamaForCausalLM
from longllama.modeling.cache_longllama import MemoryCacheLayer

from conftest import CODE_FILES, IMPORT_BLOCKER, MODELING_DIR, checkpoint_kernels_only, llama_config_like, tiny_model

# tiny_config: window 8, last_context_length 4; 30 tokens are 4 windows to memory plus the final local window
NUM_TOKENS = 30


def input_ids(batch: int = 2, tokens: int = NUM_TOKENS, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 99, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def logits_of(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


def llama_state_dict_names(config) -> set[str]:
    """State-dict names of the equivalent transformers LlamaForCausalLM (the checkpoint format)."""
    llama_config = llama_config_like(config, tie_word_embeddings=False)
    with torch.device("meta"):
        return set(LlamaForCausalLM(llama_config).state_dict())


@contextmanager
def captured_transformers_logs():
    """Records of the `transformers` logger (it does not propagate to the root logger, so caplog misses them)."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(level=logging.DEBUG)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny LongLLaMA (memory in layers 1 and 3, bf16 memory) saved with save_pretrained, with its fp32 logits."""
    model = tiny_model(0, mem_layers=[1, 3], mem_dtype="bfloat16")
    directory = tmp_path_factory.mktemp("longllama_tiny")
    model.save_pretrained(directory)
    ids = input_ids()
    # and the logits of the checkpoint code's own kernels, which a remote-code load runs: the package's compiled
    # memory attention gives the same up to float rounding (tests/test_attention.py), not bit for bit
    with checkpoint_kernels_only():
        checkpoint_logits = logits_of(model, ids)
    return {"model": model, "dir": directory, "ids": ids, "logits": logits_of(model, ids),
            "checkpoint_logits": checkpoint_logits}


# --------------------------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained
# --------------------------------------------------------------------------------------------------------------------


def test_save_pretrained_writes_a_remote_code_checkpoint(saved):
    directory = saved["dir"]
    weights = sorted(directory.glob("model*.safetensors"))
    assert weights, sorted(os.listdir(directory))
    assert not list(directory.glob("*.bin"))

    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "longllama"
    assert config["architectures"] == ["LongLlamaForCausalLM"]
    assert config["auto_map"]["AutoConfig"] == "configuration_longllama.LongLlamaConfig"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_longllama.LongLlamaForCausalLM"
    assert config["mem_layers"] == [1, 3] and config["mem_dtype"] == "bfloat16"

    for name in CODE_FILES:
        copied = directory / name
        assert copied.is_file(), name
        assert copied.read_text() == (MODELING_DIR / name).read_text(), f"{name} differs from the package source"


def test_saved_weights_have_exactly_llama_names(saved):
    names = set()
    for path in saved["dir"].glob("model*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            names |= set(f.keys())
    assert names == llama_state_dict_names(saved["model"].config)
    # untied head, saved as such
    with safe_open(str(next(saved["dir"].glob("model*.safetensors"))), framework="pt") as f:
        if "lm_head.weight" in f.keys() and "model.embed_tokens.weight" in f.keys():
            assert not torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))


def test_from_pretrained_round_trip_gives_identical_logits(saved):
    loaded = AutoModelForCausalLM.from_pretrained(saved["dir"]).eval()
    assert type(loaded) is LongLlamaForCausalLM
    assert loaded.config.mem_layers == [1, 3]
    torch.testing.assert_close(logits_of(loaded, saved["ids"]), saved["logits"], rtol=0, atol=0)
    direct = LongLlamaForCausalLM.from_pretrained(saved["dir"]).eval()
    torch.testing.assert_close(logits_of(direct, saved["ids"]), saved["logits"], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------------
# remote code in a process where the package cannot be imported
# --------------------------------------------------------------------------------------------------------------------

CHILD_SCRIPT = IMPORT_BLOCKER + textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        import longllama  # noqa: F401
    except ImportError:
        pass
    else:
        sys.exit("the longllama package is importable in the child")

    directory, ids_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    ids = torch.load(ids_path)
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids[:, :10], max_new_tokens=12, do_sample=False)
    loaded = [name for name in sys.modules if name == "longllama" or name.startswith("longllama.")]
    torch.save(
        {
            "module": type(model).__module__,
            "loaded": loaded,
            "logits": logits,
            "generated": generated,
            "cache": type(model(ids, use_cache=True).cache).__module__,
        },
        out_path,
    )
    """
)


def test_remote_code_loads_without_the_package(saved, tmp_path):
    (tmp_path / "child.py").write_text(CHILD_SCRIPT)
    torch.save(saved["ids"], tmp_path / "ids.pt")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "HF_MODULES_CACHE", "PYTHONSTARTUP")
    }
    env.update(
        PYTHONPATH="",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        TOKENIZERS_PARALLELISM="false",
    )
    result = subprocess.run(
        [sys.executable, str(tmp_path / "child.py"), str(saved["dir"]), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    out = torch.load(tmp_path / "out.pt")

    assert out["module"].startswith("transformers_modules"), out["module"]
    assert out["cache"].startswith("transformers_modules"), out["cache"]
    assert out["loaded"] == []
    torch.testing.assert_close(out["logits"], saved["checkpoint_logits"], rtol=0, atol=1e-6)

    prompt = saved["ids"][:, :10]
    with torch.no_grad():
        expected = saved["model"].generate(prompt, max_new_tokens=12, do_sample=False)
    assert out["generated"].shape == (2, 22)
    assert torch.equal(out["generated"][:, :10], prompt)
    assert torch.equal(out["generated"], expected)


# --------------------------------------------------------------------------------------------------------------------
# drop-in: the same directory is a Llama checkpoint
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("last_context_length", [4, 8])
def test_checkpoint_loads_into_plain_llama(tmp_path, last_context_length):
    """Up to last_context_length tokens LongLLaMA is exactly Llama (docs/inference.md#checkpoint and #short-inputs, 2.9;
    L may equal the window W = 8, never exceed it)."""
    model = tiny_model(6, mem_layers=[1, 2], mem_dtype="bfloat16", last_context_length=last_context_length)
    model.save_pretrained(tmp_path)

    llama, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    llama.eval()
    assert type(llama) is LlamaForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    for tokens in sorted({1, 3, last_context_length}):
        ids = input_ids(tokens=tokens, seed=tokens)
        torch.testing.assert_close(logits_of(llama, ids), logits_of(model, ids), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# the published format: pytorch_model.bin with rotary buffers, 4.30-style config.json, no code files
# --------------------------------------------------------------------------------------------------------------------


def write_published_checkpoint(directory: Path, model, rope_theta: float = 10000.0) -> None:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    state_dict = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    for idx in range(config.num_hidden_layers):
        state_dict[f"model.layers.{idx}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, directory / "pytorch_model.bin")
    published = {
        "architectures": ["LongLlamaForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_longllama.LongLlamaConfig",
            "AutoModel": "modeling_longllama.LongLlamaModel",
            "AutoModelForCausalLM": "modeling_longllama.LongLlamaForCausalLM",
            "AutoModelForSequenceClassification": "modeling_longllama.LongLlamaForSequenceClassification",
        },
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "gradient_checkpoint_every_ith": 1,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "last_context_length": config.last_context_length,
        "max_position_embeddings": config.max_position_embeddings,
        "mem_attention_grouping": [2, 3],
        "mem_dtype": config.mem_dtype,
        "mem_layers": list(config.mem_layers),
        "mem_positionals": True,
        "model_type": "longllama",
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": rope_theta,
        "tie_word_embeddings": False,
        "torch_attention": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.30.0",
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }
    (directory / "config.json").write_text(json.dumps(published, indent=2))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A published-format checkpoint of a tiny model with rope_theta 1e6 (as long_llama_code_7b)."""
    rope_theta = 1e6
    model = tiny_model(
        7, mem_layers=[1, 3], mem_dtype="bfloat16", rope_parameters={"rope_type": "default", "rope_theta": rope_theta}
    )
    directory = tmp_path_factory.mktemp("published")
    write_published_checkpoint(directory, model, rope_theta)
    ids = input_ids(seed=7)
    return {"model": model, "dir": directory, "ids": ids, "logits": logits_of(model, ids), "rope_theta": rope_theta}


def test_published_checkpoint_loads_with_the_package(published):
    directory = published["dir"]
    assert not list(directory.glob("*.py"))
    with captured_transformers_logs() as records, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    model.eval()

    assert isinstance(model, LongLlamaForCausalLM)
    assert type(model).__module__.startswith("longllama.modeling")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not info["error_msgs"]
    complaints = [r.getMessage() for r in records if r.levelno >= logging.WARNING and "inv_freq" in r.getMessage()]
    complaints += [str(w.message) for w in caught if "inv_freq" in str(w.message)]
    assert not complaints, complaints

    config = model.config
    assert config.rope_parameters["rope_theta"] == published["rope_theta"]
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.mem_attention_grouping == [2, 3]
    torch.testing.assert_close(logits_of(model, published["ids"]), published["logits"], rtol=0, atol=1e-6)


def expected_inv_freq(config) -> torch.Tensor:
    theta, dim = config.rope_parameters["rope_theta"], config.head_dim
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


@pytest.mark.parametrize(
    "load_kwargs",
    [{}, {"device_map": "cpu"}, {"low_cpu_mem_usage": True}],
    ids=["default", "device_map-cpu", "low_cpu_mem_usage"],
)
@pytest.mark.parametrize("which", ["saved", "published"])
def test_loading_initialises_rotary_buffers(saved, published, which, load_kwargs):
    source = saved if which == "saved" else published
    model = AutoModelForCausalLM.from_pretrained(source["dir"], dtype=torch.float32, **load_kwargs).eval()
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.device.type == "cpu"
    torch.testing.assert_close(rotary.inv_freq, expected_inv_freq(model.config), rtol=1e-6, atol=0)
    if hasattr(rotary, "original_inv_freq"):
        torch.testing.assert_close(rotary.original_inv_freq, expected_inv_freq(model.config), rtol=1e-6, atol=0)
    assert all(p.device.type == "cpu" for p in model.parameters())
    logits = logits_of(model, source["ids"])
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, source["logits"], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# dtype
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mem_dtype", ["bfloat16", "float32"])
def test_bfloat16_model_stores_memory_in_mem_dtype(tmp_path, mem_dtype):
    model = tiny_model(8, mem_layers=[1, 3], mem_dtype=mem_dtype)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32

    ids = input_ids(seed=8)
    with torch.no_grad():
        out = loaded(ids, use_cache=True)
    assert out.logits.shape == (2, NUM_TOKENS, 99)
    assert torch.isfinite(out.logits.float()).all()
    cache = out.cache
    assert cache.memory_length() == NUM_TOKENS - 4
    for idx in (1, 3):
        layer = cache.layers[idx]
        assert isinstance(layer, MemoryCacheLayer)
        keys, values, _ = layer.memory()
        assert keys.dtype == values.dtype == getattr(torch, mem_dtype)
        assert layer.keys.dtype == torch.bfloat16  # the local context stays in the compute dtype

    # a continued session in bf16 still runs
    with torch.no_grad():
        more = loaded(input_ids(tokens=10, seed=9), cache=cache, use_cache=True)
    assert torch.isfinite(more.logits.float()).all()
    # bf16 is an approximation of the fp32 model, not something else
    reference = logits_of(model, ids)
    agreement = (out.logits.float().argmax(-1) == reference.argmax(-1)).float().mean()
    assert agreement > 0.8
