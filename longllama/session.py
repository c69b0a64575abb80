"""Saving and loading a LongLLaMA session (`LongLlamaCache.save` / `LongLlamaCache.load`, docs/memory.md).

The checkpoint code's cache delegates both to this module, which `import longllama` plugs in
(`cache_longllama.SESSION_STORE`): sessions are files, and how files are written belongs to the package.

A saved session is a directory with two files of its own (anything else in it is the user's and is left alone):

- `memory.<16 hex>.safetensors` (the first digits of its SHA-256): every tensor of the cache (local contexts,
  unrotated local keys, memory chunks, row maps);
- `session.json`: the format version, the identity of the model (`longllama.identity`), the counters of the session,
  the layout of the memory chunks, and the name and SHA-256 of the tensors file (a corrupted or truncated file is
  refused, never half-loaded).

Saving writes the new tensors file beside the old one, then replaces `session.json` in one rename, which is the
moment the new session takes the old one's place; the old tensors file is deleted after it. At every instant the
directory holds a complete session, the old or the new. A new directory is written beside its path and renamed into
place whole. A save takes an exclusive lock on the directory and first removes what a killed save left (temporary
files, a tensors file no `session.json` names). Approximate kNN indexes are not saved: they are rebuilt from memory on
the first search.
"""

import hashlib
import json
import os
import re
import shutil
import stat
import weakref
from pathlib import Path

import torch

from .files import (
    atomic_directory, atomic_write_text, lock_directory, read_regular_file, remove_stale_partials, save_safetensors,
    unlock,
)
from .identity import decoder_of, identity_difference, model_identity
from .modeling.cache_longllama import LongLlamaCache, MemoryCacheLayer
from .modeling.memory_longllama import CHUNK_ELEMENTS, MIN_CHUNK, LayerMemory, MemoryChunk, MemorySegment

FORMAT = "longllama-session"
VERSION = 2  # 2: the model identity hashes every weight that shapes the session; versioned tensors file
SESSION_FILE = "session.json"
SESSION_FILE_LIMIT = 64 << 20  # bytes: the chunk layout of the largest sessions is far smaller
TENSORS_NAME = re.compile(r"memory\.[0-9a-f]{16}\.safetensors")
PARTIAL_TENSORS = re.compile(r"\.memory\.[0-9a-z_]+\.partial")
PARTIAL_SESSION_FILE = re.compile(r"\.session\.json\.[0-9a-z_]+\.tmp")
VERSION_1_TENSORS = "memory.safetensors"


def save_session(cache: LongLlamaCache, path: str, model=None) -> None:
    """Write `cache` to the directory `path`: a new directory, an empty one, or one holding a saved session (which the
    new one replaces in one rename; other files are left alone). Never leaves `path` without a complete session."""
    if cache.interrupted:
        raise ValueError("This session was interrupted half way through a call: it cannot be saved. Reset it first.")
    identity = _identity_to_save(cache, model)
    path = Path(os.fspath(path))
    if os.path.lexists(path) and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory: choose a directory for the session.")
    tensors, session = _session_contents(cache, identity)
    if not path.exists():
        with atomic_directory(path) as partial:  # the path appears only once the session is complete
            _write_session(partial, tensors, session, previous=None)
        return
    remove_stale_partials(path)  # a killed first save's partial directory beside it
    lock = lock_directory(path)  # one save at a time into a directory
    try:
        previous = _current_tensors_file(path)
        _remove_leftovers(path, keep=previous)
        _write_session(path, tensors, session, previous)
    finally:
        unlock(lock)


def load_session(path: str, model) -> LongLlamaCache:
    """A `LongLlamaCache` for `model` with the session saved in `path`; each layer's tensors go to its device.
    Raises `FileNotFoundError` if there is no session at `path`, `ValueError` if the session is malformed, corrupted
    or was saved from another model."""
    path = os.fspath(path)
    for attempt in range(3):  # a save into the same directory may replace the tensors file between two reads
        session = _read_session_file(path)
        identity = model_identity(model)
        difference = identity_difference(session.get("model"), identity)
        if difference is not None:
            raise ValueError(
                f"The session in {path} was saved from another model ({difference}): its memory means nothing to "
                "this model. Load it into the model that saved it (same weights, dtype and configuration), or "
                "process the document again."
            )
        try:
            tensors = _read_tensors(path, session)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    cache = LongLlamaCache(model.config)
    cache.model_fingerprint, cache.model_ref = identity, weakref.ref(decoder_of(model))
    decoder_layers = decoder_of(model).layers
    try:
        for idx, (layer, state) in enumerate(zip(cache.layers, session["layers"], strict=True)):
            device = next(decoder_layers[idx].parameters()).device
            _load_layer(layer, state, f"layers.{idx}", tensors, device)
        cache.seen_tokens = _count(session["seen_tokens"])
        cache.batch_size_ = None if session["batch_size"] is None else _count(session["batch_size"])
        if "local_valid" in tensors:
            cache.local_valid = tensors["local_valid"].to(model.device)
            cache.position_origin = tensors["position_origin"].to(model.device)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        # a session.json edited by hand (its tensors' checksum intact) that no longer matches the tensors
        raise ValueError(f"{path} does not hold a consistent LongLLaMA session ({error!r}): save it again.") from error
    return cache


