"""`verify` (numerical check of a conversion) and `to_llama` (LongLLaMA -> plain Llama checkpoint)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

import longllama  # noqa: F401  (registers the longllama model type)
from longllama import LongLlamaForCausalLM
from longllama.conversion import verify as verify_module
from longllama.conversion.convert import ConversionError, convert
from longllama.conversion.to_llama import LONGLLAMA_FIELDS, to_llama
from longllama.conversion.verify import fp32_bytes, should_verify_by_default, verify

from conftest import tiny_model
from test_checkpoints import write_published_checkpoint
from test_conversion import OPTIONS, leftovers, logits_of, tiny_llama

TOKENS = 6  # <= last_context_length (8 in OPTIONS)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(2)


@pytest.fixture(scope="module")
def converted(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    llama.save_pretrained(root / "llama")
    (root / "llama" / "tokenizer_config.json").write_text('{"model_max_length": 16}')
    return root / "llama", convert(root / "llama", root / "long", **OPTIONS)


def perturbed_copy(directory: Path, tmp_path: Path, name: str, delta: float) -> Path:
    copy = Path(shutil.copytree(directory, tmp_path / "tampered"))
    with safe_open(copy / "model.safetensors", framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    tensors[name] = tensors[name] + delta
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


# --------------------------------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------------------------------


def test_verify_passes_on_a_conversion(converted):
    src, dst = converted
    diff = verify(src, dst)
    assert 0.0 <= diff <= 1e-4
    assert verify(dst, dst) == 0.0  # a longllama src loads as LongLLaMA too


def test_verify_of_a_bfloat16_conversion_needs_a_looser_atol(converted, tmp_path):
    src, _ = converted
    dst = convert(src, tmp_path / "bf16", **OPTIONS, dtype="bfloat16")
    with pytest.raises(ConversionError, match="verification failed"):
        verify(src, dst)
    assert verify(src, dst, atol=1.0) > 1e-4


def test_verify_uses_at_most_last_context_length_tokens(converted, monkeypatch):
    src, dst = converted
    lengths = []
    original = LlamaForCausalLM.forward

    def spy(self, input_ids=None, **kwargs):
        lengths.append(input_ids.shape[-1])
        return original(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", spy)
    verify(src, dst, tokens=100)
    verify(src, dst, tokens=3)
    assert lengths == [8, 3]  # last_context_length of the dst is 8


def test_verify_raises_on_tampered_weights(converted, tmp_path):
    src, dst = converted
    tampered = perturbed_copy(dst, tmp_path, "model.layers.2.mlp.down_proj.weight", 0.5)
    with pytest.raises(ConversionError, match="max abs logit difference .* > atol") as info:
        verify(src, tampered)
    assert "\n" not in str(info.value)


def test_verify_raises_on_a_missing_tensor(converted, tmp_path):
    src, dst = converted
    copy = Path(shutil.copytree(dst, tmp_path / "partial"))
    with safe_open(copy / "model.safetensors", framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys() if key != "model.norm.weight"}
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="lacks weight model.norm.weight"):
        verify(src, copy)


def test_verify_bad_inputs(converted, tmp_path):
    src, dst = converted
    with pytest.raises(ConversionError, match="is not a directory"):
        verify(tmp_path / "nope", dst)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ConversionError, match="'mistral'"):
        verify(tmp_path / "cfg", dst)


def test_should_verify_by_default_rule(converted, monkeypatch):
    src, _ = converted
    size = fp32_bytes(src)
    assert size == 4 * sum(p.numel() for p in tiny_llama(2).parameters())
    assert should_verify_by_default(src)  # a few KB
    assert should_verify_by_default(src, dtype="float32") and not should_verify_by_default(src, dtype="bfloat16")
    monkeypatch.setattr(verify_module, "available_memory", lambda: 4 * size)
    assert not should_verify_by_default(src)  # 2 * size == 50% of available: not comfortably
    monkeypatch.setattr(verify_module, "available_memory", lambda: 4 * size + 1)
    assert should_verify_by_default(src)
    monkeypatch.setattr(verify_module, "available_memory", lambda: None)
    assert not should_verify_by_default(src)


def test_should_verify_by_default_on_a_bad_source(tmp_path):
    assert not should_verify_by_default(tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# to_llama
# --------------------------------------------------------------------------------------------------------------------


def test_round_trip_llama_longllama_llama(llama, converted, tmp_path):
    src, long_dir = converted
    out = to_llama(long_dir, tmp_path / "back")
    assert out == tmp_path / "back"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert {"mem_top_k", "mem_index", "mem_index_options", "mem_max_tokens", "mem_keep_first", "mem_device"} <= set(LONGLLAMA_FIELDS)
    assert "auto_map" not in config and not set(LONGLLAMA_FIELDS) & set(config)
    assert config["num_key_value_heads"] == 2
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"]
    assert leftovers(tmp_path) == []

    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(llama.state_dict())
        for name, tensor in llama.state_dict().items():
            assert torch.equal(f.get_tensor(name), tensor), name
    back, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(back) is LlamaForCausalLM
    ids = torch.randint(3, 99, (2, TOKENS), generator=torch.Generator().manual_seed(0))
    long_model = LongLlamaForCausalLM.from_pretrained(long_dir).eval()
    expected = logits_of(long_model, ids)
    torch.testing.assert_close(logits_of(back.eval(), ids), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_of(back, ids), logits_of(llama, ids), atol=1e-5, rtol=0)
    assert "LlamaForCausalLM.from_pretrained" in (out / "README.md").read_text()
    assert verify(long_dir, out) <= 1e-5


def test_published_format_source(tmp_path):
    rope_theta = 1e6
    model = tiny_model(
        7, mem_layers=[1, 3], mem_dtype="bfloat16", rope_parameters={"rope_type": "default", "rope_theta": rope_theta}
    )
    src = tmp_path / "published"
    write_published_checkpoint(src, model, rope_theta)
    out = to_llama(src, tmp_path / "llama", shard_size="10KB")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert not set(LONGLLAMA_FIELDS) & set(config)
    assert config["rope_parameters"]["rope_theta"] == rope_theta
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert not any("inv_freq" in name for name in index["weight_map"])
    assert set(index["weight_map"]) == set(model.state_dict())
    assert config["dtype"] == "bfloat16"  # the source's torch_dtype is kept (the stored tensors are fp32 here)
    back, info = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(3, 99, (2, 4), generator=torch.Generator().manual_seed(7))  # last_context_length 4
    torch.testing.assert_close(logits_of(back.eval(), ids), logits_of(model, ids), atol=1e-5, rtol=0)


def test_dtype_cast(converted, tmp_path):
    _, long_dir = converted
    out = to_llama(long_dir, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert all(f.get_tensor(name).dtype == torch.bfloat16 for name in f.keys())


def test_dry_run_writes_nothing(converted, tmp_path, capsys):
    _, long_dir = converted
    assert to_llama(long_dir, tmp_path / "dst", dry_run=True) == tmp_path / "dst"
    assert list(tmp_path.iterdir()) == []
    out = capsys.readouterr().out
    assert '"model_type": "llama"' in out and "mem_layers" not in out and "bytes" in out


def test_force_replaces(converted, tmp_path):
    _, long_dir = converted
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    to_llama(long_dir, dst, force=True)
    assert not (dst / "stale.txt").exists() and (dst / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_bad_inputs_leave_nothing(converted, tmp_path):
    llama_dir, long_dir = converted
    out = tmp_path / "out"
    out.mkdir()
    cases = [
        (tmp_path / "missing", {}, "is not a directory"),
        (llama_dir, {}, "already a Llama checkpoint"),
        (long_dir, {"dtype": "int8"}, "dtype 'int8'"),
        (long_dir, {"shard_size": "lots"}, "shard size 'lots'"),
    ]
    for src, options, message in cases:
        with pytest.raises(ConversionError, match=message) as info:
            to_llama(src, out / "dst", **options)
        assert "\n" not in str(info.value)
        assert list(out.iterdir()) == []


def test_bad_source_weights_leave_nothing(converted, tmp_path):
    _, long_dir = converted
    src = Path(shutil.copytree(long_dir, tmp_path / "src"))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, intermediate_size=40)))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError, match="has shape"):
        to_llama(src, out / "dst")
    assert list(out.iterdir()) == []


def test_to_llama_reads_nothing_outside_src(converted, tmp_path):
    """The reverse direction uses the same guarded reads: a generation config linked out of SRC is refused."""
    _, long_dir = converted
    src = Path(shutil.copytree(long_dir, tmp_path / "src"))
    (tmp_path / "elsewhere.json").write_text("{}")
    (src / "generation_config.json").unlink()
    (src / "generation_config.json").symlink_to(tmp_path / "elsewhere.json")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError, match="generation_config.json leads outside the source directory"):
        to_llama(src, out / "dst")
    assert list(out.iterdir()) == []


def test_existing_dst_without_force(converted, tmp_path):
    _, long_dir = converted
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(ConversionError, match="dst exists; pass force=True"):
        to_llama(long_dir, dst)
    assert list(dst.iterdir()) == [] and leftovers(tmp_path) == []


def test_interrupt_leaves_nothing(converted, tmp_path, monkeypatch):
    from longllama.conversion import to_llama as to_llama_module

    _, long_dir = converted
    monkeypatch.setattr(to_llama_module, "model_card", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        to_llama(long_dir, tmp_path / "dst")
    assert list(tmp_path.iterdir()) == []


def test_cli_to_llama(converted, tmp_path, capsys):
    _, converted = converted
    from longllama.conversion.cli import main

    back = tmp_path / "back"
    assert main([str(converted), str(back), "--to-llama"]) == 0
    assert "verified: max abs logit difference" in capsys.readouterr().out
    assert json.loads((back / "config.json").read_text())["model_type"] == "llama"
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error
        main([str(converted), str(tmp_path / "other"), "--to-llama", "--mem-layers", "1"])
    assert exit_info.value.code == 2 and "cannot be used with --to-llama" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
