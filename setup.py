"""The optional compiled part of longllama: the exact top-k and decoding memory-attention kernels (longllama/csrc),
built at install time.

Everything else is declared in setup.cfg. Without a working C compiler the build of the kernels fails, the install
still succeeds (`optional=True`) and exact kNN search and memory attention use their torch paths
(longllama/kernels.py says so once).
"""

import platform
import sys

from setuptools import Extension, setup


def kernel(name: str, source: str, flags: tuple[str, ...] = ()) -> Extension:
    # OpenMP on Linux: the kernels then run on the OpenMP threads of torch's own libgomp (see csrc/common.h)
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    return Extension(
        name,
        sources=[source],
        depends=[f"longllama/csrc/{header}" for header in ("common.h", "topk.h", "attend.h", "module.h")],
        extra_compile_args=["-O3", "-std=gnu11", *openmp, *flags],
        extra_link_args=openmp,
        optional=True,
    )


extensions = [kernel("longllama._kernels", "longllama/csrc/kernels.c")]
if platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32":
    extensions.append(kernel("longllama._kernels_avx2", "longllama/csrc/kernels_avx2.c", ("-mavx2", "-mfma")))

setup(ext_modules=extensions)
