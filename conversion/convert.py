"""Convert a Hugging Face Llama checkpoint (e.g. OpenLLaMA 3B / 7B) into a drop-in LongLLaMA checkpoint.

The weights keep their Llama names (docs/inference.md#checkpoint: memory layers add no parameters), so conversion is a
streaming copy: source shards are read one tensor at a time, checked against the target config, optionally cast, and
written into new safetensors shards of at most `shard_size` bytes. Everything goes into a temporary directory next to
DST, which is renamed to DST only when complete.

    from longllama.conversion.convert import convert
    convert("./open_llama_3b", "./long_open_llama_3b", mem_layers=[6, 12, 18])

The command line (`longllama-convert`, `python -m longllama.conversion`) is `cli.py`.
"""

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from transformers.utils import logging

import longllama.modeling
from longllama.files import atomic_directory, read_regular_file, save_safetensors
from longllama.modeling.configuration_longllama import MEM_DTYPES, LongLlamaConfig

# The remote code every checkpoint carries: each `*_longllama.py` of the modeling package (the tokenizer's file only
# goes with a sentencepiece model).
MODELING_DIR = Path(longllama.modeling.__file__).parent
CODE_FILES = tuple(sorted(p.name for p in MODELING_DIR.glob("*_longllama.py") if p.name != "tokenization_longllama.py"))
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
SPECIAL_TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token", "model_max_length", "padding_side")
DTYPES = ("keep", "bfloat16", "float16", "float32")
# config.json fields that describe the source class rather than the architecture
SOURCE_ONLY_FIELDS = ("model_type", "architectures", "auto_map", "transformers_version")
JSON_LIMIT = 64 << 20  # bytes: config, index and tokenizer JSON files are far smaller

# Source name -> target name; `{}` is a layer index, `None` drops the tensor (recomputed from the config).
WEIGHT_MAP = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.layers.{}.self_attn.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "model.layers.{}.self_attn.q_proj.bias",
    "model.layers.{}.self_attn.k_proj.bias": "model.layers.{}.self_attn.k_proj.bias",
    "model.layers.{}.self_attn.v_proj.bias": "model.layers.{}.self_attn.v_proj.bias",
    "model.layers.{}.self_attn.o_proj.bias": "model.layers.{}.self_attn.o_proj.bias",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{}.mlp.gate_proj.weight": "model.layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "model.layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "model.layers.{}.mlp.down_proj.weight",
    "model.layers.{}.mlp.gate_proj.bias": "model.layers.{}.mlp.gate_proj.bias",
    "model.layers.{}.mlp.up_proj.bias": "model.layers.{}.mlp.up_proj.bias",
    "model.layers.{}.mlp.down_proj.bias": "model.layers.{}.mlp.down_proj.bias",
    "model.layers.{}.input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# Memory layers of the published models (docs/inference.md#checkpoint), looked up by shape when --mem-layers is not
# given.
PRESETS = {
    "open_llama_3b": dict(num_hidden_layers=26, hidden_size=3200, mem_layers=[6, 12, 18]),
    "open_llama_7b": dict(num_hidden_layers=32, hidden_size=4096, mem_layers=[8, 16, 24]),
}


class ConversionError(ValueError):
    """A problem with the converter's input or options; the message is one line naming the culprit."""


