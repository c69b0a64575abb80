"""The converter (docs/inference.md#checkpoint, #beyond): a tiny random transformers LlamaForCausalLM saved in every
supported layout converts into a drop-in LongLLaMA checkpoint; bad input fails with one ConversionError and leaves
nothing behind."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import longllama  # noqa: F401  (registers the longllama model type)
from longllama import LongLlamaForCausalLM
from longllama.conversion import convert as convert_module
from longllama.conversion.convert import (
    ConversionError,
    build_config,
    convert,
    default_mem_layers,
    expected_shapes,
)
from longllama.conversion.cli import main

from conftest import CODE_FILES

TOKENS = 6  # <= last_context_length below: the converted model must equal the source Llama exactly


def tiny_llama(num_key_value_heads: int = 4, seed: int = 0, **overrides) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False, **overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    return model


def save_bin(model: LlamaForCausalLM, directory: Path, shards: int = 1, inv_freq: bool = True) -> None:
    """The published layout: pytorch_model.bin (or .bin shards + index), with the old rotary buffers."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    state_dict = dict(model.state_dict())
    if inv_freq:
        head_dim = model.config.head_dim
        for idx in range(model.config.num_hidden_layers):
            state_dict[f"model.layers.{idx}.self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (
                torch.arange(0, head_dim, 2).float() / head_dim
            )
    if shards == 1:
        torch.save(state_dict, directory / "pytorch_model.bin")
        return
    names = list(state_dict)
    weight_map = {}
    for i in range(shards):
        filename = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {name: state_dict[name] for name in names[i::shards]}
        torch.save(part, directory / filename)
        weight_map.update(dict.fromkeys(part, filename))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def save_source(model, directory: Path, layout: str) -> Path:
    if layout == "safetensors":
        model.save_pretrained(directory)
    elif layout == "safetensors-sharded":
        model.save_pretrained(directory, max_shard_size="20KB")
    elif layout == "bin":
        save_bin(model, directory)
    elif layout == "bin-sharded":
        save_bin(model, directory, shards=3)
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 16}')
    return directory


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


OPTIONS = dict(mem_layers=[1, 3], last_context_length=8, mem_dtype="float32", window=12)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def source(llama, tmp_path_factory):
    return save_source(llama, tmp_path_factory.mktemp("src") / "llama", "safetensors-sharded")


