"""The demo model shipped inside the package: a small LongLLaMA trained from scratch on a CPU with our FoT trainer
(`examples/train_demo_model.py`, docs/demo_model.md), so that passkey retrieval over 100k+ tokens runs out of the box:

    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from longllama import demo_checkpoint
    >>> model = AutoModelForCausalLM.from_pretrained(demo_checkpoint())
    >>> tokenizer = AutoTokenizer.from_pretrained(demo_checkpoint())

It knows passkey-style text only (synthetic filler, named keys, copy lists); it is not a language model.
"""

import hashlib
import json
import shutil
import warnings
from pathlib import Path

from .files import atomic_directory, private_cache_dir

DEMO_DIR = Path(__file__).parent / "demo_model"  # the weights, config and tokenizer (no code: see demo_checkpoint)
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json")


def demo_checkpoint() -> str:
    """The directory of the demo checkpoint, loadable with `AutoModelForCausalLM` / `AutoTokenizer`, and with
    `trust_remote_code=True` where the longllama package is not installed (or not imported).

    The package ships the weights, config and tokenizer once (`DEMO_DIR`) and the remote code once (`modeling/`);
    the first call puts both together in the private cache (`longllama.files.private_cache_dir`, written atomically),
    in a directory named after a hash of the files, so a new version of either gets a new directory."""
    missing = [name for name in REQUIRED_FILES if not (DEMO_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"The demo checkpoint in {DEMO_DIR} lacks {', '.join(missing)}: this installation of longllama is "
            "incomplete. Reinstall it (pip install --force-reinstall longllama), or retrain the model with "
            "examples/train_demo_model.py --install."
        )
    files = sorted(p for p in DEMO_DIR.iterdir() if p.is_file()) + code_files()
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    try:
        out = private_cache_dir() / f"demo-{digest.hexdigest()[:16]}"
        if not out.is_dir():
            with atomic_directory(out) as partial:
                for path in files:
                    shutil.copy2(path, partial / path.name)
    except OSError as error:  # no writable private cache: the package's own classes still load DEMO_DIR
        warnings.warn(f"the demo checkpoint cannot be assembled in the cache ({error}); using {DEMO_DIR}, which "
                      "loads with the longllama package but not as remote code.", RuntimeWarning, stacklevel=2)
        return str(DEMO_DIR)
    return str(out)


def code_files() -> list[Path]:
    """The remote-code files a checkpoint with a sentencepiece tokenizer carries (from the modeling package)."""
    from .conversion.convert import CODE_FILES, MODELING_DIR

    return [MODELING_DIR / name for name in (*CODE_FILES, "tokenization_longllama.py")]


def write_checkpoint(model_dir: Path, tokenizer_dir: Path, out: Path, card: str = "",
                     last_context_length: int | None = None, mem_top_k: int | None = None, code: bool = True) -> None:
    """Write a LongLLaMA checkpoint to `out` (replaced whole, atomically): the model of `model_dir` (a
    `longllama-train` output), the sentencepiece tokenizer of `tokenizer_dir` (named `LongLlamaTokenizer`), the
    remote-code files (unless `code` is False: the package's own `DEMO_DIR` carries none) and a README with `card`;
    `last_context_length` and `mem_top_k` override the config's (inference settings: training never reads them)."""
    from .conversion.convert import write_tokenizer_config

    model_dir, tokenizer_dir, out = Path(model_dir), Path(tokenizer_dir), Path(out)
    config = json.loads((model_dir / "config.json").read_text())
    if last_context_length is not None:
        if not 0 < last_context_length <= config["max_position_embeddings"]:
            raise ValueError(f"last_context_length={last_context_length} must be in [1, the window "
                             f"{config['max_position_embeddings']}].")
        config["last_context_length"] = last_context_length
    if mem_top_k is not None:
        if mem_top_k < 1:
            raise ValueError(f"mem_top_k={mem_top_k} must be a positive number of memory keys per query.")
        config["mem_top_k"] = mem_top_k
    with atomic_directory(out, mode=0o755) as partial:  # the previous checkpoint stays whole until the new one is in
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy2(model_dir / name, partial / name)
        if last_context_length is not None or mem_top_k is not None:
            (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shutil.copy2(tokenizer_dir / "tokenizer.model", partial / "tokenizer.model")
        write_tokenizer_config(tokenizer_dir, partial, longllama_tokenizer=True)  # copies the tokenizer's code
        for path in code_files():
            if code:
                shutil.copy2(path, partial / path.name)
            else:
                (partial / path.name).unlink(missing_ok=True)
        (partial / "README.md").write_text(card)
        for path in partial.iterdir():
            path.chmod(0o644)  # readable by everyone once installed (the trainer writes the weights owner-only)


__all__ = ["DEMO_DIR", "code_files", "demo_checkpoint", "write_checkpoint"]