def bind_model(cache: LongLlamaCache, model) -> None:
    """`cache.bind(model)`, called when a model uses a cache that is new to it: a cache that holds a session must have
    been filled by (or loaded for) a model of the same identity; an empty one simply changes hands."""
    if cache.seen_tokens > 0:
        recorded = cache.model_fingerprint
        if recorded is None:
            owner = cache.model_ref() if cache.model_ref is not None else None
            if owner is None:
                raise ValueError(
                    "This LongLlamaCache holds a session whose model no longer exists, so it cannot be checked "
                    "against this one: start a new session with cache=None, or save sessions with cache.save(path)."
                )
            recorded = model_identity(owner)
        difference = identity_difference(recorded, model_identity(model))
        if difference is not None:
            raise ValueError(
                f"This LongLlamaCache was filled by another model ({difference}): continue it with that model, or "
                "start a new session with cache=None."
            )
        cache.model_fingerprint = recorded
    else:
        cache.model_fingerprint = None


def _identity_to_save(cache: LongLlamaCache, model) -> dict:
    """The identity written with the session: the model's, which must be the cache's own when it holds a session."""
    owner = cache.model_ref() if cache.model_ref is not None else None
    if model is None and owner is None and cache.model_fingerprint is None:
        raise ValueError("This cache does not know its model: pass model= (the model that filled it).")
    if model is None:
        return cache.model_fingerprint if owner is None else model_identity(owner)
    if owner is not decoder_of(model):
        cache.bind(decoder_of(model))  # the session must be this model's
    return model_identity(model)


def _session_contents(cache: LongLlamaCache, identity: dict) -> tuple[dict, dict]:
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
        "model": identity,
        "seen_tokens": cache.seen_tokens,
        "batch_size": cache.batch_size_,
        "layers": layers,
    }
    return tensors, session


def _write_session(directory: Path, tensors: dict, session: dict, previous: str | None) -> None:
    """The tensors file under its final name, then `session.json` in one rename (the commit), then the old tensors
    file goes."""
    # a directory of our own: safetensors writes through a temporary file (`.tmpXXXXXX`) beside its target
    partial = directory / f".memory.{os.urandom(8).hex()}.partial"
    partial.mkdir()
    try:
        written = partial / "memory.safetensors"
        # the session's description travels inside the checksummed file too: an edited session.json is detected
        save_safetensors(tensors, written, metadata={"format": FORMAT, "session": json.dumps(session, sort_keys=True)})
        with open(written, "rb") as f:
            os.fsync(f.fileno())  # on disk before session.json names it
        digest = _sha256(written)
        name = f"memory.{digest[:16]}.safetensors"
        os.replace(written, directory / name)  # the same name holds the same bytes, should it exist
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    session.update(tensors=name, sha256=digest)
    try:
        atomic_write_text(directory / SESSION_FILE, json.dumps(session, indent=1))
    except BaseException:
        if name != previous:
            (directory / name).unlink(missing_ok=True)
        raise
    if previous is not None and previous != name:
        (directory / previous).unlink(missing_ok=True)


def _current_tensors_file(path: Path) -> str | None:
    """The tensors file named by the session in `path` (None if it holds none); `FileExistsError` if its
    `session.json` is not a LongLLaMA session, which save never overwrites."""
    if not os.path.lexists(path / SESSION_FILE):
        return None
    try:
        session = _session_json(str(path))
    except (OSError, ValueError) as error:
        raise FileExistsError(
            f"{path} holds a {SESSION_FILE} that is not a readable LongLLaMA session ({error}): save never overwrites "
            "other data. Choose another directory, or remove that file."
        ) from error
    name = session.get("tensors", VERSION_1_TENSORS)
    return name if isinstance(name, str) and TENSORS_NAME.fullmatch(name) else VERSION_1_TENSORS