# --------------------------------------------------------------------------------------------------------------------
# Successful conversions
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["safetensors", "safetensors-sharded", "bin", "bin-sharded"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_convert_is_a_drop_in_longllama_checkpoint(tmp_path, layout, kv_heads):
    llama = tiny_llama(kv_heads)
    src = save_source(llama, tmp_path / "src", layout)
    dst = convert(src, tmp_path / "dst", **OPTIONS)

    assert dst == tmp_path / "dst"
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "longllama" and config["architectures"] == ["LongLlamaForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_longllama.LongLlamaForCausalLM"
    assert config["mem_layers"] == [1, 3] and config["last_context_length"] == 8
    assert config["mem_dtype"] == "float32" and config["max_position_embeddings"] == 12
    assert config["num_key_value_heads"] == kv_heads
    for name in CODE_FILES + ["README.md", "generation_config.json", "tokenizer_config.json"]:
        assert (dst / name).is_file(), name
    assert leftovers(tmp_path) == []

    converted = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert isinstance(converted, LongLlamaForCausalLM)
    expected = llama.state_dict()
    actual = converted.state_dict()
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    ids = torch.randint(3, 99, (2, TOKENS), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(converted, ids), logits_of(llama, ids), atol=1e-5, rtol=0)


def test_rotary_buffers_are_dropped_and_files_match_the_source(llama, tmp_path):
    src = tmp_path / "src"
    save_bin(llama, src)
    dst = convert(src, tmp_path / "dst", mem_layers=[1])
    with safe_open(dst / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert not any("inv_freq" in name for name in names)
        for name, tensor in llama.state_dict().items():
            assert torch.equal(f.get_tensor(name), tensor), name
    assert names == set(llama.state_dict())


def test_remote_code_loading_without_the_package(llama, source, tmp_path):
    """A fresh interpreter that never imports longllama loads the copied code files through trust_remote_code."""
    dst = convert(source, tmp_path / "dst", **OPTIONS)
    ids = torch.randint(3, 99, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(dst)!r}, trust_remote_code=True).eval()\n"
        "assert 'longllama' not in sys.modules, 'the package was imported'\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad():\n"
        "    logits = model(ids).logits\n"
        "print(json.dumps([type(model).__module__, logits.tolist()]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    module, logits = json.loads(result.stdout.strip().splitlines()[-1])
    assert module.startswith("transformers_modules")
    torch.testing.assert_close(torch.tensor(logits), logits_of(llama, ids), atol=1e-5, rtol=0)


def test_small_shard_size_writes_an_index(llama, source, tmp_path):
    dst = convert(source, tmp_path / "dst", mem_layers=[1], shard_size="20KB")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((dst / name).is_file() for name in shards)
    assert set(index["weight_map"]) == set(llama.state_dict())
    assert not (dst / "model.safetensors").exists()
    for name in shards:
        assert (dst / name).stat().st_size <= 20_000 + 4 * 99 * 32 + 1024  # a shard overshoots only by one tensor
    converted = AutoModelForCausalLM.from_pretrained(dst)
    for name, tensor in llama.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name


def test_dtype_bfloat16(llama, source, tmp_path):
    dst = convert(source, tmp_path / "dst", mem_layers=[1], dtype="bfloat16")
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(dst / "model.safetensors", framework="pt") as f:
        for name, tensor in llama.state_dict().items():
            assert f.get_tensor(name).dtype == torch.bfloat16
            assert torch.equal(f.get_tensor(name), tensor.to(torch.bfloat16)), name


def test_defaults_for_a_llama_source(llama, source, tmp_path):
    dst = convert(source, tmp_path / "dst")
    config = json.loads((dst / "config.json").read_text())
    assert config["mem_layers"] == [1, 2, 3]  # floor(4 * k / 4)
    assert config["last_context_length"] == 16 and config["mem_dtype"] == "bfloat16"  # min(1024, the window)
    assert config["max_position_embeddings"] == 16
    card = (dst / "README.md").read_text()
    assert str(source) in card and "mem_layers`: (default)" in card
    assert f'from_pretrained("{dst}", trust_remote_code=True)' in card
    generation = json.loads((dst / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_longllama_source_keeps_its_memory_fields(source, tmp_path):
    first = convert(source, tmp_path / "first", **OPTIONS)
    second = convert(first, tmp_path / "second", last_context_length=5)
    config = json.loads((second / "config.json").read_text())
    assert config["mem_layers"] == [1, 3] and config["last_context_length"] == 5 and config["mem_dtype"] == "float32"


def test_attention_and_mlp_biases(tmp_path):
    llama = tiny_llama(2, attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for name, param in llama.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.3)
    llama.save_pretrained(tmp_path / "src")
    dst = convert(tmp_path / "src", tmp_path / "dst", **OPTIONS)
    converted = AutoModelForCausalLM.from_pretrained(dst).eval()
    for name, tensor in llama.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name
    ids = torch.randint(3, 99, (1, TOKENS), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits_of(converted, ids), logits_of(llama, ids), atol=1e-5, rtol=0)


def test_tied_embeddings_without_lm_head(tmp_path):
    llama = tiny_llama()
    llama.config.tie_word_embeddings = True
    llama.tie_weights()
    llama.save_pretrained(tmp_path / "src")
    dst = convert(tmp_path / "src", tmp_path / "dst", **OPTIONS)
    converted = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(3, 99, (1, TOKENS), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits_of(converted, ids), logits_of(llama, ids), atol=1e-5, rtol=0)


def test_generation_config_is_derived_when_absent(llama, tmp_path):
    src = tmp_path / "src"
    save_bin(llama, src)
    assert not (src / "generation_config.json").exists()
    dst = convert(src, tmp_path / "dst", mem_layers=[1])
    assert json.loads((dst / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }


def test_force_replaces(source, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    convert(source, dst, mem_layers=[2], force=True)
    assert not (dst / "stale.txt").exists()
    assert json.loads((dst / "config.json").read_text())["mem_layers"] == [2]
    assert leftovers(tmp_path) == []


def test_dry_run_writes_nothing(source, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert convert(source, dst, mem_layers=[1], dry_run=True) == dst
    assert not dst.exists() and list(tmp_path.iterdir()) == []
    out = capsys.readouterr().out
    assert "safetensors" in out and '"mem_layers": [\n    1\n  ]' in out and "bytes" in out


# --------------------------------------------------------------------------------------------------------------------
# Default memory layers
# --------------------------------------------------------------------------------------------------------------------


def test_default_mem_layers_presets_and_rule():
    assert default_mem_layers(26, 3200) == [6, 12, 18]  # OpenLLaMA 3B
    assert default_mem_layers(32, 4096) == [8, 16, 24]  # OpenLLaMA 7B
    assert default_mem_layers(26, 2048) == [6, 13, 19]  # not a preset: the rule
    assert default_mem_layers(40, 5120) == [10, 20, 30]
    assert default_mem_layers(1, 8) == [0]


@pytest.mark.parametrize(
    "shape, expected",
    [((26, 3200, 8640), [6, 12, 18]), ((32, 4096, 11008), [8, 16, 24])],
    ids=["open_llama_3b", "open_llama_7b"],
)
def test_full_shape_configs_get_the_paper_layers(tmp_path, shape, expected):
    layers, hidden, inter = shape
    config = LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=32
    )
    config.save_pretrained(tmp_path)
    target = build_config(tmp_path, None, None, None, None, "keep")
    assert target.mem_layers == expected and target.num_hidden_layers == layers
    # the converter's shape check agrees with the real model of that shape (built on the meta device: no memory)
    with torch.device("meta"):
        reference = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    assert expected_shapes(target) == reference


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one ConversionError naming the culprit, nothing left behind
# --------------------------------------------------------------------------------------------------------------------


def copy_source(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "src"))


def first_shard(src: Path) -> Path:
    return src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]


def break_bad_json(src):
    (src / "config.json").write_text("{not json")


def break_truncated_bin(src):
    model = AutoModelForCausalLM.from_pretrained(src)
    shutil.rmtree(src)
    save_bin(model, src)
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[: len(data) // 2])


def break_missing_src(src):
    shutil.rmtree(src)


def break_no_config(src):
    (src / "config.json").unlink()


def break_no_weights(src):
    for path in src.glob("model*"):
        path.unlink()


def break_model_type(src):
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, model_type="mistral")))


def break_shape(src):
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, intermediate_size=40)))


