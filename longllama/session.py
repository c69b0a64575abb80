"""Saving and loading a LongLLaMA session (`LongLlamaCache.save` / `LongLlamaCache.load`, docs/memory.md).

The checkpoint code's cache delegates both to this module, which `import longllama` plugs in
(`cache_longllama.SESSION_STORE`): sessions are files, and how files are written belongs to the package.

A saved session is a directory with two files:

- `memory.safetensors`: every tensor of the cache (local contexts, unrotated local keys, memory chunks, row maps);
- `session.json`: the format version, the model fingerprint, the counters of the session, the layout of the memory
  chunks, and the SHA-256 of `memory.safetensors` (a corrupted or truncated file is refused, never half-loaded).

The fingerprint has the fields of the model configuration that decide what keys and values mean (layer shapes,
`mem_layers`, rotary and memory settings) and a checksum of the memory layers' key and value projections, so a session
saved from one model does not load into another, even one with the same configuration. Approximate kNN indexes are
not saved: they are rebuilt from memory on the first search.
"""

import hashlib
import json
import os

import torch

from .files import atomic_directory
from .modeling.cache_longllama import LongLlamaCache, MemoryCacheLayer
from .modeling.memory_longllama import LayerMemory, MemoryChunk, MemorySegment

FORMAT = "longllama-session"
VERSION = 1
TENSORS_FILE = "memory.safetensors"
SESSION_FILE = "session.json"
# Configuration fields that decide what the stored keys and values mean.
FINGERPRINT_FIELDS = (
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
    "mem_layers",
    "mem_positionals",
    "mem_dtype",
)


def model_fingerprint(model) -> dict:
    """`{"config": {field: value}, "weights": float}`: what a session must agree on with the model it is used with."""
    config = model.config.to_dict()
    fields = {name: config.get(name) for name in FINGERPRINT_FIELDS}
    return {"config": json.loads(json.dumps(fields, default=str)), "weights": _weights_checksum(model)}


def _weights_checksum(model) -> float | None:
    """Sum of the absolute key and value projection weights of the memory layers (float64), or None on meta tensors."""
    total = 0.0
    layers = _decoder(model).layers
    for idx in model.config.mem_layers:
        attention = layers[idx].self_attn
        for weight in (attention.k_proj.weight, attention.v_proj.weight):
            if weight.is_meta:
                return None
            total += float(weight.detach().double().abs().sum())
    return total


def _decoder(model):
    """The `LongLlamaModel` of a `LongLlamaForCausalLM` (or the model itself)."""
    return getattr(model, "model", model)


def save_session(cache: LongLlamaCache, path: str, model=None) -> None:
    """Write `cache` to the directory `path` (replaced whole if it holds a saved session; never left half-written)."""
    if cache.interrupted:
        raise ValueError("This session was interrupted half way through a call: it cannot be saved. Reset it first.")
    if model is None and cache.model_fingerprint is None:
        raise ValueError("This cache does not know its model: pass model= (the model that filled it).")
    path = os.fspath(path)
    if os.path.exists(path) and not _is_session(path):
        raise FileExistsError(
            f"{path} exists and is not a saved LongLLaMA session: choose a new path (save never overwrites other data)."
        )
    tensors, layers = {}, []
    for idx, layer in enumerate(cache.layers):
        layers.append(_layer_state(layer, f"layers.{idx}", tensors))
    for name in ("local_valid", "position_origin"):
        if getattr(cache, name) is not None:
            tensors[name] = getattr(cache, name)
    tensors = {name: x.detach().contiguous().cpu() for name, x in tensors.items()}
    session = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": model_fingerprint(model) if model is not None else cache.model_fingerprint,
        "seen_tokens": cache.seen_tokens,
        "batch_size": cache.batch_size_,
        "layers": layers,
    }

    from safetensors.torch import save_file

    with atomic_directory(path) as partial:  # a previous session at `path` stays whole until the new one is in place
        save_file(tensors, os.path.join(partial, TENSORS_FILE), metadata={"format": FORMAT})
        session["sha256"] = _sha256(os.path.join(partial, TENSORS_FILE))
        with open(os.path.join(partial, SESSION_FILE), "w") as f:
            json.dump(session, f, indent=1)


