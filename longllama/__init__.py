"""LongLLaMA: the Focused Transformer (arXiv 2307.03170) on Hugging Face transformers.

`import longllama` calls `register()`: the `"longllama"` model type joins `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM`, so LongLLaMA checkpoints (ours and the published ones) load with our classes, `AutoTokenizer`
knows `LongLlamaTokenizer`, and the package's faster and optional kNN backends, its decoding kernel and static
decoding plug into the checkpoint code (`search.py`, `hnsw.py`, `attention.py`, `decoding.py`). `demo_checkpoint()` is
the directory of the bundled demo model.
"""

import importlib
import os
import sys

__version__ = "0.1.0"

# Public names, imported on first use (PEP 562 `__getattr__` below): they work even where `register()` has not run.
_PUBLIC = {
    "LongLlamaCache": ".modeling",
    "LongLlamaConfig": ".modeling",
    "LongLlamaForCausalLM": ".modeling",
    "LongLlamaModel": ".modeling",
    "LongLlamaTokenizer": ".modeling",
    "demo_checkpoint": ".demo",
}

# The console scripts (setup.cfg). Every `longllama.x` import runs this file first, and registering imports torch and
# transformers (seconds), so in these processes nothing heavy happens here: `--help` and argument errors answer at
# once, and each script's `main` calls `register()` after parsing its arguments.
CONSOLE_SCRIPTS = ("longllama-convert", "longllama-corpus", "longllama-passkey", "longllama-train")


def register() -> None:
    """Register LongLLaMA with transformers' Auto classes and plug the package into the checkpoint code: the faster
    exact search and the faiss / hnswlib backends (`INDEX_BACKENDS`), memory attention with the compiled kernel while
    decoding (`MEMORY_ATTENTION_FUNCTIONS`), saved sessions (`SESSION_STORE`), crossbatch training (`CROSS_BATCH`)
    and static decoding (`DECODE_STEP`), see docs/architecture.md. Safe to call more than once; `import longllama`
    calls it."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from . import attention, crossbatch, decoding, hnsw, search, session
    from .modeling import LongLlamaConfig, LongLlamaForCausalLM, LongLlamaModel, LongLlamaTokenizer
    from .modeling import attention_longllama, cache_longllama, modeling_longllama
    from .modeling.knn_longllama import INDEX_BACKENDS

    AutoConfig.register(LongLlamaConfig.model_type, LongLlamaConfig, exist_ok=True)
    AutoModel.register(LongLlamaConfig, LongLlamaModel, exist_ok=True)
    AutoModelForCausalLM.register(LongLlamaConfig, LongLlamaForCausalLM, exist_ok=True)
    AutoTokenizer.register(LongLlamaConfig, slow_tokenizer_class=LongLlamaTokenizer, exist_ok=True)
    INDEX_BACKENDS.update(exact=search.ExactIndex, faiss=hnsw.FaissIndex, hnswlib=hnsw.HnswlibIndex)
    attention_longllama.MEMORY_ATTENTION_FUNCTIONS["blockwise"] = attention.blockwise_memory_attention_forward
    cache_longllama.SESSION_STORE = session
    modeling_longllama.CROSS_BATCH = crossbatch
    modeling_longllama.DECODE_STEP = decoding.decode_step


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # the next lookup skips this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


def _in_console_script() -> bool:
    argv = getattr(sys, "argv", None) or [""]  # embedded interpreters may have no argv
    return os.path.basename(argv[0]).removesuffix(".exe") in CONSOLE_SCRIPTS


if not _in_console_script():
    register()

__all__ = [
    "LongLlamaCache",
    "LongLlamaConfig",
    "LongLlamaForCausalLM",
    "LongLlamaModel",
    "LongLlamaTokenizer",
    "__version__",
    "demo_checkpoint",
    "register",
]