def break_missing_shard(src):
    first_shard(src).unlink()


def break_truncated_shard(src):
    shard = first_shard(src)
    shard.write_bytes(shard.read_bytes()[:-10])


def break_unknown_name(src):
    save_file({"model.layers.0.self_attn.q_norm.weight": torch.ones(8)}, src / "extra.safetensors")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.q_norm.weight"] = "extra.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def break_duplicate_name(src):
    save_file({"model.norm.weight": torch.ones(32)}, src / "extra.safetensors")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight.copy"] = "extra.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def break_missing_tensor(src):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"]["model.norm.weight"]
    with safe_open(shard, framework="pt") as f:
        kept = {name: f.get_tensor(name) for name in f.keys() if name != "model.norm.weight"}
    save_file(kept, shard, metadata={"format": "pt"})


def edit_json(path, edit):
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def break_not_utf8(src):
    (src / "config.json").write_bytes(b'{"model_type": "llama", "name": "\xff\xfe"}')


def break_config_not_object(src):
    (src / "config.json").write_text("[1, 2, 3]")


def break_index_is_a_list(src):
    (src / "model.safetensors.index.json").write_text('["model-00001-of-00002.safetensors"]')


def break_index_values_not_strings(src):
    edit_json(src / "model.safetensors.index.json", lambda index: dict(index, weight_map={"model.norm.weight": 5}))


def break_mem_layers_not_a_list(src):
    edit_json(src / "config.json", lambda config: dict(config, model_type="longllama", mem_layers="abc"))