def load_session(path: str, model) -> LongLlamaCache:
    """A `LongLlamaCache` for `model` with the session saved in `path`; each layer's tensors go to its device."""
    path = os.fspath(path)
    session = _read_session_file(path)
    fingerprint = model_fingerprint(model)
    _check_fingerprint(session["fingerprint"], fingerprint, path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors_path = os.path.join(path, TENSORS_FILE)
    if not os.path.isfile(tensors_path):
        raise FileNotFoundError(f"{path} has no {TENSORS_FILE}: the saved session is incomplete.")
    if _sha256(tensors_path) != session.get("sha256"):
        raise ValueError(
            f"{tensors_path} is corrupted (its checksum differs from {SESSION_FILE}): save the session again."
        )
    try:
        tensors = load_file(tensors_path)
    except SafetensorError as error:
        raise ValueError(f"{tensors_path} is corrupted ({error}): save the session again.") from error

    cache = LongLlamaCache(model.config)
    cache.model_fingerprint = fingerprint
    decoder_layers = _decoder(model).layers
    try:
        for idx, (layer, state) in enumerate(zip(cache.layers, session["layers"])):
            device = next(decoder_layers[idx].parameters()).device
            _load_layer(layer, state, f"layers.{idx}", tensors, device)
        cache.seen_tokens = int(session["seen_tokens"])
        cache.batch_size_ = session["batch_size"]
        if "local_valid" in tensors:
            cache.local_valid = tensors["local_valid"].to(model.device)
            cache.position_origin = tensors["position_origin"].to(model.device)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        # a session.json edited by hand (its tensors' checksum intact) that no longer matches the tensors
        raise ValueError(f"{path} does not hold a consistent LongLLaMA session ({error!r}): save it again.") from error
    return cache


# --------------------------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------------------------


def _layer_state(layer, prefix: str, tensors: dict) -> dict:
    """Put the layer's tensors in `tensors` under `prefix`; return what `session.json` records about it."""
    for name, buffer in (("keys", layer._keys), ("values", layer._values)):
        if buffer.length > 0:
            tensors[f"{prefix}.{name}"] = buffer.view()
    if not isinstance(layer, MemoryCacheLayer):
        return {}
    if layer._raw_keys.length > 0:
        tensors[f"{prefix}.raw_keys"] = layer._raw_keys.view()
    store = layer.memory_store
    segments, chunks = [], []
    for s, segment in enumerate(store.segments):
        if segment.rows is not None:
            tensors[f"{prefix}.segments.{s}.rows"] = segment.rows
        segments.append({"rows": segment.rows is not None})
        for chunk in segment.chunks:
            if chunk.live == 0:
                continue
            c = len(chunks)
            for name in MemoryChunk.BUFFERS:
                if getattr(chunk, name) is not None:
                    tensors[f"{prefix}.chunks.{c}.{name}"] = chunk.view(name)
            chunks.append({"segment": s, "first_id": chunk.first_id + chunk.start, "limit": chunk.limit})
    return {"segments": segments, "chunks": chunks, "next_id": store.next_id, "length": store.length}


def _load_layer(layer, state: dict, prefix: str, tensors: dict, device: torch.device) -> None:
    if f"{prefix}.keys" in tensors:
        layer.lazy_initialization(tensors[f"{prefix}.keys"], None)
        layer._keys.append(tensors[f"{prefix}.keys"].to(device))
        layer._values.append(tensors[f"{prefix}.values"].to(device))
    if not isinstance(layer, MemoryCacheLayer):
        return
    if f"{prefix}.raw_keys" in tensors:
        layer._raw_keys.append(tensors[f"{prefix}.raw_keys"].to(device))
    store: LayerMemory = layer.memory_store
    memory_device = store.device or device
    store.segments = []
    store.version += 1  # readers that cached the old layout read it again
    for s, segment_state in enumerate(state["segments"]):
        rows = tensors[f"{prefix}.segments.{s}.rows"].to(memory_device) if segment_state["rows"] else None
        store.segments.append(MemorySegment(rows))
    for c, chunk_state in enumerate(state["chunks"]):
        *parts, valid = [tensors.get(f"{prefix}.chunks.{c}.{name}") for name in MemoryChunk.BUFFERS]
        if valid is None:
            raise KeyError(f"{prefix}.chunks.{c}.valid")
        if parts[0].dtype != store.storage_dtype:
            raise ValueError(f"memory stored as {parts[0].dtype}, but this model stores {store.storage_dtype}")
        # the same chunk size as when saved: same allocation, same strides, the same arithmetic afterwards
        limit = max(int(chunk_state["limit"]), valid.shape[-1])
        chunk = MemoryChunk(int(chunk_state["first_id"]), limit, parts[2] is not None)
        chunk.append(*[None if x is None else x.to(memory_device) for x in parts], valid.to(memory_device))
        store.segments[chunk_state["segment"]].chunks.append(chunk)
        layer.is_initialized = True
    store.next_id, store.length = int(state["next_id"]), int(state["length"])
    if store.length != sum(chunk.live for _, chunk in store.chunks()):
        raise ValueError("the memory chunks do not add up to the recorded memory length")


# --------------------------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------------------------


def _is_session(path: str) -> bool:
    try:
        with open(os.path.join(path, SESSION_FILE)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _read_session_file(path: str) -> dict:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No saved LongLLaMA session at {path} (save one with cache.save(path, model)).")
    session_path = os.path.join(path, SESSION_FILE)
    try:
        with open(session_path) as f:
            session = json.load(f)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path} has no {SESSION_FILE}: it is not a saved LongLLaMA session.") from error
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{session_path} is corrupted ({error}): save the session again.") from error
    if not isinstance(session, dict) or session.get("format") != FORMAT:
        raise ValueError(f"{session_path} is not a LongLLaMA session file.")
    if session.get("version") != VERSION:
        raise ValueError(
            f"{session_path} has format version {session.get('version')}; this LongLLaMA reads version {VERSION}."
        )
    return session


def _check_fingerprint(saved: dict, current: dict, path: str) -> None:
    differences = {
        name: (saved["config"].get(name), value)
        for name, value in current["config"].items()
        if saved["config"].get(name) != value
    }
    if differences:
        listed = ", ".join(f"{name}: saved {old!r}, this model {new!r}" for name, (old, new) in differences.items())
        raise ValueError(
            f"The session in {path} was saved from a model with another configuration ({listed}); its memory means "
            "nothing to this model. Load it into the model that saved it, or process the document again."
        )
    old, new = saved.get("weights"), current.get("weights")
    if old is not None and new is not None and abs(old - new) > 1e-5 * max(abs(old), abs(new), 1.0):
        raise ValueError(
            f"The session in {path} was saved from a model with the same configuration but other weights (memory-"
            f"layer checksum {old:.6g}, this model {new:.6g}): load it into the model that saved it."
        )


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["load_session", "model_fingerprint", "save_session"]
