"""Check a conversion numerically: the source and the converted checkpoint must give the same logits.

    from longllama.conversion.verify import verify
    diff = verify("./open_llama_3b", "./long_open_llama_3b")   # raises ConversionError when diff > atol

Both models are loaded in float32, one after the other (the first is freed before the second is loaded), and run on
the same seeded random token ids. The input is at most `last_context_length` tokens of the LongLLaMA side, where
LongLLaMA is exactly the source Llama model (memory is only written for tokens before the last context).
"""

import gc
import math
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from .convert import ConversionError, find_shards, read_headers, read_source_config

# Verify by default only when two fp32 copies of the model take less than this share of the available memory.
DEFAULT_MEMORY_SHARE = 0.5


def _config_fields(path: Path) -> dict:
    return read_source_config(path)  # a regular JSON object file inside `path`


def _model_type(path: Path) -> str:
    config_path = path / "config.json"
    model_type = _config_fields(path).get("model_type")
    if model_type not in ("llama", "longllama"):
        raise ConversionError(f"{config_path} has model_type {model_type!r}; only 'llama' and 'longllama' verify.")
    return model_type


def _load(path: Path):
    """A float32 model in eval mode: LongLlamaForCausalLM for a longllama checkpoint, else LlamaForCausalLM."""
    if _model_type(path) == "longllama":
        from longllama import LongLlamaForCausalLM as model_class
    else:
        model_class = LlamaForCausalLM
    try:
        model, info = model_class.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConversionError(f"cannot load {path}: {type(exc).__name__}: {exc}".replace("\n", " ")) from exc
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(map(str, info.get("mismatched_keys") or []))
    if missing:
        raise ConversionError(f"{path} lacks weight {missing[0]} ({len(missing)} missing in all).")
    if mismatched:
        raise ConversionError(f"{path} has a weight of the wrong shape: {mismatched[0]}.".replace("\n", " "))
    return model.eval()


def verify(src, dst, *, tokens: int = 32, seed: int = 0, atol: float = 1e-4) -> float:
    """Max abs difference between the logits of `src` and `dst` on one random input; raise if it exceeds `atol`.

    Args:
        src: the source checkpoint directory (model_type "llama", or "longllama": then loaded as LongLLaMA too).
        dst: the converted checkpoint (loaded as `LongLlamaForCausalLM`; a "llama" dst, e.g. the output of
            `to_llama`, is loaded as `LlamaForCausalLM`).
        tokens: input length; capped at the `last_context_length` of each side that is a LongLLaMA model.
        seed: seed of the random token ids, drawn uniformly from [3, vocab_size) (ids 0-2 are the special tokens).
        atol: largest allowed max abs logit difference.

    Returns:
        The max abs logit difference (a float). Raises `ConversionError` (one line) when it exceeds `atol`, when the
        vocabularies differ or when either checkpoint cannot be loaded completely.
    """
    src, dst = Path(src), Path(dst)
    for path in (src, dst):
        if not path.is_dir():
            raise ConversionError(f"{path} is not a directory.")
    if tokens < 1:
        raise ConversionError(f"tokens={tokens} must be at least 1.")

    # Cap the input before loading anything: the LongLLaMA side(s) equal Llama on <= last_context_length tokens.
    length = tokens
    for path in (src, dst):
        cap = _config_fields(path).get("last_context_length")
        if isinstance(cap, int) and cap >= 1:
            length = min(length, cap)

    with torch.inference_mode():
        model = _load(src)
        vocab = model.config.vocab_size
        if vocab <= 3:
            raise ConversionError(f"vocab_size {vocab} of {src} leaves no ids in [3, vocab_size) to test with.")
        ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))
        src_logits = model(ids).logits.float()
        del model  # free the source model before the converted one is loaded
        gc.collect()

        model = _load(dst)
        if model.config.vocab_size != vocab:
            raise ConversionError(f"vocab sizes differ: {src} has {vocab}, {dst} has {model.config.vocab_size}.")
        dst_logits = model(ids).logits.float()
        del model
        gc.collect()

    diff = (src_logits - dst_logits).abs().max().item()
    if not diff <= atol:  # also catches NaN
        raise ConversionError(
            f"verification failed: max abs logit difference {diff:.3g} > atol {atol:g} on {length} tokens "
            f"({src} vs {dst})."
        )
    return diff


def available_memory() -> int | None:
    """Bytes of memory available to new processes: psutil when installed, else MemAvailable of /proc/meminfo."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except OSError:
        pass
    return None


def fp32_bytes(src) -> int:
    """Size in float32 of every tensor of a checkpoint, read from the shard headers (no tensor data is read)."""
    fmt, shards = find_shards(Path(src))
    return sum(4 * math.prod(shape) for shard in shards for _, shape, _ in read_headers(shard, fmt))


def should_verify_by_default(src, dtype: str = "keep") -> bool:
    """Whether `verify` runs unless asked otherwise.

    Rule: True when 2 x (fp32 size of the weights of `src`) < 50% of the available memory (psutil's `available`
    when psutil is installed, else `MemAvailable` of /proc/meminfo). The two fp32 models are loaded one after the
    other, so this leaves room for loading overhead and activations. False when the available memory cannot be
    determined or the source cannot be read (the conversion itself reports a bad source), and False when the
    conversion casts the weights (`dtype` other than "keep" / "float32"): rounding then moves the logits by far
    more than verify's default atol, so the check would fail by design.
    """
    if dtype not in ("keep", "float32"):
        return False
    available = available_memory()
    if available is None:
        return False
    try:
        size = fp32_bytes(src)
    except (ConversionError, OSError):
        return False
    return 2 * size < DEFAULT_MEMORY_SHARE * available


__all__ = ["available_memory", "fp32_bytes", "should_verify_by_default", "verify"]