def _remove_leftovers(path: Path, keep: str | None) -> None:
    """Remove what a killed save left in `path`: its temporary files and tensors files no session names."""
    for entry in os.scandir(path):
        if PARTIAL_TENSORS.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            continue
        ours = PARTIAL_SESSION_FILE.fullmatch(entry.name)
        orphan = TENSORS_NAME.fullmatch(entry.name) and entry.name != keep
        if (ours or orphan) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)


def _read_tensors(path: str, session: dict) -> dict:
    """The tensors of the session, after checking the tensors file against `session.json` (its SHA-256, and the copy
    of `session.json` it carries: any edit of the counters, the layout or the model identity is refused)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    name = session.get("tensors")
    if not isinstance(name, str) or not TENSORS_NAME.fullmatch(name):
        raise ValueError(f"{os.path.join(path, SESSION_FILE)} names no valid tensors file ({name!r}): save the "
                         "session again.")
    tensors_path = os.path.join(path, name)
    if not os.path.lexists(tensors_path):
        raise FileNotFoundError(f"{path} has no {name}: the saved session is incomplete.")
    if _sha256(tensors_path) != session.get("sha256"):
        raise ValueError(
            f"{tensors_path} is corrupted (its checksum differs from {SESSION_FILE}): save the session again."
        )
    try:
        with safe_open(tensors_path, framework="pt") as f:
            saved = json.loads((f.metadata() or {}).get("session", "null"))
        tensors = load_file(tensors_path)
    except (SafetensorError, ValueError) as error:
        raise ValueError(f"{tensors_path} is corrupted ({error}): save the session again.") from error
    if saved != {key: value for key, value in session.items() if key not in ("tensors", "sha256")}:
        raise ValueError(f"{os.path.join(path, SESSION_FILE)} was changed after the session was saved: save the "
                         "session again.")
    return tensors


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
        limit = max(_count(chunk_state["limit"]), valid.shape[-1])
        B, Hkv, _, D = parts[0].shape
        if limit > max(valid.shape[-1], MIN_CHUNK, CHUNK_ELEMENTS // max(1, B * Hkv * D)):
            raise ValueError(f"chunk {c} claims a capacity of {limit} entries, more than this model allocates")
        chunk = MemoryChunk(_count(chunk_state["first_id"]), limit, parts[2] is not None)
        chunk.append(*[None if x is None else x.to(memory_device) for x in parts], valid.to(memory_device))
        store.segments[_count(chunk_state["segment"])].chunks.append(chunk)
        layer.is_initialized = True
    store.next_id, store.length = _count(state["next_id"]), _count(state["length"])
    if store.length != sum(chunk.live for _, chunk in store.chunks()):
        raise ValueError("the memory chunks do not add up to the recorded memory length")


# --------------------------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------------------------


def _count(value) -> int:
    """A non-negative integer of `session.json` (below 2**62: token positions must fit int64 arithmetic)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**62:
        raise ValueError(f"{value!r} is not a count")
    return value


def _read_session_file(path: str) -> dict:
    """The `session.json` of the directory `path`, of this format version."""
    session = _session_json(path)
    if session.get("version") != VERSION:
        raise ValueError(
            f"{os.path.join(path, SESSION_FILE)} has format version {session.get('version')!r}; this LongLLaMA reads "
            f"version {VERSION} (sessions of version 1 carry a weaker model check): process the document again and "
            "save it."
        )
    return session


def _session_json(path: str) -> dict:
    """The `session.json` of the directory `path`, a LongLLaMA session file of any version."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No saved LongLLaMA session at {path} (save one with cache.save(path, model)).")
    session_path = os.path.join(path, SESSION_FILE)
    try:
        session = json.loads(read_regular_file(session_path, SESSION_FILE_LIMIT))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path} has no {SESSION_FILE}: it is not a saved LongLLaMA session.") from error
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{session_path} is corrupted ({error}): save the session again.") from error
    except OSError as error:
        raise ValueError(f"{session_path} cannot be read ({error.strerror}): save the session again.") from error
    if not isinstance(session, dict) or session.get("format") != FORMAT:
        raise ValueError(f"{session_path} is not a LongLLaMA session file.")
    return session


def _sha256(path) -> str:
    """SHA-256 of the regular file `path` (anything else, such as a device, is refused rather than read forever)."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{path} is not a regular file: save the session again.")
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["bind_model", "load_session", "save_session"]