def index_naming(name):
    def damage(src):
        shard = first_shard(src)
        shutil.move(shard, src.parent / "x.safetensors")  # outside SRC: must never be read
        edit_json(src / "model.safetensors.index.json", lambda index: dict(
            index, weight_map={k: name if v == shard.name else v for k, v in index["weight_map"].items()}
        ))

    return damage


def break_shard_symlinked_outside(src):
    shard = first_shard(src)
    shutil.move(shard, src.parent / "x.safetensors")
    shard.symlink_to(src.parent / "x.safetensors")


def break_config_symlinked_to_a_device(src):
    (src / "config.json").unlink()
    (src / "config.json").symlink_to("/dev/zero")


def break_config_is_a_fifo(src):
    (src / "config.json").unlink()
    os.mkfifo(src / "config.json")


def break_tokenizer_symlinked_outside(src):
    (src / "tokenizer.model").symlink_to("/etc/passwd")


BAD_INPUTS = {
    "not_utf8": (break_not_utf8, {}, "config.json is not UTF-8 text"),
    "config_not_object": (break_config_not_object, {}, "config.json holds a JSON list, not an object"),
    "index_is_a_list": (break_index_is_a_list, {}, "index.json holds a JSON list, not an object"),
    "index_values_not_strings": (break_index_values_not_strings, {}, "has no weight_map from tensor names"),
    "mem_layers_abc": (break_mem_layers_not_a_list, {}, "invalid target config: .*mem_layers"),
    "index_parent_path": (index_naming("../x.safetensors"), {}, "'../x.safetensors' is listed in .* not a file name"),
    "index_absolute_path": (index_naming("/etc/passwd"), {}, "'/etc/passwd' is listed in .* not a file name"),
    "shard_symlinked_outside": (break_shard_symlinked_outside, {}, "leads outside the source directory"),
    "config_symlinked_to_a_device": (break_config_symlinked_to_a_device, {}, "config.json leads outside"),
    "config_is_a_fifo": (break_config_is_a_fifo, {}, "config.json is not a regular file"),
    "tokenizer_symlinked_outside": (break_tokenizer_symlinked_outside, {}, "tokenizer.model leads outside"),
    "last_context_length_above_window": (None, {"last_context_length": 17}, "last_context_length 17 is longer than the window"),
    "missing_src": (break_missing_src, {}, "is not a directory"),
    "no_config": (break_no_config, {}, "config.json is missing"),
    "no_weights": (break_no_weights, {}, "has no weights"),
    "bad_json": (break_bad_json, {}, "config.json is not valid JSON"),
    "truncated_bin": (break_truncated_bin, {}, "cannot read .*pytorch_model.bin"),
    "model_type": (break_model_type, {}, "'mistral'"),
    "shape": (break_shape, {}, r"tensor model.layers.0.mlp.\w+_proj.weight in model-.* has shape \[[\d, ]*37[\d, ]*\]"),
    "missing_shard": (break_missing_shard, {}, r"model-\d+-of-\d+.safetensors is listed in .* but missing"),
    "truncated_shard": (break_truncated_shard, {}, r"cannot read .*model-\d+-of-\d+.safetensors"),
    "unknown_name": (break_unknown_name, {}, "unknown tensor model.layers.0.self_attn.q_norm.weight in extra"),
    "duplicate_name": (break_duplicate_name, {}, r"duplicate tensor model.norm.weight: in \S+ and \S+"),
    "missing_tensor": (break_missing_tensor, {}, "missing tensor model.norm.weight"),
    "mem_layers": (None, {"mem_layers": [1, 4]}, r"mem_layers \[4\] out of range"),
    "mem_dtype": (None, {"mem_dtype": "int16"}, "mem_dtype 'int16'"),
    "shard_size": (None, {"shard_size": "lots"}, "shard size 'lots'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_and_leaves_nothing(source, tmp_path, case):
    damage, options, message = BAD_INPUTS[case]
    src = copy_source(source, tmp_path)
    if damage:
        damage(src)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError, match=message) as info:
        convert(src, out / "dst", **options)
    assert "\n" not in str(info.value)
    assert list(out.iterdir()) == []


def test_hugging_face_cache_snapshot_reads_its_blobs(source, tmp_path):
    """A Hugging Face cache snapshot links its files to the repository's blobs/: those may be read, nothing else."""
    repo = tmp_path / "models--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for path in source.iterdir():
        shutil.copy2(path, repo / "blobs" / path.name)
        (snapshot / path.name).symlink_to(Path("../../blobs") / path.name)
    assert (convert(snapshot, tmp_path / "dst") / "config.json").is_file()


def test_existing_dst_without_force(source, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(ConversionError, match="dst exists; pass force=True"):
        convert(source, dst)
    assert list(dst.iterdir()) == [] and leftovers(tmp_path) == []


def test_dst_may_not_contain_the_source(source, tmp_path):
    with pytest.raises(ConversionError, match="would overwrite the source"):
        convert(source, source.parent, force=True)
    assert (source / "config.json").is_file()


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_interrupt_while_writing_leaves_nothing(source, tmp_path, monkeypatch, error):
    def interrupted(*args, **kwargs):
        raise error("stop")

    monkeypatch.setattr(convert_module, "write_side_files", interrupted)
    with pytest.raises(error):
        convert(source, tmp_path / "dst")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_with_force_keeps_the_old_dst(source, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    monkeypatch.setattr(convert_module, "write_side_files", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        convert(source, dst, force=True)
    assert (dst / "keep.txt").read_text() == "old" and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def test_main_exit_codes(source, tmp_path, capsys):
    dst = tmp_path / "dst"
    args = [str(source), str(dst), "--mem-layers", "1,3", "--last-context-length", "8", "--window", "12"]
    assert main(args + ["--dtype", "bfloat16", "--shard-size", "30KB"]) == 0
    config = json.loads((dst / "config.json").read_text())
    assert config["mem_layers"] == [1, 3] and config["max_position_embeddings"] == 12 and config["dtype"] == "bfloat16"
    assert main(args) == 2
    assert "error: " in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
    assert "verified: max abs logit difference" in capsys.readouterr().out  # on by default for a small fp32 model
    assert main([str(source), str(tmp_path / "other"), "--mem-layers", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: mem_layers [9] out of range") and err.count("\n") == 1
    assert not (tmp_path / "other").exists()
    assert main([str(source), str(tmp_path / "dry"), "--dry-run"]) == 0 and not (tmp_path / "dry").exists()


@pytest.mark.parametrize(("window", "expected"), [(None, 16), (8, 8), (2048, 1024)])
def test_last_context_length_defaults_to_at_most_the_window(source, tmp_path, window, expected):
    """min(1024, window) for a llama source: a final window longer than the window would not fit one local context."""
    dst = convert(source, tmp_path / "dst", window=window)
    config = json.loads((dst / "config.json").read_text())
    assert config["last_context_length"] == expected and config["max_position_embeddings"] == (window or 16)


def test_last_context_length_above_the_window_is_refused(source, tmp_path, capsys):
    for extra in (["--last-context-length", "17"], ["--last-context-length", "9", "--window", "8"]):
        assert main([str(source), str(tmp_path / "dst"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: last_context_length") and "longer than the window" in err, err
        assert err.count("\n") == 1
        assert not (tmp_path / "dst").exists() and leftovers(tmp_path) == []
    assert main([str(source), str(tmp_path / "dst"), "--last-context-length", "16", "--no-verify"]) == 0  # = window


def test_longllama_source_keeps_its_last_context_length_unless_the_window_changes(source, tmp_path):
    first = convert(source, tmp_path / "first", **OPTIONS)  # last_context_length 8, window 12
    with pytest.raises(ConversionError, match="last_context_length 8 is longer than the window"):
        convert(first, tmp_path / "second", window=6)
    assert not (tmp_path / "second").exists()
    # a source whose final window is longer than its window, as the published code allows (docs/compatibility.md)
    config = json.loads((first / "config.json").read_text())
    (first / "config.json").write_text(json.dumps({**config, "last_context_length": 16}))
    kept = convert(first, tmp_path / "kept")
    assert json.loads((kept / "config.json").read_text())["last_context_length"] == 16


def test_module_help_in_a_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "longllama.conversion", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "--mem-layers" in result.stdout and "trust_remote_code=True" in result.stdout
