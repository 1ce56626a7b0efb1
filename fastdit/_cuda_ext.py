"""The optional CUDA C++ extension `fastdit._C`.

A missing extension never breaks `import fastdit`: `status()` says why it is unavailable and the
ops fall back to their other backends. `load_jit()` builds it just-in-time from `csrc/` with
torch.utils.cpp_extension.load, for development without reinstalling.
"""
from __future__ import annotations

import functools
import glob
import os
from typing import Tuple

_REPO_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


_JIT_MODULE = None  # set by load_jit(): the same ops (torch.ops.fastdit_C.*), built in place


@functools.lru_cache(maxsize=None)
def _import() -> Tuple[object, str]:
    if _JIT_MODULE is not None:
        return _JIT_MODULE, ""
    try:
        from fastdit import _C  # noqa: F401
    except ImportError:
        return None, ("fastdit._C is not built (reinstall with FASTDIT_BUILD_CUDA=1 "
                      "pip install --no-build-isolation -e .)")
    return _C, ""


def status() -> Tuple[bool, str]:
    import torch

    module, why = _import()
    if module is None:
        return False, why
    if not torch.cuda.is_available():
        return False, "fastdit._C is built but no CUDA GPU is visible"
    return True, ""


def built() -> bool:
    return _import()[0] is not None


def sources():
    files = glob.glob(os.path.join(_REPO_CSRC, "**", "*.cu"), recursive=True)
    files += glob.glob(os.path.join(_REPO_CSRC, "**", "*.cpp"), recursive=True)
    return sorted(files)


def load_jit(verbose: bool = False, archs: str = None, build_directory: str = None):
    """Builds and loads the extension from the checkout's csrc/ (development use); afterwards the
    "cuda" backend uses it. `archs` defaults to FASTDIT_CUDA_ARCHS or "8.0;8.9;9.0a"."""
    from torch.utils.cpp_extension import load

    srcs = sources()
    if not srcs:
        raise RuntimeError(f"no CUDA sources under {_REPO_CSRC}")
    archs = archs or os.environ.get("FASTDIT_CUDA_ARCHS", "8.0;8.9;9.0a")
    flags = [f"-gencode=arch=compute_{a.replace('.', '')},code=sm_{a.replace('.', '')}"
             for a in archs.split(";") if a]
    global _JIT_MODULE
    module = load(name="fastdit_C_jit", sources=srcs, extra_include_paths=[_REPO_CSRC],
                  build_directory=build_directory,
                  extra_cflags=["-O3", "-std=c++20"],  # torch >= 2.13 headers need C++20
                  extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo"] + flags, verbose=verbose)
    _JIT_MODULE = module
    _import.cache_clear()
    return module
