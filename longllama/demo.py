"""The demo model shipped inside the package: a small LongLLaMA trained from scratch on a CPU with our FoT trainer
(`examples/train_demo_model.py`, docs/demo_model.md), so that passkey retrieval over 100k+ tokens runs out of the box:

    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from longllama import demo_checkpoint
    >>> model = AutoModelForCausalLM.from_pretrained(demo_checkpoint())
    >>> tokenizer = AutoTokenizer.from_pretrained(demo_checkpoint())

It knows passkey-style text only (synthetic filler, named keys, copy lists); it is not a language model.
"""

import json
import shutil
from pathlib import Path

DEMO_DIR = Path(__file__).parent / "demo_model"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json")


def demo_checkpoint() -> str:
    """The directory of the bundled demo checkpoint, loadable with `AutoModelForCausalLM` / `AutoTokenizer` (and with
    `trust_remote_code=True` where the longllama package is not installed: the remote code is next to it)."""
    missing = [name for name in REQUIRED_FILES if not (DEMO_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"The demo checkpoint in {DEMO_DIR} lacks {', '.join(missing)}: this installation of longllama is "
            "incomplete. Reinstall it (pip install --force-reinstall longllama), or retrain the model with "
            "examples/train_demo_model.py --install."
        )
    return str(DEMO_DIR)


def write_checkpoint(model_dir: Path, tokenizer_dir: Path, out: Path, card: str = "",
                     last_context_length: int | None = None, mem_top_k: int | None = None) -> None:
    """Write a self-contained LongLLaMA checkpoint to `out` (replaced whole, atomically): the model of `model_dir`
    (a `longllama-train` output), the sentencepiece tokenizer of `tokenizer_dir` (named `LongLlamaTokenizer`),
    the remote-code files and a README with `card`; `last_context_length` and `mem_top_k` override the config's
    (inference settings: training never reads them)."""
    from . import modeling
    from .conversion.convert import CODE_FILES, write_tokenizer_config

    model_dir, tokenizer_dir, out = Path(model_dir), Path(tokenizer_dir), Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy2(model_dir / name, partial / name)
    config = json.loads((partial / "config.json").read_text())
    if last_context_length is not None:
        if not 0 < last_context_length <= config["max_position_embeddings"]:
            raise ValueError(f"last_context_length={last_context_length} must be in [1, the window "
                             f"{config['max_position_embeddings']}].")
        config["last_context_length"] = last_context_length
    if mem_top_k is not None:
        if mem_top_k < 1:
            raise ValueError(f"mem_top_k={mem_top_k} must be a positive number of memory keys per query.")
        config["mem_top_k"] = mem_top_k
    if last_context_length is not None or mem_top_k is not None:
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy2(tokenizer_dir / "tokenizer.model", partial / "tokenizer.model")
    write_tokenizer_config(tokenizer_dir, partial, longllama_tokenizer=True)
    code_dir = Path(modeling.__file__).parent
    for name in CODE_FILES:
        shutil.copy2(code_dir / name, partial / name)
    (partial / "README.md").write_text(card)
    for path in partial.iterdir():
        path.chmod(0o644)  # readable by everyone once installed (the trainer writes the weights owner-only)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)  # the previous checkpoint stays whole until the new one is in place
    partial.rename(out)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["DEMO_DIR", "demo_checkpoint", "write_checkpoint"]
