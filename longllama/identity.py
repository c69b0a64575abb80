"""The identity of a model, as far as a session is concerned (docs/memory.md#identity).

A session holds keys and values the model computed: the memory of the memory layers and the local context of every
layer. What they mean depends on the embeddings and on every decoder layer (the keys of layer i depend on layers 0 to
i - 1 whole and on its own projections), on the dtype they were computed in, and on the configuration fields that lay
the memory out. The identity is exactly that:

- `config`: those configuration fields (`IDENTITY_FIELDS`);
- `dtype`: the dtype(s) of the parameters;
- `parts`: one SHA-256 per part, `"embeddings"` and `"layer 0"`, `"layer 1"`, ..., over the name, dtype, shape and
  bytes of each of its parameters (the final norm and the LM head shape no stored key or value and are left out).

Hashing reads every byte of those weights (about 1.9 GB/s per core here), so each model's identity is computed once
and kept in a weak dictionary keyed by the model, together with a cheap key made of its parameters' storage addresses
and version counters: whatever changes a parameter in place through torch (optimizer steps, `load_state_dict`, `copy_`
under `no_grad`) bumps its version counter, and the next use hashes again. Writes through `.data` bypass the counter:
after them call `forget_identity(model)`.
"""

import hashlib
import json
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch

# Configuration fields that decide what the stored keys and values mean.
IDENTITY_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "max_position_embeddings",
    "attention_bias",
    "mlp_bias",
    "mem_layers",
    "mem_positionals",
    "mem_dtype",
)

_IDENTITIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # decoder -> (key, identity)
_LOCK = threading.Lock()


def model_identity(model) -> dict:
    """`{"config": {field: value}, "dtype": str, "parts": {part: sha256 hex}}` of `model` (a `LongLlamaModel` or
    `LongLlamaForCausalLM`), computed once and reused while its parameters are unchanged."""
    decoder = decoder_of(model)
    parts = _parts(decoder)
    key = (_config_fields(decoder.config), tuple((p.data_ptr(), p._version) for _, _, p in _parameters(parts)))
    with _LOCK:
        cached = _IDENTITIES.get(decoder)
        if cached is not None and cached[0] == key:
            return cached[1]
        identity = {
            "config": json.loads(key[0]),
            "dtype": ",".join(sorted({str(p.dtype).removeprefix("torch.") for _, _, p in _parameters(parts)})),
            "parts": _hash_parts(parts),
        }
        _IDENTITIES[decoder] = (key, identity)
        return identity


def forget_identity(model) -> None:
    """Drop the kept identity of `model` (after changing its weights through `.data`, which torch does not count)."""
    with _LOCK:
        _IDENTITIES.pop(decoder_of(model), None)


def identity_difference(saved: dict, current: dict) -> str | None:
    """What differs between two identities, in words (None when they are the same): the configuration fields, else
    the dtype, else the parts whose weights differ."""
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), dict) for k in ("config", "parts")):
        return "the saved model identity is malformed"
    fields = [
        f"{name}: saved {saved['config'].get(name)!r}, this model {value!r}"
        for name, value in current["config"].items()
        if saved["config"].get(name) != value
    ]
    if fields:
        return "configuration " + "; ".join(fields)
    if saved.get("dtype") != current["dtype"]:
        return f"dtype: saved {saved.get('dtype')}, this model {current['dtype']}"
    differing = [part for part, digest in current["parts"].items() if saved["parts"].get(part) != digest]
    if not differing:
        return None
    layers = [part.split()[1] for part in differing if part.startswith("layer ")]
    named = (["embeddings"] if "embeddings" in differing else []) + (
        [("weights of layer " if len(layers) == 1 else "weights of layers ") + ", ".join(layers)] if layers else []
    )
    return " and ".join(named) + " differ"


def decoder_of(model):
    """The `LongLlamaModel` of a `LongLlamaForCausalLM` (or the model itself)."""
    return getattr(model, "model", model)


def _parts(decoder) -> dict[str, torch.nn.Module]:
    parts = {"embeddings": decoder.embed_tokens}
    parts.update({f"layer {idx}": layer for idx, layer in enumerate(decoder.layers)})
    return parts


def _parameters(parts: dict):
    """(part, name, parameter) of every parameter, in a fixed order."""
    for part, module in parts.items():
        for name, param in module.named_parameters():
            yield part, name, param


def _config_fields(config) -> str:
    values = config.to_dict()
    return json.dumps({name: values.get(name) for name in IDENTITY_FIELDS}, sort_keys=True, default=str)


def _hash_parts(parts: dict) -> dict[str, str]:
    """SHA-256 of every part; parts are hashed on several threads (hashlib releases the GIL on large buffers)."""
    workers = max(1, min(len(parts), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(parts, pool.map(_hash_module, parts.values())))


def _hash_module(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for owner_name, owner in module.named_modules():
        for name, param in owner.named_parameters(recurse=False):
            tensor = _materialized(owner, name, param)
            full_name = f"{owner_name}.{name}" if owner_name else name
            digest.update(f"{full_name}:{str(tensor.dtype)}:{list(tensor.shape)};".encode())
            digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _materialized(owner: torch.nn.Module, name: str, param: torch.Tensor) -> torch.Tensor:
    """The weights of `param`; for a parameter offloaded by accelerate (`device_map` with "disk" or "cpu" offload,
    left on the meta device) the offloaded copy its hook loads before each forward."""
    if not param.is_meta:
        return param
    weights_map = getattr(getattr(owner, "_hf_hook", None), "weights_map", None)
    if weights_map is None:
        raise ValueError(
            f"The parameter {name} is on the meta device (not loaded): a session cannot be tied to a model whose "
            "weights are not there. Load the model fully, or with accelerate's device_map offloading."
        )
    return weights_map[name]


__all__ = ["IDENTITY_FIELDS", "decoder_of", "forget_identity", "identity_difference", "model_identity"]