def default_mem_layers(num_hidden_layers: int, hidden_size: int) -> list[int]:
    """Memory layers used when none are given.

    A shape matching a preset (26 layers of hidden 3200: OpenLLaMA 3B -> [6, 12, 18]; 32 layers of hidden 4096:
    7B -> [8, 16, 24]) uses the paper's layers. Any other shape gets three evenly spaced layers
    `floor(n * k / 4)` for k = 1, 2, 3 (deduplicated), e.g. n = 40 -> [10, 20, 30], n = 4 -> [1, 2, 3].
    """
    for preset in PRESETS.values():
        if (preset["num_hidden_layers"], preset["hidden_size"]) == (num_hidden_layers, hidden_size):
            return list(preset["mem_layers"])
    return sorted({num_hidden_layers * k // 4 for k in (1, 2, 3)})


def parse_size(size: int | str) -> int:
    """`2GB` -> 2 * 10**9 bytes, `500MiB` -> 500 * 2**20 bytes; plain integers are bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ConversionError(f"shard size {size!r} is not a size such as 2GB, 500MB or 1048576.")
    unit = (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(match.group(1)) * base**power)


# --------------------------------------------------------------------------------------------------------------------
# Reading the source
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SourceTensor:
    name: str  # source name
    target: str | None  # name in the output, None when dropped
    shard: Path
    shape: torch.Size
    dtype: torch.dtype


@dataclass
class Plan:
    """What a conversion will do, computed from the source headers only (no tensor data is read)."""

    src: Path
    format: str  # "safetensors" or "pytorch"
    shards: list[Path]
    config: LongLlamaConfig
    tensors: list[SourceTensor] = field(default_factory=list)
    dtype: str = "keep"

    def out_dtype(self, tensor: SourceTensor) -> torch.dtype:
        return tensor.dtype if self.dtype == "keep" else getattr(torch, self.dtype)

    def out_bytes(self, tensor: SourceTensor) -> int:
        return tensor.shape.numel() * self.out_dtype(tensor).itemsize if tensor.target else 0

    @property
    def total_bytes(self) -> int:
        return sum(self.out_bytes(t) for t in self.tensors)


def find_shards(src: Path) -> tuple[str, list[Path]]:
    """The weight files of a checkpoint directory, in the order the index lists them."""
    for fmt, single, index in (
        ("safetensors", "model.safetensors", "model.safetensors.index.json"),
        ("pytorch", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if os.path.lexists(src / index):
            weight_map = read_json(source_file(src, index)).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConversionError(f"{src / index} has no weight_map from tensor names to file names.")
            return fmt, [source_file(src, name, index) for name in sorted(set(weight_map.values()))]
        if os.path.lexists(src / single):
            return fmt, [source_file(src, single)]
    raise ConversionError(f"{src} has no weights: expected model.safetensors, pytorch_model.bin or a sharded index.")


def source_file(src: Path, name, listed_in: str | None = None) -> Path:
    """`src / name`, checked to be a regular file inside SRC: a name with `..` or an absolute path, a symlink that
    leads out of SRC and a device or FIFO are refused, so the converter never reads anything but SRC. (A Hugging Face
    cache snapshot, whose files link to its repository's `blobs/`, may also read those.)"""
    where = f"listed in {listed_in}" if listed_in else "in the source"
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ConversionError(f"{name!r} is {where} but is not a file name inside {src}.")
    path = src / name
    if not os.path.lexists(path):
        raise ConversionError(f"{name} is {where} but missing from {src}." if listed_in else f"{path} is missing.")
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in source_roots(src)):
        raise ConversionError(f"{path} leads outside the source directory (to {real}): copy the file into {src}.")
    if not real.is_file():
        raise ConversionError(f"{path} is not a regular file (a device, a FIFO or a directory?).")
    return path


def source_roots(src: Path) -> list[Path]:
    """Where the files of SRC may really be: SRC, and for a Hugging Face cache snapshot (`.../snapshots/REVISION`)
    the repository's `blobs` directory its files link to."""
    root = src.resolve()
    return [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]


def read_json(path: Path) -> dict:
    """The JSON object in the regular file `path` (UTF-8, at most `JSON_LIMIT` bytes), or a one-line ConversionError."""
    try:
        fields = json.loads(read_regular_file(path, JSON_LIMIT).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConversionError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from exc
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ConversionError(f"{path} nests too deeply to be a config.") from exc
    except ValueError as exc:  # not a regular file, or too large
        raise ConversionError(str(exc)) from exc
    if not isinstance(fields, dict):
        raise ConversionError(f"{path} holds a JSON {type(fields).__name__}, not an object.")
    return fields


def read_headers(shard: Path, fmt: str) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor in a shard, without reading the data of a safetensors file."""
    try:
        if fmt == "safetensors":
            with safe_open(shard, framework="pt") as f:
                headers = []
                for name in f.keys():
                    tensor_slice = f.get_slice(name)
                    headers.append((name, tuple(tensor_slice.get_shape()), safetensors_dtype(tensor_slice)))
                return headers
        state_dict = torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
        return [(name, tuple(t.shape), t.dtype) for name, t in state_dict.items()]
    except Exception as exc:
        raise ConversionError(f"cannot read {shard}: {type(exc).__name__}: {exc}".replace("\n", " ")) from exc


def safetensors_dtype(tensor_slice) -> torch.dtype:
    names = {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
        "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    }
    code = tensor_slice.get_dtype()
    if code not in names:
        raise ConversionError(f"unsupported safetensors dtype {code}")
    return getattr(torch, names[code])


def iter_tensors(shard: Path, fmt: str):
    """(name, tensor) for every tensor of one shard; only that shard is open (the .bin one memory-mapped)."""
    try:
        if fmt == "safetensors":
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state_dict = torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
            for name, tensor in state_dict.items():
                yield name, tensor.clone()  # a .bin may share storage between tensors; safetensors refuses that
    except Exception as exc:
        raise ConversionError(f"cannot read {shard}: {type(exc).__name__}: {exc}".replace("\n", " ")) from exc


# --------------------------------------------------------------------------------------------------------------------
# Target config and the weight map
# --------------------------------------------------------------------------------------------------------------------


def build_config(src: Path, mem_layers, last_context_length, mem_dtype, window, dtype) -> LongLlamaConfig:
    """LongLlamaConfig from the source config.json plus the options. A longllama source keeps its memory fields
    unless an option overrides them; a llama source gets `default_mem_layers` and the LongLlamaConfig defaults."""
    fields = read_source_config(src)
    config_path = src / "config.json"
    model_type = fields.get("model_type")
    if model_type not in ("llama", "longllama"):
        raise ConversionError(f"{config_path} has model_type {model_type!r}; only 'llama' and 'longllama' convert.")
    for name in SOURCE_ONLY_FIELDS:
        fields.pop(name, None)
    num_layers, hidden = fields.get("num_hidden_layers", 32), fields.get("hidden_size", 4096)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (num_layers, hidden)):
        raise ConversionError(f"{config_path}: num_hidden_layers and hidden_size must be positive integers.")
    if mem_layers is None and model_type == "llama":
        mem_layers = default_mem_layers(num_layers, hidden)
    if mem_layers is not None:
        bad = [idx for idx in mem_layers if not 0 <= idx < num_layers]
        if bad:
            raise ConversionError(f"mem_layers {bad} out of range: the model has layers 0..{num_layers - 1}.")
        fields["mem_layers"] = sorted(mem_layers)
    overrides = dict(last_context_length=last_context_length, mem_dtype=mem_dtype, max_position_embeddings=window)
    fields.update({name: value for name, value in overrides.items() if value is not None})
    # The final window should fit in the window: a llama source with a short window gets a shorter default, and
    # options may not set more. A longllama source may keep its own (the published code allows more, see
    # docs/compatibility.md).
    W = fields.setdefault("max_position_embeddings", LongLlamaConfig.max_position_embeddings)
    if "last_context_length" not in fields and isinstance(W, int):
        fields["last_context_length"] = min(LongLlamaConfig.last_context_length, W)
    L = fields.get("last_context_length")
    if isinstance(L, int) and isinstance(W, int) and L > W and (last_context_length is not None or window is not None):
        raise ConversionError(
            f"last_context_length {L} is longer than the window (max_position_embeddings = {W}): give "
            f"--last-context-length of at most {W}."
        )
    if dtype != "keep":
        fields.pop("torch_dtype", None)
        fields["dtype"] = dtype
    fields["architectures"] = ["LongLlamaForCausalLM"]
    return config_from_dict(LongLlamaConfig, fields, "target")


def read_source_config(src: Path) -> dict:
    """The fields of SRC's config.json (a regular JSON object file inside SRC)."""
    if not os.path.lexists(src / "config.json"):
        raise ConversionError(f"{src} is not a checkpoint directory: config.json is missing.")
    return read_json(source_file(src, "config.json"))


def config_from_dict(cls, fields: dict, which: str):
    """`cls.from_dict(fields)`; a value of the wrong type or out of range is a one-line ConversionError (transformers
    raises many kinds of errors on odd values, e.g. an IndexError for `"dtype": "abc"`: all of them mean bad input)."""
    try:
        return cls.from_dict(dict(fields))
    except (ValueError, StrictDataclassError) as exc:
        raise ConversionError(f"invalid {which} config: {exc}".replace("\n", " ")) from exc
    except Exception as exc:
        raise ConversionError(f"invalid {which} config: {type(exc).__name__}: {exc}".replace("\n", " ")) from exc


def expected_shapes(config: LongLlamaConfig) -> dict[str, tuple[int, ...]]:
    """Target name -> shape of every tensor a LlamaForCausalLM with this config holds (biases when enabled)."""
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    layer = {
        "self_attn.q_proj.weight": (q_out, hidden),
        "self_attn.k_proj.weight": (kv_out, hidden),
        "self_attn.v_proj.weight": (kv_out, hidden),
        "self_attn.o_proj.weight": (hidden, q_out),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    if config.attention_bias:
        layer.update({f"self_attn.{p}_proj.bias": (n,) for p, n in zip("qkv", (q_out, kv_out, kv_out))})
        layer["self_attn.o_proj.bias"] = (hidden,)
    if config.mlp_bias:
        layer.update({"mlp.gate_proj.bias": (inter,), "mlp.up_proj.bias": (inter,), "mlp.down_proj.bias": (hidden,)})
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for idx in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{idx}.{name}": shape for name, shape in layer.items()})
    return shapes


def target_name(name: str, shard: Path) -> str | None:
    """Map a source tensor name through WEIGHT_MAP; an unknown name is an error."""
    layer = re.search(r"\.(\d+)\.", name)
    key = name.replace(layer.group(0), ".{}.", 1) if layer else name
    if key not in WEIGHT_MAP:
        raise ConversionError(f"unknown tensor {name} in {shard.name}: not a Llama weight name.")
    mapped = WEIGHT_MAP[key]
    return mapped.format(layer.group(1)) if mapped and layer else mapped


def make_plan(src: Path, config: LongLlamaConfig, dtype: str) -> Plan:
    """Read every shard header, map names and check them against the target config before anything is written."""
    fmt, shards = find_shards(src)
    plan = Plan(src=src, format=fmt, shards=shards, config=config, dtype=dtype)
    shapes = expected_shapes(config)
    seen: dict[str, Path] = {}
    for shard in shards:
        for name, shape, tensor_dtype in read_headers(shard, fmt):
            if name in seen:
                raise ConversionError(f"duplicate tensor {name}: in {seen[name].name} and {shard.name}.")
            seen[name] = shard
            target = target_name(name, shard)
            if target is not None:
                if target not in shapes:
                    raise ConversionError(f"unexpected tensor {name} in {shard.name}: the config has no such weight.")
                if shape != shapes[target]:
                    raise ConversionError(
                        f"tensor {name} in {shard.name} has shape {list(shape)}, "
                        f"the config implies {list(shapes[target])}."
                    )
            plan.tensors.append(SourceTensor(name, target, shard, shape=torch.Size(shape), dtype=tensor_dtype))
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(shapes) - {t.target for t in plan.tensors} - optional)
    if missing:
        raise ConversionError(f"missing tensor {missing[0]} ({len(missing)} missing in all) in {src}.")
    return plan


def group_by_size(items, size_of, limit: int) -> list[list]:
    """Greedy grouping, in order, into groups of at most `limit` bytes (an item bigger than `limit` alone)."""
    groups, current, size = [], [], 0
    for item in items:
        nbytes = size_of(item)
        if current and size + nbytes > limit:
            groups.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    if current:
        groups.append(current)
    return groups


def assign_output_shards(plan: Plan, shard_bytes: int) -> list[list[SourceTensor]]:
    """Group the kept tensors, in source order, into output shards of at most shard_bytes (a bigger tensor alone)."""
    return group_by_size([t for t in plan.tensors if t.target is not None], plan.out_bytes, shard_bytes)


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def write_weights(plan: Plan, out: Path, shard_bytes: int) -> None:
    """Stream source shards into output shards; at most one output shard of tensors is held at a time."""
    groups = assign_output_shards(plan, shard_bytes)
    names = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))
    ]
    shard_of = {t.name: i for i, group in enumerate(groups) for t in group}
    pending: dict[int, dict[str, torch.Tensor]] = {}
    weight_map = {}
    # a bar on a terminal only (`disable=None`), and none after transformers' `disable_progress_bar()`
    with logging.tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="converting", disable=None) as bar:
        for shard in plan.shards:
            for name, tensor in iter_tensors(shard, plan.format):
                if name not in shard_of:
                    continue  # dropped (rotary_emb.inv_freq)
                target = target_name(name, shard)
                index = shard_of[name]
                if plan.dtype != "keep":
                    tensor = tensor.to(getattr(torch, plan.dtype))
                pending.setdefault(index, {})[target] = tensor.contiguous()
                weight_map[target] = names[index]
                bar.update(tensor.numel() * tensor.element_size())
                if len(pending[index]) == len(groups[index]):
                    save_safetensors(pending.pop(index), out / names[index], metadata={"format": "pt"})
    assert not pending, "every output shard is complete once all source shards are read"
    if len(groups) > 1:
        index_json = {"metadata": {"total_size": plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")


def copy_generation_and_tokenizer(src: Path, out: Path, config, longllama_tokenizer: bool) -> None:
    """generation_config.json (copied, or bos/eos/pad from `config`) and the tokenizer files. A sentencepiece
    `tokenizer.model` gets a tokenizer_config.json naming `LongLlamaTokenizer` (exact sentencepiece ids, shipped as
    remote code) when `longllama_tokenizer`, else transformers' `LlamaTokenizer`."""
    if os.path.lexists(src / "generation_config.json"):
        shutil.copy2(source_file(src, "generation_config.json"), out / "generation_config.json")
    else:
        tokens = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        generation = {k: v for k, v in tokens.items() if v is not None}
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if os.path.lexists(src / name):
            shutil.copy2(source_file(src, name), out / name)
    if os.path.lexists(src / "tokenizer.model"):
        write_tokenizer_config(src, out, longllama_tokenizer)


def write_tokenizer_config(src: Path, out: Path, longllama_tokenizer: bool) -> None:
    """tokenizer_config.json for a sentencepiece tokenizer.model, keeping the source's special-token strings (a
    source without a pad token gets EOS as its pad token).

    transformers 5's own `LlamaTokenizer` converts tokenizer.model to a BPE that gives other ids than sentencepiece
    on runs of spaces and leading whitespace for OpenLLaMA's model, so LongLLaMA checkpoints name
    `LongLlamaTokenizer` (modeling/tokenization_longllama.py, copied next to it), which runs sentencepiece itself."""
    path = src / "tokenizer_config.json"
    source = read_json(source_file(src, path.name)) if os.path.lexists(path) else {}
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config.update({k: source[k] for k in SPECIAL_TOKEN_FIELDS if k in source})
    if config.get("pad_token") is None:
        # `tokenizer(texts, padding=True)` must work as it comes; EOS is what generate() pads finished rows with
        config["pad_token"] = config["eos_token"]
    config.update(
        add_bos_token=source.get("add_bos_token", True),  # BOS as the source adds it (Llama tokenizers do)
        add_eos_token=source.get("add_eos_token", False),
        clean_up_tokenization_spaces=False,
        legacy=True,
    )
    if longllama_tokenizer:
        config["tokenizer_class"] = "LongLlamaTokenizer"
        config["auto_map"] = {"AutoTokenizer": ["tokenization_longllama.LongLlamaTokenizer", None]}
        shutil.copy2(MODELING_DIR / "tokenization_longllama.py", out / "tokenization_longllama.py")
    else:
        config["tokenizer_class"] = "LlamaTokenizer"
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_side_files(plan: Plan, out: Path) -> None:
    """config.json, generation_config.json, the remote-code files and any tokenizer files."""
    plan.config.to_json_file(out / "config.json")
    copy_generation_and_tokenizer(plan.src, out, plan.config, longllama_tokenizer=True)
    for name in CODE_FILES:
        shutil.copy2(MODELING_DIR / name, out / name)


def model_card(plan: Plan, dst: Path, options: dict) -> str:
    config = plan.config
    option_lines = "\n".join(f"- `{k}`: " + ("(default)" if v is None else f"`{v}`") for k, v in options.items())
    return f"""---
library_name: transformers
tags:
- longllama
- focused-transformer
---

# LongLLaMA conversion of `{plan.src.name}`

Converted by `longllama.conversion` from `{plan.src}` ({plan.format}, {len(plan.shards)} shard(s)).
The weights are the source weights unchanged (names of `LlamaForCausalLM`); memory layers add no parameters
(Focused Transformer, arXiv 2307.03170).

Memory layers: `{config.mem_layers}`, window (`max_position_embeddings`): {config.max_position_embeddings},
`last_context_length`: {config.last_context_length}, `mem_dtype`: `{config.mem_dtype}`.

Options used:

{option_lines}

## Loading

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{dst}", trust_remote_code=True)
```

With the `longllama` package installed, `import longllama` first and `trust_remote_code` is not needed. Up to
`last_context_length` tokens the model gives the same outputs as the source Llama model.
"""


def describe(plan: Plan) -> str:
    """The dry-run report."""
    kept = [t for t in plan.tensors if t.target]
    lines = [
        f"source: {plan.src} ({plan.format}, {len(plan.shards)} shard(s): {', '.join(s.name for s in plan.shards)})",
        f"tensors: {len(kept)} kept, {len(plan.tensors) - len(kept)} dropped; {plan.total_bytes:,} bytes of weights",
        "config.json:",
        plan.config.to_json_string(),
    ]
    return "\n".join(lines)


def check_paths(src: Path, dst: Path, dtype: str, force: bool, dry_run: bool) -> None:
    """The checks every conversion makes before reading anything."""
    if not src.is_dir():
        raise ConversionError(f"source {src} is not a directory.")
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {list(DTYPES)}.")
    if dst.resolve() == src.resolve() or dst.resolve() in src.resolve().parents:
        raise ConversionError(f"destination {dst} would overwrite the source {src}.")
    if dst.exists() and not force and not dry_run:
        raise ConversionError(f"{dst} exists; pass force=True (--force) to replace it.")


def write_atomically(dst: Path, force: bool, fill) -> Path:
    """Call `fill(tmp)` on a new directory next to `dst`, then move it to `dst` (with `force`, replacing what is there).
    On any failure, Ctrl-C included, the temporary directory is removed and `dst` is left as it was."""
    with atomic_directory(dst, mode=0o755) as tmp:
        fill(tmp)
        if dst.exists() and not force:
            raise ConversionError(f"{dst} exists; pass force=True (--force) to replace it.")
    return dst


def convert(
    src,
    dst,
    *,
    mem_layers: list[int] | None = None,
    last_context_length: int | None = None,
    mem_dtype: str | None = None,
    window: int | None = None,
    dtype: str = "keep",
    shard_size: int | str = "2GB",
    force: bool = False,
    dry_run: bool = False,
) -> Path:
    """Convert the Llama (or LongLLaMA) checkpoint directory `src` into a LongLLaMA checkpoint at `dst`.

    Args:
        src: directory with config.json (model_type "llama" or "longllama") and model.safetensors, sharded
            safetensors with model.safetensors.index.json, pytorch_model.bin, or sharded .bin with an index.
        dst: output directory; must not exist unless `force`.
        mem_layers: 0-based memory layers. Default: the source's own for a longllama source, else
            `default_mem_layers` ([6, 12, 18] for OpenLLaMA 3B, [8, 16, 24] for 7B, otherwise
            floor(n * k / 4) for k = 1, 2, 3 with n layers).
        last_context_length: tokens of the final local window, at most the window; default: a longllama source's,
            else min(1024, window).
        mem_dtype: default: a longllama source's, else the LongLlamaConfig default.
        window: `max_position_embeddings` (the context window); default: the source's.
        dtype: "keep" or a dtype name the weights are cast to (config `dtype` follows).
        shard_size: maximum output shard size, e.g. "2GB", "500MiB" or bytes.
        force: replace an existing `dst`.
        dry_run: print the plan and the resulting config.json; write nothing.

    Returns:
        `dst` as a Path. Raises `ConversionError` (a `ValueError`) with a one-line message on bad input, and `OSError`
        when writing fails (a read-only or full disk); nothing is left at `dst` (nor the temporary directory next to
        it) when anything fails, and a `dst` replaced with `force` stays whole until the new one takes its place.
        Nothing outside `src` is read (`source_file`).
    """
    src, dst = Path(src), Path(dst)
    check_paths(src, dst, dtype, force, dry_run)
    if mem_dtype is not None and mem_dtype not in MEM_DTYPES:
        raise ConversionError(f"mem_dtype {mem_dtype!r} is not one of {list(MEM_DTYPES)}.")
    shard_bytes = parse_size(shard_size)
    config = build_config(src, mem_layers, last_context_length, mem_dtype, window, dtype)
    plan = make_plan(src, config, dtype)
    if dry_run:
        print(describe(plan))
        return dst

    options = dict(
        mem_layers=mem_layers, last_context_length=last_context_length, mem_dtype=mem_dtype, window=window,
        dtype=dtype, shard_size=shard_size,
    )

    def fill(out: Path) -> None:
        write_weights(plan, out, shard_bytes)
        write_side_files(plan, out)
        (out / "README.md").write_text(model_card(plan, dst, options))

    return write_atomically(dst, force, fill)


__all__ = ["ConversionError", "PRESETS", "WEIGHT_MAP", "convert", "default_mem_layers"]
