"""Turn a LongLLaMA checkpoint back into a plain Llama checkpoint (`LlamaForCausalLM`, no remote code).

LongLLaMA stores the weights of a `LlamaForCausalLM` under the same names (memory layers add no parameters), so this
is the converter's streaming copy in reverse: config.json loses the LongLLaMA fields, the weights are copied shard by
shard (`rotary_emb.inv_freq` buffers of published checkpoints are dropped), tokenizer files and
generation_config.json are copied, code files are not. The result equals the LongLLaMA model on inputs of at most
`last_context_length` tokens; it has no memory, so longer inputs are plain (windowless) Llama attention.

    from longllama.conversion.to_llama import to_llama
    to_llama("./long_llama_3b", "./llama_3b")
"""

import json
from pathlib import Path

from transformers import LlamaConfig

from .convert import (
    SOURCE_ONLY_FIELDS,
    ConversionError,
    Plan,
    check_paths,
    config_from_dict,
    copy_generation_and_tokenizer,
    make_plan,
    parse_size,
    read_source_config,
    write_atomically,
    write_weights,
)
from longllama.modeling.configuration_longllama import LongLlamaConfig

# config.json fields that only LongLLaMA has (auto_map included), derived from the two config classes; none of them
# reaches the Llama config.
LONGLLAMA_FIELDS = tuple(sorted(set(LongLlamaConfig().to_dict()) - set(LlamaConfig().to_dict())))


def read_longllama_config(src: Path) -> dict:
    fields = read_source_config(src)
    config_path = src / "config.json"
    model_type = fields.get("model_type")
    if model_type == "llama":
        raise ConversionError(f"{src} is already a Llama checkpoint (model_type 'llama'); nothing to convert.")
    if model_type != "longllama":
        raise ConversionError(f"{config_path} has model_type {model_type!r}; only 'longllama' converts to Llama.")
    return fields


def build_configs(fields: dict, dtype: str) -> tuple[LongLlamaConfig, LlamaConfig]:
    """(LongLlamaConfig of the source, for the shape check; LlamaConfig of the output)."""
    fields = {k: v for k, v in fields.items() if k not in SOURCE_ONLY_FIELDS}
    if dtype != "keep":
        fields.pop("torch_dtype", None)
        fields["dtype"] = dtype
    source = config_from_dict(LongLlamaConfig, fields, "source")
    # Rebuild from the normalised source config (rope_theta / torch_dtype of published configs are mapped there).
    llama_fields = {k: v for k, v in source.to_dict().items() if k not in LONGLLAMA_FIELDS + SOURCE_ONLY_FIELDS}
    llama_fields["architectures"] = ["LlamaForCausalLM"]
    target = config_from_dict(LlamaConfig, llama_fields, "target")
    for name in LONGLLAMA_FIELDS:
        if hasattr(target, name):
            delattr(target, name)
    return source, target


def llama_config_json(config: LlamaConfig) -> str:
    text = config.to_json_string()
    fields = json.loads(text)
    leaked = [k for k in LONGLLAMA_FIELDS if k in fields]
    if leaked:  # defensive: the LlamaConfig must not carry LongLLaMA fields
        for name in leaked:
            fields.pop(name)
        text = json.dumps(fields, indent=2, sort_keys=True) + "\n"
    return text


def model_card(plan: Plan, src_fields: dict, dst: Path) -> str:
    return f"""---
library_name: transformers
tags:
- llama
---

# Llama export of the LongLLaMA checkpoint `{plan.src.name}`

Converted by `longllama.conversion.to_llama` from `{plan.src}` ({plan.format}, {len(plan.shards)} shard(s)).
The weights are the LongLLaMA weights unchanged; the memory fields (`mem_layers` {src_fields.get("mem_layers")},
`last_context_length` {src_fields.get("last_context_length")}) are dropped. This model has no external memory: it
gives the same outputs as the LongLLaMA model on inputs of at most `last_context_length` tokens.

## Loading

```python
from transformers import LlamaForCausalLM

model = LlamaForCausalLM.from_pretrained("{dst}")
```
"""


def to_llama(
    src,
    dst,
    *,
    dtype: str = "keep",
    shard_size: int | str = "2GB",
    force: bool = False,
    dry_run: bool = False,
) -> Path:
    """Convert the LongLLaMA checkpoint directory `src` into a plain Llama checkpoint at `dst`.

    Args:
        src: directory with config.json (model_type "longllama"; our format or the published one with
            pytorch_model.bin, `rotary_emb.inv_freq` buffers, `torch_dtype`, `rope_theta`, no `num_key_value_heads`).
        dst: output directory; must not exist unless `force`.
        dtype: "keep" or a dtype name the weights are cast to (config `dtype` follows).
        shard_size: maximum output shard size, e.g. "2GB", "500MiB" or bytes.
        force: replace an existing `dst`.
        dry_run: print the plan and the resulting config.json; write nothing.

    Returns:
        `dst` as a Path. Raises `ConversionError` with a one-line message on bad input; nothing is left at `dst` (nor
        the temporary directory next to it) when anything fails.
    """
    src, dst = Path(src), Path(dst)
    check_paths(src, dst, dtype, force, dry_run)
    shard_bytes = parse_size(shard_size)
    fields = read_longllama_config(src)
    source_config, target_config = build_configs(fields, dtype)
    plan = make_plan(src, source_config, dtype)
    config_json = llama_config_json(target_config)
    if dry_run:
        kept = [t for t in plan.tensors if t.target]
        shard_names = ", ".join(s.name for s in plan.shards)
        print(f"source: {plan.src} ({plan.format}, {len(plan.shards)} shard(s): {shard_names})")
        print(f"tensors: {len(kept)} kept, {len(plan.tensors) - len(kept)} dropped; {plan.total_bytes:,} bytes")
        print(f"config.json:\n{config_json}")
        return dst

    def fill(out: Path) -> None:
        write_weights(plan, out, shard_bytes)
        (out / "config.json").write_text(config_json)
        copy_generation_and_tokenizer(src, out, target_config, longllama_tokenizer=False)
        (out / "README.md").write_text(model_card(plan, fields, dst))

    return write_atomically(dst, force, fill)


__all__ = ["LONGLLAMA_FIELDS", "to_llama"]
