"""The package's compiled kernels (longllama/csrc, built at install time by setup.py) and what their callers share.

One extension module holds them all: the running top-k of exact kNN search (`search.py`) and memory attention for
decoding (`attention.py`). Two builds: `longllama._kernels_avx2` (AVX2 + FMA, imported on CPUs that have both) and the
portable `longllama._kernels`. Nothing is compiled or loaded from a writable location at run time. Without the module
(no C compiler at install time) the first use says so once and the callers use torch (same results).
"""

import os
import platform
import threading
import warnings

import torch

ENV_SWITCH = "LONGLLAMA_KERNELS"  # "0": never use the compiled kernels (silently)
# How the kernels name the stored dtypes of memory (csrc/common.h)
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
MAX_D = 512  # head_dim bound of the kernels (csrc/common.h)

_UNLOADED = object()
_module = _UNLOADED  # the extension module, None when unavailable; see `compiled`
_load_lock = threading.Lock()
_buffers = threading.local()  # per thread: reusable buffers, see `reusable_buffer`


def compiled():
    """The compiled kernels (`longllama._kernels_avx2` on CPUs with AVX2 and FMA, else `longllama._kernels`), or None
    when they are switched off or were not built; then the first call warns once."""
    global _module
    if _module is _UNLOADED:
        with _load_lock:
            if _module is _UNLOADED:
                _module = _load()
    return _module


def _load():
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return None
    try:
        if simd_available():
            from . import _kernels_avx2 as module
        else:
            from . import _kernels as module
        return module
    except ImportError as error:
        warnings.warn(
            f"LongLLaMA's compiled kernels are not installed ({error}): exact kNN search and memory attention while "
            f"decoding use their torch paths (same results, slower). They are built when the package is installed "
            f"with a C compiler (gcc or clang) and the Python headers present: pip install --force-reinstall "
            f"--no-deps longllama. Set {ENV_SWITCH}=0 to silence this warning.",
            RuntimeWarning,
            stacklevel=4,
        )
        return None


def simd_available() -> bool:
    """Whether this CPU runs the AVX2 + FMA build (x86-64 where torch detects AVX2)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def reusable_buffer(name: str, numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A buffer of `numel` elements kept between calls, one per thread, name, dtype and device (grown when too small):
    on the CPU a fresh one costs page faults on every call. The caller uses it before asking again."""
    buffers = _buffers.__dict__.setdefault("by_key", {})
    key = (name, dtype, torch.device(device))
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


__all__ = ["DTYPES", "ENV_SWITCH", "MAX_D", "compiled", "reusable_buffer", "simd_available"]
