"""The optional compiled part of longllama: the exact top-k kernel (longllama/csrc), built at install time.

Everything else is declared in setup.cfg. Without a working C compiler the build of the kernel fails, the install
still succeeds (`optional=True`) and exact kNN search uses its torch path (longllama/search.py says so once).
"""

import platform
import sys

from setuptools import Extension, setup


def kernel(name: str, source: str, flags: tuple[str, ...] = ()) -> Extension:
    # OpenMP on Linux: the kernel then runs on the OpenMP threads of torch's own libgomp (see csrc/topk.h)
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    return Extension(
        name,
        sources=[source],
        depends=["longllama/csrc/topk.h"],
        extra_compile_args=["-O3", "-std=gnu11", *openmp, *flags],
        extra_link_args=openmp,
        optional=True,
    )


extensions = [kernel("longllama._topk", "longllama/csrc/topk.c")]
if platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32":
    extensions.append(kernel("longllama._topk_avx2", "longllama/csrc/topk_avx2.c", ("-mavx2", "-mfma")))

setup(ext_modules=extensions)
